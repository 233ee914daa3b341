"""The nonlocal term `A`: multi-head softmax self-attention, an integral operator over tokens.

Four implementations compute the same function (see `choose_implementation` for which one
runs where):

- `"cudnn"`: `jax.nn.dot_product_attention(implementation="cudnn")`, the fused cuDNN kernel
  (NVIDIA GPUs, float16/bfloat16 only).
- `"xla"`: `jax.nn.dot_product_attention(implementation="xla")`, XLA's composition of
  batched matmuls and a softmax taken in float32.
- `"blockwise"`: query blocks of `block_size` rows in a `lax.scan`, each against all keys,
  with a hand-written `jax.custom_vjp` that saves the output and the row logsumexp and
  recomputes each block's probabilities in the backward pass. Every matmul is laid out so
  that the `(rows, keys)` matrix is read row-major; see `docs/architecture.md` for why this is
  the CPU path. Exact in the input dtype (float64 included).
- `"einsum"`: two einsums and a softmax (in float32 for half-precision inputs), autodiff
  for the backward; the plain formula, kept as the exact reference path off the CPU and as
  the CPU's half-precision path.
"""

import contextlib
import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, PRNGKeyArray

IMPLEMENTATIONS = ("xla", "cudnn", "blockwise", "einsum")

# jax.nn.dot_product_attention's cuDNN path (jax/_src/cudnn/fused_attention_stablehlo.py):
# float16/bfloat16 inputs, head dimension a multiple of 8 and at most 128 (256 from Hopper
# on; the pure decision below cannot see the GPU generation, so it keeps the bound that
# holds everywhere), and with a mask (passed as an additive bias) an even sequence length.
_CUDNN_DTYPES = (np.dtype(jnp.float16), np.dtype(jnp.bfloat16))
_CUDNN_MAX_HEAD_DIM = 128


def _cudnn_can_run(dtype, seq: int, head_dim: int, masked: bool) -> bool:
    return (
        np.dtype(dtype) in _CUDNN_DTYPES
        and head_dim % 8 == 0
        and head_dim <= _CUDNN_MAX_HEAD_DIM
        and (not masked or seq % 2 == 0)
    )


def choose_implementation(platform: str, dtype, seq: int, head_dim: int, masked: bool) -> str:
    """The attention implementation `MultiHeadAttention` uses by default.

    A pure function of the platform, the dtype and the shapes, so the choice made on any
    machine can be checked on a CPU.

    - NVIDIA GPU (`platform` `"gpu"` or `"cuda"`): `"cudnn"` where JAX's cuDNN kernel can run
      (float16/bfloat16, head dimension a multiple of 8 and at most 128, an even sequence
      length when masked); otherwise `"einsum"` for float64 and `"xla"` for the rest.
    - CPU: `"blockwise"` for float32 and float64 (faster on XLA's CPU backend, and exact
      in float64); `"einsum"` for float16/bfloat16 (logits and softmax in float32).
    - Any other platform: `"einsum"` for float64, `"xla"` otherwise.

    **Arguments:**

    - `platform`: a JAX platform name (`jax.default_backend()`; `"cuda"` also accepted).
    - `dtype`: the dtype of the queries, keys and values.
    - `seq`: the sequence length.
    - `head_dim`: the width of one head.
    - `masked`: whether a key-padding mask is passed.

    **Returns:**

    One of `"xla"`, `"cudnn"`, `"blockwise"`, `"einsum"`.
    """
    dtype = np.dtype(dtype)
    if platform in ("gpu", "cuda") and _cudnn_can_run(dtype, seq, head_dim, masked):
        return "cudnn"
    if platform == "cpu":
        # Half precision: the einsum path, which casts to float32 for the softmax itself
        # (jax.nn.dot_product_attention's backward mixes dtypes, which strict promotion
        # refuses; half precision is no faster on a CPU anyway).
        return "blockwise" if dtype in (np.dtype(np.float32), np.dtype(np.float64)) else "einsum"
    return "einsum" if dtype == np.dtype(np.float64) else "xla"


def _current_platform() -> str:
    backend = jax.default_backend()
    if backend == "gpu" and "rocm" in jax.devices()[0].client.platform_version.lower():
        return "rocm"
    return backend


def _dense_init(key: PRNGKeyArray, fan_in: int, shape: tuple[int, ...], dtype) -> Array:
    lim = 1.0 / math.sqrt(fan_in)
    return jr.uniform(key, shape, dtype, -lim, lim)


