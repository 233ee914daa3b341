"""Argument checks shared by the integrators and the spectral operator (private)."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def check_state(u0, mask) -> None:
    """A state `(*batch, seq, dim)` of floats and a boolean mask of its shape without `dim`."""
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


def check_save_at(save_at, t1: float) -> np.ndarray | None:
    """The save depths as a float64 array, or `None`."""
    if save_at is None:
        return None
    ts = np.asarray(save_at, dtype=np.float64)
    if ts.ndim != 1 or ts.size == 0 or np.any(ts < 0) or np.any(ts > t1) or np.any(np.diff(ts) < 0):
        raise ValueError(
            f"save_at must be a non-empty, non-decreasing sequence of depths in [0, {t1}]; "
            f"got {save_at!r}."
        )
    return ts


MATMUL_PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")


def check_matmul_precision(precision: str | None) -> None:
    if precision is not None and precision not in MATMUL_PRECISIONS:
        raise ValueError(
            f"matmul_precision must be one of {MATMUL_PRECISIONS} or None (JAX's default); "
            f"got {precision!r}. Pass 'highest' for full float32 matmuls in adaptive solves."
        )


def check_common(dt0, max_steps, adjoint) -> None:
    """The configuration `Continuous` and `ExponentialContinuous` share."""
    if dt0 is not None and not dt0 > 0:
        raise ValueError(f"dt0 must be > 0; got dt0={dt0}.")
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int; got max_steps={max_steps!r}.")
    if not isinstance(adjoint, diffrax.AbstractAdjoint):
        raise ValueError(
            f"adjoint must be a diffrax adjoint, e.g. diffrax.BacksolveAdjoint(); got {adjoint!r}."
        )


def check_controller(controller) -> None:
    if not isinstance(controller, diffrax.AbstractStepSizeController):
        raise ValueError(
            "controller must be a diffrax step-size controller, e.g. "
            f"diffrax.PIDController(rtol=1e-3, atol=1e-4); got {controller!r}."
        )


def array_tolerances(controller):
    """`controller` with its tolerances checked and stored as arrays, so that changing them
    does not recompile a jitted call."""
    if isinstance(controller, diffrax.ClipStepSizeController):
        return eqx.tree_at(
            lambda c: c.controller, controller, array_tolerances(controller.controller)
        )
    if isinstance(controller, diffrax.PIDController):
        rtol, atol = controller.rtol, controller.atol
        for name, v in (("rtol", rtol), ("atol", atol)):
            if not isinstance(v, jax.core.Tracer) and float(np.asarray(v)) < 0:
                raise ValueError(
                    f"PIDController {name} must be >= 0; got {name}={float(np.asarray(v))}. "
                    "Pass e.g. rtol=1e-3, atol=1e-4."
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
