"""The stiff-aware path: exact diffusion in the DCT basis, exponential Runge–Kutta methods."""

import decimal
import math
from collections.abc import Callable
from typing import NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.linalg

import pdeformer as pf
from helpers import prefix_mask
from pdeformer.exprk import ExponentialTableau, phi
from pdeformer.operators.spectral import exact_diffusion


def _operator(dim, d, *, dilations=(1,), mix_seed=None):
    op = pf.DiffusionOperator(dim, dilations=dilations, alpha_max=None, init=d, dtype=jnp.float64)
    if mix_seed is not None:
        mix = np.random.default_rng(mix_seed).normal(size=(len(dilations), dim))
        op = eqx.tree_at(lambda o: o.mix, op, jnp.asarray(mix))
    return op


def _problem(seed, d, *, seq=8, dim=8, num_layers=2):
    # Any weights make a valid field for these tests. Initialising a Field compiles some
    # 25 random-number kernels (about 10 s on two busy cores), so the structure is traced
    # only and the weights are drawn with numpy: small enough that the reaction is mild
    # next to D Lap, LayerNorm scales around one.
    abstract = eqx.filter_eval_shape(
        lambda: pf.Field(dim, 2, num_layers, key=jr.PRNGKey(0), dtype=jnp.float64)
    )
    rng = np.random.default_rng(seed)
    field = jax.tree.map(
        lambda a: jnp.asarray(rng.normal(size=a.shape) / np.sqrt(a.shape[-1] if a.ndim else 1)),
        abstract,
    )
    field = eqx.tree_at(
        lambda f: (f.blocks.attention_norm.weight, f.blocks.reaction_norm.weight),
        field,
        (1 + 0.1 * field.blocks.attention_norm.weight, 1 + 0.1 * field.blocks.reaction_norm.weight),
    )
    field = eqx.tree_at(lambda f: f.diffusion, field, _operator(dim, d), is_leaf=_is_none)
    x = jnp.asarray(rng.normal(size=(2, seq, dim)))
    return field, x, prefix_mask([seq, seq // 2], seq)


def _is_none(x) -> bool:
    return x is None


def _max_err(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)))


# ---------------------------------------------------------------------------------------
# The diffusion operator in its eigenbasis.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True])
def test_exact_diffusion_is_the_matrix_exponential(masked):
    with jax.enable_x64(True):
        seq, dim = 6, 3
        op = _operator(dim, 50.0, dilations=(1, 2, 4), mix_seed=0)
        u = jnp.asarray(np.random.default_rng(1).normal(size=(seq, dim)))
        mask = jnp.arange(seq) < 4 if masked else None
        rate = jax.jit(jax.jacfwd(lambda v: op(v, mask).reshape(-1)))(u)
        h = 0.01
        ref = scipy.linalg.expm(h * np.asarray(rate).reshape(seq * dim, seq * dim))
        ref = (ref @ np.asarray(u).reshape(-1)).reshape(seq, dim)
        exact = jax.jit(exact_diffusion)(op, u, mask, h)
        np.testing.assert_allclose(exact, ref, atol=1e-12)


@pytest.mark.parametrize("masked", [False, True])
def test_diffusion_term_is_the_operator_on_a_batch(masked):
    # The term's rate V (lam * V^T u) equals the stencil, sequence by sequence (batched,
    # each sequence with its own valid length), and is zero on pads.
    with jax.enable_x64(True):
        seq, dim = 7, 3
        op = _operator(dim, 3.0, dilations=(1, 2), mix_seed=2)
        u = jnp.asarray(np.random.default_rng(3).normal(size=(2, 3, seq, dim)))
        mask = prefix_mask([7, 5, 1, 3, 6, 2], seq).reshape(2, 3, seq) if masked else None

        @jax.jit
        def rates(op, u, mask):
            term = pf.DiffusionTerm(op, u, mask)
            if mask is None:
                return term.vf(0.0, u, None), jax.vmap(jax.vmap(lambda v: op(v)))(u)
            return term.vf(0.0, u, None), jax.vmap(jax.vmap(op))(u, mask)

        spectral, direct = rates(op, u, mask)
        np.testing.assert_allclose(spectral, direct, atol=1e-12)
        if masked:
            np.testing.assert_array_equal(jnp.where(mask[..., None], 0.0, spectral), 0.0)


