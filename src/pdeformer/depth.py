"""Integrators in depth: `Discrete` (the standard Transformer) and `Continuous` (diffrax).

Both take the same `Field` and return a `DepthSolution` with the final state and honest
statistics. The state may carry leading batch axes: the whole batch is integrated as one
ODE (one step-size sequence), which keeps the piecewise field's branch a real
`lax.cond` and avoids running each sample's adaptive loop to the slowest sample.
"""

import abc
from collections.abc import Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from .field import Field
from .unrolled import Unrolled

DEFAULT_CHECKPOINTS = 16
"""How many steps `Continuous`'s default adjoint keeps for its backward pass.

diffrax's own default, `RecursiveCheckpointAdjoint()`, keeps about `sqrt(2 max_steps)`
copies of the solver state (90 at the usual `max_steps=4096`), sized by the step budget and
not by the steps taken. A Transformer solve takes a few steps per layer, so most of those
buffers go unused, yet they are allocated, zero-filled and read on every training step. A
solve longer than the checkpoints recomputes some steps instead (binomial checkpointing).
The measured trade is in `docs/results/performance/results.md` (`bench_memory.py`).
"""


def default_adjoint(max_steps: int) -> diffrax.RecursiveCheckpointAdjoint:
    """The adjoint `Continuous` uses when none is given: diffrax's
    `RecursiveCheckpointAdjoint` with `min(DEFAULT_CHECKPOINTS, max_steps)` checkpoints."""
    return diffrax.RecursiveCheckpointAdjoint(checkpoints=min(DEFAULT_CHECKPOINTS, max_steps))


class DepthStats(eqx.Module):
    """Statistics of one integration in depth.

    - `num_steps`: steps attempted (accepted + rejected).
    - `num_accepted_steps`, `num_rejected_steps`.
    - `nfe`: evaluations of the vector field, rejected steps included.
    - `success`: `False` where the solver failed (e.g. `max_steps` reached) and the caller
      asked not to raise.
    """

    num_steps: Int[Array, ""]
    num_accepted_steps: Int[Array, ""]
    num_rejected_steps: Int[Array, ""]
    nfe: Int[Array, ""]
    success: Bool[Array, ""]


class DepthSolution(eqx.Module):
    """The result of integrating a field in depth.

    - `u`: the final state `u(T)`.
    - `ts`: the depths where states were saved, or `None`.
    - `us`: the saved states, stacked on a leading axis, or `None`.
    - `stats`: a `DepthStats`.
    """

    u: Float[Array, "*batch seq dim"]
    ts: Float[Array, " saves"] | None
    us: Float[Array, "saves *batch seq dim"] | None
    stats: DepthStats


def _transition(field: Field, boundary, u, mask):
    """The field's between-layer map after layer `boundary`, on a (possibly batched) state."""
    fn = lambda v, m: field.transition(boundary, v, m)
    for _ in range(u.ndim - 2):
        fn = jax.vmap(fn, in_axes=(0, 0 if mask is not None else None))
    return fn(u, mask)


class _Rate(eqx.Module):
    """The field as a diffrax vector field `(t, u, args) -> du/dt` on a (batched) state.

    A module, not a closure: the field's weights are then leaves of the term, which
    `diffrax.BacksolveAdjoint` needs in order to differentiate with respect to them.
    """

    field: Field
    matmul_precision: str | None = eqx.field(static=True, default=None)

    def __call__(self, t, u, args):
        mask, anchor = args
        # The field takes the batch axes itself (`Field.__call__`): no `jax.vmap` here,
        # which would leave XLA's CPU backend the weight gradients of batched matmuls to
        # differentiate (much slower; see `docs/architecture.md`).
        fn = lambda t, v, m: self.field(t, v, m, anchor=anchor)
        if self.matmul_precision is None:
            return fn(t, u, mask)
        # Set here, in the vector field, so that every trace of it is pinned: the forward
        # solve, and the backward solve of BacksolveAdjoint, traced after the forward.
        with jax.default_matmul_precision(self.matmul_precision):
            return fn(t, u, mask)


def _check_state(u0, mask):
    if u0.ndim < 2:
        raise TypeError(
            f"the state must have shape (*batch, seq, dim); got shape {u0.shape}. "
            "Pass token states of one sequence as (seq, dim) or a batch as (batch, seq, dim)."
        )
    if not jnp.issubdtype(u0.dtype, jnp.floating):
        raise TypeError(f"the state must be floating point; got dtype {u0.dtype}.")
    if mask is not None:
        if mask.shape != u0.shape[:-1]:
            raise TypeError(
                f"mask must have shape {u0.shape[:-1]} (the state's shape without its last "
                f"axis); got {mask.shape}."
            )
        if mask.dtype != jnp.bool_:
            raise TypeError(f"mask must be boolean (True = valid token); got dtype {mask.dtype}.")


