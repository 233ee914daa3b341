"""`Continuous`: the field's flow integrated by diffrax.

The state may carry leading batch axes: the whole batch is integrated as one ODE (one
step-size sequence), which avoids running each sample's adaptive loop to the slowest sample.
"""

from collections.abc import Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import regularisers as reg
from .._checks import (
    array_tolerances,
    check_common,
    check_controller,
    check_matmul_precision,
    check_save_at,
    check_state,
)
from ..unrolled import Unrolled, can_unroll
from ._base import (
    AbstractDepth,
    DepthSolution,
    VectorField,
    check_fixed_saves,
    fixed_steps,
    stats,
    steps_per_piece,
)

DEFAULT_CHECKPOINTS = 16
"""How many steps `Continuous`'s default adjoint keeps for its backward pass.

diffrax's own default, `RecursiveCheckpointAdjoint()`, keeps about `sqrt(2 max_steps)`
copies of the solver state (90 at the usual `max_steps=4096`), sized by the step budget and
not by the steps taken. A Transformer solve takes a few steps per layer, so most of those
buffers go unused, yet they are allocated, zero-filled and read on every training step. A
solve longer than the checkpoints recomputes some steps instead (binomial checkpointing).
"""


def default_adjoint(max_steps: int) -> diffrax.RecursiveCheckpointAdjoint:
    """The adjoint `Continuous` uses when none is given: diffrax's
    `RecursiveCheckpointAdjoint` with `min(DEFAULT_CHECKPOINTS, max_steps)` checkpoints."""
    return diffrax.RecursiveCheckpointAdjoint(checkpoints=min(DEFAULT_CHECKPOINTS, max_steps))


def default_controller() -> diffrax.PIDController:
    """The controller `Continuous` uses when none is given: `PIDController(rtol=1e-3,
    atol=1e-4)`, the library's tolerance rule `atol = rtol / 10`."""
    return diffrax.PIDController(rtol=1e-3, atol=1e-4)


def evaluations_per_step(solver: diffrax.AbstractSolver) -> tuple[int, bool]:
    """Vector-field evaluations per step of an explicit solver, and whether it is FSAL.

    An FSAL ("first same as last") Runge–Kutta method reuses its last stage as the next
    step's first, so it pays `stages - 1` per step plus one evaluation at the start and
    after every jump of the field.

    **Arguments:**

    - `solver`: a diffrax solver, e.g. `diffrax.Tsit5()`.

    **Returns:**

    `(evaluations, fsal)`, e.g. `(6, True)` for `Tsit5` and `(2, False)` for `Heun`.

    **Raises:**

    `ValueError` for solvers whose evaluation count is not fixed per step (implicit
    solvers, whose Newton iterations vary).
    """
    if isinstance(solver, diffrax.Euler):
        return 1, False
    if isinstance(solver, Unrolled):  # the same method
        solver = solver.solver
    tableau = getattr(solver, "tableau", None)
    if isinstance(tableau, diffrax.ButcherTableau) and isinstance(solver, diffrax.AbstractERK):
        if tableau.fsal:
            return tableau.num_stages - 1, True
        return tableau.num_stages, False
    raise ValueError(
        f"cannot count vector-field evaluations for {type(solver).__name__}: pass an explicit "
        "solver (Euler, Heun, Midpoint, Ralston, Bosh3, Tsit5, Dopri5, Dopri8)."
    )


def _clip_controller(controller, *, jump_ts, step_ts, dtype):
    # Adds jump and step times to a controller (merging with any the caller set).
    step_ts = [t for t in step_ts if t not in jump_ts]
    if not jump_ts and not step_ts:
        return controller
    if not isinstance(controller, diffrax.ClipStepSizeController):
        controller = diffrax.ClipStepSizeController(controller)
    new = []
    for name, extra in (("jump_ts", jump_ts), ("step_ts", step_ts)):
        ts = getattr(controller, name)
        if extra:
            merged = jnp.asarray(extra, dtype)
            if ts is not None:
                merged = jnp.unique(jnp.concatenate([ts.astype(dtype), merged]))
            ts = merged
        new.append(ts)
    return eqx.tree_at(
        lambda c: (c.jump_ts, c.step_ts), controller, tuple(new), is_leaf=lambda x: x is None
    )


