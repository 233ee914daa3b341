"""Dropout as the LRA Transformer baseline has it: two rates, applied only where a key is given."""

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray


class Dropout(eqx.Module):
    """The dropout rates of a model, as the LRA Transformer has them.

    - `rate`: on the embedded tokens (after the positions are added, CLS token included),
      on the reaction's (FFN's) hidden activations, and on the output of each residual
      branch (attention and FFN) before it is added to the stream.
    - `attention_rate`: on the attention weights (after the softmax).

    The rates are static configuration: a model built with `Dropout(0, 0)` (or without
    one) runs exactly the program of a model without dropout. Dropout acts only where the
    model is called with a `key` (training); without one (evaluation) it is the identity.
    Kept entries are scaled by `1 / (1 - rate)` (inverted dropout).

    **Arguments:**

    - `rate`: in `[0, 1)`; LRA uses 0.1 for most tasks.
    - `attention_rate`: in `[0, 1)`; LRA uses 0.1 for most tasks.

    **Raises:**

    `ValueError` for a rate outside `[0, 1)`.
    """

    rate: float = eqx.field(static=True, default=0.0)
    attention_rate: float = eqx.field(static=True, default=0.0)

    def __check_init__(self):
        for name in ("rate", "attention_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
                raise ValueError(
                    f"Dropout {name} must be a number in [0, 1); got {name}={value!r}. "
                    "Pass e.g. 0.1, or 0 for none."
                )

    @property
    def active(self) -> bool:
        """Whether any rate is positive (only then does a key change anything)."""
        return self.rate > 0 or self.attention_rate > 0


def dropout(
    x: Float[Array, "*shape"], rate: float, key: PRNGKeyArray | None
) -> Float[Array, "*shape"]:
    """Inverted dropout: each entry of `x` is zeroed with probability `rate` and the rest
    scaled by `1 / (1 - rate)`; `x` itself where `key` is `None` or `rate` is 0.

    **Arguments:**

    - `x`: any array of floats.
    - `rate`: a Python float in `[0, 1)`.
    - `key`: draws the mask (one independent draw per entry), or `None`.

    **Returns:**

    An array like `x`.
    """
    if key is None or rate == 0:
        return x
    keep = jr.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