def _check_save_at(save_at, t1: float) -> np.ndarray | None:
    if save_at is None:
        return None
    ts = np.asarray(save_at, dtype=np.float64)
    if ts.ndim != 1 or ts.size == 0 or np.any(ts < 0) or np.any(ts > t1) or np.any(np.diff(ts) < 0):
        raise ValueError(
            f"save_at must be a non-empty, non-decreasing sequence of depths in [0, {t1}]; "
            f"got {save_at!r}."
        )
    return ts


_MATMUL_PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")


def _check_matmul_precision(precision: str | None) -> str | None:
    if precision is not None and precision not in _MATMUL_PRECISIONS:
        raise ValueError(
            f"matmul_precision must be one of {_MATMUL_PRECISIONS} or None (JAX's default); "
            f"got {precision!r}. Pass 'highest' for full float32 matmuls in adaptive solves."
        )
    return precision


class AbstractDepth(eqx.Module):
    """An integrator of a `Field` over depth `[0, T]`."""

    @abc.abstractmethod
    def __call__(
        self,
        field: Field,
        u0: Float[Array, "*batch seq dim"],
        mask: Bool[Array, "*batch seq"] | None = None,
        *,
        save_at: Sequence[float] | None = None,
    ) -> DepthSolution:
        """Integrate `field` from `u0` over `[0, field.num_layers]`.

        **Arguments:**

        - `field`: the vector field.
        - `u0`: initial token states, `(seq, dim)` or with leading batch axes.
        - `mask`: key-padding mask matching `u0` without its channel axis, or `None`.
        - `save_at`: depths at which to save the state (e.g. `range(L + 1)` for per-layer
          states), or `None`.

        **Returns:**

        A `DepthSolution`.
        """


class Discrete(AbstractDepth):
    """Forward Euler with the field's discrete step: exactly the standard Transformer.

    With the sequential composition the step is 1/2 and each layer is the pre-LN block
    `u + A(N u)`, `u + R(N' u)`; with `post_norm=True` the norms move out of the field and
    after each step instead (`N(u + A(u))`: the post-LN Transformer).

    **Arguments:**

    - `post_norm`: use the post-LN arrangement.
    - `residual`: keep the residual connection (default). With `False` each sub-step
      *replaces* the state, `u <- h f(t, u)` (e.g. `u <- A(N u)`), the "no residual"
      arm of the stabilizer ablation; it is no longer a discretization of the ODE. Pads
      keep their states.
    """

    post_norm: bool = eqx.field(static=True, default=False)
    residual: bool = eqx.field(static=True, default=True)

    def __call__(self, field, u0, mask=None, *, save_at=None):
        _check_state(u0, mask)
        ts_save = _check_save_at(save_at, field.t1)
        h = field.discrete_step
        num_steps = round(field.t1 / h)
        if ts_save is not None:
            k = ts_save / h
            if not np.allclose(k, np.round(k)):
                raise ValueError(
                    f"Discrete can save only at multiples of its step {h}; got save_at={save_at!r}."
                )
        sub = round(1.0 / h)  # sub-steps per layer, each at a phase known at trace time
        step_dtype = u0.dtype
        h_arr = jnp.asarray(h, step_dtype)
        post_norm = self.post_norm
        has_mask = mask is not None

        def layer_step(u, layer):
            states = []
            for k in range(sub):
                t = layer + jnp.asarray(k * h, step_dtype)
                f = lambda t, v, m, k=k: field(t, v, m, normalize=not post_norm, phase=float(k * h))
                increment = h_arr * f(t, u, mask)
                if self.residual:
                    new = u + increment
                elif has_mask:
                    new = jnp.where(mask[..., None], increment, u)
                else:
                    new = increment
                if post_norm:
                    block, _ = field.layer(t)
                    norm = field.composition.post_norm(block, jnp.asarray(k * h, step_dtype))
                    # Norms are token-wise: the batch can be flattened into the token axis.
                    new = norm(new.reshape(-1, u.shape[-1])).reshape(u.shape)
                    if has_mask:
                        new = jnp.where(mask[..., None], new, u)
                u = new
                states.append(u)
            if field.transitions is not None:
                # The state jumps at the boundary after this layer (not after the last).
                boundary = layer.astype(jnp.int32)
                jumped = _transition(field, boundary, u, mask)
                u = jnp.where(boundary < field.num_layers - 1, jumped, u)
                states[-1] = u
            return u, (jnp.stack(states) if ts_save is not None else None)

        layers = jnp.arange(field.num_layers, dtype=step_dtype)
        u1, traj = jax.lax.scan(layer_step, u0, layers)
        us = None
        ts_out = None
        if ts_save is not None:
            traj = traj.reshape(num_steps, *u0.shape)
            traj = jnp.concatenate([u0[None], traj], axis=0)
            idx = np.round(ts_save / h).astype(np.int32)
            us = traj[idx]
            ts_out = jnp.asarray(ts_save, step_dtype)
        n = jnp.asarray(num_steps, jnp.int32)
        stats = DepthStats(
            num_steps=n,
            num_accepted_steps=n,
            num_rejected_steps=jnp.asarray(0, jnp.int32),
            nfe=n,
            success=jnp.asarray(True),
        )
        return DepthSolution(u=u1, ts=ts_out, us=us, stats=stats)


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


