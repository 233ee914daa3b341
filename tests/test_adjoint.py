"""`pf.KeepResidualsAdjoint`: the gradient of keeping every step's residuals equals the
gradient of recomputing them (`RecursiveCheckpointAdjoint`)."""

import os
import subprocess
import sys

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import pdeformer as pf
from helpers import prefix_mask


def _flat(tree):
    return jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(eqx.filter(tree, eqx.is_array))])


def _ode_grads(adjoint, ts=None, rtol=1e-7):
    """Gradients of a small nonlinear ODE solve with respect to its weights and its
    initial state, through diffrax directly."""
    w = jr.normal(jr.PRNGKey(0), (6, 6), jnp.float64) * 0.7
    y0 = jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float64)

    def loss(w, y0):
        term = diffrax.ODETerm(lambda t, y, a: jnp.tanh(a @ y) - 0.3 * t * y)
        saveat = diffrax.SaveAt(t1=True) if ts is None else diffrax.SaveAt(ts=ts)
        sol = diffrax.diffeqsolve(
            term,
            diffrax.Dopri5(),
            0.0,
            3.0,
            0.5,  # too large a first step: the controller rejects some
            y0,
            args=w,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=rtol),
            adjoint=adjoint,
            saveat=saveat,
            max_steps=128,
        )
        return jnp.sum(sol.ys**2), sol.stats

    (_, stats), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(w, y0)
    return grads, stats


@pytest.mark.parametrize("ts", [None, (0.4, 1.7, 3.0)], ids=["t1", "ts"])
def test_matches_recursive_checkpoint_through_diffrax(ts):
    with jax.enable_x64(True):
        ts = None if ts is None else jnp.asarray(ts, jnp.float64)
        ref, stats = _ode_grads(diffrax.RecursiveCheckpointAdjoint(checkpoints=16), ts)
        kept, kept_stats = _ode_grads(pf.KeepResidualsAdjoint(slots=64), ts)
        # The solve has rejected steps, which take slots too and pass gradients on.
        assert int(stats["num_rejected_steps"]) > 0
        assert int(kept_stats["num_steps"]) == int(stats["num_steps"])
        for a, b in zip(kept, ref, strict=True):
            assert float(jnp.linalg.norm(b)) > 1e-3
            assert jnp.linalg.norm(a - b) <= 1e-12 * jnp.linalg.norm(b)


def test_too_few_slots_is_a_runtime_error():
    with jax.enable_x64(True):
        ref, stats = _ode_grads(diffrax.RecursiveCheckpointAdjoint())
        slots = int(stats["num_steps"]) - 1
        with pytest.raises(Exception, match=rf"KeepResidualsAdjoint\(slots={slots}\)"):
            jax.block_until_ready(_ode_grads(pf.KeepResidualsAdjoint(slots=slots)))
        # Exactly as many slots as loop iterations is enough.
        grads, _ = _ode_grads(pf.KeepResidualsAdjoint(slots=slots + 1))
        assert jnp.linalg.norm(grads[0] - ref[0]) <= 1e-12 * jnp.linalg.norm(ref[0])


_OVERFLOW_PROGRAM = """
import jax, jax.numpy as jnp, diffrax
import pdeformer as pf

def loss(w):
    term = diffrax.ODETerm(lambda t, y, a: jnp.tanh(a * y))
    sol = diffrax.diffeqsolve(
        term, diffrax.Tsit5(), 0.0, 1.0, 0.1, jnp.ones(3), args=w,
        stepsize_controller=diffrax.ConstantStepSize(),
        adjoint=pf.KeepResidualsAdjoint(slots=4), max_steps=64,
    )
    return jnp.sum(sol.ys)

print(jax.jit(jax.grad(loss))(0.5))
"""