def _phi_reference(j: int, z: float) -> float:
    # phi_j(z) = (e^z - sum_{k<j} z^k / k!) / z^j in 60-digit decimal arithmetic.
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        zd = decimal.Decimal(z)
        if zd == 0:
            return 1 / math.factorial(j)
        head = sum(zd**k / math.factorial(k) for k in range(j))
        return float((zd.exp() - head) / zd**j)


def test_phi_functions_are_accurate_on_both_branches():
    with jax.enable_x64(True):
        zs = [0.0, -1e-12, -1e-6, -0.3, -0.999, -1.0, -1.001, -2.5, -40.0, -1e4, 0.7]
        phis = jax.jit(lambda z: jnp.stack([phi(j, z) for j in range(4)]))(jnp.asarray(zs))
        for j in range(4):
            ref = np.asarray([_phi_reference(j, z) for z in zs])
            np.testing.assert_allclose(phis[j], ref, rtol=2e-15, atol=0)
        # Gradients are finite at 0 (the recurrence branch is masked, never divided by
        # zero) and right on both branches: phi_3'(0) = 1/4!, and a central difference
        # of the reference at -5.
        grads = jax.jit(jax.vmap(jax.grad(lambda z: phi(3, z))))(jnp.asarray([0.0, -5.0]))
        assert float(grads[0]) == pytest.approx(1 / 24, rel=1e-12)
        fd = (_phi_reference(3, -5.0 + 1e-6) - _phi_reference(3, -5.0 - 1e-6)) / 2e-6
        assert float(grads[1]) == pytest.approx(fd, rel=1e-8)


def _tableau_arrays(tableau: ExponentialTableau, z: float):
    def ev(coefficient):
        return sum(w * float(phi(j, jnp.asarray(s * z))) for w, j, s in coefficient)

    s = tableau.num_stages
    a = np.zeros((s, s))
    for i in range(s):
        for j in range(i):
            a[i, j] = ev(tableau.a[i][j])
    b = np.asarray([ev(x) for x in tableau.b])
    e = np.asarray([ev(x) for x in tableau.e])
    return np.asarray(tableau.c), a, b, b - e


@pytest.mark.parametrize("solver", [pf.ExpRK2(), pf.ExpRK3()], ids=lambda s: type(s).__name__)
def test_tableaux_satisfy_their_order_conditions(solver):
    with jax.enable_x64(True):
        order = solver.tableau.order
        # z = 0: a classical Runge–Kutta pair of orders p(p - 1).
        c, a, b, bhat = _tableau_arrays(solver.tableau, 0.0)
        conditions = {
            1: lambda w: [w.sum() - 1],
            2: lambda w: [w @ c - 1 / 2],
            3: lambda w: [w @ c**2 - 1 / 3, w @ a @ c - 1 / 6],
        }
        for p in range(1, order + 1):
            np.testing.assert_allclose(conditions[p](b), 0, atol=1e-14)
        for p in range(1, order):
            np.testing.assert_allclose(conditions[p](bhat), 0, atol=1e-14)
        assert np.max(np.abs(conditions[order](bhat))) > 1e-3  # a genuine lower order
        # Stiff conditions at z = -7 (Hochbruck–Ostermann): the weights reproduce phi_1 and
        # phi_2, and every stage is exact for constant N.
        z = -7.0
        c, a, b, bhat = _tableau_arrays(solver.tableau, z)
        p1, p2 = (float(phi(j, jnp.asarray(z))) for j in (1, 2))
        for w in (b, bhat):
            assert w.sum() == pytest.approx(p1, abs=1e-14)
        assert b @ c == pytest.approx(p2, abs=1e-14)
        for i in range(1, len(c)):
            ci_phi1 = c[i] * float(phi(1, jnp.asarray(c[i] * z)))
            assert a[i].sum() == pytest.approx(ci_phi1, abs=1e-14)