def _array_tolerances(controller):
    """Tolerances as arrays, so that changing them does not recompile a jitted call."""
    if isinstance(controller, diffrax.ClipStepSizeController):
        return eqx.tree_at(
            lambda c: c.controller, controller, _array_tolerances(controller.controller)
        )
    if isinstance(controller, diffrax.PIDController):
        rtol, atol = controller.rtol, controller.atol
        for name, v in (("rtol", rtol), ("atol", atol)):
            if not isinstance(v, jax.core.Tracer) and float(np.asarray(v)) < 0:
                raise ValueError(
                    f"PIDController {name} must be >= 0; got {name}={float(np.asarray(v))}. "
                    "Pass e.g. rtol=1e-3, atol=1e-5."
                )
        if not isinstance(rtol, jax.core.Tracer) and not isinstance(atol, jax.core.Tracer):
            if float(np.asarray(rtol)) == 0 and float(np.asarray(atol)) == 0:
                raise ValueError("PIDController needs rtol > 0 or atol > 0; got both 0.")
        return eqx.tree_at(
            lambda c: (c.rtol, c.atol),
            controller,
            (jnp.asarray(rtol, dtype=float), jnp.asarray(atol, dtype=float)),
        )
    return controller


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


class _FirstStageCounter(diffrax.AbstractAdaptiveStepSizeController):
    """Wraps a controller to count the steps whose first stage is evaluated afresh.

    An FSAL method reuses the previous step's last stage, except on the first step and on
    every attempt that starts after a jump (retries of a rejected post-jump step included).
    diffrax's statistics do not say how many such attempts there were; this state does.
    """

    controller: diffrax.AbstractAdaptiveStepSizeController

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
        return _FirstStageCounter(self.controller.wrap(direction))

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        t1, inner = self.controller.init(terms, t0, t1, y0, dt0, args, func, error_order)
        return t1, (inner, jnp.asarray(True), jnp.asarray(0, jnp.int32))

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, state):
        inner, fresh, count = state
        count = count + fresh.astype(jnp.int32)
        keep, next_t0, next_t1, made_jump, inner, result = self.controller.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, inner
        )
        # A rejected attempt is retried from the same start, so it stays fresh.
        fresh = jnp.where(keep, jnp.asarray(made_jump), fresh)
        return keep, next_t0, next_t1, made_jump, (inner, fresh, count), result


