"""`ExponentialContinuous`: the field's flow with its diffusion `D Lap u` integrated exactly.

An adaptive exponential Runge–Kutta method (`pdeformer.exprk`) on `du/dt = N(t, u) + D Lap u`:
the diffusion enters through its DCT-II eigenvalues (`DiffusionTerm`), so the step follows
the tolerance and the smoothness of `N` (attention and reaction), not `D`.
"""

import diffrax
import equinox as eqx
import jax.numpy as jnp
import numpy as np

from .._checks import array_tolerances, check_save_at, check_state
from ..exprk import AbstractExponentialRK, ExpRK3
from ..operators.spectral import DiffusionTerm
from ._base import DepthSolution, VectorField, stats
from .continuous import AbstractContinuous, _clip_controller, default_adjoint, default_controller


class ExponentialContinuous(AbstractContinuous):
    """The field's flow with its diffusion `D Lap u` integrated exactly: for large `D`.

    An adaptive exponential Runge–Kutta method (`ExpRK3` by default) on
    `du/dt = N(t, u) + D Lap u`, where `N` is the field without its diffusion term. The
    diffusion enters through its DCT-II eigenvalues (`DiffusionTerm`), so the step size is
    set by the tolerance and the smoothness of `N` only: its cost does not grow with `D`,
    where an explicit solver's grows linearly. The controller gets the field's jump times
    (as `Continuous` does) and steps that land exactly on the save depths.

    Each step costs `solver.num_stages` field evaluations, rejected steps included; they are
    counted in `stats.nfe` (the method is not FSAL, so nothing else is evaluated).

    **Arguments:**

    - `solver`: an `AbstractExponentialRK` (default `ExpRK3()`).
    - `controller`: an adaptive step-size controller (default
      `diffrax.PIDController(rtol=1e-3, atol=1e-4)`), with the tolerances checked and
      stored as arrays as `Continuous` does.
    - `adjoint`: how to differentiate (default, as for `Continuous`, diffrax's
      `RecursiveCheckpointAdjoint` keeping `min(16, max_steps)` steps;
      `diffrax.BacksolveAdjoint` is not supported).
    - `dt0`: the initial step; default the field's discrete step.
    - `max_steps`, `throw`, `matmul_precision`: as for `Continuous`.

    **Raises:**

    `ValueError` at construction for a solver that is not exponential, a controller that is
    not adaptive or a backsolve adjoint; at call time for a field without a diffusion term
    (use `Continuous`).
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
        self.solver = ExpRK3() if solver is None else solver
        controller = default_controller() if controller is None else controller
        self.controller = array_tolerances(controller)
        self.adjoint = default_adjoint(max_steps) if adjoint is None else adjoint
        self.dt0 = None if dt0 is None else float(dt0)
        self.max_steps = max_steps
        self.throw = throw
        self.matmul_precision = matmul_precision

    def __check_init__(self):
        if not isinstance(self.solver, AbstractExponentialRK):
            raise ValueError(
                "solver must be an exponential Runge–Kutta method (pdeformer.ExpRK3() or "
                f"pdeformer.ExpRK2()); got {self.solver!r}. For an explicit diffrax solver use "
                "pdeformer.Continuous."
            )
        if not isinstance(self.controller, diffrax.AbstractAdaptiveStepSizeController):
            raise ValueError(
                "controller must be adaptive, e.g. diffrax.PIDController(rtol=1e-3, "
                f"atol=1e-4); got {self.controller!r}. The exponential path exists to let the "
                "tolerance, not the diffusion coefficient, set the step."
            )
        if isinstance(self.adjoint, diffrax.BacksolveAdjoint):
            raise ValueError(
                "BacksolveAdjoint is not supported by the exponential path; pass "
                "diffrax.RecursiveCheckpointAdjoint() (the default) or diffrax.DirectAdjoint()."
            )

    def __call__(self, field, u0, mask=None, *, save_at=None, key=None):
        # `key` is accepted for the common signature; nothing here is random (no regularisers).
        del key
        check_state(u0, mask)
        ts_save = check_save_at(save_at, field.t1)
        if field.diffusion is None:
            raise ValueError(
                "ExponentialContinuous integrates a field's diffusion term exactly, but this "
                "field has none; use pdeformer.Continuous, or build the field with "
                "diffusion=pdeformer.DiffusionOperator(dim, alpha_max=None)."
            )
        if getattr(field, "transitions", None) is not None:
            raise ValueError(
                "ExponentialContinuous does not support fields with maps between layers "
                "(diffusion_at='between_layers'); use pdeformer.Continuous."
            )
        dtype = u0.dtype
        smooth = eqx.tree_at(lambda f: f.diffusion, field, None, is_leaf=lambda x: x is None)
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(VectorField(smooth, self.matmul_precision)),
            DiffusionTerm(field.diffusion, u0, mask),
        )
        controller = _clip_controller(
            self.controller,
            jump_ts=field.jump_times(),
            step_ts=() if ts_save is None else tuple(ts_save.tolist()),
            dtype=dtype,
        )
        if ts_save is None:
            saveat = diffrax.SaveAt(t1=True)
        else:
            # t1 is saved last, so the final state is there whatever was asked.
            saveat = diffrax.SaveAt(ts=jnp.asarray(np.append(ts_save, field.t1), dtype))
        sol = diffrax.diffeqsolve(
            terms,
            self.solver,
            t0=0.0,
            t1=field.t1,
            dt0=field.discrete_step if self.dt0 is None else self.dt0,
            y0=u0,
            args=mask,
            stepsize_controller=controller,
            adjoint=self.adjoint,
            saveat=saveat,
            max_steps=self.max_steps,
            throw=self.throw,
        )
        num_steps = jnp.asarray(sol.stats["num_steps"], jnp.int32)
        st = stats(
            num_steps,
            sol.stats["num_accepted_steps"],
            sol.stats["num_rejected_steps"],
            self.solver.num_stages * num_steps,
            sol.result == diffrax.RESULTS.successful,
        )
        if ts_save is None:
            return DepthSolution(u=sol.ys[-1], ts=None, us=None, stats=st)
        return DepthSolution(u=sol.ys[-1], ts=jnp.asarray(ts_save, dtype), us=sol.ys[:-1], stats=st)
