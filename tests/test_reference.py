"""Discrete mode equals a plainly written pre-LN Transformer built from the same weights.

The reference below shares no code with the library: softmax, LayerNorm, GELU and the
layer loop are written out by hand over the raw weight arrays.
"""

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import pdeformer as pf
from helpers import max_abs_diff, prefix_mask


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _reference_encoder(W, x, mask, num_heads, eps, post_ln=False, residual=True, hooks=None):
    """A plain pre-LN (or post-LN) Transformer encoder over one sequence `x: (seq, dim)`,
    in NumPy, in the dtype of `x`.

    With `residual=False` each branch's output replaces the stream (the ablation's arm).
    `hooks` maps insertion point names to `hook(layer, x) -> x`, applied where the
    documentation of `pdeformer.placement` says.
    """
    W = {name: np.asarray(w) for name, w in W.items()}
    x, mask = np.asarray(x), np.asarray(mask)
    skip = 1.0 if residual else 0.0
    hooks = hooks or {}
    hook = lambda name, layer, v: np.asarray(hooks[name](layer, v)) if name in hooks else v
    seq, dim = x.shape
    hd = dim // num_heads
    num_layers = W["qkv_w"].shape[0]
    for layer in range(num_layers):
        h = hook("before_norm", layer, x)
        h = h if post_ln else _layer_norm(h, W["ln1_w"][layer], W["ln1_b"][layer], eps)
        h = hook("after_norm", layer, h)
        qkv = h @ W["qkv_w"][layer] + W["qkv_b"][layer]
        q, k, v = qkv[:, :dim], qkv[:, dim : 2 * dim], qkv[:, 2 * dim :]
        heads = []
        for i in range(num_heads):
            sl = slice(i * hd, (i + 1) * hd)
            logits = (q[:, sl] @ k[:, sl].T) / x.dtype.type(math.sqrt(hd))
            logits = np.where(mask[None, :], logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p = p / p.sum(-1, keepdims=True)
            heads.append(p @ v[:, sl])
        a = np.concatenate(heads, axis=-1) @ W["out_w"][layer] + W["out_b"][layer]
        x = skip * x + hook("after_attention", layer, a)
        if post_ln:
            x = _layer_norm(x, W["ln1_w"][layer], W["ln1_b"][layer], eps)
        h = x if post_ln else _layer_norm(x, W["ln2_w"][layer], W["ln2_b"][layer], eps)
        r = _gelu_tanh(h @ W["w1"][layer] + W["b1"][layer]) @ W["w2"][layer] + W["b2"][layer]
        x = skip * x + hook("after_ffn", layer, r)
        if post_ln:
            x = _layer_norm(x, W["ln2_w"][layer], W["ln2_b"][layer], eps)
        if layer < num_layers - 1:
            x = hook("between_layers", layer, x)
    return x


def _reflect(j, n):
    r = j % (2 * n)
    return 2 * n - 1 - r if r >= n else r


def _plain_diffusion(x, n, alphas, dilations, num_steps):
    """`num_steps` explicit steps of `sum_s alpha_s (x[i+d] - 2 x[i] + x[i-d])` on the first
    `n` tokens, neighbours past either end mirrored (`x[n] = x[n-1]`, `x[-1] = x[0]`)."""
    x, alphas = np.asarray(x), np.asarray(alphas)
    v = x[:n]
    for _ in range(num_steps):
        new = v
        for s, d in enumerate(dilations):
            up = np.array([_reflect(i + d, n) for i in range(n)])
            down = np.array([_reflect(i - d, n) for i in range(n)])
            new = new + alphas[s] * (v[up] - 2 * v + v[down])
        v = new
    return np.concatenate([v, x[n:]], axis=0)


def _weights(field):
    b = field.blocks
    return dict(
        qkv_w=b.attention.qkv_weight,
        qkv_b=b.attention.qkv_bias,
        out_w=b.attention.out_weight,
        out_b=b.attention.out_bias,
        ln1_w=b.attention_norm.weight,
        ln1_b=b.attention_norm.bias,
        ln2_w=b.reaction_norm.weight,
        ln2_b=b.reaction_norm.bias,
        w1=b.reaction.w1,
        b1=b.reaction.b1,
        w2=b.reaction.w2,
        b2=b.reaction.b2,
    )


def _randomise_norms(field, key):
    # Non-trivial norm parameters, so a mix-up of the two norms cannot pass unnoticed.
    k1, k2, k3, k4 = jr.split(key, 4)
    b = field.blocks
    dt = b.attention_norm.weight.dtype
    weights = [1 + 0.1 * jr.normal(k, b.attention_norm.weight.shape, dt) for k in (k1, k3)]
    biases = [0.1 * jr.normal(k, b.attention_norm.bias.shape, dt) for k in (k2, k4)]
    return _set_norms(field, weights, biases)


def _set_norms(field, weights, biases):
    return eqx.tree_at(
        lambda f: (
            f.blocks.attention_norm.weight,
            f.blocks.reaction_norm.weight,
            f.blocks.attention_norm.bias,
            f.blocks.reaction_norm.bias,
        ),
        field,
        (weights[0], weights[1], biases[0], biases[1]),
    )


def _case(dtype, key, num_layers=3, dim=16, heads=4, seq=12, batch=3):
    kf, kn, kx, kb = jr.split(key, 4)
    field = pf.Field(dim, heads, num_layers, key=kf, dtype=dtype)
    field = _randomise_norms(field, kn)
    # Non-zero biases everywhere.
    leaves = [
        field.blocks.attention.qkv_bias,
        field.blocks.attention.out_bias,
        field.blocks.reaction.b1,
        field.blocks.reaction.b2,
    ]
    ks = jr.split(kb, len(leaves))
    field = eqx.tree_at(
        lambda f: (
            f.blocks.attention.qkv_bias,
            f.blocks.attention.out_bias,
            f.blocks.reaction.b1,
            f.blocks.reaction.b2,
        ),
        field,
        tuple(0.1 * jr.normal(k, x.shape, dtype) for k, x in zip(ks, leaves, strict=True)),
    )
    x = jr.normal(kx, (batch, seq, dim), dtype)
    return field, x


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("post_ln", [False, True])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.float64, 1e-10)])
def test_discrete_equals_plain_transformer(getkey, dtype, tol, padded, post_ln):
    with jax.enable_x64(dtype == jnp.float64):
        field, x = _case(dtype, getkey())
        seq = x.shape[1]
        lengths = [seq, seq - 5, 3] if padded else [seq] * 3
        mask = prefix_mask(lengths, seq)
        depth = pf.PostLN() if post_ln else pf.Discrete()
        sol = jax.jit(lambda f, x, m: depth(f, x, m))(field, x, mask)
        W = _weights(field)
        for b in range(x.shape[0]):
            ref = _reference_encoder(W, x[b], mask[b], 4, 1e-5, post_ln=post_ln)
            n = lengths[b]
            assert sol.u.dtype == dtype
            assert max_abs_diff(sol.u[b, :n], ref[:n]) <= tol
            # Pads are frozen: they keep their initial states.
            assert jnp.array_equal(sol.u[b, n:], x[b, n:])
        assert int(sol.stats.nfe) == 2 * field.num_layers