def _precision_context(precision):
    # A custom rule may be traced after, and outside, the `jax.default_matmul_precision`
    # context the call ran in (the backward always; the forward under diffrax's
    # checkpointing); the integrators pin the field's matmuls that way, so the caller's
    # setting is passed on and re-entered.
    if precision is None:
        return contextlib.nullcontext()
    return jax.default_matmul_precision(precision)


def _current_precision():
    return jax.config.jax_default_matmul_precision


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x, w, precision):
    """`x @ w` whose backward pass reads both products row-major.

    Autodiff's weight gradient `x^T g` contracts the rows of `x`; XLA's CPU backend then
    leaves its fast matmul library for a generic loop (under `vmap` the rows are the batch
    and the sequence). Transposing the operands explicitly, behind `optimization_barrier` so
    that XLA does not fold the transposes back, keeps both products on the fast path.
    """
    return x @ w


def _matmul_fwd(x, w, precision):
    with _precision_context(precision):
        return x @ w, (x, w)


def _matmul_bwd(precision, residuals, g):
    x, w = residuals
    with _precision_context(precision):
        x_t = lax.optimization_barrier(x.T)
        w_t = lax.optimization_barrier(w.T)
        return g @ w_t, x_t @ g


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _masked_value(dtype) -> Array:
    # Finite, as in jax.nn.dot_product_attention: a row whose keys are all padded gets
    # uniform weights instead of NaN, and a row with one valid key gets exp(-huge) = 0 on
    # every pad, exactly as with -inf.
    return jnp.asarray(-0.7 * float(jnp.finfo(dtype).max), dtype)


def _einsum_attention(q, k, v, mask):
    # Logits and softmax in at least float32 (half-precision inputs are cast explicitly,
    # so the backward pass mixes no dtypes); a no-op for float32 and float64.
    dtype = jnp.float32 if jnp.finfo(q.dtype).bits < 32 else q.dtype
    q, k = q.astype(dtype), k.astype(dtype)
    logits = jnp.einsum("tnh,snh->nts", q, k) / jnp.sqrt(jnp.asarray(q.shape[-1], dtype))
    if mask is not None:
        logits = jnp.where(mask[None, None, :], logits, _masked_value(logits.dtype))
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("nts,snh->tnh", weights, v)


# --- Blockwise attention ---------------------------------------------------------------
#
# XLA's CPU backend hands a matmul to its fast library (YNNPACK) only when each operand is
# read along its rows; a product like `P^T dO` (contracting the rows of the big `(t, s)`
# matrix) either falls back to a slow generic loop or is preceded by a full transpose copy
# of `P`. Below, every product reads the `(t, s)` block row-major; the small `(t, h)`
# operands are transposed instead, behind `optimization_barrier` so that XLA does not fold
# the transposes back into the matmuls.


