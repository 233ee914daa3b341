"""Continuous depth: convergence orders, the tolerance trade-off, honest NFE, no retracing."""

import functools

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import pdeformer as pf
from helpers import prefix_mask


def _small(key, dtype, num_layers=2, **kw):
    kf, kx = jr.split(key)
    field = pf.Field(8, 2, num_layers, key=kf, dtype=dtype, **kw)
    x = jr.normal(kx, (2, 6, 8), dtype)
    mask = prefix_mask([6, 4], 6)
    return field, x, mask


def _tight(field, x, mask):
    ref = pf.Continuous(
        diffrax.Tsit5(), diffrax.PIDController(rtol=1e-12, atol=1e-12), max_steps=100_000
    )
    return ref(field, x, mask).u


# Slow tier (three compiled solves each). The default tier has the order of the constant-step
# exponential solver (tests/test_stiff.py), Euler as `Discrete()` bit for bit
# (tests/test_reference.py) and the adaptive error following the tolerance (below).
@pytest.mark.slow
@pytest.mark.parametrize("solver,order", [(diffrax.Euler(), 1.0), (diffrax.Heun(), 2.0)])
def test_fixed_step_convergence_order(getkey, solver, order):
    with jax.enable_x64(True):
        field, x, mask = _small(getkey(), jnp.float64)
        ref = _tight(field, x, mask)
        ks = np.array([3, 5, 7])  # each step size compiles a solve of its own
        errs = []
        for k in ks:
            depth = pf.Continuous(solver, diffrax.ConstantStepSize(), dt0=0.5**k)
            errs.append(float(jnp.max(jnp.abs(depth(field, x, mask).u - ref))))
        slope = np.polyfit(-ks * np.log(2.0), np.log(errs), 1)[0]
        assert abs(slope - order) < 0.2, (slope, errs)


def _stiffer(field, scale):
    # Larger output weights: faster dynamics, so the controller has work at every tolerance.
    return eqx.tree_at(
        lambda f: (f.blocks.attention.out_weight, f.blocks.reaction.w2),
        field,
        (scale * field.blocks.attention.out_weight, scale * field.blocks.reaction.w2),
    )


def test_tolerance_trades_accuracy_for_compute():
    # A fixed case: the trend is a property of the controller, but a random field can be
    # so gentle that loose tolerances already take the minimum number of steps.
    with jax.enable_x64(True):
        field, x, mask = _small(jr.PRNGKey(0), jnp.float64, num_layers=3)
        field = _stiffer(field, 6.0)
        # The tolerance is not part of the compiled program: the reference solve and the
        # five below share one compile.
        solve = eqx.filter_jit(lambda f, x, m, d: d(f, x, m))
        tsit5 = lambda rtol, atol: pf.Continuous(
            diffrax.Tsit5(), diffrax.PIDController(rtol=rtol, atol=atol), max_steps=100_000
        )
        ref = solve(field, x, mask, tsit5(1e-12, 1e-12)).u
        nfes, errs = [], []
        for rtol in [1e-2, 1e-3, 1e-4, 1e-5, 1e-6]:
            sol = solve(field, x, mask, tsit5(rtol, rtol * 1e-2))
            nfes.append(int(sol.stats.nfe))
            errs.append(float(jnp.max(jnp.abs(sol.u - ref))))
        # Adaptive control is not strictly monotone step by step (an early rejected step can
        # cost more at a looser tolerance), so the trend is fitted in log-log.
        log_rtol = np.log10([1e-2, 1e-3, 1e-4, 1e-5, 1e-6])
        assert np.polyfit(log_rtol, np.log10(nfes), 1)[0] < -0.05, nfes
        assert np.polyfit(log_rtol, np.log10(errs), 1)[0] > 0.5, errs
        assert nfes[-1] > 2 * nfes[0], nfes
        assert errs[-1] < errs[0] / 100, errs


