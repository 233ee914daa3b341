"""Normalization operators: the stability control `N` of the field."""

import abc

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float


def _statistics_dtype(dtype):
    # Half-precision inputs (mixed precision) take their statistics in float32: a mean of
    # squares over hundreds of channels loses most of bfloat16's 8 bits.
    return jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype


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
        dtype = _statistics_dtype(u.dtype)
        x = u.astype(dtype)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        centred = x - mean
        var = jnp.mean(centred * centred, axis=-1, keepdims=True)
        out = centred * jnp.reciprocal(jnp.sqrt(var + self.eps))
        return (out * self.weight.astype(dtype) + self.bias.astype(dtype)).astype(u.dtype)


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
        dtype = _statistics_dtype(u.dtype)
        x = u.astype(dtype)
        ms = jnp.mean(x * x, axis=-1, keepdims=True)
        return (x * jnp.reciprocal(jnp.sqrt(ms + self.eps)) * self.weight.astype(dtype)).astype(
            u.dtype
        )


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
