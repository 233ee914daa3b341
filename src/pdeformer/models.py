"""Encoder and classifier around the field: embedding, positions, depth, norm, pooling, head."""

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .depth import AbstractDepth, DepthSolution, Discrete
from .field import Field
from .operators import AbstractNorm, DiffusionLayer, Dropout, LayerNorm
from .operators.dropout import dropout as _dropout
from .placement import ENCODER_POINTS, INSERTION_POINTS, DiffusionFactory, check_points

# ---------------------------------------------------------------------------------------
# Positional encodings
# ---------------------------------------------------------------------------------------


class AbstractPositions(eqx.Module):
    """A positional encoding added to the token embeddings."""

    @abc.abstractmethod
    def __call__(self, seq: int, dtype) -> Float[Array, "seq dim"]:
        """The encodings of positions `0 .. seq-1`."""


class SinusoidalPositions(AbstractPositions):
    """The fixed sinusoidal encoding of Vaswani et al.; no parameters, any length.

    **Arguments:**

    - `dim`: model width.
    """

    dim: int = eqx.field(static=True)

    def __init__(self, dim: int):
        self.dim = dim

    def __call__(self, seq: int, dtype) -> Float[Array, "seq dim"]:
        pos = jnp.arange(seq, dtype=jnp.float32)[:, None]
        i = jnp.arange(0, self.dim, 2, dtype=jnp.float32)
        freq = jnp.exp(-math.log(10000.0) * i / self.dim)
        angles = pos * freq
        enc = jnp.zeros((seq, self.dim), jnp.float32)
        enc = enc.at[:, 0::2].set(jnp.sin(angles))
        enc = enc.at[:, 1::2].set(jnp.cos(angles[:, : self.dim // 2]))
        return enc.astype(dtype)


class LearnedPositions(AbstractPositions):
    """A learned table of position embeddings, for sequences up to `max_len`.

    **Arguments:**

    - `max_len`: the longest sequence the table covers (longer ones raise a `ValueError`).
    - `dim`: model width.
    - `key`: a JAX PRNG key (entries start as `0.02 * normal`).
    - `dtype`: parameter dtype.
    """

    table: Float[Array, "max_len dim"]

    def __init__(self, max_len: int, dim: int, *, key: PRNGKeyArray, dtype=jnp.float32):
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1; got {max_len}.")
        self.table = 0.02 * jr.normal(key, (max_len, dim), dtype)

    def __call__(self, seq: int, dtype) -> Float[Array, "seq dim"]:
        if seq > self.table.shape[0]:
            raise ValueError(
                f"sequence of length {seq} exceeds LearnedPositions max_len="
                f"{self.table.shape[0]}; build the model with a larger max_len."
            )
        return self.table[:seq].astype(dtype)


# ---------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------


class AbstractPooling(eqx.Module):
    """Reduces the token states of one sequence to one vector."""

    @abc.abstractmethod
    def prepare(
        self, u: Float[Array, "seq dim"], mask: Bool[Array, " seq"]
    ) -> tuple[Float[Array, "seq2 dim"], Bool[Array, " seq2"]]:
        """Adjust the embedded sequence before depth integration (e.g. prepend CLS)."""

    @abc.abstractmethod
    def __call__(
        self, u: Float[Array, "seq dim"], mask: Bool[Array, " seq"]
    ) -> Float[Array, " dim"]:
        """Pool the final states."""


class MeanPooling(AbstractPooling):
    """The mean of the valid tokens' final states."""

    def prepare(self, u, mask):
        return u, mask

    def __call__(self, u, mask):
        w = mask.astype(u.dtype)
        return (w @ u) / jnp.maximum(jnp.sum(w), 1.0)


class ClsPooling(AbstractPooling):
    """A learned CLS token is prepended; its final state is the summary.

    **Arguments:**

    - `dim`: model width.
    - `key`: a JAX PRNG key (the token starts as `0.02 * normal`).
    - `dtype`: parameter dtype.
    """

    cls: Float[Array, " dim"]

    def __init__(self, dim: int, *, key: PRNGKeyArray, dtype=jnp.float32):
        self.cls = 0.02 * jr.normal(key, (dim,), dtype)

    def prepare(self, u, mask):
        u = jnp.concatenate([self.cls[None].astype(u.dtype), u], axis=0)
        return u, jnp.concatenate([jnp.ones((1,), bool), mask])

    def __call__(self, u, mask):
        return u[0]


# ---------------------------------------------------------------------------------------
# Encoder and classifier
# ---------------------------------------------------------------------------------------


def _check_tokens(tokens, mask, vocab_size):
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integer ids; got dtype {tokens.dtype}.")
    if tokens.ndim < 1:
        raise TypeError(f"tokens must have shape (*batch, seq); got shape {tokens.shape}.")
    if mask is not None and (mask.shape != tokens.shape or mask.dtype != jnp.bool_):
        raise TypeError(
            f"mask must be boolean with the tokens' shape {tokens.shape}; got "
            f"{mask.dtype}{list(mask.shape)}."
        )


class Encoder(eqx.Module):
    """Token embedding + positions, integrated in depth by the field, then a final norm.

    **Arguments:**

    - `vocab_size`: number of token ids (0 may be the pad id; it is embedded like any other
      and excluded by the mask).
    - `dim`, `num_heads`, `num_layers`, `hidden`: sizes (see `Field`).
    - `key`: a JAX PRNG key.
    - `positions`: `"sinusoidal"`-style object: `SinusoidalPositions(dim)` (default) or
      `LearnedPositions(max_len, dim, key=...)`.
    - `pooling`: `ClsPooling(dim, key=...)` or `MeanPooling()` (default).
    - `final_norm`: a constructor `norm(dim)`; default `LayerNorm`.
    - `diffusion_at`: insertion points of diffusion layers, any subset of the seven
      `pdeformer.placement.INSERTION_POINTS`: `"after_embedding"` and `"before_head"` are
      applied here, once; the others are passed to the `Field`. Default: none.
    - `diffusion_layer`: the layers' constructor, `diffusion_layer(dim, key=, dtype=)`;
      default `DiffusionLayer` (single scale).
    - `dropout`: a `Dropout`, as in the LRA Transformer: `rate` on the initial state `u(0)`
      (embedding plus positions, after pooling has prepared it: a CLS token is dropped out
      too, as in LRA) and in the field (see `Field`), `attention_rate` on the attention
      weights. Active only in a call with a `key`. `None` (default) or zero rates: none.
    - `**field_kwargs`: passed to `Field` (`schedule`, `composition`, `norm`, `activation`,
      `diffusion`, ...).
    """

    embedding: Float[Array, "vocab dim"]
    positions: AbstractPositions
    pooling: AbstractPooling
    field: Field
    final_norm: AbstractNorm
    after_embedding: eqx.Module | None
    before_head: eqx.Module | None
    dropout: Dropout | None = None

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        num_heads: int,
        num_layers: int,
        *,
        key: PRNGKeyArray,
        hidden: int | None = None,
        positions: AbstractPositions | None = None,
        pooling: AbstractPooling | None = None,
        final_norm=LayerNorm,
        diffusion_at: tuple[str, ...] | str | None = (),
        diffusion_layer: DiffusionFactory = DiffusionLayer,
        dropout: Dropout | None = None,
        dtype=jnp.float32,
        **field_kwargs,
    ):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1; got {vocab_size}.")
        points = check_points(diffusion_at, INSERTION_POINTS)
        ke, kf = jr.split(key)
        self.embedding = jr.normal(ke, (vocab_size, dim), dtype) / math.sqrt(dim)
        self.positions = SinusoidalPositions(dim) if positions is None else positions
        self.pooling = MeanPooling() if pooling is None else pooling
        self.field = Field(
            dim,
            num_heads,
            num_layers,
            key=kf,
            hidden=hidden,
            dtype=dtype,
            diffusion_at=tuple(p for p in points if p not in ENCODER_POINTS),
            diffusion_layer=diffusion_layer,
            dropout=dropout,
            **field_kwargs,
        )
        # None without any positive rate: the model is then the one built without dropout.
        self.dropout = dropout if dropout is not None and dropout.active else None
        self.final_norm = final_norm(dim, dtype=dtype)
        # Keys folded in per point, so adding a point leaves the other weights as they were.
        kd = {p: jr.fold_in(key, 1 + INSERTION_POINTS.index(p)) for p in ENCODER_POINTS}
        self.after_embedding, self.before_head = (
            diffusion_layer(dim, key=kd[p], dtype=dtype) if p in points else None
            for p in ENCODER_POINTS
        )

    @property
    def diffusion_at(self) -> tuple[str, ...]:
        """The insertion points of this encoder's diffusion layers, in canonical order."""
        points = set(self.field.diffusion_at)
        points.update(p for p in ENCODER_POINTS if getattr(self, p) is not None)
        return tuple(p for p in INSERTION_POINTS if p in points)

    def token_embeddings(self, tokens: Int[Array, "*batch seq"]) -> Float[Array, "*batch seq dim"]:
        """Token embedding plus positions: the signal at the `after_embedding` point."""
        _check_tokens(tokens, None, self.embedding.shape[0])
        return self.embedding[tokens] + self.positions(tokens.shape[-1], self.embedding.dtype)

    def embed(
        self, tokens: Int[Array, "*batch seq"], mask: Bool[Array, "*batch seq"] | None = None
    ) -> tuple[Float[Array, "*batch seq2 dim"], Bool[Array, "*batch seq2"]]:
        """Initial states `u(0)` and the mask (adjusted by pooling, e.g. a CLS token)."""
        _check_tokens(tokens, mask, self.embedding.shape[0])
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)

        def one(tok, m):
            u = self.token_embeddings(tok)
            if self.after_embedding is not None:
                # On the embedded tokens themselves, before pooling adds e.g. a CLS token.
                u = self.after_embedding(u, m)
            return self.pooling.prepare(u, m)

        for _ in range(tokens.ndim - 1):
            one = jax.vmap(one)
        return one(tokens, mask)

    def __call__(
        self,
        tokens: Int[Array, "*batch seq"],
        mask: Bool[Array, "*batch seq"] | None = None,
        *,
        depth: AbstractDepth | None = None,
        save_at=None,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "*batch dim"], DepthSolution]:
        """Encode and pool.

        **Arguments:**

        - `tokens`: integer ids, `(seq,)` or with leading batch axes.
        - `mask`: `True` on valid tokens (valid first), or `None` for all valid.
        - `depth`: the integrator, `Discrete()` (default) or `Continuous(...)`.
        - `save_at`: depths at which to keep the states (see `AbstractDepth`).
        - `key`: for training: draws the dropout masks (where the encoder has dropout:
          then split into the embedding's, the field's (`Field.with_dropout_key`) and the
          rest) and is passed to the integrator (the probe of a `JacobianFrobenius`
          regulariser). `None` (evaluation): no dropout.

        **Returns:**

        The pooled features and the `DepthSolution` (final states before the final norm,
        saved states and statistics).
        """
        depth = Discrete() if depth is None else depth
        u0, mask = self.embed(tokens, mask)
        field = self.field
        if key is not None and self.dropout is not None:
            # Split only with dropout, so that a model without it uses `key` as before.
            key, embedding_key, field_key = jr.split(key, 3)
            u0 = _dropout(u0, self.dropout.rate, embedding_key)
            field = field.with_dropout_key(field_key)
        sol = depth(field, u0, mask, save_at=save_at, key=key)

        def pool(u, m):
            if self.before_head is not None:
                u = self.before_head(u, m)
            return self.pooling(self.final_norm(u), m)

        for _ in range(tokens.ndim - 1):
            pool = jax.vmap(pool)
        return pool(sol.u, mask), sol


