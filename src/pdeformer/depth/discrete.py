"""Fixed-step integrators of the standard Transformer: `Discrete` (pre-LN) and `PostLN`."""

import diffrax
import equinox as eqx
import jax.numpy as jnp

from .. import regularisers as reg
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

    **Arguments:**

    - `regularisers`: `KineticEnergy` and `JacobianFrobenius` (see
      `pdeformer.regularisers`), accumulated as sums over the Euler steps, `h` times the
      integrand at the start of each step (the augmented rate of `Continuous`, under
      Euler, through the same stepping code); returned in `DepthSolution.regularisation`.
      A `JacobianFrobenius` needs a `key` per call.

    **Raises:**

    `ValueError` at construction for an `ErrorEstimate` (Euler makes no error estimate).
    """

    regularisers: tuple

    def __init__(self, *, regularisers: tuple = ()):
        self.regularisers = reg.check_regularisers(regularisers)

    def __check_init__(self):
        for r in reg.check_regularisers(self.regularisers):
            if isinstance(r, reg.ErrorEstimate):
                raise ValueError(
                    "ErrorEstimate needs an adaptive solver's error estimate, which Discrete "
                    "does not make: use Continuous(diffrax.Tsit5(), diffrax.PIDController(...), "
                    "regularisers=...), or KineticEnergy / JacobianFrobenius with Discrete."
                )

    def __call__(self, field, u0, mask=None, *, save_at=None, key=None):
        check_state(u0, mask)
        ts_save = check_save_at(save_at, field.t1)
        h = field.discrete_step
        check_fixed_saves(ts_save, h, "Discrete")
        steps = round(field.pieces().width / h)
        u1, us, n, integrals = fixed_steps(
            field,
            diffrax.Euler(),
            steps,
            u0,
            mask,
            ts_save,
            regularisers=self.regularisers,
            key=key,
        )
        return DepthSolution(
            u=u1,
            ts=None if ts_save is None else jnp.asarray(ts_save, u0.dtype),
            us=us,
            stats=stats(n, n, 0, n, True),
            regularisation=integrals,
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

    It takes no regularisers: with a norm after every step it is no discretization of the
    ODE, whose integrals they are. `PostLN(regularisers=...)` raises a `ValueError`
    saying so.
    """

    def __init__(self, *, regularisers: tuple = ()):
        if regularisers:
            raise ValueError(
                "PostLN takes no regularisers: with a norm after every step it is no "
                "discretization of the ODE whose integrals they are; got "
                f"regularisers={regularisers!r}. Use Discrete(regularisers=...) (pre-LN) or "
                "Continuous(..., regularisers=...)."
            )

    def __call__(self, field, u0, mask=None, *, save_at=None, key=None):
        # `key` is accepted for the common signature; nothing here is random.
        del key
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
        u1, us, n, _ = fixed_steps(
            _without_norms(field), diffrax.Euler(), steps, u0, mask, ts_save, after_step=normalise
        )
        return DepthSolution(
            u=u1,
            ts=None if ts_save is None else jnp.asarray(ts_save, u0.dtype),
            us=us,
            stats=stats(n, n, 0, n, True),
        )
