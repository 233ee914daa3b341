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

from .dropout import dropout

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


def _dense_init(
    key: PRNGKeyArray, weights: tuple[tuple[int, tuple[int, ...]], ...], dtype
) -> list[Array]:
    """Weights `jr.uniform(k_i, shape_i, dtype, -1/sqrt(fan_in_i), 1/sqrt(fan_in_i))` for
    `weights = ((fan_in_i, shape_i), ...)`, `k_i` the keys of `jr.split(key, len(weights))`.

    One batched draw of the longest flat length, cut to each shape: the same numbers (JAX's
    threefry draws element `j` of any shape from counter `j`), from one random-number
    program instead of one per shape (XLA compiles such a program for every new shape).
    """
    keys = jr.split(key, len(weights))
    size = max(math.prod(shape) for _, shape in weights)
    lims = jnp.asarray([1.0 / math.sqrt(fan_in) for fan_in, _ in weights], dtype)
    flat = jax.vmap(lambda k, lim: jr.uniform(k, (size,), dtype, -lim, lim))(keys, lims)
    return [flat[i, : math.prod(shape)].reshape(shape) for i, (_, shape) in enumerate(weights)]


def dense(x: Float[Array, "*rows fan_in"], w: Float[Array, "fan_in fan_out"], b=None):
    """`x @ w + b` over any leading axes, computed as one 2-D matmul.

    The leading axes are flattened first. Under `jax.vmap` (or with a 3-D `x` and
    `jnp.matmul`) the weight gradient `x^T g` contracts two axes at once, and XLA's CPU
    backend then copies the cotangent into a transposed layout and leaves its fast matmul
    path. This is why the field takes its batch axes itself instead of being vmapped
    (`docs/architecture.md`; `experiments/bench_layout.py`).
    """
    out = (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])
    return out if b is None else out + b


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


def _masked_value(dtype) -> Array:
    # Finite, as in jax.nn.dot_product_attention: a row whose keys are all padded gets
    # uniform weights instead of NaN, and a row with one valid key gets exp(-huge) = 0 on
    # every pad, exactly as with -inf.
    return jnp.asarray(-0.7 * float(jnp.finfo(dtype).max), dtype)


def _einsum_attention(q, k, v, mask, dropout_rate=0.0, key=None):
    # Logits and softmax in at least float32 (half-precision inputs are cast explicitly,
    # so the backward pass mixes no dtypes); a no-op for float32 and float64.
    dtype = jnp.float32 if jnp.finfo(q.dtype).bits < 32 else q.dtype
    q, k = q.astype(dtype), k.astype(dtype)
    scale = jnp.sqrt(jnp.asarray(q.shape[-1], dtype))
    logits = jnp.einsum("...tnh,...snh->...nts", q, k) / scale
    if mask is not None:
        logits = jnp.where(mask[..., None, None, :], logits, _masked_value(logits.dtype))
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    weights = dropout(weights, dropout_rate, key)
    return jnp.einsum("...nts,...snh->...tnh", weights, v)


# --- Blockwise attention ---------------------------------------------------------------
#
# The inputs are laid out as `(pairs, seq, head_dim)`, one row per (sequence, head) pair of
# the whole batch, so that the loop structure is chosen here and not by `vmap`. An outer
# `lax.scan` walks groups of `g` pairs, an inner one blocks of `b` query rows; each step
# holds one `(g, b, seq)` block of logits. The sizes follow `_blocking`: about 8 MiB per
# block and at least two groups, the fastest of the choices `experiments/bench_layout.py`
# times on XLA's CPU backend (a block of a few MiB stays in cache between the matmul and the
# softmax). XLA's CPU backend hands a matmul to its fast library only when
# each operand is read along its rows; a product like `P^T dO` (contracting the rows of the
# big block) falls back to a slow loop or a full transpose copy of the block. Every product
# below reads the block row-major; the small `(b, h)` operands are transposed instead,
# behind `optimization_barrier` so that XLA does not fold the transposes back.

_BLOCK_BYTES = 8 * 2**20
DEFAULT_BLOCK_SIZE = 512


