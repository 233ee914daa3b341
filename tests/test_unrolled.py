"""`Unrolled`: the same Runge–Kutta method as the diffrax solver it wraps (solution, dense
output, steps, gradients), whatever the adjoint, and refusals of what it cannot unroll."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import pdeformer as pf

SAVE_AT = (0.3, 1.0, 1.7)


def _problem(seed):
    field = pf.Field(8, 2, 2, key=jr.PRNGKey(seed), hidden=16, dtype=jnp.float64)
    u0 = jr.normal(jr.PRNGKey(seed + 1), (2, 6, 8), jnp.float64)
    mask = jnp.arange(6) < jnp.array([[6], [4]])
    return field, u0, mask


def _solve_and_grad(depth, field, u0, mask):
    def loss(f):
        sol = depth(f, u0, mask, save_at=SAVE_AT)
        return jnp.sum(sol.u**2) + jnp.sum(jnp.sin(sol.us)), sol

    return eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))(field)


def _forward(depth, field, u0, mask):
    return eqx.filter_jit(lambda f: depth(f, u0, mask, save_at=SAVE_AT))(field)


def _max_diff(a, b):
    return max(
        float(jnp.max(jnp.abs(x - y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _check_same(s0, s1):
    for stat in ("num_steps", "num_accepted_steps", "num_rejected_steps", "nfe"):
        assert int(getattr(s1.stats, stat)) == int(getattr(s0.stats, stat)), stat
    assert jnp.allclose(s1.u, s0.u, rtol=0, atol=1e-12)
    assert jnp.allclose(s1.us, s0.us, rtol=0, atol=1e-12)  # the dense output


@pytest.mark.parametrize("name", ["Heun", "Dopri5"])
def test_same_solution_as_the_wrapped_solver(name, seed):
    # Tight tolerances from a first step of one piece (dt0 = 1/2): steps are rejected, so
    # Dopri5's first-same-as-last state is also checked across rejections.
    with jax.enable_x64(True):
        field, u0, mask = _problem(seed)
        controller = diffrax.PIDController(rtol=1e-6, atol=1e-8)
        solver = getattr(diffrax, name)()
        s0 = _forward(pf.Continuous(solver, controller), field, u0, mask)
        unrolled = pf.Continuous(pf.Unrolled(solver), controller)
        s1 = _forward(unrolled, field, u0, mask)
        assert int(s0.stats.num_rejected_steps) > 0
        _check_same(s0, s1)

        # One sequence at a time under vmap (each takes its own steps, and the
        # first-same-as-last test is a batched predicate): as the wrapped solver does.
        def per_sequence(depth):
            return jax.vmap(lambda u, m: depth(field, u[None], m[None]).u[0])(u0, mask)

        base = pf.Continuous(solver, controller)
        assert jnp.allclose(per_sequence(unrolled), per_sequence(base), rtol=0, atol=1e-12)


def test_same_gradient_as_the_wrapped_solver(seed):
    with jax.enable_x64(True):
        field, u0, mask = _problem(seed)
        controller = diffrax.PIDController(rtol=1e-6, atol=1e-8)

        def value_and_grad(solver):
            depth = pf.Continuous(solver, controller)
            loss = lambda f: jnp.sum(depth(f, u0, mask).u ** 2)
            return eqx.filter_jit(eqx.filter_value_and_grad(loss))(field)

        l0, g0 = value_and_grad(diffrax.Dopri5())
        l1, g1 = value_and_grad(pf.Unrolled(diffrax.Dopri5()))
        assert abs(float(l1) - float(l0)) <= 1e-10 * abs(float(l0))
        assert _max_diff(g1, g0) <= 1e-9


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, rtol", [("Heun", 1e-5), ("Bosh3", 1e-6), ("Tsit5", 1e-7), ("Dopri5", 1e-7)]
)
def test_same_method_with_dense_output_gradients(name, rtol, seed):
    with jax.enable_x64(True):
        field, u0, mask = _problem(seed)
        controller = diffrax.PIDController(rtol=rtol, atol=rtol / 100)
        solver = getattr(diffrax, name)()
        (l0, s0), g0 = _solve_and_grad(pf.Continuous(solver, controller), field, u0, mask)
        (l1, s1), g1 = _solve_and_grad(
            pf.Continuous(pf.Unrolled(solver), controller), field, u0, mask
        )
        assert int(s0.stats.num_rejected_steps) > 0
        _check_same(s0, s1)
        assert abs(float(l1) - float(l0)) <= 1e-10 * abs(float(l0))
        assert _max_diff(g1, g0) <= 1e-9


@pytest.mark.slow
def test_backsolve_adjoint(seed):
    with jax.enable_x64(True):
        field, u0, mask = _problem(seed)
        controller = diffrax.PIDController(rtol=1e-6, atol=1e-8)
        base = pf.Continuous(diffrax.Tsit5(), controller)
        (_, s0), g0 = _solve_and_grad(base, field, u0, mask)
        backsolve = pf.Continuous(
            pf.Unrolled(diffrax.Tsit5()), controller, diffrax.BacksolveAdjoint()
        )
        (_, s1), g1 = _solve_and_grad(backsolve, field, u0, mask)
        # The continuous adjoint is a different gradient: equal to the tolerance only.
        assert jnp.allclose(s1.u, s0.u, atol=1e-12)
        assert _max_diff(g1, g0) <= 1e-4


def test_counts_and_refusals():
    assert pf.evaluations_per_step(pf.Unrolled(diffrax.Tsit5())) == (6, True)
    assert pf.evaluations_per_step(pf.Unrolled(diffrax.Heun())) == (2, False)
    assert pf.Unrolled(diffrax.Dopri5()).tableau is diffrax.Dopri5().tableau
    for solver in (diffrax.Euler(), diffrax.Kvaerno3(), "Tsit5"):
        with pytest.raises(ValueError, match="explicit Runge-Kutta"):
            pf.Unrolled(solver)
    with pytest.raises(ValueError, match="already Unrolled"):
        pf.Unrolled(pf.Unrolled(diffrax.Tsit5()))
