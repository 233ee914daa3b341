"""Ablation arms of the stabilizer study that are not discretizations of the field.

`NoResidual` is built from the library's public API only: the field's pieces
(`Field.pieces`), their rates (`Field.on_piece`) and the between-layer map
(`Field.transition`).
"""

import jax
import jax.numpy as jnp
import numpy as np

import pdeformer as pf


class NoResidual(pf.AbstractDepth):
    """The "no residual" arm: each Euler step of the discrete model *replaces* the state,
    `u <- h f(t, u)` (with the sequential composition `u <- A(N u)`, then `u <- R(N' u)`),
    instead of adding to it. It is no longer a discretization of the ODE. Pads keep their
    states; the field's between-layer maps are applied as in `pf.Discrete()`. Saves are
    possible at multiples of the step (e.g. `save_at=range(L + 1)` for per-layer states),
    as in `pf.Discrete()`.
    """

    def __call__(self, field, u0, mask=None, *, save_at=None, key=None):
        pieces = field.pieces()
        h = field.discrete_step
        steps = round(pieces.width / h)
        dtype = u0.dtype
        ts_save = None if save_at is None else np.asarray(save_at, dtype=np.float64)
        if ts_save is not None:
            k = ts_save / h
            if (
                ts_save.ndim != 1
                or ts_save.size == 0
                or np.any(ts_save < 0)
                or np.any(ts_save > field.t1)
                or not np.allclose(k, np.round(k))
            ):
                raise ValueError(
                    f"NoResidual saves only at multiples of its step {h} in [0, {field.t1}]; "
                    f"got save_at={save_at!r}. Pass e.g. save_at=range({field.num_layers} + 1)."
                )
        save = ts_save is not None

        def period_body(u, period):
            outs = []
            for j, branch in enumerate(pieces.branches):
                rate = field.on_piece(period, branch)
                start = period.astype(dtype) * pieces.period + j * pieces.width

                def step(u, k, rate=rate, start=start):
                    increment = h * rate(start + jnp.asarray(k, dtype) * h, u, mask)
                    u = increment if mask is None else jnp.where(mask[..., None], increment, u)
                    return u, (u if save else None)

                u, out = jax.lax.scan(step, u, jnp.arange(steps))
                outs.append(out)
            if field.transitions is not None:
                u = jnp.where(period < field.num_layers - 1, field.transition(period, u, mask), u)
                if save:
                    # The state saved at a layer's end is the one the next layer starts from.
                    outs[-1] = outs[-1].at[-1].set(u)
            return u, (jnp.concatenate(outs) if save else None)

        u1, traj = jax.lax.scan(period_body, u0, jnp.arange(pieces.periods, dtype=jnp.int32))
        total = pieces.count * steps
        n = jnp.asarray(total, jnp.int32)
        stats = pf.DepthStats(
            num_steps=n,
            num_accepted_steps=n,
            num_rejected_steps=jnp.asarray(0, jnp.int32),
            nfe=n,
            success=jnp.asarray(True),
        )
        if not save:
            return pf.DepthSolution(u=u1, ts=None, us=None, stats=stats)
        traj = jnp.concatenate([u0[None], traj.reshape(total, *u0.shape)], axis=0)
        us = traj[np.round(ts_save / h).astype(np.int32)]
        return pf.DepthSolution(u=u1, ts=jnp.asarray(ts_save, dtype), us=us, stats=stats)
