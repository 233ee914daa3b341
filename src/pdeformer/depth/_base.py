"""The integrators' shared base: results, statistics, and the fixed-step walk over the pieces."""

import abc
from collections.abc import Callable, Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, Scalar

from .. import regularisers as reg
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
    - `regularisation`: the integrals of the integrator's regularisers over `[0, T]`, one
      scalar each in their order (see `pdeformer.regularisers`), or `None` without any.
    """

    u: Float[Array, "*batch seq dim"]
    ts: Float[Array, " saves"] | None
    us: Float[Array, "saves *batch seq dim"] | None
    stats: DepthStats
    regularisation: tuple[Scalar, ...] | None = None


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
        key: PRNGKeyArray | None = None,
    ) -> DepthSolution:
        """Integrate `field` from `u0` over `[0, field.num_layers]`.

        **Arguments:**

        - `field`: the vector field.
        - `u0`: initial token states, `(seq, dim)` or with leading batch axes.
        - `mask`: key-padding mask matching `u0` without its channel axis, or `None`.
        - `save_at`: depths at which to save the state (e.g. `range(L + 1)` for per-layer
          states), or `None`.
        - `key`: draws what a solve holds fixed in depth (the probe of a
          `JacobianFrobenius` regulariser); needed only then.

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
    regularisers: tuple = (),
    key: PRNGKeyArray | None = None,
) -> tuple[Array, Array | None, int, tuple[Scalar, ...] | None]:
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

    With `regularisers` (`KineticEnergy`, `JacobianFrobenius`; see
    `pdeformer.regularisers`) the solver steps the augmented state `(u, integrals)` under
    the augmented rate (`regularisers.AugmentedRate`, its probe drawn once from `key`), so
    the integrals are the solver's quadrature along its own trajectory: with Euler, the
    sum over the steps of `h` times the integrand at each step's start. The state `u` is
    stepped exactly as without them.

    **Returns:**

    `(u1, us, num_steps, integrals)`: the final state, the states at `ts_save` (multiples
    of the step) or `None`, the number of steps, and the regularisers' integrals over
    `[0, T]` (`None` without any).
    """
    pieces = field.pieces()
    dtype = u0.dtype
    h = pieces.width / steps
    save = ts_save is not None
    regularisers = tuple(regularisers)
    regularised = bool(regularisers)
    probe = reg.draw_probe(regularisers, u0, mask, key) if regularised else None
    count = reg.token_count(u0, mask) if regularised else None

    def run_piece(y, period, j, branch):
        rate = VectorField(field.on_piece(period, branch), matmul_precision)
        if regularised:
            rate = reg.AugmentedRate(rate, regularisers, probe, count)
        term = diffrax.ODETerm(rate)
        start = period.astype(dtype) * pieces.period + j * pieces.width

        def step(carry, k):
            y, state = carry
            ta = start + jnp.asarray(k, dtype) * h
            tb = start + jnp.asarray(k + 1, dtype) * h
            y1, _, _, state, _ = solver.step(term, ta, tb, y, mask, state, False)
            if after_step is not None:
                y1 = after_step(period, branch, ta, y1, y)
            u1 = y1[0] if regularised else y1
            return (y1, state), (u1 if save else None)

        state = solver.init(term, start, start + h, y, mask)
        if steps == 1:
            (y, _), out = step((y, state), 0)
            return y, (out[None] if save else None)
        (y, _), outs = jax.lax.scan(step, (y, state), jnp.arange(steps))
        return y, outs

    def period_body(y, period):
        outs = []
        for j, branch in enumerate(pieces.branches):
            y, out = run_piece(y, period, j, branch)
            outs.append(out)
        if field.transitions is not None:
            # Periods are layers here; the state jumps after every layer but the last.
            u, integrals = y if regularised else (y, None)
            u = jnp.where(period < field.num_layers - 1, field.transition(period, u, mask), u)
            y = (u, integrals) if regularised else u
            if save:
                outs[-1] = outs[-1].at[-1].set(u)
        return y, (jnp.concatenate(outs) if save else None)

    y0 = (u0, tuple(jnp.zeros((), dtype) for _ in regularisers)) if regularised else u0
    y1, traj = jax.lax.scan(period_body, y0, jnp.arange(pieces.periods, dtype=jnp.int32))
    u1, integrals = y1 if regularised else (y1, None)
    total = pieces.count * steps
    if not save:
        return u1, None, total, integrals
    traj = jnp.concatenate([u0[None], traj.reshape(total, *u0.shape)], axis=0)
    return u1, traj[np.round(ts_save / h).astype(np.int32)], total, integrals


def stats(num_steps, accepted, rejected, nfe, success) -> DepthStats:
    return DepthStats(
        num_steps=jnp.asarray(num_steps, jnp.int32),
        num_accepted_steps=jnp.asarray(accepted, jnp.int32),
        num_rejected_steps=jnp.asarray(rejected, jnp.int32),
        nfe=jnp.asarray(nfe, jnp.int32),
        success=jnp.asarray(success),
    )
