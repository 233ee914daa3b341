"""Gradients through depth: adjoints agree with each other and with finite differences."""

import os

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import pdeformer as pf
from helpers import prefix_mask


def _setup(key):
    kf, kx = jr.split(key)
    field = pf.Field(4, 2, 2, key=kf, hidden=8, dtype=jnp.float64)
    x = jr.normal(kx, (2, 5, 4), jnp.float64)
    return field, x, prefix_mask([5, 3], 5)


def _grad(field, x, mask, depth):
    def loss(f):
        return jnp.sum(depth(f, x, mask).u ** 2)

    return eqx.filter_jit(eqx.filter_grad(loss))(field)


def _flat(tree):
    return jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(eqx.filter(tree, eqx.is_array))])


@pytest.mark.slow
def test_adjoints_agree(getkey):
    with jax.enable_x64(True):
        field, x, mask = _setup(getkey())
        ctrl = diffrax.PIDController(rtol=1e-8, atol=1e-8)

        # A small max_steps keeps DirectAdjoint's compile time (it grows with max_steps) low;
        # seeds 0-15 took 9 to 39 steps.
        def grad(adjoint):
            depth = pf.Continuous(diffrax.Tsit5(), ctrl, adjoint, max_steps=128)
            return _flat(_grad(field, x, mask, depth))

        rc = grad(diffrax.RecursiveCheckpointAdjoint())
        direct = grad(diffrax.DirectAdjoint())
        back = grad(diffrax.BacksolveAdjoint())
        # The same discrete computation differentiated two ways: equal to rounding, which
        # the adaptive controller's branches amplify on some inputs (seeds 0-7 gave relative
        # differences from 6e-16 to 6e-9, max-abs up to 1e-7 for gradients of size 10).
        assert jnp.linalg.norm(direct - rc) <= 1e-7 * jnp.linalg.norm(rc)
        # Backsolve integrates the adjoint ODE backwards: equal to the tolerance level.
        np.testing.assert_allclose(back, rc, rtol=1e-5, atol=1e-5)
        assert jnp.linalg.norm(rc) > 1e-3


@pytest.fixture(scope="module")
def default_gradient():
    """A tight adaptive solve under the default adjoint, differentiated once and shared by
    the two tests below (its backward pass is the costly compile): the field, the state,
    the flat parameters, the jitted loss of the flat parameters, its gradient there, and the
    number of steps the solve took."""
    key = jr.PRNGKey(int(os.environ["PDEFORMER_TEST_SEED"]))  # the session seed (conftest)
    with jax.enable_x64(True):
        field, x, mask = _setup(key)
        depth = pf.Continuous(
            diffrax.Tsit5(), diffrax.PIDController(rtol=1e-10, atol=1e-10), max_steps=256
        )
        assert depth.adjoint == diffrax.RecursiveCheckpointAdjoint(checkpoints=16)
        params, static = eqx.partition(field, eqx.is_array)
        flat, unravel = jax.flatten_util.ravel_pytree(params)

        def loss_and_steps(theta):
            sol = depth(eqx.combine(unravel(theta), static), x, mask)
            return jnp.sum(sol.u**2), sol.stats.num_steps

        loss = jax.jit(lambda theta: loss_and_steps(theta)[0])
        g, steps = jax.jit(jax.grad(loss_and_steps, has_aux=True))(flat)
        return field, x, mask, flat, loss, g, int(steps)


@pytest.mark.slow  # 256 float64 steps differentiated twice
def test_default_adjoint_recomputes_exactly(default_gradient):
    """The default keeps 16 checkpoints: a solve of more steps recomputes some of them in the
    backward pass, which must give the gradient of keeping every step, up to rounding.

    Not asked bit for bit: a recomputed step runs inside the backward pass's loop, another
    program than the forward solve, where XLA may fuse and order its sums differently; the
    adaptive controller's error estimate (a difference of two nearly equal solutions at rtol
    1e-10) then differs in its last bits, a step size may move, and the gradient with it. With
    XLA's default settings the two gradients were equal bit for bit on the newest versions
    and on the dependency floors (jax 0.8.0, equinox 0.13.3) for every seed tried; with the
    LLVM optimisations off and XLA's classic CPU emitters they differed by up to 8.4e-10
    relative on the floors. The bound, 1e-8, admits such reordering; a recomputation that
    goes wrong (a step missed or repeated, a truncated tape) is off by far more.
    """
    with jax.enable_x64(True):
        field, x, mask, _, _, g, steps = default_gradient
        assert steps > pf.depth.DEFAULT_CHECKPOINTS  # so the backward pass recomputes
        every = pf.Continuous(
            diffrax.Tsit5(),
            diffrax.PIDController(rtol=1e-10, atol=1e-10),
            diffrax.RecursiveCheckpointAdjoint(checkpoints=256),
            max_steps=256,
        )
        g_every = _flat(_grad(field, x, mask, every))
        assert jnp.linalg.norm(g - g_every) <= 1e-8 * jnp.linalg.norm(g_every)
        assert jnp.linalg.norm(g_every) > 1e-3


# The backward pass of a tight adaptive solve compiles for about 20 s: slow tier. The default
# tier checks the gradient of one step of Heun and Dopri5 against the wrapped solver's
# (tests/test_unrolled.py) and the discrete gradient against finite differences
# (tests/test_regularisers.py).
@pytest.mark.slow
def test_gradient_matches_finite_differences(default_gradient):
    with jax.enable_x64(True):
        _, _, _, flat, loss, g, _ = default_gradient
        rng = np.random.default_rng(0)
        for _ in range(3):
            v = jnp.asarray(rng.standard_normal(flat.shape))
            v = v / jnp.linalg.norm(v)
            eps = 1e-5
            fd = (loss(flat + eps * v) - loss(flat - eps * v)) / (2 * eps)
            np.testing.assert_allclose(float(g @ v), float(fd), rtol=1e-5, atol=1e-7)


# Slow tier: the default tier checks the discrete gradient against finite differences
# (tests/test_regularisers.py), the forward passes bit for bit (tests/test_reference.py) and a
# gradient through diffrax's Euler loop (tests/test_terms.py).
@pytest.mark.slow
def test_discrete_gradient_matches_continuous_euler(getkey):
    with jax.enable_x64(True):
        field, x, mask = _setup(getkey())
        a = _flat(_grad(field, x, mask, pf.Discrete()))
        b = _flat(_grad(field, x, mask, pf.Continuous(diffrax.Euler(), diffrax.ConstantStepSize())))
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
