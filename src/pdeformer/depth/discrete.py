"""Fixed-step integrators of the standard Transformer: `Discrete` (pre-LN) and `PostLN`."""

import diffrax
import equinox as eqx
import jax.numpy as jnp

from .._checks import check_save_at, check_state
from ..operators import Identity
from ._base import AbstractDepth, DepthSolution, check_fixed_saves, fixed_steps, stats


class Discrete(AbstractDepth):
    """Forward Euler over the field's pieces with the composition's step: exactly the
    standard Transformer.

    With the sequential composition the step is 1/2 and each layer is the pre-LN block
    `u + A(N u)`, `u + R(N' u)`. It is the same program as
    `Continuous(diffrax.Euler(), diffrax.ConstantStepSize(), dt0=field.discrete_step)`,
    so the two agree bit for bit. Saves are possible at multiples of the step.
    """

    def __call__(self, field, u0, mask=None, *, save_at=None):
        check_state(u0, mask)
        ts_save = check_save_at(save_at, field.t1)
        h = field.discrete_step
        check_fixed_saves(ts_save, h, "Discrete")
        steps = round(field.pieces().width / h)
        u1, us, n = fixed_steps(field, diffrax.Euler(), steps, u0, mask, ts_save)
        return DepthSolution(
            u=u1,
            ts=None if ts_save is None else jnp.asarray(ts_save, u0.dtype),
            us=us,
            stats=stats(n, n, 0, n, True),
        )


def _without_norms(field):
    return eqx.tree_at(
        lambda f: (f.blocks.attention_norm, f.blocks.reaction_norm),
        field,
        (Identity(), Identity()),
    )


class PostLN(AbstractDepth):
    """The post-LN Transformer: the field's norms move from before each branch to after
    each Euler step, `u <- N(u + A(u))`, then `u <- N'(u + R(u))`.

    Forward Euler with the composition's step over the pieces of the field with its norms
    taken out (replaced by `Identity`), each step followed by the norm of its piece
    (`composition.post_norm`). Pads keep their states. Saves are possible at multiples of
    the step.
    """

    def __call__(self, field, u0, mask=None, *, save_at=None):
        check_state(u0, mask)
        ts_save = check_save_at(save_at, field.t1)
        h = field.discrete_step
        check_fixed_saves(ts_save, h, "PostLN")

        def normalise(period, branch, t, new, old):
            block = field.schedule.weights(field.blocks, t, period)
            norm = field.composition.post_norm(block, branch)
            # Norms are token-wise: the batch can be flattened into the token axis.
            new = norm(new.reshape(-1, new.shape[-1])).reshape(new.shape)
            return new if mask is None else jnp.where(mask[..., None], new, old)

        steps = round(field.pieces().width / h)
        u1, us, n = fixed_steps(
            _without_norms(field), diffrax.Euler(), steps, u0, mask, ts_save, after_step=normalise
        )
        return DepthSolution(
            u=u1,
            ts=None if ts_save is None else jnp.asarray(ts_save, u0.dtype),
            us=us,
            stats=stats(n, n, 0, n, True),
        )