def _query_blocks(x, block_size):  # (t, n, h) -> (blocks, n, block_size, h), zero-padded
    t = x.shape[0]
    num_blocks = -(-t // block_size)
    x = jnp.pad(x, ((0, num_blocks * block_size - t), (0, 0), (0, 0)))
    return jnp.transpose(x.reshape(num_blocks, block_size, *x.shape[1:]), (0, 2, 1, 3))


def _unblock(x, t):  # (blocks, n, block_size, h) -> (t, n, h)
    num_blocks, n, block_size, h = x.shape
    return jnp.transpose(x, (0, 2, 1, 3)).reshape(num_blocks * block_size, n, h)[:t]


def _block_logits(q_block, k_t, mask):  # (n, b, h) x (n, h, s) -> (n, b, s)
    logits = jnp.einsum("nbh,nhs->nbs", q_block, k_t)
    if mask is not None:
        logits = jnp.where(mask[None, None, :], logits, _masked_value(logits.dtype))
    return logits


def _scan_blocks(body, carry, xs):
    # One block: no loop (the whole sequence is one matmul per product).
    if jax.tree.leaves(xs)[0].shape[0] == 1:
        carry, ys = body(carry, jax.tree.map(lambda x: x[0], xs))
        return carry, jax.tree.map(lambda y: y[None], ys)
    return lax.scan(body, carry, xs)


def _scale(q):
    return jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise_attention(q, k, v, mask, block_size, precision):
    return _blockwise_fwd(q, k, v, mask, block_size, precision)[0]


def _blockwise_fwd(q, k, v, mask, block_size, precision):
    with _precision_context(precision):
        return _blockwise_fwd_body(q, k, v, mask, block_size)


def _blockwise_fwd_body(q, k, v, mask, block_size):
    t = q.shape[0]
    k_t = lax.optimization_barrier(jnp.transpose(k, (1, 2, 0)))  # (n, h, s)
    v_h = jnp.swapaxes(v, 0, 1)  # (n, s, h)

    def block(_, q_block):
        logits = _block_logits(q_block, k_t, mask)
        peak = jnp.max(logits, axis=-1, keepdims=True)
        weights = jnp.exp(logits - peak)
        total = jnp.sum(weights, axis=-1, keepdims=True)
        out = jnp.einsum("nbs,nsh->nbh", weights, v_h) / total
        return None, (out, (peak + jnp.log(total))[..., 0])

    _, (out, lse) = _scan_blocks(block, None, _query_blocks(q * _scale(q), block_size))
    out = _unblock(out, t)
    return out, (q, k, v, mask, out, lse)


def _blockwise_bwd(block_size, precision, residuals, g):
    with _precision_context(precision):
        return _blockwise_bwd_body(block_size, residuals, g)


def _blockwise_bwd_body(block_size, residuals, g):
    q, k, v, mask, out, lse = residuals
    t = q.shape[0]
    barrier = lax.optimization_barrier
    k_t = barrier(jnp.transpose(k, (1, 2, 0)))  # (n, h, s)
    v_t = barrier(jnp.transpose(v, (1, 2, 0)))
    k_h = jnp.swapaxes(k, 0, 1)  # (n, s, h)
    q_blocks = _query_blocks(q * _scale(q), block_size)
    g_blocks = _query_blocks(g, block_size)
    q_blocks_t = barrier(jnp.swapaxes(q_blocks, -1, -2))  # (blocks, n, h, b)
    g_blocks_t = barrier(jnp.swapaxes(g_blocks, -1, -2))
    # dP - rowsum(dO * O): the softmax backward without materialising its Jacobian. Padded
    # query rows have g = 0, so they add nothing to dK and dV.
    delta = jnp.sum(g_blocks * _query_blocks(out, block_size), axis=-1)

    def block(carry, xs):
        dk_t, dv_t = carry
        q_block, q_block_t, g_block, g_block_t, lse_block, delta_block = xs
        weights = jnp.exp(_block_logits(q_block, k_t, mask) - lse_block[..., None])
        dv_t = dv_t + jnp.einsum("nhb,nbs->nhs", g_block_t, weights)
        d_weights = jnp.einsum("nbh,nhs->nbs", g_block, v_t)
        d_logits = weights * (d_weights - delta_block[..., None])
        dq_block = jnp.einsum("nbs,nsh->nbh", d_logits, k_h)
        dk_t = dk_t + jnp.einsum("nhb,nbs->nhs", q_block_t, d_logits)
        return (dk_t, dv_t), dq_block

    zeros = jnp.zeros_like(k_t)
    xs = (q_blocks, q_blocks_t, g_blocks, g_blocks_t, lse, delta)
    (dk_t, dv_t), dq = _scan_blocks(block, (zeros, zeros), xs)
    dq = _unblock(dq, t) * _scale(q)
    return dq, jnp.transpose(dk_t, (2, 0, 1)), jnp.transpose(dv_t, (2, 0, 1)), None


_blockwise_attention.defvjp(_blockwise_fwd, _blockwise_bwd)


def attention(
    q: Float[Array, "seq heads head_dim"],
    k: Float[Array, "seq heads head_dim"],
    v: Float[Array, "seq heads head_dim"],
    mask: Bool[Array, " seq"] | None = None,
    *,
    implementation: str | None = None,
    block_size: int = 128,
) -> Float[Array, "seq heads head_dim"]:
    """Softmax attention `softmax(q k^T / sqrt(head_dim)) v` per head, keys masked.

    **Arguments:**

    - `q`, `k`, `v`: queries, keys and values of one sequence.
    - `mask`: `True` for the keys that take part; a query whose keys are all masked gets
      uniform weights over all keys (a finite result, never NaN).
    - `implementation`: one of `"xla"`, `"cudnn"`, `"blockwise"`, `"einsum"`, or `None`
      for `choose_implementation`'s choice. `"xla"` in float64 runs `"einsum"`, since
      `jax.nn.dot_product_attention` takes its softmax in float32.
    - `block_size`: query rows per block of `"blockwise"` (any positive integer; the last
      block is zero-padded).

    **Returns:**

    The attention output, shaped like `q`.

    **Raises:**

    `ValueError` for an unknown `implementation`.
    """
    _check_implementation(implementation)
    seq, _, head_dim = q.shape
    if implementation is None:
        implementation = choose_implementation(
            _current_platform(), q.dtype, seq, head_dim, mask is not None
        )
    if implementation == "blockwise":
        return _blockwise_attention(q, k, v, mask, min(block_size, seq), _current_precision())
    if implementation == "einsum" or (implementation == "xla" and q.dtype == jnp.float64):
        return _einsum_attention(q, k, v, mask)
    attn_mask = None if mask is None else mask[None, None, :]
    # jax.nn.dot_product_attention promotes half-precision logits against float32 itself,
    # which a caller's strict dtype promotion would refuse; its result keeps q's dtype.
    with jax.numpy_dtype_promotion("standard"):
        return jax.nn.dot_product_attention(q, k, v, mask=attn_mask, implementation=implementation)


def _check_implementation(implementation) -> None:
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown attention implementation {implementation!r}. Pass one of "
            f"{', '.join(repr(i) for i in IMPLEMENTATIONS)}, or None to choose by platform, "
            "dtype and shapes."
        )


