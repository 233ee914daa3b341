"""The integrators' shared base: results, statistics, and the fixed-step walk over the pieces."""

import abc
from collections.abc import Callable, Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ..field import Field


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


class VectorField(eqx.Module):
    """A rate `(t, u, mask)` as a diffrax vector field `(t, y, args)`, `args` the mask.

    A module, not a closure: the field's weights are then leaves of the term, which
    `diffrax.BacksolveAdjoint` needs in order to differentiate with respect to them.
    """

    rate: Callable
    matmul_precision: str | None = eqx.field(static=True, default=None)

    def __call__(self, t, u, mask):
        if self.matmul_precision is None:
            return self.rate(t, u, mask)
        # Set here, in the vector field, so that every trace of it is pinned: the forward
        # solve, and the backward solve of BacksolveAdjoint, traced after the forward.
        with jax.default_matmul_precision(self.matmul_precision):
            return self.rate(t, u, mask)


def check_fixed_saves(ts_save: np.ndarray | None, h: float, name: str) -> None:
    if ts_save is None:
        return
    k = ts_save / h
    if not np.allclose(k, np.round(k)):
        raise ValueError(
            f"{name} saves only at multiples of its step {h}; got save_at={ts_save.tolist()}. "
            "Use an adaptive controller to save elsewhere."
        )


def steps_per_piece(field: Field, dt: float) -> int:
    """How many constant steps of `dt` cover each of the field's pieces; raises if `dt`
    does not divide them."""
    width = field.pieces().width
    steps = max(1, round(width / dt))
    if not np.isclose(steps * dt, width):
        raise ValueError(
            f"with a constant step size, dt0 must divide the field's smooth pieces of width "
            f"{width}; got dt0={dt}. Pass e.g. dt0={width}/2**k."
        )
    return steps


def fixed_steps(
    field: Field,
    solver: diffrax.AbstractSolver,
    steps: int,
    u0: Float[Array, "*batch seq dim"],
    mask: Bool[Array, "*batch seq"] | None,
    ts_save: np.ndarray | None,
    *,
    matmul_precision: str | None = None,
    after_step: Callable | None = None,
) -> tuple[Array, Array | None, int]:
    """`steps` constant steps of `solver` on each of the field's pieces, in order.

    This one function is `Discrete` (with `diffrax.Euler()`) and `Continuous`'s fixed-step
    path (with any solver): the two build the same program, so `Discrete()` and
    `Continuous(diffrax.Euler(), diffrax.ConstantStepSize(), dt0=1/2)` agree bit for bit
    by construction. Each piece is stepped with its own rate (`field.on_piece`), so a stage
    on the piece's end takes that piece's rate and the method keeps its order; a scan runs
    over the periods (compile time flat in depth), the branches of a period are unrolled
    (known at trace time: no `lax.cond`). The solver starts afresh on each piece
    (`solver.init`, as after a jump), and the field's between-layer map is applied at the
    end of every layer but the last.

    `after_step(period, branch, t, u_new, u_old)`, where given, replaces each step's result
    (post-LN's norm).

    **Returns:**

    `(u1, us, num_steps)`: the final state, the states at `ts_save` (multiples of the step)
    or `None`, and the number of steps.
    """
    pieces = field.pieces()
    dtype = u0.dtype
    h = pieces.width / steps
    save = ts_save is not None

    def run_piece(u, period, j, branch):
        term = diffrax.ODETerm(VectorField(field.on_piece(period, branch), matmul_precision))
        start = period.astype(dtype) * pieces.period + j * pieces.width

        def step(carry, k):
            u, state = carry
            ta = start + jnp.asarray(k, dtype) * h
            tb = start + jnp.asarray(k + 1, dtype) * h
            u1, _, _, state, _ = solver.step(term, ta, tb, u, mask, state, False)
            if after_step is not None:
                u1 = after_step(period, branch, ta, u1, u)
            return (u1, state), (u1 if save else None)

        state = solver.init(term, start, start + h, u, mask)
        if steps == 1:
            (u, _), out = step((u, state), 0)
            return u, (out[None] if save else None)
        (u, _), outs = jax.lax.scan(step, (u, state), jnp.arange(steps))
        return u, outs

    def period_body(u, period):
        outs = []
        for j, branch in enumerate(pieces.branches):
            u, out = run_piece(u, period, j, branch)
            outs.append(out)
        if field.transitions is not None:
            # Periods are layers here; the state jumps after every layer but the last.
            u = jnp.where(period < field.num_layers - 1, field.transition(period, u, mask), u)
            if save:
                outs[-1] = outs[-1].at[-1].set(u)
        return u, (jnp.concatenate(outs) if save else None)

    u1, traj = jax.lax.scan(period_body, u0, jnp.arange(pieces.periods, dtype=jnp.int32))
    total = pieces.count * steps
    if not save:
        return u1, None, total
    traj = jnp.concatenate([u0[None], traj.reshape(total, *u0.shape)], axis=0)
    return u1, traj[np.round(ts_save / h).astype(np.int32)], total


def stats(num_steps, accepted, rejected, nfe, success) -> DepthStats:
    return DepthStats(
        num_steps=jnp.asarray(num_steps, jnp.int32),
        num_accepted_steps=jnp.asarray(accepted, jnp.int32),
        num_rejected_steps=jnp.asarray(rejected, jnp.int32),
        nfe=jnp.asarray(nfe, jnp.int32),
        success=jnp.asarray(success),
    )