@pytest.mark.parametrize("mode", ["off", "nan"])
def test_overflow_without_runtime_errors_gives_nan(mode):
    # With equinox's runtime errors off, 10 steps in 4 slots must not return the gradient
    # of a truncated tape.
    env = {**os.environ, "EQX_ON_ERROR": mode, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(
        [sys.executable, "-c", _OVERFLOW_PROGRAM], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "nan", run.stdout


def test_weights_are_kept_once_not_per_slot():
    # The loop's invariant inputs (here a 2 MiB matrix) are residuals of every iteration's
    # pullback; the slots must not copy them.
    with jax.enable_x64(True):
        w = jnp.eye(512) * 0.5 + 0.01
        slots = 64

        def loss(w, adjoint):
            term = diffrax.ODETerm(lambda t, y, a: jnp.tanh(a @ y))
            sol = diffrax.diffeqsolve(
                term,
                diffrax.Euler(),
                0.0,
                1.0,
                0.25,
                jnp.linspace(-1.0, 1.0, 512),
                args=w,
                adjoint=adjoint,
                max_steps=slots,
            )
            return jnp.sum(sol.ys**2)

        kept = jax.jit(jax.grad(loss), static_argnums=1)
        adjoint = pf.KeepResidualsAdjoint(slots=slots)
        temp = kept.lower(w, adjoint).compile().memory_analysis().temp_size_in_bytes
        assert temp < 8 * w.nbytes, (temp, w.nbytes)  # kept per slot it would be 64x
        ref = jax.grad(loss)(w, diffrax.RecursiveCheckpointAdjoint())
        g = kept(w, adjoint)
        assert jnp.linalg.norm(ref) > 1e-3
        assert jnp.linalg.norm(g - ref) <= 1e-12 * jnp.linalg.norm(ref)


@pytest.mark.parametrize("slots", [0, -3])
def test_slots_below_one_are_refused(slots):
    with pytest.raises(ValueError, match="slots must be at least 1"):
        pf.KeepResidualsAdjoint(slots=slots)


@pytest.mark.parametrize("slots", [2.0, True, None])
def test_slots_that_are_not_ints_are_refused(slots):
    # The library's own check or the jaxtyping hook (in the tests) may answer first.
    with pytest.raises(TypeError, match="slots"):
        pf.KeepResidualsAdjoint(slots=slots)


def _field_setup(key, **kwargs):
    kf, kx = jr.split(key)
    field = pf.Field(4, 2, 2, key=kf, hidden=8, dtype=jnp.float64, **kwargs)
    x = jr.normal(kx, (2, 5, 4), jnp.float64)
    return field, x, prefix_mask([5, 3], 5)


def _field_grad(field, x, mask, depth, save_at=None):
    def loss(f):
        sol = depth(f, x, mask, save_at=save_at)
        out = jnp.sum(sol.u**2)
        return out if save_at is None else out + jnp.sum(sol.us**3)

    return _flat(eqx.filter_jit(eqx.filter_grad(loss))(field))


@pytest.mark.parametrize(
    "solver, save_at, diffusion_at",
    [
        (diffrax.Tsit5(), None, ()),
        pytest.param(pf.Unrolled(diffrax.Dopri5()), (0.25, 1.5), (), marks=pytest.mark.slow),
        pytest.param(diffrax.Tsit5(), None, ("between_layers",), marks=pytest.mark.slow),
    ],
    ids=["tsit5", "unrolled-save_at", "maps-between-layers"],
)
def test_matches_default_adjoint_through_continuous(getkey, solver, save_at, diffusion_at):
    # Through the library: masked batch, weight jumps at layer boundaries, states saved
    # inside the solve, and (last case) one solve per layer inside a `lax.scan`.
    with jax.enable_x64(True):
        field, x, mask = _field_setup(getkey(), diffusion_at=diffusion_at)
        ctrl = diffrax.PIDController(rtol=1e-6, atol=1e-6)
        default = pf.Continuous(solver, ctrl, max_steps=64)
        kept = pf.Continuous(solver, ctrl, pf.KeepResidualsAdjoint(slots=64), max_steps=64)
        g_ref = _field_grad(field, x, mask, default, save_at)
        g = _field_grad(field, x, mask, kept, save_at)
        assert jnp.linalg.norm(g_ref) > 1e-3
        assert jnp.linalg.norm(g - g_ref) <= 1e-10 * jnp.linalg.norm(g_ref)
        # Without differentiation the slots play no part: the same solution.
        sol = eqx.filter_jit(lambda f: kept(f, x, mask))(field)
        ref = eqx.filter_jit(lambda f: default(f, x, mask))(field)
        assert jnp.array_equal(sol.u, ref.u)
        assert int(sol.stats.num_steps) == int(ref.stats.num_steps)


def test_undifferentiated_solve_needs_no_slots(getkey):
    with jax.enable_x64(True):
        field, x, mask = _field_setup(getkey())
        ctrl = diffrax.PIDController(rtol=1e-8, atol=1e-8)
        sol = pf.Continuous(diffrax.Tsit5(), ctrl, pf.KeepResidualsAdjoint(slots=1))(field, x, mask)
        assert int(sol.stats.num_steps) > 1
        assert bool(sol.stats.success)


@pytest.mark.slow
def test_vmapped_gradients_match(getkey):
    # Under `jax.vmap` each batch member runs its own adaptive loop; members that finish
    # early keep their state while the others step (equinox's loop rewrite).
    with jax.enable_x64(True):
        field, x, _ = _field_setup(getkey())
        ctrl = diffrax.PIDController(rtol=1e-6, atol=1e-6)
        xs = jnp.stack([x, 3.0 * x])

        def grads(adjoint):
            depth = pf.Continuous(diffrax.Tsit5(), ctrl, adjoint, max_steps=64)
            g = eqx.filter_grad(lambda f, u: jnp.sum(depth(f, u).u ** 2))
            return jax.vmap(_flat, in_axes=0)(
                eqx.filter_jit(eqx.filter_vmap(g, in_axes=(None, 0)))(field, xs)
            )

        steps = eqx.filter_vmap(
            lambda u: pf.Continuous(diffrax.Tsit5(), ctrl, max_steps=64)(field, u).stats.num_steps
        )(xs)
        assert int(steps[0]) != int(steps[1])  # the members take different step counts
        ref = grads(None)
        kept = grads(pf.KeepResidualsAdjoint(slots=64))
        assert jnp.linalg.norm(kept - ref) <= 1e-10 * jnp.linalg.norm(ref)


@pytest.mark.slow
def test_matches_default_adjoint_on_the_stiff_path():
    # The exponential integrators are diffrax solvers of the library's own: the adjoint
    # differentiates their steps as any other.
    from test_stiff import _problem

    with jax.enable_x64(True):
        field, x, mask = _problem(0, 5.0, seq=6, dim=4)
        params, static = eqx.partition(field, eqx.is_inexact_array)
        pid = diffrax.PIDController(rtol=1e-3, atol=1e-5)  # 37 steps, 8 of them rejected

        def grads(adjoint):
            depth = pf.ExponentialContinuous(controller=pid, adjoint=adjoint)
            loss = lambda p: jnp.sum(jnp.sin(depth(eqx.combine(p, static), x, mask).u))
            return _flat(jax.jit(jax.grad(loss))(params))

        ref = grads(None)
        kept = grads(pf.KeepResidualsAdjoint(slots=64))
        assert jnp.linalg.norm(ref) > 1e-3
        assert jnp.linalg.norm(kept - ref) <= 1e-10 * jnp.linalg.norm(ref)
