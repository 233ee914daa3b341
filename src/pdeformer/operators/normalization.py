"""Normalization operators: the stability control `N` of the field."""

import abc

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float


class AbstractNorm(eqx.Module):
    """A token-wise normalization acting on one sequence `(seq, dim)`."""

    @abc.abstractmethod
    def __call__(self, u: Float[Array, "seq dim"]) -> Float[Array, "seq dim"]:
        raise NotImplementedError


class LayerNorm(AbstractNorm):
    """LayerNorm over the channel axis, with a learnable scale and shift.

    **Arguments:**

    - `dim`: number of channels.
    - `eps`: added to the variance before the square root.
    """

    weight: Float[Array, " dim"]
    bias: Float[Array, " dim"]
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype=jnp.float32):
        if eps <= 0:
            raise ValueError(f"LayerNorm needs eps > 0; got eps={eps}. Pass e.g. eps=1e-5.")
        self.weight = jnp.ones((dim,), dtype)
        self.bias = jnp.zeros((dim,), dtype)
        self.eps = eps

    def __call__(self, u: Float[Array, "seq dim"]) -> Float[Array, "seq dim"]:
        mean = jnp.mean(u, axis=-1, keepdims=True)
        centred = u - mean
        var = jnp.mean(centred * centred, axis=-1, keepdims=True)
        return centred * jnp.reciprocal(jnp.sqrt(var + self.eps)) * self.weight + self.bias


class RMSNorm(AbstractNorm):
    """RMSNorm over the channel axis, with a learnable scale.

    **Arguments:**

    - `dim`: number of channels.
    - `eps`: added to the mean square before the square root.
    """

    weight: Float[Array, " dim"]
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32):
        if eps <= 0:
            raise ValueError(f"RMSNorm needs eps > 0; got eps={eps}. Pass e.g. eps=1e-6.")
        self.weight = jnp.ones((dim,), dtype)
        self.eps = eps

    def __call__(self, u: Float[Array, "seq dim"]) -> Float[Array, "seq dim"]:
        ms = jnp.mean(u * u, axis=-1, keepdims=True)
        return u * jnp.reciprocal(jnp.sqrt(ms + self.eps)) * self.weight


class Identity(AbstractNorm):
    """No normalization: the ablation "without LayerNorm".

    **Arguments:**

    - `dim`, `dtype`: accepted and ignored, so that `Identity` can stand wherever a norm
      constructor `norm(dim, dtype=...)` is expected (e.g. `Field(..., norm=Identity)`).
    """

    def __init__(self, dim: int | None = None, *, dtype=None):
        del dim, dtype

    def __call__(self, u: Float[Array, "seq dim"]) -> Float[Array, "seq dim"]:
        return u