def _backsolve_controller(adjoint, forward, *, jump_ts, dtype):
    # The backward controller of a BacksolveAdjoint, told the field's jump times: the one
    # it was given (e.g. `regularisers.seminorm_backsolve`, which diffrax would otherwise
    # run blind to the jumps), or `forward` when that is set (with regularisers: the
    # forward solve's seminorm over the state would leave the adjoint out of control).
    if not isinstance(adjoint, diffrax.BacksolveAdjoint):
        return adjoint
    backward = adjoint.kwargs.get("stepsize_controller", forward)
    if not isinstance(backward, diffrax.AbstractAdaptiveStepSizeController):
        return adjoint
    backward = _clip_controller(
        array_tolerances(backward), jump_ts=jump_ts, step_ts=(), dtype=dtype
    )
    return diffrax.BacksolveAdjoint(**{**adjoint.kwargs, "stepsize_controller": backward})


SNAP_FRACTION = 1e-3
"""A proposed step that would stop short of a jump by less than this fraction of its own
length (or by a few ulps) is stretched onto the jump (see `_JumpAware`)."""


class _JumpAware(diffrax.AbstractAdaptiveStepSizeController):
    """Wraps a controller: snaps step ends onto jumps, and counts fresh first stages.

    - A step whose proposed end falls just short of a jump time (within a few ulps, or
      `SNAP_FRACTION` of the step) ends on the jump instead (on `prevbefore(jump)`, where
      `diffrax.ClipStepSizeController` ends a step it clips). Otherwise the next step is a
      sliver of a few ulps onto the jump, after which the controller restarts from a step
      near 1e-16 and needs a dozen steps to grow back, for no gain in accuracy.
    - An FSAL method reuses the previous step's last stage, except on the first step and
      on every attempt that starts after a jump (retries of a rejected post-jump step
      included). diffrax's statistics do not say how many such attempts there were; this
      state does.
    """

    controller: diffrax.AbstractAdaptiveStepSizeController
    jump_ts: jax.Array | None = None

    @property
    def rtol(self):
        return self.controller.rtol

    @property
    def atol(self):
        return self.controller.atol

    @property
    def norm(self):
        return self.controller.norm

    def wrap(self, direction):
        return _JumpAware(self.controller.wrap(direction), self.jump_ts)

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        t1, inner = self.controller.init(terms, t0, t1, y0, dt0, args, func, error_order)
        return t1, (inner, jnp.asarray(True), jnp.asarray(0, jnp.int32))

    def _snap(self, next_t0, next_t1):
        if self.jump_ts is None or self.jump_ts.size == 0:
            return next_t1
        ts = self.jump_ts.astype(next_t1.dtype)
        inf = jnp.asarray(jnp.inf, next_t1.dtype)
        jump = jnp.min(jnp.where(ts > next_t0, ts, inf))
        target = jnp.nextafter(jump, -inf)
        gap = target - next_t1
        ulps = 16 * jnp.finfo(next_t1.dtype).eps * jnp.maximum(jnp.abs(jump), 1)
        near = (gap > 0) & (gap <= jnp.maximum(ulps, SNAP_FRACTION * (next_t1 - next_t0)))
        return jnp.where(jnp.isfinite(jump) & near, target, next_t1)

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, state):
        inner, fresh, count = state
        count = count + fresh.astype(jnp.int32)
        keep, next_t0, next_t1, made_jump, inner, result = self.controller.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, inner
        )
        next_t1 = self._snap(next_t0, next_t1)
        # A rejected attempt is retried from the same start, so it stays fresh.
        fresh = jnp.where(keep, jnp.asarray(made_jump), fresh)
        return keep, next_t0, next_t1, made_jump, (inner, fresh, count), result


class AbstractContinuous(AbstractDepth):
    """An integrator of the field by a diffrax solver: the configuration and checks that
    `Continuous` and `ExponentialContinuous` share."""

    solver: eqx.AbstractVar[diffrax.AbstractSolver]
    controller: eqx.AbstractVar[diffrax.AbstractStepSizeController]
    adjoint: eqx.AbstractVar[diffrax.AbstractAdjoint]
    dt0: eqx.AbstractVar[float | None]
    max_steps: eqx.AbstractVar[int]
    throw: eqx.AbstractVar[bool]
    matmul_precision: eqx.AbstractVar[str | None]

    def __check_init__(self):
        check_controller(self.controller)
        check_common(self.dt0, self.max_steps, self.adjoint)
        check_matmul_precision(self.matmul_precision)