# ---------------------------------------------------------------------------------------
# Convergence and error control.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "solver",
    [pytest.param(pf.ExpRK2(), marks=pytest.mark.slow), pf.ExpRK3()],
    ids=lambda s: type(s).__name__,
)
def test_convergence_order_with_constant_steps(solver):
    # u' = D Lap u + a sin(u) + b cos(w t) on a masked batch (multi-scale Neumann
    # Laplacian, its largest eigenvalue about -8), constant steps.
    with jax.enable_x64(True):
        seq, dim = 8, 3
        op = _operator(dim, 1.0, dilations=(1, 2), mix_seed=4)
        rng = np.random.default_rng(5)
        u0 = jnp.asarray(rng.normal(size=(2, seq, dim)))
        mask = prefix_mask([8, 5], seq)

        def reaction(t, u, args):
            a, b, w = args
            return jnp.where(mask[..., None], a * jnp.sin(u) + b * jnp.cos(w * t), 0.0)

        terms = diffrax.MultiTerm(diffrax.ODETerm(reaction), pf.DiffusionTerm(op, u0, mask))

        @eqx.filter_jit
        def solve(solver, n, args):  # n and args arrays: one compilation per solver
            return diffrax.diffeqsolve(
                terms,
                solver,
                0.0,
                1.0,
                1 / n,
                u0,
                args=args,
                stepsize_controller=diffrax.ConstantStepSize(),
                max_steps=512,
            ).ys[-1]

        # The fitted order is the design order (the reference: 512 steps, an error
        # 8^order times below the finest one fitted).
        args = (jnp.asarray(1.0), jnp.ones_like(u0), jnp.asarray(3.0))
        ref = solve(solver, jnp.asarray(512.0), args)
        steps = np.asarray([8, 16, 32, 64])
        errors = [_max_err(solve(solver, jnp.asarray(float(n)), args), ref) for n in steps]
        slope = np.polyfit(np.log(1 / steps), np.log(errors), 1)[0]
        assert abs(slope - solver.tableau.order) < 0.15, (slope, errors)
        np.testing.assert_array_equal(ref[1, 5:], u0[1, 5:])  # pads never move

        # With a constant N = g the method is exact whatever the step: u(1) = exp(L) u0 +
        # phi_1(L) g, here from scipy's expm of the stencil's matrix [[L, g], [0, 0]].
        g = jnp.where(mask[..., None], jnp.asarray(rng.normal(size=u0.shape)), 0.0)
        constant = (jnp.asarray(0.0), g, jnp.asarray(0.0))
        size = u0.size
        stencil = jax.jit(jax.jacfwd(lambda u: jax.vmap(op)(u, mask).reshape(-1)))(u0)
        augmented = np.zeros((size + 1, size + 1))
        augmented[:size, :size] = np.asarray(stencil).reshape(size, size)
        augmented[:size, size] = np.asarray(g).reshape(-1)
        exact = scipy.linalg.expm(augmented) @ np.append(np.asarray(u0).reshape(-1), 1.0)
        got = solve(solver, jnp.asarray(8.0), constant)
        np.testing.assert_allclose(got, exact[:size].reshape(u0.shape), atol=1e-12)


class _Stiff(NamedTuple):
    field: pf.Field
    x: jax.Array
    mask: jax.Array
    with_d: Callable
    exponential: Callable
    explicit: Callable


@pytest.fixture(scope="module")
def stiff() -> _Stiff:
    """A masked batch through a 2-layer field with D = 50, built once per module (a fixed
    key), and one compiled exponential and one compiled Tsit5 solve for every test here
    (tolerances are arrays; D is a parameter of the field, not of the trace)."""
    with jax.enable_x64(True):
        field, x, mask = _problem(0, 50.0)

    def with_d(d):
        return eqx.tree_at(lambda f: f.diffusion, field, _operator(8, d))

    @eqx.filter_jit
    def exponential(field, rtol):
        pid = diffrax.PIDController(rtol=rtol, atol=rtol * 1e-2)
        return pf.ExponentialContinuous(controller=pid, max_steps=20_000)(field, x, mask)

    @eqx.filter_jit
    def explicit(field, rtol):
        pid = diffrax.PIDController(rtol=rtol, atol=rtol * 1e-2)
        return pf.Continuous(diffrax.Tsit5(), pid, max_steps=20_000)(field, x, mask)

    return _Stiff(field, x, mask, with_d, exponential, explicit)


