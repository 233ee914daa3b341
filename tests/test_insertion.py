"""The seven insertion points of the diffusion layer, at the encoder level.

The field-level points are checked against a plainly written Transformer in
`test_reference.py`; here: configuration errors, that the points leave the other weights
alone, the two encoder points, gradients to every point in both modes, and schedules.
"""

import functools

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import pdeformer as pf
from helpers import max_abs_diff, prefix_mask
from pdeformer.placement import ENCODER_POINTS, FIELD_POINTS, INSERTION_POINTS


def test_names_and_errors(getkey):
    assert len(INSERTION_POINTS) == 7
    assert set(FIELD_POINTS) | set(ENCODER_POINTS) == set(INSERTION_POINTS)
    with pytest.raises(ValueError, match="after_embedding.*before_head"):
        pf.Encoder(10, 8, 2, 2, key=getkey(), diffusion_at=("after_embeding",))
    with pytest.raises(ValueError, match="placed by the Encoder"):
        pf.Field(8, 2, 2, key=getkey(), diffusion_at=("after_embedding",))
    # A single name may be given as a string; order and repeats do not matter.
    enc = pf.Encoder(
        10, 8, 2, 2, key=getkey(), diffusion_at=("before_head", "after_ffn", "after_ffn")
    )
    assert enc.diffusion_at == ("after_ffn", "before_head")
    assert pf.Encoder(10, 8, 2, 2, key=getkey(), diffusion_at="after_norm").diffusion_at == (
        "after_norm",
    )


def test_points_leave_the_other_weights_alone(getkey):
    key = getkey()
    plain = pf.Classifier(10, 8, 2, 3, 4, key=key)
    full = pf.Classifier(10, 8, 2, 3, 4, key=key, diffusion_at=INSERTION_POINTS)
    assert full.encoder.diffusion_at == INSERTION_POINTS
    for get in (
        lambda m: m.encoder.embedding,
        lambda m: m.encoder.field.blocks.attention.qkv_weight,
        lambda m: m.encoder.field.blocks.reaction.w1,
        lambda m: m.head_weight,
    ):
        np.testing.assert_array_equal(np.asarray(get(plain)), np.asarray(get(full)))
    # One layer per depth node at the branch points, one per inner boundary between layers.
    assert full.encoder.field.blocks.after_attention.operator.theta.shape == (3, 8)
    assert full.encoder.field.transitions.operator.theta.shape == (2, 8)
    assert full.encoder.after_embedding.operator.theta.shape == (8,)


def test_encoder_points_are_applied_once(getkey):
    """`after_embedding` acts on the embedded tokens, `before_head` on the final states."""
    key = getkey()
    layer = functools.partial(pf.DiffusionLayer, dilations=(1, 2), init=0.3)
    enc = pf.Encoder(
        12,
        8,
        2,
        2,
        key=key,
        diffusion_at=ENCODER_POINTS,
        diffusion_layer=layer,
        pooling=pf.MeanPooling(),
    )
    plain = pf.Encoder(12, 8, 2, 2, key=key)
    tokens = jr.randint(getkey(), (3, 10), 0, 12)
    mask = prefix_mask([10, 6, 2], 10)

    @eqx.filter_jit  # one program, not op by op
    def by_hand(enc, plain):
        u0, _ = plain.embed(tokens, mask)
        d0 = jax.vmap(enc.after_embedding)(u0, mask)
        sol = pf.Discrete()(plain.field, d0, mask)
        final = jax.vmap(enc.before_head)(sol.u, mask)
        want = jax.vmap(lambda u, m: plain.pooling(plain.final_norm(u), m))(final, mask)
        return d0, want, enc.embed(tokens, mask)[0], enc(tokens, mask)[0]

    d0, want, embedded, got = by_hand(enc, plain)
    np.testing.assert_allclose(embedded, d0, rtol=1e-6, atol=1e-6)
    assert max_abs_diff(got, want) <= 1e-5