FIELD_POINTS = ("before_norm", "after_norm", "after_attention", "after_ffn", "between_layers")


def _with_diffusion(dtype, key, dilations=(1, 2, 4), num_steps=2):
    """A field with diffusion layers at all five field points, random coefficients per
    layer and point (so a mix-up of layers or points cannot pass unnoticed)."""
    kf, kc = jr.split(key)
    base, x = _case(dtype, kf)
    layer = functools.partial(pf.DiffusionLayer, dilations=dilations, num_steps=num_steps)
    field = pf.Field(
        16, 4, 3, key=kf, dtype=dtype, diffusion_at=FIELD_POINTS, diffusion_layer=layer
    )
    # The plain case's weights (random norms and biases), plus the diffusion layers.
    field = eqx.tree_at(lambda f: f.blocks, field, _copy_weights(base.blocks, field.blocks))
    stacks = [getattr(field.blocks, p).operator for p in FIELD_POINTS[:4]]
    stacks.append(field.transitions.operator)
    keys = jr.split(kc, 2 * len(stacks))
    new = [
        eqx.tree_at(
            lambda o: (o.theta, o.mix),
            op,
            (jr.normal(k1, op.theta.shape, dtype), jr.normal(k2, op.mix.shape, dtype)),
        )
        for op, k1, k2 in zip(stacks, keys[::2], keys[1::2], strict=True)
    ]
    field = eqx.tree_at(
        lambda f: (
            [getattr(f.blocks, p).operator for p in FIELD_POINTS[:4]] + [f.transitions.operator]
        ),
        field,
        new,
    )
    return field, x


