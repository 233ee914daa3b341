"""Ablation arms of the stabilizer study that are not discretizations of the field.

`NoResidual` is built from the library's public API only: the field's pieces
(`Field.pieces`), their rates (`Field.on_piece`) and the between-layer map
(`Field.transition`).
"""

import jax
import jax.numpy as jnp

import pdeformer as pf


class NoResidual(pf.AbstractDepth):
    """The "no residual" arm: each Euler step of the discrete model *replaces* the state,
    `u <- h f(t, u)` (with the sequential composition `u <- A(N u)`, then `u <- R(N' u)`),
    instead of adding to it. It is no longer a discretization of the ODE. Pads keep their
    states; the field's between-layer maps are applied as in `pf.Discrete()`.
    """

    def __call__(self, field, u0, mask=None, *, save_at=None):
        if save_at is not None:
            raise ValueError(
                f"NoResidual returns the final state only; got save_at={save_at!r}. Pass "
                "save_at=None."
            )
        pieces = field.pieces()
        h = field.discrete_step
        steps = round(pieces.width / h)
        dtype = u0.dtype

        def period_body(u, period):
            for j, branch in enumerate(pieces.branches):
                rate = field.on_piece(period, branch)
                start = period.astype(dtype) * pieces.period + j * pieces.width

                def step(u, k, rate=rate, start=start):
                    increment = h * rate(start + jnp.asarray(k, dtype) * h, u, mask)
                    if mask is None:
                        return increment, None
                    return jnp.where(mask[..., None], increment, u), None

                u, _ = jax.lax.scan(step, u, jnp.arange(steps))
            if field.transitions is not None:
                jumped = field.transition(period, u, mask)
                u = jnp.where(period < field.num_layers - 1, jumped, u)
            return u, None

        u1, _ = jax.lax.scan(period_body, u0, jnp.arange(pieces.periods, dtype=jnp.int32))
        n = jnp.asarray(pieces.count * steps, jnp.int32)
        stats = pf.DepthStats(
            num_steps=n,
            num_accepted_steps=n,
            num_rejected_steps=jnp.asarray(0, jnp.int32),
            nfe=n,
            success=jnp.asarray(True),
        )
        return pf.DepthSolution(u=u1, ts=None, us=None, stats=stats)