def test_error_follows_the_tolerance_and_cost_is_flat_in_d(stiff):
    with jax.enable_x64(True):
        field, x, _, with_d, exponential, _ = stiff
        # D = 50 (stiff for an explicit method): the error against a tight reference falls
        # with rtol and stays within a small multiple of it.
        ref = exponential(field, jnp.asarray(1e-7)).u
        scale = float(jnp.max(jnp.abs(ref)))
        errors = []
        for rtol in (1e-3, 1e-4, 1e-5):
            sol = exponential(field, jnp.asarray(rtol))
            errors.append(_max_err(sol.u, ref))
            assert errors[-1] < 10 * rtol * scale, (rtol, errors)
            np.testing.assert_array_equal(sol.u[1, 4:], x[1, 4:])  # pads never move
        assert errors[0] > 4 * errors[1] > 16 * errors[2], errors
        # The cost does not grow with D.
        nfe = [
            int(exponential(with_d(d), jnp.asarray(1e-4)).stats.nfe) for d in (20.0, 80.0, 320.0)
        ]
        assert max(nfe) < 1.3 * min(nfe), nfe


@pytest.mark.slow
def test_explicit_solver_pays_for_d_and_agrees(stiff):
    with jax.enable_x64(True):
        field, _, _, with_d, exponential, explicit = stiff
        # An independent reference (Tsit5 on the unsplit field) agrees with the exponential
        # path's tight solve: the split into N + D Lap is right.
        tight = jnp.asarray(1e-10)
        assert _max_err(exponential(field, tight).u, explicit(field, tight).u) < 1e-8
        nfe_exp, nfe_tsit5 = [], []
        for d in (20.0, 80.0, 320.0):
            nfe_exp.append(int(exponential(with_d(d), jnp.asarray(1e-4)).stats.nfe))
            nfe_tsit5.append(int(explicit(with_d(d), jnp.asarray(1e-4)).stats.nfe))
        # The explicit cost grows about linearly in D (stability), the exponential one not.
        assert nfe_tsit5[2] > 8 * nfe_tsit5[0], nfe_tsit5
        assert nfe_tsit5[2] > 10 * nfe_exp[2], (nfe_tsit5, nfe_exp)


# ---------------------------------------------------------------------------------------
# The integrator: saving, pads, statistics, gradients, dtypes, validation.
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_save_at_and_pads(seed):
    with jax.enable_x64(True):
        field, x, mask = _problem(seed, 20.0)
        pid = diffrax.PIDController(rtol=1e-7, atol=1e-9)
        save = [0.0, 0.75, 1.0, 2.0]
        sol = pf.ExponentialContinuous(controller=pid)(field, x, mask, save_at=save)
        ref = pf.Continuous(diffrax.Tsit5(), pid, max_steps=20_000)(field, x, mask, save_at=save)
        np.testing.assert_array_equal(sol.ts, np.asarray(save))
        np.testing.assert_array_equal(sol.us[0], x)
        np.testing.assert_array_equal(sol.us[-1], sol.u)
        # 0.75 is no jump of the field: the steps land there, so the save is not an
        # interpolation (linear dense output would be first order).
        assert _max_err(sol.us, ref.us) < 1e-5
        np.testing.assert_array_equal(sol.u[1, 4:], x[1, 4:])
        np.testing.assert_array_equal(sol.us[:, 1, 4:], jnp.broadcast_to(x[1, 4:], (4, 4, 8)))
        assert bool(sol.stats.success)


@pytest.mark.slow
def test_nfe_counts_every_evaluation(seed):
    with jax.enable_x64(True):
        field, x, mask = _problem(seed, 30.0)
    calls = []

    class Counted(pf.Field):
        def __call__(self, t, u, mask=None, **kwargs):
            jax.debug.callback(lambda: calls.append(1))
            return super().__call__(t, u, mask, **kwargs)

    counted = object.__new__(Counted)
    for name, value in vars(field).items():
        object.__setattr__(counted, name, value)
    with jax.enable_x64(True):
        pid = diffrax.PIDController(rtol=1e-4, atol=1e-6)
        for solver in (pf.ExpRK2(), pf.ExpRK3()):
            calls.clear()
            # One sequence: the callback then fires once per evaluation.
            sol = pf.ExponentialContinuous(solver, pid)(counted, x[1], mask[1])
            jax.effects_barrier()
            assert int(sol.stats.num_rejected_steps) > 0  # rejected steps are counted too
            assert int(sol.stats.nfe) == len(calls), (int(sol.stats.nfe), len(calls))
            assert int(sol.stats.nfe) == solver.num_stages * int(sol.stats.num_steps)


