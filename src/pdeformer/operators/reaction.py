"""The local reaction term `R`: the token-wise feed-forward network."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .attention import _dense_init, dense
from .dropout import dropout


class Reaction(eqx.Module):
    """Token-wise two-layer MLP `act(u @ w1 + b1) @ w2 + b2`: the reaction term of the field.

    The weights multiply from the right (`w1` is `(dim, hidden)`, `w2` is `(hidden, dim)`):
    a PyTorch `nn.Linear` maps as `w1 = linear1.weight.T`, `b1 = linear1.bias` (and
    likewise `linear2` to `w2`, `b2`); a Flax `Dense` kernel maps as it is.

    **Arguments:**

    - `dim`: model width.
    - `hidden`: width of the hidden layer (commonly `4 * dim`).
    - `key`: a JAX PRNG key for the initial weights.
    - `activation`: the nonlinearity. The default, `jax.nn.gelu`, is the tanh approximation
      of GELU (`approximate=True`, as in Flax and the LRA reference code); PyTorch's
      default `nn.GELU()` is the exact one: pass
      `activation=functools.partial(jax.nn.gelu, approximate=False)`.
    - `dtype`: dtype of the weights.
    """

    w1: Float[Array, "dim hidden"]
    b1: Float[Array, " hidden"]
    w2: Float[Array, "hidden dim"]
    b2: Float[Array, " dim"]
    activation: Callable[[Array], Array] = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        key: PRNGKeyArray,
        activation: Callable[[Array], Array] = jax.nn.gelu,
        dtype=jnp.float32,
    ):
        if hidden < 1:
            raise ValueError(f"Reaction needs hidden >= 1; got hidden={hidden}. Pass e.g. 4*dim.")
        self.w1, self.w2 = _dense_init(key, ((dim, (dim, hidden)), (hidden, (hidden, dim))), dtype)
        self.b1 = jnp.zeros((hidden,), dtype)
        self.b2 = jnp.zeros((dim,), dtype)
        self.activation = activation

    def __call__(
        self,
        u: Float[Array, "*batch seq dim"],
        *,
        dropout_rate: float = 0.0,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch seq dim"]:
        """The MLP on every token of `u`; with a `key` and a positive `dropout_rate`,
        dropout on the hidden activations (as in the LRA Transformer's MLP block)."""
        # Token-wise: any leading axes, flattened into one matmul (see `dense`).
        # The activation is rematerialised in the backward pass: reverse mode then keeps
        # only its input, not the several hidden-size intermediates of e.g. the tanh GELU,
        # which a scan over layers (or depth steps) would otherwise store and copy.
        hidden = jax.checkpoint(self.activation)(dense(u, self.w1, self.b1))
        hidden = dropout(hidden, dropout_rate, key)
        return dense(hidden, self.w2, self.b2)
