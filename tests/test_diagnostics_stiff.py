"""Diagnostics (roughness, commutators) and the stiff-aware split path."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.linalg

import pdeformer as pf
from pdeformer.diagnostics import (
    commutator,
    dirichlet_energy,
    model_commutator,
    roughness_profile,
)
from pdeformer.operators.diffusion_layer import DiffusionLayer
from pdeformer.stiff import SplitDiffusion, exact_diffusion


def test_dirichlet_energy_constant_and_mask():
    u = jnp.ones((5, 3))
    assert float(dirichlet_energy(u)) == 0.0
    v = jnp.arange(5.0)[:, None] * jnp.ones((1, 3))
    assert float(dirichlet_energy(v)) == pytest.approx(12.0)
    # Pairs touching a pad are excluded.
    mask = jnp.arange(5) < 3
    assert float(dirichlet_energy(v, mask)) == pytest.approx(6.0)


def test_commutator(getkey):
    dim = 8
    u = jr.normal(getkey(), (7, dim))
    mask = jnp.arange(7) < 5
    diffusion = DiffusionLayer(dim, dilations=(1, 2), init=0.3)
    # A token-wise linear map commutes with channel-uniform diffusion.
    w = jr.normal(getkey(), (dim, dim))
    comm = eqx.filter_jit(commutator)
    assert float(comm(diffusion, lambda v, m: v @ w, u, mask)) < 1e-5
    attention = pf.MultiHeadAttention(dim, 2, key=getkey())
    # Uniform attention (zero queries and keys) is mean-field, and D conserves the mean.
    uniform = eqx.tree_at(
        lambda a: a.qkv_weight, attention, attention.qkv_weight.at[:, : 2 * dim].set(0.0)
    )
    assert float(comm(diffusion, uniform, u, mask)) < 1e-5
    # Real attention does not commute with diffusion.
    sharp = eqx.tree_at(lambda a: a.qkv_weight, attention, 5.0 * attention.qkv_weight)
    assert float(comm(diffusion, sharp, u, mask)) > 1e-3


def test_model_diagnostics(getkey):
    encoder = pf.Encoder(11, 8, 2, 3, key=getkey())
    tokens = jr.randint(getkey(), (2, 6), 0, 11)
    mask = jnp.arange(6)[None, :] < jnp.asarray([6, 3])[:, None]
    profile = eqx.filter_jit(roughness_profile)(encoder, tokens, mask)
    assert profile.shape == (4,)
    assert bool(jnp.all((profile >= 0) & (profile <= 4)))
    model_commutator_jit = eqx.filter_jit(model_commutator)
    c0 = model_commutator_jit(encoder, tokens, mask, layer=0)
    c2 = model_commutator_jit(encoder, tokens, mask, layer=2)
    assert c0.shape == () and float(c0) > 0 and float(c2) > 0
    with pytest.raises(ValueError, match="layer"):
        model_commutator(encoder, tokens, mask, layer=3)


@pytest.mark.parametrize("masked", [False, True])
def test_exact_diffusion_is_the_matrix_exponential(masked):
    with jax.enable_x64(True):
        seq, dim = 6, 3
        op = pf.DiffusionOperator(
            dim, dilations=(1, 2, 4), alpha_max=None, init=50.0, dtype=jnp.float64
        )
        op = eqx.tree_at(
            lambda o: o.mix, op, jnp.asarray(np.random.default_rng(0).normal(size=(3, dim)))
        )
        u = jnp.asarray(np.random.default_rng(1).normal(size=(seq, dim)))
        mask = jnp.arange(seq) < 4 if masked else None
        rate = jax.jacfwd(lambda v: op(v, mask).reshape(-1))(u).reshape(seq * dim, seq * dim)
        h = 0.01
        ref = (scipy.linalg.expm(h * np.asarray(rate)) @ np.asarray(u).reshape(-1)).reshape(
            seq, dim
        )
        np.testing.assert_allclose(exact_diffusion(op, u, mask, h), ref, atol=1e-12)


def _stiff_problem():
    op = pf.DiffusionOperator(8, alpha_max=None, init=50.0, dtype=jnp.float64)
    field = pf.Field(8, 2, 2, key=jr.PRNGKey(1), dtype=jnp.float64, diffusion=op)
    x = jr.normal(jr.PRNGKey(2), (2, 6, 8), jnp.float64)
    mask = jnp.arange(6)[None, :] < jnp.asarray([6, 4])[:, None]
    return field, x, mask


def test_split_diffusion_matches_reference_with_far_fewer_evaluations():
    # D = 50: the Laplacian's top eigenvalue is -200, so explicit Tsit5 is stability-bound.
    with jax.enable_x64(True):
        field, x, mask = _stiff_problem()
        pid = lambda rtol: diffrax.PIDController(rtol=rtol, atol=rtol * 1e-2)
        ref = pf.Continuous(diffrax.Tsit5(), pid(1e-9), max_steps=100_000)(field, x, mask)
        explicit = pf.Continuous(diffrax.Tsit5(), pid(1e-4), max_steps=100_000)(field, x, mask)
        split = SplitDiffusion(diffrax.Tsit5(), pid(1e-4))
        sol = split(field, x, mask, save_at=[0, 1, 2])
        err = float(jnp.max(jnp.abs(sol.u - ref.u)))
        scale = float(jnp.max(jnp.abs(ref.u)))
        # Strang splitting at H = 1/2 in the stiff regime: measured ~8e-3 absolute error on
        # states of size ~2 (the splitting misses the quasi-steady balance of the stiff
        # modes; see the report), with ~15x fewer field evaluations.
        assert err < 2e-2 * max(scale, 1.0), (err, scale)
        assert int(sol.stats.nfe) * 5 <= int(explicit.stats.nfe), (sol.stats, explicit.stats)
        assert bool(sol.stats.success)
        np.testing.assert_array_equal(sol.us[-1], sol.u)
        np.testing.assert_array_equal(sol.us[0], x)
        assert split.diffusion_applications(field) == 8
        # Pads are untouched.
        np.testing.assert_array_equal(sol.u[1, 4:], x[1, 4:])


def test_split_diffusion_without_diffusion_is_a_piecewise_solve(getkey):
    with jax.enable_x64(True):
        field = pf.Field(4, 2, 1, key=getkey(), dtype=jnp.float64)
        x = jr.normal(getkey(), (5, 4), jnp.float64)
        pid = diffrax.PIDController(rtol=1e-8, atol=1e-10)
        a = SplitDiffusion(diffrax.Tsit5(), pid)(field, x)
        b = pf.Continuous(diffrax.Tsit5(), pid)(field, x)
        np.testing.assert_allclose(a.u, b.u, atol=1e-6)


def test_split_diffusion_validation():
    with pytest.raises(ValueError, match="macro_step"):
        SplitDiffusion(macro_step=0.0)
    with pytest.raises(ValueError, match="controller"):
        SplitDiffusion(controller=diffrax.ConstantStepSize())