@pytest.mark.slow
def test_gradients_match_the_explicit_solver(seed):
    # d loss / d (weights, diffusion coefficients) through the exponential solve (recursive
    # checkpointing) against Tsit5 on the unsplit field, both at tight tolerance.
    with jax.enable_x64(True):
        field, x, mask = _problem(seed, 5.0, seq=6, dim=4)
        params, static = eqx.partition(field, eqx.is_inexact_array)
        pid = diffrax.PIDController(rtol=1e-9, atol=1e-11)

        def loss(params, depth):
            sol = depth(eqx.combine(params, static), x, mask)
            return jnp.sum(jnp.sin(sol.u))

        # ExpRK3 (order 3) takes 2,000 to 5,000 steps at this tolerance, depending on the
        # seed's weights; Tsit5 (order 5) 100 to 300.
        g_exp = jax.grad(loss)(params, pf.ExponentialContinuous(controller=pid, max_steps=20_000))
        g_ref = jax.grad(loss)(params, pf.Continuous(diffrax.Tsit5(), pid, max_steps=20_000))
        for a, b in zip(jax.tree.leaves(g_exp), jax.tree.leaves(g_ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        # The diffusion coefficient gets a real gradient.
        assert float(jnp.max(jnp.abs(g_exp.diffusion.theta))) > 1e-6


@pytest.mark.slow
def test_float32_unmasked(seed):
    with jax.enable_x64(True):
        field64, x64, _ = _problem(seed, 50.0)
    field = jax.tree.map(lambda v: v.astype(jnp.float32) if eqx.is_inexact_array(v) else v, field64)
    x = x64.astype(jnp.float32)
    pid = diffrax.PIDController(rtol=1e-4, atol=1e-6)
    sol = pf.ExponentialContinuous(controller=pid)(field, x)
    assert sol.u.dtype == jnp.float32
    with jax.enable_x64(True):
        ref = pf.ExponentialContinuous(controller=pid)(field64, x64)
    assert _max_err(sol.u, ref.u.astype(jnp.float32)) < 1e-3


def test_validation(stiff):
    with pytest.raises(ValueError, match="exponential Runge–Kutta"):
        pf.ExponentialContinuous(diffrax.Tsit5())
    with pytest.raises(ValueError, match="controller must be adaptive"):
        pf.ExponentialContinuous(controller=diffrax.ConstantStepSize())
    with pytest.raises(ValueError, match="BacksolveAdjoint"):
        pf.ExponentialContinuous(adjoint=diffrax.BacksolveAdjoint())
    # Shared configuration is checked by the same rules as Continuous.
    with pytest.raises(ValueError, match="max_steps must be a positive int"):
        pf.ExponentialContinuous(max_steps=0)
    with pytest.raises(ValueError, match="rtol must be >= 0"):
        pf.ExponentialContinuous(controller=diffrax.PIDController(rtol=-1.0, atol=1e-6))
    plain = eqx.tree_at(lambda f: f.diffusion, stiff.field, None)
    with pytest.raises(ValueError, match="has none; use pdeformer.Continuous"):
        pf.ExponentialContinuous()(plain, stiff.x, stiff.mask)
    # Maps between layers: refused before anything is computed (so the abstract field of
    # eval_shape is enough here).
    with jax.enable_x64(True):
        with_maps = eqx.filter_eval_shape(
            lambda: pf.Field(
                8,
                2,
                2,
                key=jr.PRNGKey(0),
                diffusion=_operator(8, 1.0),
                diffusion_at="between_layers",
            )
        )
        with pytest.raises(ValueError, match="maps between layers"):
            pf.ExponentialContinuous()(with_maps, stiff.x, stiff.mask)
    with pytest.raises(ValueError, match="j >= 0"):
        phi(-1, jnp.zeros(()))
    with pytest.raises(ValueError, match="row i of a"):
        ExponentialTableau(c=(0.0, 1.0), a=((), ()), b=((), ()), e=((), ()), order=1)