@pytest.mark.parametrize(
    "solver",
    [
        # An adaptive FSAL method with few stages in the default tier; the others slow.
        pytest.param(diffrax.Euler(), marks=pytest.mark.slow),
        pytest.param(diffrax.Heun(), marks=pytest.mark.slow),
        pytest.param(diffrax.Midpoint(), marks=pytest.mark.slow),
        diffrax.Bosh3(),
        pytest.param(diffrax.Tsit5(), marks=pytest.mark.slow),
        pytest.param(diffrax.Dopri5(), marks=pytest.mark.slow),
        pytest.param(diffrax.Dopri8(), marks=pytest.mark.slow),
    ],
    ids=lambda s: type(s).__name__,
)
def test_nfe_counts_every_evaluation(getkey, solver):
    """NFE from the statistics equals the evaluations counted by a callback in the field."""
    field, x, mask = _small(getkey(), jnp.float32, num_layers=3)
    calls = []

    class CountedPiece(eqx.Module):
        inner: pf.PieceRate

        def __call__(self, t, u, mask=None):
            jax.debug.callback(lambda: calls.append(1))
            return self.inner(t, u, mask)

    class Counted(pf.Field):
        # Every evaluation goes through a piece's rate, whichever integrator asks.
        def on_piece(self, period, branch):
            return CountedPiece(super().on_piece(period, branch))

    counted = object.__new__(Counted)
    for name, value in vars(field).items():
        object.__setattr__(counted, name, value)
    x1 = x[0]  # one sequence: the callback then fires once per evaluation
    m1 = mask[0]
    if isinstance(solver, diffrax.AbstractAdaptiveSolver):
        controller = diffrax.PIDController(rtol=1e-4, atol=1e-6)
    else:
        controller = diffrax.ConstantStepSize()
    depth = pf.Continuous(solver, controller, dt0=0.25)
    sol = depth(counted, x1, m1)
    jax.effects_barrier()
    assert int(sol.stats.nfe) == len(calls), (int(sol.stats.nfe), len(calls), sol.stats)
    assert int(sol.stats.num_steps) == int(sol.stats.num_accepted_steps) + int(
        sol.stats.num_rejected_steps
    )


def test_changing_tolerance_does_not_retrace(getkey):
    field, x, mask = _small(getkey(), jnp.float32)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def solve(field, x, mask, depth):
        return depth(field, x, mask).u

    for rtol in [1e-2, 1e-3, 1e-5]:
        solve(field, x, mask, pf.Continuous(controller=diffrax.PIDController(rtol=rtol, atol=1e-6)))
    assert eqx.debug.get_num_traces(solve) == 1


def test_jump_times_are_given_to_the_controller(getkey):
    """The field's jump times, which the adaptive solves step onto (their steps are checked
    by `test_tighter_tolerance_never_takes_fewer_steps` and `test_no_sliver_steps_at_jumps`)."""
    field, x, mask = _small(getkey(), jnp.float32, num_layers=3)
    assert field.jump_times() == (0.5, 1.0, 1.5, 2.0, 2.5)
    controller = pf.Continuous()._controller(field, jnp.float32)
    np.testing.assert_array_equal(np.asarray(controller.jump_ts), field.jump_times())
    assert np.asarray(controller.controller.jump_ts).size == 5
    # Jump times are structure: the fields' shapes suffice (no weights are drawn).
    shaped = functools.partial(eqx.filter_eval_shape, pf.Field, 8, 2, 3, key=getkey())
    shared = shaped(schedule=pf.Shared(), composition=pf.ParallelBlock())
    assert shared.jump_times() == ()
    interp = shaped(schedule=pf.Interpolated())
    # The sequential block jumps at every half layer even with smooth weights.
    assert interp.jump_times() == (0.5, 1.0, 1.5, 2.0, 2.5)
    # Interpolated weights kink at every node: each layer is its own smooth piece.
    kinked = shaped(schedule=pf.Interpolated(), composition=pf.ParallelBlock())
    assert kinked.jump_times() == (1.0, 2.0)