class Continuous(AbstractContinuous):
    """The exact flow of the field, integrated by diffrax.

    An adaptive controller runs one diffrax solve over `[0, T]` with the ends of the
    field's pieces as jump times (one solve per layer for a field with maps between
    layers); a step that would end just short of a jump is stretched onto it, so that no
    sliver step restarts the controller. A constant step runs `solver`'s steps piece by
    piece (see `Discrete`): with `diffrax.Euler()` and `dt0=field.discrete_step` it is
    `Discrete()`, bit for bit.

    **Arguments:**

    - `solver`: any explicit diffrax solver (default `diffrax.Tsit5()`).
    - `controller`: a step-size controller (default
      `diffrax.PIDController(rtol=1e-3, atol=1e-4)`: the library's rule is
      `atol = rtol / 10`); for a fixed-step solve pass `diffrax.ConstantStepSize()` with
      `dt0`, which must divide the field's pieces (`field.pieces().width`; a field that is
      one smooth piece, e.g. `Shared()` weights with `ParallelBlock()`, takes any step that
      divides `T`). The field's jump times are handed to adaptive controllers (through
      `diffrax.ClipStepSizeController`) at call time. Tolerances are stored as arrays, so
      changing them does not recompile.
    - `adjoint`: how to differentiate an adaptive solve. Default:
      `default_adjoint(max_steps)`, diffrax's `RecursiveCheckpointAdjoint` keeping
      `min(16, max_steps)` steps (see `DEFAULT_CHECKPOINTS`; diffrax's own default keeps
      `sqrt(2 max_steps)`). A fixed-step solve is differentiated through its steps, as
      `Discrete` is; it accepts `RecursiveCheckpointAdjoint` and `DirectAdjoint`, which
      mean that.
    - `dt0`: initial (or constant) step; default: the field's discrete step.
    - `max_steps`: the most steps the solver may take.
    - `throw`: raise on failure (default); with `False`, failure is reported in
      `stats.success` and the state is what the solver reached.
    - `matmul_precision`: the matmul precision inside the vector field, as for
      `jax.default_matmul_precision` (default `"highest"`: full float32, so that TF32
      rounding on recent NVIDIA GPUs does not pass for truncation error and inflate an
      adaptive solver's step count; no effect on CPU); `None` leaves JAX's default.
    - `unroll_stages`: with an adaptive controller, step an explicit Runge–Kutta `solver`
      as `pf.Unrolled(solver)` (default `True`): the same method and steps, its stages
      straight-line code, so that reverse mode no longer recomputes every stage inside
      diffrax's stage loop on top of the adjoint's recomputation of the step (a faster
      backward pass, with all of a differentiated step's stage intermediates held at once;
      see `docs/architecture.md`). `False` keeps diffrax's stage loop. Solvers `Unrolled`
      does not take are used as given.
    - `regularisers`: a tuple of `KineticEnergy`, `JacobianFrobenius`, `ErrorEstimate`
      (see `pdeformer.regularisers`), integrated inside the same solve as extra state
      left out of step-size control (an adaptive controller's norm is restricted to the
      state, `regularisers.with_state_seminorm`), and returned in
      `DepthSolution.regularisation`. With a constant step they go through the same
      stepping code as `Discrete`'s. `ErrorEstimate` needs an adaptive controller;
      `JacobianFrobenius` a `key` per call.

    **Raises:**

    `ValueError` at construction for a solver whose evaluations per step are not fixed,
    a bad controller, step, budget or precision, for `BacksolveAdjoint` (or another
    adjoint) with a constant step, and for regularisers that the controller cannot serve
    (`ErrorEstimate` with a constant step; any with an adaptive controller other than
    `diffrax.PIDController`, whose norm is not known).
    """

    solver: diffrax.AbstractSolver
    controller: diffrax.AbstractStepSizeController
    adjoint: diffrax.AbstractAdjoint
    regularisers: tuple
    dt0: float | None = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    throw: bool = eqx.field(static=True)
    matmul_precision: str | None = eqx.field(static=True)
    unroll_stages: bool = eqx.field(static=True)

    def __init__(
        self,
        solver: diffrax.AbstractSolver | None = None,
        controller: diffrax.AbstractStepSizeController | None = None,
        adjoint: diffrax.AbstractAdjoint | None = None,
        *,
        dt0: float | None = None,
        max_steps: int = 4096,
        throw: bool = True,
        matmul_precision: str | None = "highest",
        regularisers: Sequence[reg.AbstractRegulariser] = (),
        unroll_stages: bool = True,
    ):
        self.solver = diffrax.Tsit5() if solver is None else solver
        controller = default_controller() if controller is None else controller
        self.controller = array_tolerances(controller)
        self.adjoint = default_adjoint(max_steps) if adjoint is None else adjoint
        self.regularisers = reg.check_regularisers(regularisers)
        self.dt0 = None if dt0 is None else float(dt0)
        self.max_steps = max_steps
        self.throw = throw
        self.matmul_precision = matmul_precision
        self.unroll_stages = unroll_stages

    def __check_init__(self):
        if not isinstance(self.unroll_stages, bool):
            raise ValueError(
                f"unroll_stages must be True or False; got unroll_stages={self.unroll_stages!r}."
            )
        if not isinstance(self.solver, diffrax.AbstractSolver):
            raise ValueError(
                f"solver must be a diffrax solver, e.g. diffrax.Tsit5(); got {self.solver!r}."
            )
        evaluations_per_step(self.solver)
        adaptive = isinstance(self.controller, diffrax.AbstractAdaptiveStepSizeController)
        if not adaptive and not isinstance(
            self.adjoint, diffrax.RecursiveCheckpointAdjoint | diffrax.DirectAdjoint
        ):
            raise ValueError(
                "a fixed-step solve is differentiated through its steps (as Discrete is), "
                f"so it takes no other adjoint; got adjoint={self.adjoint!r} with "
                f"{type(self.controller).__name__}. Leave adjoint unset, or pass an adaptive "
                "controller, e.g. diffrax.PIDController(rtol=1e-3, atol=1e-4)."
            )
        if self.regularisers:
            reg.with_state_seminorm(self.controller)  # raises for a controller of unknown norm
            if any(isinstance(r, reg.ErrorEstimate) for r in self.regularisers) and not adaptive:
                raise ValueError(
                    "ErrorEstimate penalises an adaptive solver's error estimates; got "
                    f"controller={type(self.controller).__name__}. Pass an adaptive controller "
                    "such as diffrax.PIDController(rtol=1e-2, atol=1e-4), or leave it out."
                )

    def __call__(self, field, u0, mask=None, *, save_at=None, key=None):
        check_state(u0, mask)
        ts_save = check_save_at(save_at, field.t1)
        if isinstance(self.controller, diffrax.AbstractAdaptiveStepSizeController):
            return self._adaptive(field, u0, mask, ts_save, key)
        return self._fixed(field, u0, mask, ts_save, key)

    def _stats(self, num_steps, accepted, rejected, restarts, success):
        per_step, fsal = evaluations_per_step(self.solver)
        nfe = per_step * num_steps
        if fsal:
            # An FSAL method evaluates its first stage afresh at the start and after each
            # jump of the field (the stored last stage belongs to the other side).
            nfe = nfe + restarts
        return stats(num_steps, accepted, rejected, nfe, success)

    def _fixed(self, field, u0, mask, ts_save, key):
        dt0 = field.discrete_step if self.dt0 is None else self.dt0
        steps = steps_per_piece(field, dt0)
        total = steps * field.pieces().count
        if total > self.max_steps:
            raise ValueError(
                f"a constant step of {dt0} needs {total} steps, more than "
                f"max_steps={self.max_steps}; pass a larger max_steps or a larger dt0."
            )
        check_fixed_saves(ts_save, field.pieces().width / steps, "a constant step size")
        u1, us, n, integrals = fixed_steps(
            field,
            self.solver,
            steps,
            u0,
            mask,
            ts_save,
            matmul_precision=self.matmul_precision,
            regularisers=self.regularisers,
            key=key,
        )
        ts = None if ts_save is None else jnp.asarray(ts_save, u0.dtype)
        return DepthSolution(
            u=u1,
            ts=ts,
            us=us,
            stats=self._stats(n, n, 0, field.pieces().count, True),
            regularisation=integrals,
        )

    def _controller(self, field, dtype) -> _JumpAware:
        # The caller's controller, told the field's jump times and wrapped to snap step
        # ends onto them and to count fresh first stages; with regularisers, its norm
        # restricted to the state, so that the integrals never change the steps.
        jumps = field.jump_times()
        controller = self.controller
        if self.regularisers:
            controller = reg.with_state_seminorm(controller)
        controller = _clip_controller(controller, jump_ts=jumps, step_ts=(), dtype=dtype)
        jump_ts = getattr(controller, "jump_ts", None)
        return _JumpAware(controller, jump_ts)

    def _adaptive(self, field, u0, mask, ts_save, key):
        rate = VectorField(field, self.matmul_precision)
        regularised = bool(self.regularisers)
        solver = self.solver
        if self.unroll_stages and can_unroll(solver):
            solver = Unrolled(solver)
        if regularised:
            # The augmented state (u, integrals) under the augmented rate, one probe per
            # solve; an ErrorEstimate is added by a wrapper around the solver.
            augmented = reg.augment(rate, self.regularisers, u0, mask, key=key)
            term = diffrax.ODETerm(augmented)
            y0 = augmented.initial(u0)
            solver = reg.regularised_solver(solver, self.regularisers, augmented.count)
        else:
            term, y0 = diffrax.ODETerm(rate), u0
        controller = self._controller(field, u0.dtype)
        adjoint = _backsolve_controller(
            self.adjoint,
            self.controller if regularised else None,
            jump_ts=field.jump_times(),
            dtype=u0.dtype,
        )
        dt0 = field.discrete_step if self.dt0 is None else self.dt0

        def split(ys):
            # The saved states, and the integrals at the last save (None without any).
            if not regularised:
                return ys, None
            us, integrals = ys
            return us, tuple(i[-1] for i in integrals)

        def solve(u, t0, t1, ts):
            # `ts`: the depths to save in [t0, t1], t1 last, or None for t1 only; returns
            # the saved states and the counts (steps, accepted, rejected, fresh first
            # stages, success).
            if ts is None:
                saveat = diffrax.SaveAt(t1=True, controller_state=True)
            else:
                saveat = diffrax.SaveAt(ts=ts, controller_state=True)
            sol = diffrax.diffeqsolve(
                term,
                solver,
                t0=t0,
                t1=t1,
                dt0=dt0,
                y0=u,
                args=mask,
                stepsize_controller=controller,
                adjoint=adjoint,
                saveat=saveat,
                max_steps=self.max_steps,
                throw=self.throw,
            )
            counts = jnp.stack(
                [
                    jnp.asarray(sol.stats["num_steps"], jnp.int32),
                    jnp.asarray(sol.stats["num_accepted_steps"], jnp.int32),
                    jnp.asarray(sol.stats["num_rejected_steps"], jnp.int32),
                    jnp.asarray(sol.controller_state[2], jnp.int32),
                    (sol.result == diffrax.RESULTS.successful).astype(jnp.int32),
                ]
            )
            return sol.ys, counts

        dtype = u0.dtype
        # t1 is always saved last, so the final state is there whatever was asked.
        ts_all = None if ts_save is None else np.append(ts_save, field.t1)
        if field.transitions is None:
            ys, counts = solve(
                y0, 0.0, field.t1, None if ts_all is None else jnp.asarray(ts_all, dtype)
            )
            ys, integrals = split(ys)
            st = self._stats(*counts[:4], counts[4] == 1)
            if ts_save is None:
                return DepthSolution(u=ys[-1], ts=None, us=None, stats=st, regularisation=integrals)
            return DepthSolution(
                u=ys[-1],
                ts=jnp.asarray(ts_save, dtype),
                us=ys[:-1],
                stats=st,
                regularisation=integrals,
            )

        # With maps between layers the state jumps at every layer boundary: one solve per
        # layer, the map applied to its final state. A save at depth t is read from the
        # solve of layer min(floor(t), L - 1), every solve saving all depths clipped to its
        # own interval (so states at t = l are the post-map states, the inputs of layer l).
        num_layers = field.num_layers

        def layer_solve(y, layer):
            t0 = layer.astype(dtype)
            ts = None if ts_all is None else jnp.clip(jnp.asarray(ts_all, dtype), t0, t0 + 1)
            ys, counts = solve(y, t0, t0 + 1, ts)
            ys, integrals = split(ys)
            u1 = jnp.where(layer < num_layers - 1, field.transition(layer, ys[-1], mask), ys[-1])
            y1 = (u1, integrals) if regularised else u1
            return y1, (ys[:-1] if ts_save is not None else None, counts)

        y1, (ys, counts) = jax.lax.scan(layer_solve, y0, jnp.arange(num_layers))
        u1, integrals = y1 if regularised else (y1, None)
        total = jnp.sum(counts, axis=0)
        st = self._stats(*total[:4], total[4] == num_layers)
        if ts_save is None:
            return DepthSolution(u=u1, ts=None, us=None, stats=st, regularisation=integrals)
        owner = np.minimum(np.floor(ts_save), num_layers - 1).astype(np.int32)
        us = ys[owner, np.arange(len(ts_save))]
        return DepthSolution(
            u=u1, ts=jnp.asarray(ts_save, dtype), us=us, stats=st, regularisation=integrals
        )