# Slow tier (a backward pass through every insertion point compiles long). The default tier
# checks every point's forward pass against the written-out model (above, and
# tests/test_reference.py) and the gradient of a regularised loss through the discrete
# steps against finite differences (tests/test_regularisers.py).
@pytest.mark.slow
@pytest.mark.parametrize(
    "depth",
    [
        pf.Discrete(),
        pf.Continuous(diffrax.Heun(), diffrax.PIDController(rtol=1e-3, atol=1e-5)),
    ],
    ids=["discrete", "continuous"],
)
def test_gradients_reach_every_point(getkey, depth):
    layer = functools.partial(pf.DiffusionLayer, dilations=(1, 2, 4))
    model = pf.Classifier(
        12, 8, 2, 2, 3, key=getkey(), diffusion_at=INSERTION_POINTS, diffusion_layer=layer
    )
    tokens = jr.randint(getkey(), (2, 9), 0, 12)
    mask = prefix_mask([9, 5], 9)

    @eqx.filter_jit
    @eqx.filter_grad
    def grad(m):
        logits, _ = m(tokens, mask, depth=depth)
        return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

    g = grad(model)
    enc = g.encoder
    thetas = {
        "after_embedding": enc.after_embedding.operator.theta,
        "before_head": enc.before_head.operator.theta,
        "between_layers": enc.field.transitions.operator.theta,
    }
    for p in ("before_norm", "after_norm", "after_attention", "after_ffn"):
        thetas[p] = getattr(enc.field.blocks, p).operator.theta
    for p, t in thetas.items():
        assert bool(jnp.all(jnp.isfinite(t))), p
        assert float(jnp.max(jnp.abs(t))) > 0, f"no gradient reaches {p}"


@pytest.mark.parametrize(
    "schedule",
    [pf.Shared(), pytest.param(pf.Interpolated(), marks=pytest.mark.slow)],
    ids=["shared", "interp"],
)
def test_points_follow_the_schedule(getkey, schedule):
    """Branch layers are stacked like the blocks (one for Shared, L+1 nodes for
    Interpolated); Euler with step 1/2 still equals the discrete model."""
    field = pf.Field(
        8,
        2,
        3,
        key=getkey(),
        schedule=schedule,
        diffusion_at=("after_attention", "between_layers"),
        diffusion_layer=pf.AdaptiveDiffusionLayer,
    )
    nodes = schedule.num_nodes(3)
    assert field.blocks.after_attention.gate_weight.shape == (nodes, 8, 8)
    assert field.transitions.gate_weight.shape == (2, 8, 8)
    x = jr.normal(getkey(), (2, 7, 8))
    mask = prefix_mask([7, 4], 7)
    euler = pf.Continuous(diffrax.Euler(), diffrax.ConstantStepSize(), dt0=0.5)

    def run(depth):
        return jax.jit(lambda f: depth(f, x, mask).u)(field)

    a, b = run(pf.Discrete()), run(euler)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a[1, 4:]), np.asarray(x[1, 4:]))


@pytest.mark.slow
def test_roughness_at_points(getkey):
    from pdeformer.diagnostics import dirichlet_energy, roughness_at_points

    key = getkey()
    plain = pf.Encoder(12, 8, 2, 3, key=key)
    tokens = jr.randint(getkey(), (3, 10), 0, 12)
    mask = prefix_mask([10, 6, 4], 10)
    r = eqx.filter_jit(roughness_at_points)(plain, tokens, mask)
    assert set(r) == set(INSERTION_POINTS)
    assert r["before_norm"].shape == r["after_ffn"].shape == (3,)
    assert r["between_layers"].shape == (2,)
    for v in r.values():
        assert bool(jnp.all((v >= 0) & (v <= 4)))

    def rel(x, m):  # written out: energy over squared norm, valid tokens only
        return dirichlet_energy(x, m) / jnp.sum(jnp.where(m[:, None], x**2, 0.0))

    def mean_rel(x):
        return float(jnp.mean(jax.vmap(rel)(x, mask)))

    u0, _ = plain.embed(tokens, mask)
    assert abs(float(r["after_embedding"]) - mean_rel(u0)) <= 1e-6
    assert abs(float(r["before_norm"][0]) - mean_rel(u0)) <= 1e-6
    sol = pf.Discrete()(plain.field, u0, mask, save_at=[1.0, 2.0, 3.0])
    np.testing.assert_allclose(
        r["between_layers"], [mean_rel(sol.us[0]), mean_rel(sol.us[1])], rtol=1e-5
    )
    assert abs(float(r["before_head"]) - mean_rel(sol.us[2])) <= 1e-6
    # The attention signal of layer 1 is half the field's rate on its first half.
    u1 = sol.us[0]
    attention = jax.vmap(lambda v, m: plain.field(jnp.asarray(1.25), v, m) / 2)(u1, mask)
    assert abs(float(r["after_attention"][1]) - mean_rel(attention)) <= 1e-5

    # A diffusion layer after the embedding smooths what the first block receives.
    smoothed = pf.Encoder(12, 8, 2, 3, key=key, diffusion_at="after_embedding")
    s = roughness_at_points(smoothed, tokens, mask)
    assert float(s["after_embedding"]) == pytest.approx(float(r["after_embedding"]), abs=1e-6)
    assert float(s["before_norm"][0]) < float(r["before_norm"][0])