HEADS = ("linear", "mlp")
"""The heads `Classifier` builds: `"linear"` (one dense layer) or `"mlp"` (LRA's)."""


class Classifier(eqx.Module):
    """An `Encoder` with a linear head, or LRA's MLP head.

    **Arguments:**

    - `vocab_size`, `dim`, `num_heads`, `num_layers`: sizes (see `Encoder`).
    - `num_classes`: number of output classes.
    - `key`: a JAX PRNG key.
    - `head`: `"linear"` (default): `logits = x @ head_weight + head_bias` on the pooled
      features `x`; `"mlp"`: the LRA Transformer's classifier head,
      `Dense(mlp_dim) -> ReLU -> Dense(num_classes)` (`mlp_weight`, `mlp_bias`, then
      `head_weight`, `head_bias`).
    - `mlp_dim`: the hidden width of the `"mlp"` head (LRA uses the FFN width); default
      `dim`. Only with `head="mlp"`.
    - `**encoder_kwargs`: passed to `Encoder`.

    **Raises:**

    `ValueError` for fewer than 2 classes, an unknown `head`, or an `mlp_dim` below 1 or
    given with the linear head.
    """

    encoder: Encoder
    head_weight: Float[Array, "features classes"]
    head_bias: Float[Array, " classes"]
    mlp_weight: Float[Array, "dim mlp"] | None = None
    mlp_bias: Float[Array, " mlp"] | None = None

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        num_heads: int,
        num_layers: int,
        num_classes: int,
        *,
        key: PRNGKeyArray,
        head: str = "linear",
        mlp_dim: int | None = None,
        dtype=jnp.float32,
        **encoder_kwargs,
    ):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2; got {num_classes}.")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}; got head={head!r}.")
        if head == "linear" and mlp_dim is not None:
            raise ValueError(
                f"mlp_dim is the hidden width of the MLP head; got mlp_dim={mlp_dim} with "
                "head='linear'. Pass head='mlp', or leave mlp_dim out."
            )
        if mlp_dim is not None and mlp_dim < 1:
            raise ValueError(f"mlp_dim must be >= 1; got {mlp_dim}.")
        ke, kh = jr.split(key)
        self.encoder = Encoder(
            vocab_size, dim, num_heads, num_layers, key=ke, dtype=dtype, **encoder_kwargs
        )
        features = dim
        if head == "mlp":
            mlp_dim = dim if mlp_dim is None else mlp_dim
            km, kh = jr.split(kh)
            self.mlp_weight = jr.normal(km, (dim, mlp_dim), dtype) / math.sqrt(dim)
            self.mlp_bias = jnp.zeros((mlp_dim,), dtype)
            features = mlp_dim
        else:
            self.mlp_weight = self.mlp_bias = None
        self.head_weight = jr.normal(kh, (features, num_classes), dtype) / math.sqrt(features)
        self.head_bias = jnp.zeros((num_classes,), dtype)

    @property
    def head(self) -> str:
        """The head's kind, `"linear"` or `"mlp"`."""
        return "linear" if self.mlp_weight is None else "mlp"

    def __call__(
        self,
        tokens: Int[Array, "*batch seq"],
        mask: Bool[Array, "*batch seq"] | None = None,
        *,
        depth: AbstractDepth | None = None,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "*batch classes"], DepthSolution]:
        """Class logits and the depth solution (see `Encoder.__call__`; `key` draws the
        dropout masks, if any, and is passed to the integrator; the head has no dropout)."""
        features, sol = self.encoder(tokens, mask, depth=depth, key=key)
        if self.mlp_weight is not None:
            features = jax.nn.relu(features @ self.mlp_weight + self.mlp_bias)
        return features @ self.head_weight + self.head_bias, sol


