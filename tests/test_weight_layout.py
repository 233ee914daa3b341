"""The weight layouts the docstrings promise, checked against an independent reference.

A user mapping a PyTorch `nn.MultiheadAttention` / `nn.Linear` or a Flax model onto the
library relies on these: `qkv_weight` is PyTorch's `in_proj_weight` transposed (columns
q|k|v, head-major inside each), `Reaction` computes `act(u @ w1 + b1) @ w2 + b2`, the mask is
`True` on real tokens, padded positions are carried unchanged, and the default GELU is the
tanh approximation.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import pdeformer as pf


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def _torch_attention(x, in_proj_weight, in_proj_bias, out_weight, out_bias, heads, pad):
    """PyTorch's multi-head attention for one sequence, in numpy (`key_padding_mask=pad`)."""
    seq, dim = x.shape
    d = dim // heads
    qkv = x @ in_proj_weight.T + in_proj_bias  # nn.Linear: x W^T + b, rows of W are q|k|v
    q, k, v = (qkv[:, i * dim : (i + 1) * dim].reshape(seq, heads, d) for i in range(3))
    logits = np.einsum("thd,shd->hts", q, k) / np.sqrt(d)
    logits = np.where(pad[None, None, :], -np.inf, logits)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    out = np.einsum("hts,shd->thd", w, v).reshape(seq, dim)
    return out @ out_weight.T + out_bias


def test_qkv_weight_is_pytorch_in_proj_weight_transposed_and_mask_is_true_on_tokens():
    dim, heads, seq = 8, 2, 5
    rng = np.random.default_rng(0)
    in_w, in_b = rng.normal(size=(3 * dim, dim)), rng.normal(size=3 * dim)
    out_w, out_b = rng.normal(size=(dim, dim)), rng.normal(size=dim)
    x = rng.normal(size=(seq, dim))
    pad = np.array([False, False, False, True, True])  # PyTorch: True marks padding
    mha = pf.MultiHeadAttention(
        dim, heads, key=jr.PRNGKey(0), implementation="einsum", dtype=jnp.float64
    )
    weights = lambda m: (m.qkv_weight, m.qkv_bias, m.out_weight, m.out_bias)  # noqa: E731
    mha = eqx.tree_at(weights, mha, tuple(jnp.asarray(a) for a in (in_w.T, in_b, out_w.T, out_b)))
    ours = mha(jnp.asarray(x), jnp.asarray(~pad))  # the library's mask: True on real tokens
    np.testing.assert_allclose(
        ours, _torch_attention(x, in_w, in_b, out_w, out_b, heads, pad), rtol=1e-10
    )


def test_reaction_multiplies_from_the_right_with_tanh_gelu_by_default():
    reaction = pf.Reaction(4, 6, key=jr.PRNGKey(1), dtype=jnp.float64)
    u = jr.normal(jr.PRNGKey(2), (3, 4), jnp.float64)
    hidden = u @ reaction.w1 + reaction.b1
    tanh_gelu = 0.5 * hidden * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (hidden + 0.044715 * hidden**3)))
    np.testing.assert_allclose(reaction(u), tanh_gelu @ reaction.w2 + reaction.b2, rtol=1e-12)
    exact = functools.partial(jax.nn.gelu, approximate=False)
    exact_reaction = pf.Reaction(4, 6, key=jr.PRNGKey(1), activation=exact, dtype=jnp.float64)
    erf_gelu = 0.5 * hidden * (1 + jax.scipy.special.erf(hidden / np.sqrt(2)))
    np.testing.assert_allclose(exact_reaction(u), erf_gelu @ reaction.w2 + reaction.b2, rtol=1e-12)
    assert not np.allclose(reaction(u), exact_reaction(u), rtol=1e-9, atol=0)


def test_padded_positions_are_carried_unchanged():
    field = pf.Field(8, 2, 2, key=jr.PRNGKey(3), dtype=jnp.float64)
    u0 = jr.normal(jr.PRNGKey(4), (2, 5, 8), jnp.float64)
    mask = jnp.array([[True] * 5, [True, True, True, False, False]])
    solve = eqx.filter_jit(lambda d, f: d(f, u0, mask).u)  # not op by op
    for depth in (pf.Discrete(), pf.Continuous()):
        u = solve(depth, field)
        np.testing.assert_array_equal(u[1, 3:], u0[1, 3:])
        assert not np.allclose(u[1, :3], u0[1, :3])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_initial_weights_are_the_documented_uniform_draws(dtype):
    # Drawn in one batched program, yet each matrix is exactly `jr.uniform` of its own key
    # (the i-th of `jr.split(key)`) at its own shape, bounds +-1/sqrt(fan_in).
    key = jr.PRNGKey(7)
    k1, k2 = jr.split(key)
    lim = lambda fan_in: 1.0 / np.sqrt(fan_in)
    attn = pf.MultiHeadAttention(4, 2, key=key, dtype=dtype)
    reaction = pf.Reaction(4, 6, key=key, dtype=dtype)
    expected = [
        (attn.qkv_weight, jr.uniform(k1, (4, 12), dtype, -lim(4), lim(4))),
        (attn.out_weight, jr.uniform(k2, (4, 4), dtype, -lim(4), lim(4))),
        (reaction.w1, jr.uniform(k1, (4, 6), dtype, -lim(4), lim(4))),
        (reaction.w2, jr.uniform(k2, (6, 4), dtype, -lim(6), lim(6))),
    ]
    for ours, draw in expected:
        assert ours.dtype == dtype
        np.testing.assert_array_equal(ours, draw)