class MultiHeadAttention(eqx.Module):
    """Multi-head softmax self-attention on one sequence, with a key-padding mask.

    By default the implementation is chosen per platform, dtype and shapes
    (`choose_implementation`): the fused cuDNN kernel on NVIDIA GPUs for float16/bfloat16
    inputs it supports, a blockwise attention with its own backward pass on CPU
    (float32/float64), the einsum path with a float32 softmax for half precision on CPU,
    XLA's `jax.nn.dot_product_attention` elsewhere, and an exact einsum path for float64 off
    the CPU. Padded keys receive no attention weight; padded queries are
    computed like any other and are the caller's to ignore or freeze. The blockwise path
    defines its own backward pass (`jax.custom_vjp`), so it supports reverse-mode
    differentiation only; for `jax.jvp`/`jax.jacfwd` pass `implementation="einsum"`.

    **Arguments:**

    - `dim`: model width; must be divisible by `num_heads`.
    - `num_heads`: number of heads.
    - `key`: a JAX PRNG key for the initial weights.
    - `implementation`: `None` (choose as above) or one of `"xla"`, `"cudnn"` (raises where
      JAX's cuDNN kernel cannot run), `"blockwise"`, `"einsum"`.
    - `block_size`: query rows per block of the blockwise implementation.
    - `dtype`: dtype of the weights.

    **Raises:**

    `ValueError` if `num_heads` does not divide `dim`, for an unknown `implementation`, or
    for a `block_size` below 1.
    """

    qkv_weight: Float[Array, "dim three_dim"]
    qkv_bias: Float[Array, " three_dim"]
    out_weight: Float[Array, "dim dim"]
    out_bias: Float[Array, " dim"]
    num_heads: int = eqx.field(static=True)
    implementation: str | None = eqx.field(static=True)
    block_size: int = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        key: PRNGKeyArray,
        implementation: str | None = None,
        block_size: int = 128,
        dtype=jnp.float32,
    ):
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(
                f"MultiHeadAttention needs num_heads >= 1 dividing dim; got dim={dim}, "
                f"num_heads={num_heads}. Pass a num_heads among the divisors of {dim}."
            )
        _check_implementation(implementation)
        if block_size < 1:
            raise ValueError(
                f"MultiHeadAttention needs block_size >= 1; got {block_size}. Pass a "
                "positive number of query rows per block (128 is the default)."
            )
        kq, ko = jr.split(key)
        self.qkv_weight = _dense_init(kq, dim, (dim, 3 * dim), dtype)
        self.qkv_bias = jnp.zeros((3 * dim,), dtype)
        self.out_weight = _dense_init(ko, dim, (dim, dim), dtype)
        self.out_bias = jnp.zeros((dim,), dtype)
        self.num_heads = num_heads
        self.implementation = implementation
        self.block_size = block_size

    def __call__(
        self, u: Float[Array, "seq dim"], mask: Bool[Array, " seq"] | None = None
    ) -> Float[Array, "seq dim"]:
        seq, dim = u.shape
        head_dim = dim // self.num_heads
        implementation = self.implementation
        if implementation is None:
            implementation = choose_implementation(
                _current_platform(), u.dtype, seq, head_dim, mask is not None
            )
        # The CPU path's projections get the row-major backward as well (see `_matmul`);
        # the others keep plain autodiff, and with it forward-mode differentiation.
        if implementation == "blockwise":
            matmul = functools.partial(_matmul, precision=_current_precision())
        else:
            matmul = jnp.matmul
        qkv = matmul(u, self.qkv_weight) + self.qkv_bias
        qkv = qkv.reshape(seq, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        out = attention(q, k, v, mask, implementation=implementation, block_size=self.block_size)
        return matmul(out.reshape(seq, dim), self.out_weight) + self.out_bias