class Continuous(AbstractDepth):
    """The exact flow of the field, integrated by diffrax.

    **Arguments:**

    - `solver`: any explicit diffrax solver (default `diffrax.Tsit5()`).
    - `controller`: a step-size controller (default
      `diffrax.PIDController(rtol=1e-3, atol=1e-5)`); for a fixed-step solve pass
      `diffrax.ConstantStepSize()` with `dt0`. The field's jump times are handed to
      adaptive controllers (through `diffrax.ClipStepSizeController`) at call time.
      Tolerances are stored as arrays, so changing them does not recompile.
    - `adjoint`: how to differentiate. Default: `default_adjoint(max_steps)`, diffrax's
      `RecursiveCheckpointAdjoint` keeping `min(16, max_steps)` steps (see
      `DEFAULT_CHECKPOINTS`; diffrax's own default keeps `sqrt(2 max_steps)`).
    - `dt0`: initial (or constant) step; default: the field's discrete step.
    - `max_steps`: the most steps the solver may take.
    - `throw`: raise on failure (default); with `False`, failure is reported in
      `stats.success` and the state is what the solver reached.
    - `matmul_precision`: the matmul precision inside the vector field, as for
      `jax.default_matmul_precision` (default `"highest"`: full float32, so that TF32
      rounding on recent NVIDIA GPUs does not pass for truncation error and inflate an
      adaptive solver's step count; no effect on CPU); `None` leaves JAX's default.
    """

    solver: diffrax.AbstractSolver
    controller: diffrax.AbstractStepSizeController
    adjoint: diffrax.AbstractAdjoint
    dt0: float | None = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    throw: bool = eqx.field(static=True)
    matmul_precision: str | None = eqx.field(static=True)

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
    ):
        self.solver = diffrax.Tsit5() if solver is None else solver
        controller = (
            diffrax.PIDController(rtol=1e-3, atol=1e-5) if controller is None else controller
        )
        if not isinstance(self.solver, diffrax.AbstractSolver):
            raise ValueError(
                f"solver must be a diffrax solver, e.g. diffrax.Tsit5(); got {solver!r}."
            )
        if not isinstance(controller, diffrax.AbstractStepSizeController):
            raise ValueError(
                "controller must be a diffrax step-size controller, e.g. "
                f"diffrax.PIDController(rtol=1e-3, atol=1e-5); got {controller!r}."
            )
        evaluations_per_step(self.solver)  # validates the solver early
        self.controller = _array_tolerances(controller)
        if dt0 is not None and not dt0 > 0:
            raise ValueError(f"dt0 must be > 0; got dt0={dt0}.")
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be a positive int; got max_steps={max_steps!r}.")
        if adjoint is not None and not isinstance(adjoint, diffrax.AbstractAdjoint):
            raise ValueError(
                f"adjoint must be a diffrax adjoint, e.g. diffrax.BacksolveAdjoint(); got "
                f"{adjoint!r}."
            )
        self.adjoint = default_adjoint(max_steps) if adjoint is None else adjoint
        self.dt0 = None if dt0 is None else float(dt0)
        self.max_steps = max_steps
        self.throw = throw
        self.matmul_precision = _check_matmul_precision(matmul_precision)

    def __call__(self, field, u0, mask=None, *, save_at=None):
        _check_state(u0, mask)
        ts_save = _check_save_at(save_at, field.t1)
        if isinstance(self.controller, diffrax.AbstractAdaptiveStepSizeController):
            return self._adaptive(field, u0, mask, ts_save)
        return self._piecewise(field, u0, mask, ts_save)

    def _stats(self, num_steps, accepted, rejected, restarts, success) -> DepthStats:
        per_step, fsal = evaluations_per_step(self.solver)
        nfe = per_step * num_steps
        if fsal:
            # An FSAL method evaluates its first stage afresh at the start and after each
            # jump of the field (the stored last stage belongs to the other side).
            nfe = nfe + restarts
        return DepthStats(
            num_steps=num_steps,
            num_accepted_steps=accepted,
            num_rejected_steps=rejected,
            nfe=jnp.asarray(nfe, jnp.int32),
            success=success,
        )

    def _adaptive(self, field, u0, mask, ts_save):
        term = diffrax.ODETerm(_Rate(field, self.matmul_precision))
        controller = _clip_controller(
            self.controller, jump_ts=field.jump_times(), step_ts=(), dtype=u0.dtype
        )
        controller = _FirstStageCounter(controller)
        dt0 = field.discrete_step if self.dt0 is None else self.dt0

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
                self.solver,
                t0=t0,
                t1=t1,
                dt0=dt0,
                y0=u,
                args=(mask, None),
                stepsize_controller=controller,
                adjoint=self.adjoint,
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
                u0, 0.0, field.t1, None if ts_all is None else jnp.asarray(ts_all, dtype)
            )
            stats = self._stats(*counts[:4], counts[4] == 1)
            if ts_save is None:
                return DepthSolution(u=ys[-1], ts=None, us=None, stats=stats)
            return DepthSolution(u=ys[-1], ts=jnp.asarray(ts_save, dtype), us=ys[:-1], stats=stats)

        # With maps between layers the state jumps at every layer boundary: one solve per
        # layer, the map applied to its final state. A save at depth t is read from the
        # solve of layer min(floor(t), L - 1), every solve saving all depths clipped to its
        # own interval (so states at t = l are the post-map states, the inputs of layer l).
        num_layers = field.num_layers

        def layer_solve(u, layer):
            t0 = layer.astype(dtype)
            ts = None if ts_all is None else jnp.clip(jnp.asarray(ts_all, dtype), t0, t0 + 1)
            ys, counts = solve(u, t0, t0 + 1, ts)
            jumped = _transition(field, layer, ys[-1], mask)
            u1 = jnp.where(layer < num_layers - 1, jumped, ys[-1])
            return u1, (ys[:-1] if ts_save is not None else None, counts)

        u1, (ys, counts) = jax.lax.scan(layer_solve, u0, jnp.arange(num_layers))
        total = jnp.sum(counts, axis=0)
        stats = self._stats(*total[:4], total[4] == num_layers)
        if ts_save is None:
            return DepthSolution(u=u1, ts=None, us=None, stats=stats)
        owner = np.minimum(np.floor(ts_save), num_layers - 1).astype(np.int32)
        us = ys[owner, np.arange(len(ts_save))]
        return DepthSolution(u=u1, ts=jnp.asarray(ts_save, dtype), us=us, stats=stats)

    def _piecewise(self, field, u0, mask, ts_save):
        # A fixed-step solve is run piece by piece over the smooth intervals of the field
        # (between its jumps and layer boundaries), each piece told which interval it is
        # on: a stage evaluated exactly at a jump then takes the rate of its own piece,
        # and the method keeps its order.
        breaks = sorted(set(field.jump_times()) | set(range(1, field.num_layers)))
        edges = np.array([0.0, *breaks, field.t1])
        widths = np.diff(edges)
        if not np.allclose(widths, widths[0]):
            raise ValueError(f"the field's smooth pieces must have equal widths; got {edges}.")
        width = float(widths[0])
        dt0 = field.discrete_step if self.dt0 is None else self.dt0
        steps = max(1, round(width / dt0))
        if steps * (len(widths)) > self.max_steps:
            raise ValueError(
                f"a constant step of {dt0} needs {steps * len(widths)} steps, more than "
                f"max_steps={self.max_steps}; pass a larger max_steps or a larger dt0."
            )
        if not np.isclose(steps * dt0, width):
            raise ValueError(
                f"with a constant step size, dt0 must divide the field's smooth pieces of "
                f"width {width}; got dt0={dt0}. Pass e.g. dt0={width}/2**k."
            )
        if ts_save is not None and not np.all(np.isin(np.round(ts_save, 12), np.round(edges, 12))):
            raise ValueError(
                f"with a constant step size, save_at must be among the piece edges "
                f"{edges.tolist()}; got {ts_save.tolist()}. Use an adaptive controller to "
                "save elsewhere."
            )
        term = diffrax.ODETerm(_Rate(field, self.matmul_precision))
        dtype = u0.dtype
        starts = jnp.asarray(edges[:-1], dtype)
        # Pieces ending on an inner layer boundary apply the field's between-layer map.
        ends = np.round(edges[1:], 12)
        at_boundary = jnp.asarray((ends == np.round(ends)) & (ends < field.t1))
        boundaries = jnp.asarray(np.round(ends).astype(np.int32) - 1)

        def piece(u, x):
            t0, jump, boundary = x
            t1 = t0 + jnp.asarray(width, dtype)
            anchor = t0 + jnp.asarray(width / 2, dtype)
            sol = diffrax.diffeqsolve(
                term,
                self.solver,
                t0=t0,
                t1=t1,
                dt0=jnp.asarray(width / steps, dtype),
                y0=u,
                args=(mask, anchor),
                stepsize_controller=self.controller,
                adjoint=self.adjoint,
                saveat=diffrax.SaveAt(t1=True),
                # The step count per piece is known: a tight bound keeps the checkpointing
                # adjoint's buffers (sized by max_steps) from dwarfing the state.
                max_steps=steps,
                throw=self.throw,
            )
            u1 = sol.ys[-1]
            if field.transitions is not None:
                u1 = jnp.where(jump, _transition(field, boundary, u1, mask), u1)
            counts = jnp.stack(
                [
                    jnp.asarray(sol.stats["num_steps"], jnp.int32),
                    jnp.asarray(sol.stats["num_accepted_steps"], jnp.int32),
                    jnp.asarray(sol.stats["num_rejected_steps"], jnp.int32),
                    (sol.result == diffrax.RESULTS.successful).astype(jnp.int32),
                ]
            )
            return u1, (u1 if ts_save is not None else None, counts)

        u1, (traj, counts) = jax.lax.scan(piece, u0, (starts, at_boundary, boundaries))
        total = jnp.sum(counts, axis=0)
        num_pieces = len(edges) - 1
        stats = self._stats(total[0], total[1], total[2], num_pieces, total[3] == num_pieces)
        if ts_save is None:
            return DepthSolution(u=u1, ts=None, us=None, stats=stats)
        traj = jnp.concatenate([u0[None], traj], axis=0)
        idx = np.searchsorted(np.round(edges, 12), np.round(ts_save, 12))
        return DepthSolution(u=u1, ts=jnp.asarray(ts_save, dtype), us=traj[idx], stats=stats)