@pytest.mark.parametrize(
    "schedule", [pf.PerLayer(), pf.Shared(), pf.Interpolated()], ids=lambda s: type(s).__name__
)
def test_schedules_select_the_right_weights(getkey, schedule):
    field = pf.Field(8, 2, 3, key=getkey(), schedule=schedule)
    n = field.blocks.attention.qkv_weight.shape[0]
    assert n == {pf.PerLayer: 3, pf.Shared: 1, pf.Interpolated: 4}[type(schedule)]
    w = field.blocks.attention.qkv_weight
    weights = eqx.filter_jit(field.schedule.weights)  # one program for every t
    for t in [0.0, 0.7, 1.25, 2.9, 3.0]:
        layer = jnp.asarray(min(int(t), 2), jnp.int32)
        block = weights(field.blocks, jnp.asarray(t), layer)
        if isinstance(schedule, pf.PerLayer):
            expect = w[min(int(t), 2)]
        elif isinstance(schedule, pf.Shared):
            expect = w[0]
        else:
            i = min(int(t), 2)
            s = t - i
            expect = (1 - s) * w[i] + s * w[i + 1]
        np.testing.assert_allclose(block.attention.qkv_weight, expect, rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # the default tier saves states in tests/test_reference.py
def test_saved_states_and_interpolated_field_run(getkey):
    field, x, mask = _small(getkey(), jnp.float32, schedule=pf.Interpolated())
    sol = pf.Continuous()(field, x, mask, save_at=[0.0, 1.0, 2.0])
    assert sol.us.shape == (3, *x.shape)
    np.testing.assert_allclose(sol.us[0], x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sol.us[-1], sol.u, rtol=1e-5, atol=1e-5)


def test_diffusion_operator_follows_the_field_dtype(getkey):
    """A `DiffusionOperator` given to a float64 field is cast to float64 (it is built in
    float32 unless told otherwise), so the rate does not mix precisions."""
    with jax.enable_x64(True):
        op = pf.DiffusionOperator(8, alpha_max=None, init=0.5)
        assert op.theta.dtype == jnp.float32
        field = pf.Field(8, 2, 2, key=getkey(), dtype=jnp.float64, diffusion=op)
        assert field.diffusion.theta.dtype == field.diffusion.mix.dtype == jnp.float64
        x = jr.normal(getkey(), (5, 8), jnp.float64)
        assert pf.Discrete()(field, x).u.dtype == jnp.float64


def _jumpy_field():
    return pf.Field(
        16,
        2,
        3,
        key=jr.PRNGKey(0),
        dtype=jnp.float64,
        diffusion=pf.DiffusionOperator(16, alpha_max=None, init=0.5, dtype=jnp.float64),
    )


@pytest.mark.slow  # four solves; the default tier checks the snap itself (no sliver steps)
def test_tighter_tolerance_never_takes_fewer_steps():
    """Issue 25's reproduction: a step that ended a few ulps short of a jump used to leave a
    sliver step onto the jump and a controller restarting from ~1e-16 (27 steps at rtol
    1e-4 against 17 at 1e-5). With step ends snapped onto jumps the count follows rtol."""
    with jax.enable_x64(True):
        field = _jumpy_field()
        u0 = jr.normal(jr.PRNGKey(100), (1, 12, 16), jnp.float64)
        counts = []
        for rtol in (1e-2, 1e-3, 1e-4, 1e-5):
            ctrl = diffrax.PIDController(rtol=rtol, atol=rtol / 10)
            counts.append(int(pf.Continuous(diffrax.Tsit5(), ctrl)(field, u0).stats.num_steps))
        assert counts == sorted(counts), counts


def test_no_sliver_steps_at_jumps():
    """Over a sweep of seeds and two tolerances, no accepted step is a sliver (shorter than
    1e-6 of the median step); without the snap 4 of these 12 solves had one."""
    with jax.enable_x64(True):
        field = _jumpy_field()
        term = diffrax.ODETerm(lambda t, y, args: field(t, y, None))
        # The tolerances traced: both share one compiled solve.
        solve = eqx.filter_jit(
            lambda u0, c: (
                diffrax.diffeqsolve(
                    term,
                    diffrax.Tsit5(),
                    0.0,
                    field.t1,
                    0.5,
                    u0,
                    stepsize_controller=c,
                    saveat=diffrax.SaveAt(steps=True),
                    max_steps=256,
                ).ts
            )
        )
        for rtol in (1e-3, 1e-4):
            tol = dict(rtol=jnp.asarray(rtol), atol=jnp.asarray(rtol / 10))
            depth = pf.Continuous(diffrax.Tsit5(), diffrax.PIDController(**tol))
            controller = depth._controller(field, jnp.float64)
            for seed in range(100, 106):
                u0 = jr.normal(jr.PRNGKey(seed), (1, 12, 16), jnp.float64)
                ts = np.asarray(solve(u0, controller))
                h = np.diff(np.concatenate([[0.0], ts[np.isfinite(ts)]]))
                assert h.min() > 1e-6 * np.median(h), (rtol, seed, h)
