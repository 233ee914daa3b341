"""The nonlocal term `A`: multi-head softmax self-attention, an integral operator over tokens."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, PRNGKeyArray


def _dense_init(key: PRNGKeyArray, fan_in: int, shape: tuple[int, ...], dtype) -> Array:
    lim = 1.0 / math.sqrt(fan_in)
    return jr.uniform(key, shape, dtype, -lim, lim)


def _plain_attention(q, k, v, mask):
    logits = jnp.einsum("tnh,snh->nts", q, k) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.asarray(-jnp.inf, logits.dtype))
    return jnp.einsum("nts,snh->tnh", jax.nn.softmax(logits, axis=-1), v)


class MultiHeadAttention(eqx.Module):
    """Multi-head softmax self-attention on one sequence, with a key-padding mask.

    Uses `jax.nn.dot_product_attention`, so the backend's fused kernel is used where
    there is one (cuDNN on NVIDIA GPUs). Padded keys receive no attention weight; padded
    queries are computed like any other and are the caller's to ignore or freeze.

    **Arguments:**

    - `dim`: model width; must be divisible by `num_heads`.
    - `num_heads`: number of heads.
    - `key`: a JAX PRNG key for the initial weights.
    - `implementation`: passed to `jax.nn.dot_product_attention` (`None` lets JAX choose).
    """

    qkv_weight: Float[Array, "dim three_dim"]
    qkv_bias: Float[Array, " three_dim"]
    out_weight: Float[Array, "dim dim"]
    out_bias: Float[Array, " dim"]
    num_heads: int = eqx.field(static=True)
    implementation: str | None = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        key: PRNGKeyArray,
        implementation: str | None = None,
        dtype=jnp.float32,
    ):
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(
                f"MultiHeadAttention needs num_heads >= 1 dividing dim; got dim={dim}, "
                f"num_heads={num_heads}. Pass a num_heads among the divisors of {dim}."
            )
        kq, ko = jr.split(key)
        self.qkv_weight = _dense_init(kq, dim, (dim, 3 * dim), dtype)
        self.qkv_bias = jnp.zeros((3 * dim,), dtype)
        self.out_weight = _dense_init(ko, dim, (dim, dim), dtype)
        self.out_bias = jnp.zeros((dim,), dtype)
        self.num_heads = num_heads
        self.implementation = implementation

    def __call__(
        self, u: Float[Array, "seq dim"], mask: Bool[Array, " seq"] | None = None
    ) -> Float[Array, "seq dim"]:
        seq, dim = u.shape
        head_dim = dim // self.num_heads
        qkv = u @ self.qkv_weight + self.qkv_bias
        qkv = qkv.reshape(seq, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        attn_mask = None if mask is None else mask[None, None, :]
        if u.dtype == jnp.float64:
            # jax.nn.dot_product_attention always takes its softmax in float32, which
            # would cap float64 runs (convergence studies, gradient checks) at float32
            # accuracy; no fused kernel exists for float64 anyway.
            out = _plain_attention(q, k, v, attn_mask)
        else:
            out = jax.nn.dot_product_attention(
                q, k, v, mask=attn_mask, implementation=self.implementation
            )
        return out.reshape(seq, dim) @ self.out_weight + self.out_bias
