"""Diffusion layers: stability is a property of the parameterization, checked by hypothesis.

Every property is drawn over random states, prefix masks (lengths 1 and 2 included), sequence
lengths and extreme parameters (theta, mix logits and gate weights up to +-30), in float64.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdeformer.operators import neumann_laplacian
from pdeformer.operators.diffusion_layer import AdaptiveDiffusionLayer, DiffusionLayer

SETTINGS = settings(max_examples=30, deadline=None)
KINDS = ("single", "multi", "adaptive", "adaptive-multi")


@st.composite
def cases(draw):
    # Few distinct shapes, so each jitted call compiles a handful of times; the valid length
    # (the prefix mask) ranges over everything, 1 and 2 included.
    seq = draw(st.sampled_from([1, 2, 12]))
    n = draw(st.integers(1, seq))
    dim = 3
    seed = draw(st.integers(0, 2**31 - 1))
    theta = draw(st.floats(-30, 30))
    mix_scale = draw(st.floats(0, 30))
    gate_scale = draw(st.sampled_from([0.0, 1.0, 30.0]))
    num_steps = 1  # several steps are the one step iterated; tested separately
    return seq, n, dim, seed, theta, mix_scale, gate_scale, num_steps


def _build(kind, case):
    """A layer with random extreme parameters, a state, its prefix mask, in float64."""
    seq, n, dim, seed, theta, mix_scale, gate_scale, num_steps = case
    rng = np.random.default_rng(seed)
    dilations = (1,) if kind in ("single", "adaptive") else (1, 2, 4, 8)
    scales = len(dilations)
    mix = jnp.asarray(mix_scale * rng.uniform(-1, 1, (scales, dim)))
    if kind.startswith("adaptive"):
        layer = AdaptiveDiffusionLayer(
            dim, dilations=dilations, num_steps=num_steps, dtype=jnp.float64
        )
        bias = jnp.asarray(theta + rng.uniform(-1, 1, (scales, dim)))
        weight = jnp.asarray(gate_scale * rng.standard_normal((dim, dim)))
        layer = eqx.tree_at(
            lambda m: (m.gate_bias, m.mix, m.gate_weight), layer, (bias, mix, weight)
        )
    else:
        layer = DiffusionLayer(dim, dilations=dilations, num_steps=num_steps, dtype=jnp.float64)
        th = jnp.asarray(theta + rng.uniform(-1, 1, (dim,)))
        layer = eqx.tree_at(lambda m: (m.operator.theta, m.operator.mix), layer, (th, mix))
    u = rng.standard_normal((seq, dim)) * rng.uniform(0.1, 10)
    mask = jnp.asarray(np.arange(seq) < n)
    return layer, u, mask, n


_jcall = eqx.filter_jit(lambda layer, u, mask: layer(u, mask))
_jstep = eqx.filter_jit(lambda layer, u, mask: layer.step(u, mask))


# Results come back as NumPy so that checks on valid prefixes of varying length do not
# compile a fresh XLA op per length.
def _call(layer, u, mask):
    return np.asarray(_jcall(layer, jnp.asarray(u), mask))


def _step(layer, u, mask):
    return np.asarray(_jstep(layer, jnp.asarray(u), mask))


def _dirichlet(u):
    return float(np.sum(np.diff(np.asarray(u), axis=0) ** 2))


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(case=cases())
def test_mean_norm_and_pads(kind, case):
    with jax.enable_x64(True):
        layer, u, mask, n = _build(kind, case)
        out = _call(layer, u, mask)
        assert out.dtype == np.float64
        scale = float(np.max(np.abs(u))) + 1.0
        # Token mean conserved over the valid tokens.
        np.testing.assert_allclose(out[:n].mean(0), u[:n].mean(0), atol=1e-12 * scale)
        # Non-expansive on the valid tokens.
        assert np.linalg.norm(out[:n]) <= np.linalg.norm(u[:n]) * (1 + 1e-12)
        # Maximum principle per channel (the step is doubly stochastic).
        assert np.all(out[:n] <= u[:n].max(0) + 1e-12 * scale)
        assert np.all(out[:n] >= u[:n].min(0) - 1e-12 * scale)
        # Pads untouched; valid tokens independent of what the pads hold.
        np.testing.assert_array_equal(out[n:], u[n:])
        other = u.copy()
        other[n:] = 1e3 * np.sin(np.arange(u[n:].size)).reshape(-1, u.shape[1])
        np.testing.assert_allclose(
            _call(layer, other, mask)[:n], out[:n], rtol=0, atol=1e-13 * scale
        )
        # No mask = all tokens valid.
        if n == u.shape[0]:
            np.testing.assert_allclose(_call(layer, u, None), out, rtol=0, atol=1e-13 * scale)


@pytest.mark.parametrize("kind", ("single", "multi"))
@SETTINGS
@given(case=cases())
def test_dirichlet_energy_non_increasing(kind, case):
    with jax.enable_x64(True):
        layer, u, mask, n = _build(kind, case)
        out = _call(layer, u, mask)
        before, after = _dirichlet(u[:n]), _dirichlet(out[:n])
        assert after <= before * (1 + 1e-12) + 1e-24


@pytest.mark.parametrize("kind", ("adaptive", "adaptive-multi"))
@SETTINGS
@given(case=cases())
def test_adaptive_energy_inequality(kind, case):
    # For frozen conductances the step is u' = (I - L) u with L a symmetric PSD graph
    # Laplacian, eig(L) < 4 alpha_max: ||u||^2 - ||u'||^2 >= (2 - 4 alpha_max) u^T L u.
    with jax.enable_x64(True):
        layer, u, mask, n = _build(kind, case)
        inc = _step(layer, u, mask)
        weighted = -float(np.sum(u[:n] * inc[:n]))  # u^T L u
        scale = float(np.sum(u[:n] ** 2)) + 1.0
        assert weighted >= -1e-12 * scale
        drop = float(np.sum(u[:n] ** 2) - np.sum((u[:n] + inc[:n]) ** 2))
        assert drop >= (2 - 4 * layer.alpha_max) * weighted - 1e-12 * scale


@pytest.mark.parametrize("kind", ("adaptive", "adaptive-multi"))
@SETTINGS
@given(case=cases())
def test_adaptive_with_zero_gate_is_constant_coefficient(kind, case):
    # W = 0: conductances constant along the sequence, so the adaptive layer is the
    # constant-coefficient layer and the (unweighted) Dirichlet energy is non-increasing.
    with jax.enable_x64(True):
        layer, u, mask, n = _build(kind, case)
        layer = eqx.tree_at(lambda m: m.gate_weight, layer, jnp.zeros_like(layer.gate_weight))
        out = _call(layer, u, mask)
        assert _dirichlet(out[:n]) <= _dirichlet(u[:n]) * (1 + 1e-12) + 1e-24
        if kind == "adaptive":
            ref = DiffusionLayer(u.shape[1], num_steps=layer.num_steps, dtype=jnp.float64)
            ref = eqx.tree_at(lambda m: m.operator.theta, ref, layer.gate_bias[0])
            np.testing.assert_allclose(_call(ref, u, mask), out, rtol=1e-12, atol=1e-12)


def test_adaptive_dirichlet_energy_can_grow():
    # The documented limit: variable conductances dissipate the weighted energy, not the
    # unweighted Dirichlet energy. u = (0, 1, 2) with k_{1/2} ~ 0.45, k_{3/2} ~ 0.
    with jax.enable_x64(True):
        layer = AdaptiveDiffusionLayer(1, dtype=jnp.float64)
        layer = eqx.tree_at(
            lambda m: (m.gate_weight, m.gate_bias),
            layer,
            (jnp.full((1, 1), -60.0), jnp.full((1, 1), 60.0)),
        )
        u = jnp.asarray([[0.0], [1.0], [2.0]])
        out = layer(u)
        assert _dirichlet(out) > _dirichlet(u) + 0.1
        # ... while mean, norm and the maximum principle still hold.
        np.testing.assert_allclose(out.mean(), u.mean(), atol=1e-14)
        assert jnp.linalg.norm(out) <= jnp.linalg.norm(u)


@pytest.mark.parametrize("dilations", [(1,), (1, 2, 4, 8)])
@SETTINGS
@given(case=cases())
def test_budget_holds(dilations, case):
    with jax.enable_x64(True):
        seq, n, dim, seed, theta, mix_scale, *_ = case
        rng = np.random.default_rng(seed)
        layer = DiffusionLayer(dim, dilations=dilations, dtype=jnp.float64)
        layer = eqx.tree_at(
            lambda m: (m.operator.theta, m.operator.mix),
            layer,
            (
                jnp.asarray(theta + rng.uniform(-1, 1, (dim,))),
                jnp.asarray(mix_scale * rng.uniform(-1, 1, (len(dilations), dim))),
            ),
        )
        c = layer.coefficients()
        assert np.all(c >= 0)
        assert np.all(c.sum(0) < layer.alpha_max)
        adaptive = AdaptiveDiffusionLayer(dim, dilations=dilations, dtype=jnp.float64)
        adaptive = eqx.tree_at(lambda m: m.mix, adaptive, layer.operator.mix)
        np.testing.assert_allclose(adaptive.max_conductances().sum(0), adaptive.alpha_max)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=15, deadline=None)
@given(case=cases())
def test_zero_coefficient_is_identity(kind, case):
    with jax.enable_x64(True):
        layer, u, mask, _ = _build(kind, case)
        if kind.startswith("adaptive"):
            layer = eqx.tree_at(
                lambda m: m.gate_bias, layer, jnp.full_like(layer.gate_bias, -jnp.inf)
            )
        else:
            layer = eqx.tree_at(
                lambda m: m.operator.theta, layer, jnp.full_like(layer.operator.theta, -jnp.inf)
            )
        np.testing.assert_array_equal(_call(layer, u, mask), u)


def test_operator_with_forced_zero_coefficients_is_identity():
    with jax.enable_x64(True):
        layer = DiffusionLayer(3, dilations=(1, 2), dtype=jnp.float64)
        zero = eqx.tree_at(
            lambda m: m.operator,
            layer,
            eqx.tree_at(lambda o: o.theta, layer.operator, jnp.full((3,), -jnp.inf)),
        )
        u = jnp.asarray(np.random.default_rng(0).standard_normal((5, 3)))
        np.testing.assert_array_equal(zero(u), u)


@pytest.mark.parametrize("alpha,grows", [(0.6, True), (0.45, False)])
def test_budget_exceeded_alternating_mode_grows(alpha, grows):
    # Bypass the parameterization: one Euler step u + alpha Lap u with alpha = 0.6 > 1/2.
    # The alternating mode (-1)^i is the Laplacian's eigenvector (eigenvalue -4) away from
    # the ends, so interior tokens (farther than the number of steps from either end, which
    # the boundary's influence cannot reach) scale by exactly 1 - 4 alpha per step.
    with jax.enable_x64(True):
        seq, steps = 64, 10
        u0 = jnp.asarray((-1.0) ** np.arange(seq))[:, None]
        u = u0
        for _ in range(steps):
            u = u + alpha * neumann_laplacian(u, None, 1)
        factor = 1 - 4 * alpha
        interior = slice(steps + 1, seq - steps - 1)
        np.testing.assert_allclose(u[interior], factor**steps * u0[interior], rtol=1e-12)
        if grows:
            assert abs(factor) > 1
            assert float(jnp.linalg.norm(u)) > 10 * float(jnp.linalg.norm(u0))
        else:
            assert abs(factor) < 1
            assert float(jnp.linalg.norm(u)) < float(jnp.linalg.norm(u0))


def test_validation_messages():
    with pytest.raises(ValueError, match="num_steps"):
        DiffusionLayer(4, num_steps=0)
    with pytest.raises(ValueError, match="alpha_max"):
        DiffusionLayer(4, alpha_max=0.6)
    with pytest.raises(ValueError, match="alpha_max"):
        AdaptiveDiffusionLayer(4, alpha_max=0.0)
    with pytest.raises(ValueError, match="dilations"):
        AdaptiveDiffusionLayer(4, dilations=(0,))
    with pytest.raises(ValueError, match="dim"):
        AdaptiveDiffusionLayer(0)
    with pytest.raises(ValueError, match="init"):
        DiffusionLayer(4, init=0.5)


def test_num_steps_iterates_one_step(getkey):
    u = jax.random.normal(getkey(), (9, 4))
    mask = jnp.arange(9) < 6
    for cls in (DiffusionLayer, AdaptiveDiffusionLayer):
        one = cls(4, dilations=(1, 2), init=0.3)
        three = cls(4, dilations=(1, 2), init=0.3, num_steps=3)
        np.testing.assert_allclose(three(u, mask), one(one(one(u, mask), mask), mask), atol=1e-6)


def test_jit_grad_and_vmap(getkey):
    layer = AdaptiveDiffusionLayer(4, dilations=(1, 2), key=getkey())
    u = jax.random.normal(getkey(), (3, 10, 4))
    mask = jnp.arange(10)[None, :] < jnp.asarray([10, 4, 1])[:, None]

    @eqx.filter_jit
    @eqx.filter_grad
    def grad(m, u, mask):
        return jnp.sum(jax.vmap(m)(u, mask) ** 2)

    g = grad(layer, u, mask)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
    g2 = eqx.filter_grad(lambda m: jnp.sum(jax.vmap(m)(u, mask) ** 2))(
        DiffusionLayer(4, dilations=(1, 2))
    )
    assert bool(jnp.all(jnp.isfinite(g2.operator.theta)))


@pytest.mark.parametrize("dilations", [(1,), (1, 2), (1, 2, 4, 8)])
def test_every_variant_starts_from_the_same_total_coefficient(dilations, getkey):
    """Single-scale, multi-scale and token-adaptive layers start with the same total
    coefficient `init` (0.1 by default), split evenly over the dilations (0.025 each for four
    scales): the placement study compares variants under one budget and one starting
    strength. The adaptive layer's conductance at zero gate input is the same split."""
    layer = DiffusionLayer(6, dilations=dilations)
    coef = np.asarray(layer.coefficients())
    np.testing.assert_allclose(coef.sum(axis=0), 0.1, rtol=1e-6)
    np.testing.assert_allclose(coef, 0.1 / len(dilations), rtol=1e-6)
    adaptive = AdaptiveDiffusionLayer(6, dilations=dilations, key=getkey())
    at_zero = np.asarray(adaptive.max_conductances() * jax.nn.sigmoid(adaptive.gate_bias))
    np.testing.assert_allclose(at_zero, 0.1 / len(dilations), rtol=1e-6)
    # On a constant-plus-linear input with W = 0 both layers give the same update.
    u = jnp.outer(jnp.arange(9.0), jnp.ones(6))
    zero_gate = eqx.tree_at(lambda m: m.gate_weight, adaptive, jnp.zeros((6, 6)))
    np.testing.assert_allclose(zero_gate(u), layer(u), atol=1e-6)