def _copy_weights(src, dst):
    names = ("attention_norm", "attention", "reaction_norm", "reaction")
    return eqx.tree_at(
        lambda b: [getattr(b, n) for n in names], dst, [getattr(src, n) for n in names]
    )


def _hooks(field, n):
    def make(stack, dilations, num_steps):
        def hook(layer, v):
            op = jax.tree.map(lambda a: a[layer], stack)
            return _plain_diffusion(v, n, op.coefficients(), dilations, num_steps)

        return hook

    hooks = {}
    for p in FIELD_POINTS[:4]:
        lay = getattr(field.blocks, p)
        hooks[p] = make(lay.operator, lay.dilations, lay.num_steps)
    lay = field.transitions
    hooks["between_layers"] = make(lay.operator, lay.dilations, lay.num_steps)
    return hooks


def test_insertion_points_equal_plain_transformer(getkey):
    """Discrete mode with diffusion at the five field points is the plain Transformer with a
    plainly written diffusion step at each documented place (float64, to 1e-10)."""
    with jax.enable_x64(True):
        field, x = _with_diffusion(jnp.float64, getkey())
        lengths = [12, 7, 3]
        mask = prefix_mask(lengths, 12)
        run = jax.jit(lambda f: pf.Discrete()(f, x, mask).u)
        u = run(field)
        W = _weights(field)
        for b, n in enumerate(lengths):
            ref = _reference_encoder(W, x[b], mask[b], 4, 1e-5, hooks=_hooks(field, n))
            assert max_abs_diff(u[b, :n], ref[:n]) <= 1e-10
            assert jnp.array_equal(u[b, n:], x[b, n:])
        # Each point matters: switching any one of them off (zero coefficients, which is
        # the identity) changes the output.
        for p in FIELD_POINTS:
            get = (
                (lambda f: f.transitions.operator.theta)
                if p == "between_layers"
                else (lambda f, p=p: getattr(f.blocks, p).operator.theta)
            )
            off = eqx.tree_at(get, field, jnp.full_like(get(field), -1e9))
            assert max_abs_diff(run(off), u) > 1e-6


def _euler_half_step():
    import diffrax

    return pf.Continuous(diffrax.Euler(), diffrax.ConstantStepSize(), dt0=0.5)


def _assert_same_solves(field, x, mask, save):
    """`Discrete()` and `Continuous(Euler, dt=1/2)`, each jitted on its own as a user
    would, agree bit for bit: final state, saved states and statistics."""

    def run(depth):
        def solve(f):
            sol = depth(f, x, mask, save_at=save)
            return sol.u, sol.us, sol.stats.nfe

        return jax.jit(solve)(field)

    (a_u, a_us, a_nfe), (b_u, b_us, b_nfe) = run(pf.Discrete()), run(_euler_half_step())
    np.testing.assert_array_equal(np.asarray(a_u), np.asarray(b_u))
    if save is not None:
        np.testing.assert_array_equal(np.asarray(a_us), np.asarray(b_us))
    assert int(a_nfe) == int(b_nfe) == 2 * field.num_layers
    return a_u, a_us