def _pad_to(tokens, mask, seq: int):
    pad = seq - tokens.shape[-1]
    if pad == 0:
        return tokens, mask
    widths = [(0, 0)] * (tokens.ndim - 1) + [(0, pad)]
    return jnp.pad(tokens, widths), jnp.pad(mask, widths)


class DualClassifier(eqx.Module):
    """Two documents, one shared `Encoder`, and LRA's matching head (Retrieval).

    Both documents are encoded by the same encoder in one depth integration (they are
    padded to a common length and stacked on a new leading axis, so an adaptive solver
    takes one step sequence for the pair batch). With pooled features `x1`, `x2` the head
    is LRA's: `[x1, x2, x1 * x2, x1 - x2] -> Dense(mlp_dim) -> ReLU -> Dense(num_classes)`.

    **Arguments:**

    - `vocab_size`, `dim`, `num_heads`, `num_layers`: sizes (see `Encoder`).
    - `num_classes`: number of output classes (2 for Retrieval).
    - `key`: a JAX PRNG key.
    - `mlp_dim`: hidden width of the head; default `dim`.
    - `**encoder_kwargs`: passed to `Encoder` (insertion points included).
    """

    encoder: Encoder
    mlp_weight: Float[Array, "four_dim mlp"]
    mlp_bias: Float[Array, " mlp"]
    head_weight: Float[Array, "mlp classes"]
    head_bias: Float[Array, " classes"]

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        num_heads: int,
        num_layers: int,
        num_classes: int,
        *,
        key: PRNGKeyArray,
        mlp_dim: int | None = None,
        dtype=jnp.float32,
        **encoder_kwargs,
    ):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2; got {num_classes}.")
        mlp_dim = dim if mlp_dim is None else mlp_dim
        if mlp_dim < 1:
            raise ValueError(f"mlp_dim must be >= 1; got {mlp_dim}.")
        ke, km, kh = jr.split(key, 3)
        self.encoder = Encoder(
            vocab_size, dim, num_heads, num_layers, key=ke, dtype=dtype, **encoder_kwargs
        )
        self.mlp_weight = jr.normal(km, (4 * dim, mlp_dim), dtype) / math.sqrt(4 * dim)
        self.mlp_bias = jnp.zeros((mlp_dim,), dtype)
        self.head_weight = jr.normal(kh, (mlp_dim, num_classes), dtype) / math.sqrt(mlp_dim)
        self.head_bias = jnp.zeros((num_classes,), dtype)

    def __call__(
        self,
        tokens: Int[Array, "*batch seq"],
        mask: Bool[Array, "*batch seq"] | None,
        tokens2: Int[Array, "*batch seq2"],
        mask2: Bool[Array, "*batch seq2"] | None,
        *,
        depth: AbstractDepth | None = None,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "*batch classes"], DepthSolution]:
        """Class logits for document pairs and the depth solution of the stacked pair
        (states `(2, *batch, seq, dim)`: the first documents, then the second); `key` is
        passed to the integrator."""
        if tokens.shape[:-1] != tokens2.shape[:-1]:
            raise TypeError(
                f"the two documents must have the same batch shape; got {tokens.shape} and "
                f"{tokens2.shape}."
            )
        mask = jnp.ones(tokens.shape, bool) if mask is None else mask
        mask2 = jnp.ones(tokens2.shape, bool) if mask2 is None else mask2
        _check_tokens(tokens, mask, self.encoder.embedding.shape[0])
        _check_tokens(tokens2, mask2, self.encoder.embedding.shape[0])
        seq = max(tokens.shape[-1], tokens2.shape[-1])
        t1, m1 = _pad_to(tokens, mask, seq)
        t2, m2 = _pad_to(tokens2, mask2, seq)
        features, sol = self.encoder(jnp.stack([t1, t2]), jnp.stack([m1, m2]), depth=depth, key=key)
        x1, x2 = features[0], features[1]
        x = jnp.concatenate([x1, x2, x1 * x2, x1 - x2], axis=-1)
        hidden = jax.nn.relu(x @ self.mlp_weight + self.mlp_bias)
        return hidden @ self.head_weight + self.head_bias, sol
