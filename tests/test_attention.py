"""The attention implementations against plain softmax attention; the default choice."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import pdeformer as pf
from helpers import tree_allclose
from pdeformer.operators.attention import attention, choose_implementation

SEQ, HEADS, HEAD_DIM = 13, 2, 4


def _plain_attention(q, k, v, mask):
    """Softmax attention written out per head, pads at -inf (rows need one valid key)."""
    outs = []
    for n in range(q.shape[1]):
        logits = q[:, n] @ k[:, n].T / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
        if mask is not None:
            logits = jnp.where(mask[None, :], logits, -jnp.inf)
        p = jnp.exp(logits - logits.max(-1, keepdims=True))
        outs.append((p / p.sum(-1, keepdims=True)) @ v[:, n])
    return jnp.stack(outs, axis=1)


def _inputs(key, dtype, mask_kind):
    kq, kk, kv, kg, km = jr.split(key, 5)
    shape = (SEQ, HEADS, HEAD_DIM)
    q, k, v, g = (2.0 * jr.normal(x, shape, dtype) for x in (kq, kk, kv, kg))
    if mask_kind is None:
        mask = None
    elif mask_kind == "prefix":
        mask = jnp.arange(SEQ) < 9
    else:  # scattered, with at least one valid key
        mask = jr.bernoulli(km, 0.5, (SEQ,)).at[3].set(True)
    return q, k, v, g, mask


def _value_and_vjp(fn, q, k, v, g, mask):
    out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
    return out, pullback(g)


IMPLEMENTATIONS = [
    ("blockwise", 1),
    ("blockwise", 4),  # does not divide SEQ: the last block is padded
    ("blockwise", 13),  # one block
    ("blockwise", 64),
    ("einsum", 128),
    ("xla", 128),
]


def _attention_cases():
    """float64 with every mask; float32 (whose tolerance is the question) with the scattered
    mask. Block size 1 (a loop of one-row blocks, the costliest to compile) in float64 with
    the scattered mask only. The other combinations are in the slow tier."""
    for implementation, block_size in IMPLEMENTATIONS:
        for dtype, mask_kind in [
            *((jnp.float64, m) for m in (None, "prefix", "scattered")),
            *((jnp.float32, m) for m in ("scattered", None, "prefix")),
        ]:
            if block_size == 1:
                default = dtype == jnp.float64 and mask_kind == "scattered"
            else:
                default = mask_kind == "scattered" or dtype == jnp.float64
            marks = () if default else (pytest.mark.slow,)
            yield pytest.param(implementation, block_size, dtype, mask_kind, marks=marks)


@pytest.mark.parametrize("implementation,block_size,dtype,mask_kind", list(_attention_cases()))
def test_values_and_gradients_equal_plain_attention(
    getkey, implementation, block_size, dtype, mask_kind
):
    with jax.enable_x64(dtype == jnp.float64):
        q, k, v, g, mask = _inputs(getkey(), dtype, mask_kind)

        def fn(q, k, v, mask):
            return attention(q, k, v, mask, implementation=implementation, block_size=block_size)

        out, grads = _value_and_vjp(fn, q, k, v, g, mask)
        ref_out, ref_grads = _value_and_vjp(_plain_attention, q, k, v, g, mask)
        assert out.dtype == dtype and all(x.dtype == dtype for x in grads)
        for x, ref in zip((out, *grads), (ref_out, *ref_grads), strict=True):
            assert tree_allclose(x, ref, **_normwise_tolerance(ref))


def _normwise_tolerance(ref) -> dict:
    """float32 round-off in attention's gradients scales with their largest entry, not with
    each entry: logits here spread by about 4 and gradients reach about 10, so an entry near
    zero can differ by ~1e-5 between two correct summation orders. Measured over 300 seeds x
    3 masks x every implementation: max |diff| / max |ref| <= 4.4e-6; allowed: 2e-5."""
    if ref.dtype != jnp.float32:
        return {}
    return dict(rtol=0.0, atol=2e-5 * float(jnp.max(jnp.abs(ref))))


@pytest.mark.parametrize("implementation", ["blockwise", "einsum", "xla"])
def test_padded_keys_get_no_weight(getkey, implementation):
    with jax.enable_x64(True):
        q, k, v, _, mask = _inputs(getkey(), jnp.float64, "scattered")
        noise_k, noise_v = (jr.normal(getkey(), k.shape, k.dtype) for _ in range(2))
        pads = ~mask[:, None, None]
        k2, v2 = jnp.where(pads, 1e3 * noise_k, k), jnp.where(pads, noise_v, v)
        fn = lambda k, v: attention(q, k, v, mask, implementation=implementation, block_size=4)
        np.testing.assert_array_equal(fn(k, v), fn(k2, v2))
        # ... and receive zero gradient.
        _, pullback = jax.vjp(fn, k, v)
        dk, dv = pullback(jnp.ones_like(q))
        assert np.all(np.asarray(dk)[~np.asarray(mask)] == 0)
        assert np.all(np.asarray(dv)[~np.asarray(mask)] == 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("implementation", ["blockwise", "einsum", "xla"])
def test_all_keys_padded_gives_uniform_weights_not_nan(getkey, dtype, implementation):
    # What jax.nn.dot_product_attention (the previous float32 path) returns: a finite mask
    # value, so every weight is equal.
    with jax.enable_x64(dtype == jnp.float64):
        q, k, v, g, _ = _inputs(getkey(), dtype, None)
        mask = jnp.zeros((SEQ,), bool)
        fn = lambda q, k, v: attention(q, k, v, mask, implementation=implementation, block_size=5)
        out, pullback = jax.vjp(fn, q, k, v)
        grads = pullback(g)
        assert all(np.all(np.isfinite(x)) for x in (out, *grads))
        expected = jnp.broadcast_to(v.mean(axis=0), out.shape)
        assert tree_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "platform,dtype,seq,head_dim,masked,expected",
    [
        ("gpu", jnp.bfloat16, 512, 32, False, "cudnn"),
        ("cuda", jnp.float16, 512, 64, True, "cudnn"),
        ("gpu", jnp.bfloat16, 512, 128, True, "cudnn"),
        ("gpu", jnp.bfloat16, 511, 32, True, "xla"),  # masked: cuDNN needs an even length
        ("gpu", jnp.bfloat16, 511, 32, False, "cudnn"),
        ("gpu", jnp.bfloat16, 512, 12, False, "xla"),  # head dim not a multiple of 8
        ("gpu", jnp.bfloat16, 512, 256, False, "xla"),  # above 128
        ("gpu", jnp.float32, 512, 32, False, "xla"),
        ("gpu", jnp.float64, 512, 32, True, "einsum"),
        ("cpu", jnp.float32, 512, 32, True, "blockwise"),
        ("cpu", jnp.float64, 7, 3, False, "blockwise"),
        ("cpu", jnp.bfloat16, 512, 32, False, "einsum"),
        ("cpu", jnp.float16, 512, 32, False, "einsum"),
        ("rocm", jnp.bfloat16, 512, 32, False, "xla"),
        ("tpu", jnp.float32, 512, 32, False, "xla"),
        ("tpu", jnp.float64, 512, 32, False, "einsum"),
    ],
)
def test_choose_implementation(platform, dtype, seq, head_dim, masked, expected):
    assert choose_implementation(platform, dtype, seq, head_dim, masked) == expected


def test_default_on_this_machine_is_chosen_by_platform(getkey):
    q, k, v, g, mask = _inputs(getkey(), jnp.float32, "prefix")
    chosen = choose_implementation(jax.default_backend(), q.dtype, SEQ, HEAD_DIM, True)
    default = attention(q, k, v, mask)
    np.testing.assert_array_equal(default, attention(q, k, v, mask, implementation=chosen))


def test_module_default_matches_xla(getkey):
    attn_default = pf.MultiHeadAttention(8, 2, key=jr.PRNGKey(0))
    attn_xla = pf.MultiHeadAttention(8, 2, key=jr.PRNGKey(0), implementation="xla")
    u = jr.normal(getkey(), (SEQ, 8))
    mask = jnp.arange(SEQ) < 10
    assert tree_allclose(attn_default(u, mask), attn_xla(u, mask))


@pytest.mark.parametrize("bad", ["flash", "XLA", "cudnn "])
def test_unknown_implementation_is_refused(bad):
    match = f"Unknown attention implementation '{bad}'. Pass one of 'xla', 'cudnn'"
    with pytest.raises(ValueError, match=match):
        pf.MultiHeadAttention(8, 2, key=jr.PRNGKey(0), implementation=bad)
    q = jnp.zeros((SEQ, HEADS, HEAD_DIM))
    with pytest.raises(ValueError, match=match):
        attention(q, q, q, implementation=bad)


def test_block_size_below_one_is_refused():
    with pytest.raises(ValueError, match="needs block_size >= 1; got 0"):
        pf.MultiHeadAttention(8, 2, key=jr.PRNGKey(0), block_size=0)


def test_field_passes_its_block_size_to_attention(getkey):
    """`Field(attention_block_size=...)` reaches every block's attention, and the blockwise
    result does not depend on it (float64: exact up to round-off)."""
    with jax.enable_x64(True):
        key = getkey()
        kw = dict(key=key, attention_implementation="blockwise", dtype=jnp.float64)
        fields = [pf.Field(8, 2, 2, attention_block_size=b, **kw) for b in (3, 128)]
        assert fields[0].blocks.attention.block_size == 3
        assert fields[1].blocks.attention.block_size == 128
        u = jr.normal(getkey(), (SEQ, 8), jnp.float64)
        mask = jnp.arange(SEQ) < 7
        rate = eqx.filter_jit(lambda f: f(jnp.asarray(0.25), u, mask))  # not op by op
        rates = [rate(f) for f in fields]
        assert jnp.allclose(rates[0], rates[1], rtol=1e-12, atol=1e-12)
        assert not jnp.allclose(rates[0], 0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_module_gradients_equal_einsum_module(getkey, dtype):
    # The blockwise module under `jax.vmap` (its own backward, batched by JAX) and called on
    # the batch directly (its loops over pairs of the whole batch) against plain autodiff.
    with jax.enable_x64(dtype == jnp.float64):
        key, u_key = getkey(), getkey()
        modules = [
            pf.MultiHeadAttention(8, 2, key=key, implementation=i, block_size=4, dtype=dtype)
            for i in ("blockwise", "einsum")
        ]
        u = jr.normal(u_key, (2, SEQ, 8), dtype)
        mask = jnp.arange(SEQ)[None, :] < jnp.array([[SEQ], [7]])

        def loss(module, u):
            return jnp.sum(jnp.sin(jax.vmap(module)(u, mask)))

        def loss_batched(module, u):
            return jnp.sum(jnp.sin(module(u, mask)))

        # Compiled whole: op by op, the blockwise loops dispatch (and compile) every primitive.
        grads = [eqx.filter_jit(jax.grad(loss, argnums=(0, 1)))(m, u) for m in modules]
        grads.append(eqx.filter_jit(jax.grad(loss_batched, argnums=(0, 1)))(modules[0], u))
        # Weight gradients sum over 26 tokens of size-20 terms: float32 round-off ~1e-5.
        tol = {} if dtype == jnp.float64 else dict(rtol=1e-5, atol=1e-4)
        # Leaves only: the two modules differ in a static field, hence in tree structure.
        assert tree_allclose(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), **tol)
        assert tree_allclose(jax.tree.leaves(grads[2]), jax.tree.leaves(grads[1]), **tol)


@pytest.mark.parametrize("batch", [(), (1,), (3,), (2, 3)])
def test_batched_blockwise_attention_equals_einsum(getkey, batch, monkeypatch):
    """Leading batch axes, with the grouping of (sequence, head) pairs forced small so that
    several groups, group sizes above one and padded query blocks are all exercised."""
    from pdeformer.operators import attention as att

    monkeypatch.setattr(att, "_BLOCK_BYTES", 2 * 4 * SEQ * 8)  # two pairs of 4-row blocks
    with jax.enable_x64(True):
        q, k, v = (jr.normal(getkey(), (*batch, SEQ, 2, 3), jnp.float64) for _ in range(3))
        lengths = jr.randint(getkey(), batch, 1, SEQ + 1)
        mask = jnp.arange(SEQ) < lengths[..., None]

        def loss(implementation, q, k, v):
            out = attention(q, k, v, mask, implementation=implementation, block_size=4)
            return jnp.sum(jnp.sin(out))

        # Compiled whole: op by op, the blockwise loops dispatch (and compile) every primitive.
        def value_and_grad(implementation):
            f = jax.value_and_grad(functools.partial(loss, implementation), argnums=(0, 1, 2))
            return jax.jit(f)(q, k, v)

        ref = value_and_grad("einsum")
        got = value_and_grad("blockwise")
        assert tree_allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_blocking_rule():
    from pdeformer.operators.attention import _blocking

    # About 8 MiB of logits per block, at least two groups, a divisor of the pairs.
    assert _blocking(32, 512, 512, 4) == (8, 512)
    assert _blocking(32, 256, 512, 4) == (16, 256)
    assert _blocking(32, 4096, 512, 4) == (1, 512)
    assert _blocking(7, 64, 512, 4) == (1, 64)
    assert _blocking(1, 64, 512, 4) == (1, 64)
    assert _blocking(12, 100, 16, 8) == (6, 16)


def test_attention_refuses_mismatched_shapes():
    # The check itself (the test suite's jaxtyping hook would refuse these calls first).
    from pdeformer.operators.attention import _check_attention_shapes

    q = jnp.zeros((2, SEQ, 2, 3))
    with pytest.raises(ValueError, match="of one shape"):
        _check_attention_shapes(q, q[0], q, None)
    with pytest.raises(ValueError, match=r"mask of shape \(2, 13\)"):
        _check_attention_shapes(q, q, q, jnp.ones((SEQ,), bool))


def test_einsum_supports_forward_mode(getkey):
    module = pf.MultiHeadAttention(8, 2, key=getkey(), implementation="einsum")
    u, t = jr.normal(getkey(), (SEQ, 8)), jr.normal(getkey(), (SEQ, 8))
    _, tangent = jax.jvp(module, (u,), (t,))
    _, pullback = jax.vjp(module, u)
    # <J t, c> = <t, J^T c> for a random cotangent c.
    c = jr.normal(getkey(), (SEQ, 8))
    (jt_c,) = pullback(c)
    np.testing.assert_allclose(jnp.vdot(tangent, c), jnp.vdot(t, jt_c), rtol=1e-4)