def _blocking(
    pairs: int, seq: int, block_size: int, itemsize: int, shards: int = 1
) -> tuple[int, int]:
    """`(g, b)`: pairs per group (a divisor of `pairs`) and query rows per block.

    `g` is a multiple of `shards` where `pairs` allows it, and the memory bound applies to
    the `g / shards` pairs of one shard: a batch split over `shards` devices then splits
    each group evenly, and no device waits for another's pairs (see `_groups`).
    """
    if pairs % shards != 0:
        shards = 1
    rows = min(block_size, seq)
    fits = [
        g
        for g in range(shards, pairs + 1, shards)
        if pairs % g == 0
        and (g == shards or (g // shards) * rows * seq * itemsize <= _BLOCK_BYTES)
        and (g == shards or pairs // g >= 2)
    ]
    return max(fits), rows


def _scan(body, carry, xs):
    # A loop of one iteration is the body itself: no while loop around it.
    if jax.tree.leaves(xs)[0].shape[0] == 1:
        carry, ys = body(carry, jax.tree.map(lambda x: x[0], xs))
        return carry, jax.tree.map(lambda y: y[None], ys)
    return lax.scan(body, carry, xs)


def _groups(x, g):  # (p, ...) -> (p/g, g, ...); group j holds pairs j, j + p/g, ...
    # Strided, not contiguous: the loops run over the group axis, and the `g` pairs of a
    # group are the batch axis of every product. A batch sharded over devices (contiguous
    # runs of pairs) then shards that batch axis, never the axis a loop walks, which XLA's
    # partitioner could only serve by gathering every pair onto every device.
    return jnp.swapaxes(x.reshape(g, x.shape[0] // g, *x.shape[1:]), 0, 1)


def _ungroups(x):  # inverse of `_groups`
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def _to_blocks(x, g, b):  # (p, t, ...) -> (p/g, t/b, g, b, ...), zero-padded rows
    p, t = x.shape[:2]
    num = -(-t // b)
    x = jnp.pad(x, ((0, 0), (0, num * b - t)) + ((0, 0),) * (x.ndim - 2))
    x = x.reshape(p, num, b, *x.shape[2:])
    return jnp.swapaxes(_groups(x, g), 1, 2)


def _from_blocks(x, t):  # (p/g, t/b, g, b, ...) -> (p, t, ...)
    x = _ungroups(jnp.swapaxes(x, 1, 2))
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :t]


def _block_logits(q_block, k_t, mask):  # (g, b, h) x (g, h, s) -> (g, b, s)
    logits = jnp.einsum("gbh,ghs->gbs", q_block, k_t)
    if mask is not None:
        logits = jnp.where(mask[:, None, :], logits, _masked_value(logits.dtype))
    return logits


def _scale(q):
    return jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise_attention(q, k, v, mask, block_size, precision):
    return _blockwise_fwd(q, k, v, mask, block_size, precision)[0]


def _blockwise_fwd(q, k, v, mask, block_size, precision):
    with _precision_context(precision):
        return _blockwise_fwd_body(q, k, v, mask, block_size)


def _blockwise_fwd_body(q, k, v, mask, block_size):
    pairs, t, _ = q.shape
    g, b = _blocking(pairs, t, block_size, q.dtype.itemsize, jax.device_count())
    k_t = _groups(lax.optimization_barrier(jnp.swapaxes(k, 1, 2)), g)  # (p/g, g, h, s)
    masks = None if mask is None else _groups(mask, g)

    def group(_, xs):
        q_blocks, k_t, v, mask = xs

        def block(_, q_block):
            logits = _block_logits(q_block, k_t, mask)
            peak = jnp.max(logits, axis=-1, keepdims=True)
            weights = jnp.exp(logits - peak)
            total = jnp.sum(weights, axis=-1, keepdims=True)
            out = jnp.einsum("gbs,gsh->gbh", weights, v) / total
            return None, (out, (peak + jnp.log(total))[..., 0])

        return None, _scan(block, None, q_blocks)[1]

    xs = (_to_blocks(q * _scale(q), g, b), k_t, _groups(v, g), masks)
    _, (out, lse) = _scan(group, None, xs)
    out = _from_blocks(out, t)
    return out, (q, k, v, mask, out, _from_blocks(lse, t))


def _blockwise_bwd(block_size, precision, residuals, g):
    with _precision_context(precision):
        return _blockwise_bwd_body(block_size, residuals, g)


def _blockwise_bwd_body(block_size, residuals, d_out):
    q, k, v, mask, out, lse = residuals
    pairs, t, _ = q.shape
    g, b = _blocking(pairs, t, block_size, q.dtype.itemsize, jax.device_count())
    barrier = lax.optimization_barrier
    q_blocks = _to_blocks(q * _scale(q), g, b)  # (p/g, blocks, g, b, h)
    g_blocks = _to_blocks(d_out, g, b)
    # dP - rowsum(dO * O): the softmax backward without materialising its Jacobian. Padded
    # query rows have dO = 0, so they add nothing to dK and dV.
    delta = _to_blocks(jnp.sum(d_out * out, axis=-1), g, b)
    xs = (
        q_blocks,
        barrier(jnp.swapaxes(q_blocks, -1, -2)),
        g_blocks,
        barrier(jnp.swapaxes(g_blocks, -1, -2)),
        _to_blocks(lse, g, b),
        delta,
        _groups(barrier(jnp.swapaxes(k, 1, 2)), g),  # (p/g, g, h, s)
        _groups(barrier(jnp.swapaxes(v, 1, 2)), g),
        _groups(k, g),  # (p/g, g, s, h)
        None if mask is None else _groups(mask, g),
    )

    def group(_, xs):
        q_blocks, q_blocks_t, g_blocks, g_blocks_t, lse, delta, k_t, v_t, k_h, mask = xs

        def block(carry, ys):
            dk_t, dv_t = carry
            q_block, q_block_t, g_block, g_block_t, lse_block, delta_block = ys
            weights = jnp.exp(_block_logits(q_block, k_t, mask) - lse_block[..., None])
            dv_t = dv_t + jnp.einsum("ghb,gbs->ghs", g_block_t, weights)
            d_weights = jnp.einsum("gbh,ghs->gbs", g_block, v_t)
            d_logits = weights * (d_weights - delta_block[..., None])
            dq_block = jnp.einsum("gbs,gsh->gbh", d_logits, k_h)
            dk_t = dk_t + jnp.einsum("ghb,gbs->ghs", q_block_t, d_logits)
            return (dk_t, dv_t), dq_block

        zeros = jnp.zeros_like(k_t)
        ys = (q_blocks, q_blocks_t, g_blocks, g_blocks_t, lse, delta)
        (dk_t, dv_t), dq = _scan(block, (zeros, zeros), ys)
        return None, (dk_t, dv_t, dq)

    _, (dk_t, dv_t, dq) = _scan(group, None, xs)
    unpair = lambda x: jnp.swapaxes(_ungroups(x), 1, 2)  # (p/g, g, h, s) -> (p, s, h)
    return _from_blocks(dq, t) * _scale(q), unpair(dk_t), unpair(dv_t), None


_blockwise_attention.defvjp(_blockwise_fwd, _blockwise_bwd)


def _pairs(x):  # (*batch, seq, heads, h) -> (batch * heads, seq, h)
    x = jnp.moveaxis(x, -2, -3)
    return x.reshape(-1, *x.shape[-2:])


def _unpairs(x, shape):  # inverse of `_pairs` for a `shape` of (*batch, seq, heads, h)
    x = x.reshape(*shape[:-3], shape[-2], shape[-3], shape[-1])
    return jnp.moveaxis(x, -3, -2)


def attention(
    q: Float[Array, "*batch seq heads head_dim"],
    k: Float[Array, "*batch seq heads head_dim"],
    v: Float[Array, "*batch seq heads head_dim"],
    mask: Bool[Array, "*batch seq"] | None = None,
    *,
    implementation: str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dropout_rate: float = 0.0,
    key: PRNGKeyArray | None = None,
) -> Float[Array, "*batch seq heads head_dim"]:
    """Softmax attention `softmax(q k^T / sqrt(head_dim)) v` per head, keys masked.

    **Arguments:**

    - `q`, `k`, `v`: queries, keys and values of one sequence, or of a batch on leading
      axes (passing the batch here, instead of `jax.vmap`-ing over it, lets the
      blockwise path choose its loops over the whole batch).
    - `mask`: `True` for the keys that take part, shaped `q.shape[:-2]`; a query whose keys
      are all masked gets uniform weights over all keys (a finite result, never NaN).
    - `implementation`: one of `"xla"`, `"cudnn"`, `"blockwise"`, `"einsum"`, or `None`
      for `choose_implementation`'s choice. `"xla"` in float64 runs `"einsum"`, since
      `jax.nn.dot_product_attention` takes its softmax in float32.
    - `block_size`: the most query rows per block of `"blockwise"` (any positive integer;
      the last block is zero-padded).
    - `dropout_rate`: dropout on the attention weights (after the softmax), drawn from
      `key`: one independent draw per (sequence, head, query, key). It needs the weights
      themselves, so with a `key` and a positive rate the `"einsum"` path runs whatever
      `implementation` says (memory `batch * heads * seq**2`, as in the LRA reference).
    - `key`: the key of that dropout, or `None` (no dropout: evaluation).

    **Returns:**

    The attention output, shaped like `q`.

    **Raises:**

    `ValueError` for an unknown `implementation` or mismatched shapes.
    """
    _check_implementation(implementation)
    _check_attention_shapes(q, k, v, mask)
    *batch, seq, heads, head_dim = q.shape
    if key is not None and dropout_rate > 0:
        return _einsum_attention(q, k, v, mask, dropout_rate, key)
    if implementation is None:
        implementation = choose_implementation(
            _current_platform(), q.dtype, seq, head_dim, mask is not None
        )
    if implementation == "blockwise":
        if mask is not None:
            mask = jnp.broadcast_to(mask[..., None, :], (*batch, heads, seq)).reshape(-1, seq)
        out = _blockwise_attention(
            _pairs(q), _pairs(k), _pairs(v), mask, block_size, _current_precision()
        )
        return _unpairs(out, q.shape)
    if implementation == "einsum" or (implementation == "xla" and q.dtype == jnp.float64):
        return _einsum_attention(q, k, v, mask)
    # jax.nn.dot_product_attention takes one batch axis (or none).
    flat = lambda x: x.reshape(-1, *x.shape[-3:]) if batch else x
    attn_mask = None if mask is None else mask.reshape(-1, seq)[:, None, None, :]
    if attn_mask is not None and not batch:
        attn_mask = attn_mask[0]
    # jax.nn.dot_product_attention promotes half-precision logits against float32 itself,
    # which a caller's strict dtype promotion would refuse; its result keeps q's dtype.
    with jax.numpy_dtype_promotion("standard"):
        out = jax.nn.dot_product_attention(
            flat(q), flat(k), flat(v), mask=attn_mask, implementation=implementation
        )
    return out.reshape(q.shape)


def _check_attention_shapes(q, k, v, mask) -> None:
    if q.ndim < 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            "attention needs q, k and v of one shape (*batch, seq, heads, head_dim); got "
            f"{q.shape}, {k.shape} and {v.shape}."
        )
    if mask is not None and mask.shape != q.shape[:-2]:
        raise ValueError(
            f"attention needs a mask of shape {q.shape[:-2]} (*batch, seq); got {mask.shape}."
        )


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
    - `block_size`: the most query rows per block of the blockwise implementation.
    - `dtype`: dtype of the weights.

    **Raises:**

    `ValueError` if `num_heads` does not divide `dim`, for an unknown `implementation`, or
    for a `block_size` below 1.

    **Weights** (to map a trained model onto these fields): the projections compute
    `qkv = u @ qkv_weight + qkv_bias` and `out @ out_weight + out_bias`, inputs on the left.

    - `qkv_weight`, `(dim, 3 * dim)`: columns `[0, dim)` give the queries, `[dim, 2 dim)`
      the keys, `[2 dim, 3 dim)` the values; inside each third the columns are head-major
      (column `h * head_dim + j` is channel `j` of head `h`). This is PyTorch's
      `nn.MultiheadAttention.in_proj_weight` transposed (`qkv_weight = in_proj_weight.T`,
      `qkv_bias = in_proj_bias`), and Flax's separate `query`/`key`/`value` kernels
      reshaped to `(dim, dim)` and concatenated along the columns.
    - `out_weight`, `(dim, dim)`: PyTorch's `out_proj.weight.T` (`out_bias =
      out_proj.bias`); its rows are the concatenated heads, head-major.

    **Mask:** `mask[..., i]` is `True` where token `i` is a real token and `False` where it
    is padding: the opposite of PyTorch's `key_padding_mask` (pass `~key_padding_mask`).
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
        block_size: int = DEFAULT_BLOCK_SIZE,
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
                f"positive number of query rows per block ({DEFAULT_BLOCK_SIZE} is the "
                "default)."
            )
        self.qkv_weight, self.out_weight = _dense_init(
            key, ((dim, (dim, 3 * dim)), (dim, (dim, dim))), dtype
        )
        self.qkv_bias = jnp.zeros((3 * dim,), dtype)
        self.out_bias = jnp.zeros((dim,), dtype)
        self.num_heads = num_heads
        self.implementation = implementation
        self.block_size = block_size

    def __call__(
        self,
        u: Float[Array, "*batch seq dim"],
        mask: Bool[Array, "*batch seq"] | None = None,
        *,
        dropout_rate: float = 0.0,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch seq dim"]:
        """The attention output on `u`; with a `key` and a positive `dropout_rate`, dropout
        on the attention weights (see `attention`)."""
        *batch, seq, dim = u.shape
        head_dim = dim // self.num_heads
        qkv = dense(u, self.qkv_weight, self.qkv_bias)
        qkv = qkv.reshape(*batch, seq, 3, self.num_heads, head_dim)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        out = attention(
            q,
            k,
            v,
            mask,
            implementation=self.implementation,
            block_size=self.block_size,
            dropout_rate=dropout_rate,
            key=key,
        )
        return dense(out.reshape(*batch, seq, dim), self.out_weight, self.out_bias)