@pytest.mark.parametrize("diffusion", [False, True], ids=["plain", "diffusion_rate"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["float32", "float64"])
def test_discrete_is_euler_with_half_step(getkey, dtype, diffusion):
    """`Discrete()` is `Continuous(Euler, ConstantStepSize, dt0=1/2)` by construction (one
    program walks the field's pieces for both), so they agree bit for bit: float32 and
    float64, with and without the `D Lap(u)` rate term, with padding and saved states.
    No compiler flag is involved: the two compile the same operations in the same order."""
    with jax.enable_x64(dtype == jnp.float64):
        field, x = _case(dtype, getkey())
        if diffusion:
            op = pf.DiffusionOperator(16, alpha_max=None, init=0.3, dtype=dtype)
            field = eqx.tree_at(lambda f: f.diffusion, field, op, is_leaf=lambda v: v is None)
        mask = prefix_mask([12, 7, 3], 12)
        _assert_same_solves(field, x, mask, [0.0, 0.5, 1.0, 2.5, 3.0])


# Every point at once in the default tier; each point alone in the slow tier.
@pytest.mark.parametrize(
    "point", [*(pytest.param(p, marks=pytest.mark.slow) for p in FIELD_POINTS), "all"]
)
def test_insertion_points_euler_half_step_is_discrete(getkey, point):
    """With diffusion layers at each field insertion point (and at all of them, with the
    `D Lap(u)` rate term too), `Continuous(Euler, dt=1/2)` is bit-for-bit `Discrete()`,
    saved states included (at integer depths: the states after the between-layer map)."""
    field, x = _with_diffusion(jnp.float32, getkey())
    if point != "all":
        field = eqx.tree_at(
            lambda f: [getattr(f.blocks, p) for p in FIELD_POINTS[:4]] + [f.transitions],
            field,
            [getattr(field.blocks, p) if p == point else None for p in FIELD_POINTS[:4]]
            + [field.transitions if point == "between_layers" else None],
            is_leaf=lambda v: v is None,
        )
        assert field.diffusion_at == (point,)
    else:
        op = pf.DiffusionOperator(16, alpha_max=None, init=0.3)
        field = eqx.tree_at(lambda f: f.diffusion, field, op, is_leaf=lambda v: v is None)
    mask = prefix_mask([12, 7, 3], 12)
    save = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
    _, a_us = _assert_same_solves(field, x, mask, save)
    if point != "all":
        return
    # The state saved at t = 1 is D_0 applied to the state at the end of layer 0.
    no_maps = eqx.tree_at(lambda f: f.transitions, field, None)
    end0 = jax.jit(lambda f: pf.Discrete()(f, x, mask, save_at=[1.0]).us[0])(no_maps)
    mapped = eqx.filter_jit(lambda f, u: f.transition(0, u, mask))(field, end0)
    np.testing.assert_allclose(np.asarray(a_us[2]), np.asarray(mapped), rtol=1e-6, atol=1e-6)


def test_one_smooth_piece_takes_one_step(getkey):
    """`Shared()` weights with `ParallelBlock()` are one smooth piece: a constant step of the
    whole depth is allowed (one Euler step over four layers), and `Discrete()` is still
    Euler with step 1 over that piece, bit for bit."""
    import diffrax

    field = pf.Field(16, 4, 4, key=getkey(), schedule=pf.Shared(), composition=pf.ParallelBlock())
    assert field.pieces() == pf.Pieces(width=4.0, branches=(0,), periods=1)
    assert field.jump_times() == ()
    x = jr.normal(getkey(), (2, 12, 16))
    mask = prefix_mask([12, 5], 12)
    one = pf.Continuous(diffrax.Euler(), diffrax.ConstantStepSize(), dt0=4.0)(field, x, mask)
    assert int(one.stats.num_steps) == int(one.stats.nfe) == 1
    rate = eqx.filter_jit(lambda f: f(jnp.asarray(0.0), x, mask))(field)  # not op by op
    np.testing.assert_allclose(np.asarray(one.u), np.asarray(x + 4.0 * rate), rtol=1e-6, atol=1e-6)
    unit = pf.Continuous(diffrax.Euler(), diffrax.ConstantStepSize(), dt0=1.0)
    a = jax.jit(lambda f: pf.Discrete()(f, x, mask).u)(field)
    b = jax.jit(lambda f: unit(f, x, mask).u)(field)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# Long mathematics: a tight adaptive solve and a fine constant-step one, one solve per layer.
# The default tier runs adaptive solves with between-layer maps in test_insertion.py
# (test_gradients_reach_every_point[continuous]) and their exact discrete limits here.
@pytest.mark.slow
def test_insertion_points_adaptive_converges(getkey):
    """An adaptive solve of a field with between-layer maps (one solve per layer) agrees with
    a fine constant-step solve, final and saved states alike, in float64."""
    import diffrax

    with jax.enable_x64(True):
        field, x = _with_diffusion(jnp.float64, getkey(), num_steps=1)
        mask = prefix_mask([12, 7, 3], 12)
        save = [0.0, 0.25, 1.0, 2.0, 2.75, 3.0]
        adaptive = pf.Continuous(diffrax.Tsit5(), diffrax.PIDController(rtol=1e-8, atol=1e-10))
        a = adaptive(field, x, mask, save_at=save)
        fine = pf.Continuous(diffrax.Dopri5(), diffrax.ConstantStepSize(), dt0=1 / 32)
        b = fine(field, x, mask, save_at=[0.0, 1.0, 2.0, 3.0])
        assert bool(a.stats.success)
        assert max_abs_diff(a.u, b.u) <= 1e-6
        assert max_abs_diff(a.us[np.array([0, 2, 3, 5])], b.us) <= 1e-6
        assert max_abs_diff(a.us[-1], a.u) == 0.0
        np.testing.assert_array_equal(np.asarray(a.ts), np.asarray(save))


def test_parallel_block_is_euler_step_one(getkey):
    """The parallel composition under Discrete is `u + A(N u) + R(N' u)` per layer."""
    field = pf.Field(8, 2, 2, key=getkey(), composition=pf.ParallelBlock())
    x = jr.normal(getkey(), (5, 8))
    out = eqx.filter_jit(lambda f: pf.Discrete()(f, x).u)(field)  # compiled, not op by op
    W = _weights(field)

    @eqx.filter_jit
    def written_out(field):
        ref = x
        for layer in range(2):
            blk = jax.tree.map(lambda a, i=layer: a[i], field.blocks)
            attend = blk.attention(blk.attention_norm(ref))
            ref = ref + attend + blk.reaction(blk.reaction_norm(ref))
        return ref

    assert max_abs_diff(out, written_out(field)) <= 1e-5
    assert W["qkv_w"].shape[0] == 2


def test_saved_states_are_per_layer(getkey):
    field, x = _case(jnp.float32, getkey())
    sol = pf.Discrete()(field, x, save_at=range(field.num_layers + 1))
    assert sol.us.shape == (field.num_layers + 1, *x.shape)
    np.testing.assert_array_equal(np.asarray(sol.us[0]), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(sol.us[-1]), np.asarray(sol.u))
    W = _weights(field)
    mask = jnp.ones(x.shape[1], bool)
    ref1 = _reference_encoder(jax.tree.map(lambda a: a[:1], W), x[0], mask, 4, 1e-5)
    assert max_abs_diff(sol.us[1, 0], ref1) <= 1e-5
