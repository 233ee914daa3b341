"""The PDE right-hand side: one vector field from which every model of the library follows.

    du/dt = A(N(u)) + R(N'(u)) + D Lap(u)

With the sequential composition, layer `l` owns the depth interval `[l, l+1)`: attention
acts on `[l, l+1/2)` with rate `2 A_l(N_l(u))`, the reaction on `[l+1/2, l+1)` with rate
`2 R_l(N'_l(u))`. Forward Euler with step 1/2 is then the pre-LN Transformer, bit for bit.
"""

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, Scalar

from .operators import (
    AbstractNorm,
    DiffusionLayer,
    DiffusionOperator,
    LayerNorm,
    MultiHeadAttention,
    Reaction,
)
from .operators.attention import DEFAULT_BLOCK_SIZE
from .placement import FIELD_POINTS, DiffusionFactory, check_points


class Block(eqx.Module):
    """The weights of one layer: two norms, attention, the reaction (FFN), and optional
    diffusion layers at the four branch insertion points.

    A `Field` holds these stacked on a leading axis (one slice per depth node).
    """

    attention_norm: AbstractNorm
    attention: MultiHeadAttention
    reaction_norm: AbstractNorm
    reaction: Reaction
    before_norm: eqx.Module | None = None
    after_norm: eqx.Module | None = None
    after_attention: eqx.Module | None = None
    after_ffn: eqx.Module | None = None

    def attend(
        self,
        u: Float[Array, "*batch seq dim"],
        mask: Bool[Array, "*batch seq"] | None,
        normalize: bool = True,
    ) -> Float[Array, "*batch seq dim"]:
        """The attention branch `A(N(u))` (`A(u)` with `normalize=False`, post-LN), with
        the `before_norm`, `after_norm` and `after_attention` diffusion layers where set."""
        x = _per_sequence(self.before_norm, u, mask)
        x = _token_wise(self.attention_norm, x) if normalize else x
        x = _per_sequence(self.after_norm, x, mask)
        a = self.attention(x, mask)
        return _per_sequence(self.after_attention, a, mask)

    def react(
        self,
        u: Float[Array, "*batch seq dim"],
        mask: Bool[Array, "*batch seq"] | None,
        normalize: bool = True,
    ) -> Float[Array, "*batch seq dim"]:
        """The FFN branch `R(N'(u))` (`R(u)` with `normalize=False`, post-LN), with the
        `after_ffn` diffusion layer where set (`mask` is only read by that layer)."""
        r = self.reaction(_token_wise(self.reaction_norm, u) if normalize else u)
        return _per_sequence(self.after_ffn, r, mask)


def _per_sequence(layer, u, mask):
    """`layer(u, mask)` for a layer that acts on one sequence, mapped over the leading
    axes of `u`; the identity for `layer=None`."""
    if layer is None:
        return u
    fn = layer
    for _ in range(u.ndim - 2):
        fn = jax.vmap(fn, in_axes=(0, 0 if mask is not None else None))
    return fn(u, mask)


def _token_wise(norm: AbstractNorm, u):
    """A token-wise norm on `(*batch, seq, dim)`: the batch is folded into the token axis."""
    apply = jax.checkpoint(lambda n, x: n(x))
    if u.ndim == 2:
        return apply(norm, u)
    return apply(norm, u.reshape(-1, u.shape[-1])).reshape(u.shape)


# ---------------------------------------------------------------------------------------
# Depth schedules: how the weights depend on depth t.
# ---------------------------------------------------------------------------------------


class AbstractSchedule(eqx.Module):
    """How the field's weights depend on depth `t in [0, num_layers]`."""

    @abc.abstractmethod
    def num_nodes(self, num_layers: int) -> int:
        """How many weight sets are stacked for `num_layers` layers."""

    @abc.abstractmethod
    def weights(self, stacked: Block, t: Scalar, num_layers: int, anchor: Scalar) -> Block:
        """The block of weights in force at depth `t` on the piece containing `anchor`."""

    @abc.abstractmethod
    def jump_times(self, num_layers: int) -> tuple[float, ...]:
        """Depths in `(0, num_layers)` where the weights jump."""


def _index(stacked: eqx.Module, i) -> eqx.Module:
    """Slice `i` of a module whose arrays are stacked on a leading axis."""
    arrays, static = eqx.partition(stacked, eqx.is_array)
    return eqx.combine(jax.tree.map(lambda x: x[i], arrays), static)


class PerLayer(AbstractSchedule):
    """One weight set per layer, piecewise constant in depth: the standard Transformer."""

    def num_nodes(self, num_layers: int) -> int:
        return num_layers

    def weights(self, stacked: Block, t: Scalar, num_layers: int, anchor: Scalar) -> Block:
        i = jnp.clip(jnp.floor(anchor).astype(jnp.int32), 0, num_layers - 1)
        return _index(stacked, i)

    def jump_times(self, num_layers: int) -> tuple[float, ...]:
        return tuple(float(k) for k in range(1, num_layers))


class Shared(AbstractSchedule):
    """One weight set for all depths: the classic (autonomous) neural ODE."""

    def num_nodes(self, num_layers: int) -> int:
        return 1

    def weights(self, stacked: Block, t: Scalar, num_layers: int, anchor: Scalar) -> Block:
        return _index(stacked, 0)

    def jump_times(self, num_layers: int) -> tuple[float, ...]:
        return ()


class Interpolated(AbstractSchedule):
    """Weights linear in `t` between nodes at `t = 0, 1, ..., num_layers`: no weight jumps."""

    def num_nodes(self, num_layers: int) -> int:
        return num_layers + 1

    def weights(self, stacked: Block, t: Scalar, num_layers: int, anchor: Scalar) -> Block:
        i = jnp.clip(jnp.floor(anchor).astype(jnp.int32), 0, num_layers - 1)
        s = t - i.astype(t.dtype)
        arrays, static = eqx.partition(stacked, eqx.is_array)
        mixed = jax.tree.map(
            lambda x: (1 - s).astype(x.dtype) * x[i] + s.astype(x.dtype) * x[i + 1], arrays
        )
        return eqx.combine(mixed, static)

    def jump_times(self, num_layers: int) -> tuple[float, ...]:
        return ()


# ---------------------------------------------------------------------------------------
# Compositions: how attention and reaction share a layer's depth interval.
# ---------------------------------------------------------------------------------------


class AbstractComposition(eqx.Module):
    """How attention and reaction combine inside one layer interval `[l, l+1)`."""

    @property
    @abc.abstractmethod
    def discrete_step(self) -> float:
        """The Euler step that makes this composition the standard (discrete) block."""

    @abc.abstractmethod
    def rate(
        self,
        block: Block,
        phase: Scalar,
        u: Float[Array, "seq dim"],
        mask: Bool[Array, " seq"] | None,
        normalize: bool = True,
    ) -> Float[Array, "seq dim"]:
        """The rate of the block at position `phase in [0, 1]` of its layer interval."""

    @abc.abstractmethod
    def post_norm(self, block: Block, phase: Scalar) -> AbstractNorm:
        """The norm applied after a discrete step that starts at `phase` (post-LN)."""

    @abc.abstractmethod
    def jump_offsets(self) -> tuple[float, ...]:
        """Offsets in `[0, 1)` inside each layer where the rate jumps."""


class SequentialBlock(AbstractComposition):
    """Attention on the first half of each layer, the reaction on the second (Lie–Trotter).

    Euler with step 1/2 gives `u + A(N u)`, then `+ R(N' u)`: the standard pre-LN block.
    """

    @property
    def discrete_step(self) -> float:
        return 0.5

    def rate(self, block, phase, u, mask, normalize=True):
        if isinstance(phase, float):
            # Known at trace time (the discrete integrator knows its sub-step): no cond,
            # so reverse mode does not store the residuals of both branches.
            if phase < 0.5:
                return 2 * block.attend(u, mask, normalize)
            return 2 * block.react(u, mask, normalize)
        return jax.lax.cond(
            phase < 0.5,
            lambda v: 2 * block.attend(v, mask, normalize),
            lambda v: 2 * block.react(v, mask, normalize),
            u,
        )

    def post_norm(self, block, phase):
        return _select_norm(phase < 0.5, block.attention_norm, block.reaction_norm)

    def jump_offsets(self) -> tuple[float, ...]:
        # Mid-layer (attention -> reaction) and at the layer boundary (reaction -> the next
        # attention), whatever the weight schedule.
        return (0.0, 0.5)


class ParallelBlock(AbstractComposition):
    """Attention and reaction act at once: `du/dt = A(N u) + R(N' u)`.

    Euler with step 1 gives the parallel block `u + A(N u) + R(N' u)`.
    """

    @property
    def discrete_step(self) -> float:
        return 1.0

    def rate(self, block, phase, u, mask, normalize=True):
        return block.attend(u, mask, normalize) + block.react(u, mask, normalize)

    def post_norm(self, block, phase):
        return block.reaction_norm

    def jump_offsets(self) -> tuple[float, ...]:
        return ()


def _cast(module: eqx.Module, dtype) -> eqx.Module:
    """`module` with its floating-point arrays cast to `dtype`."""
    return jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, module)


def _select_norm(pred, a: AbstractNorm, b: AbstractNorm) -> AbstractNorm:
    arrays_a, static = eqx.partition(a, eqx.is_array)
    arrays_b, _ = eqx.partition(b, eqx.is_array)
    return eqx.combine(jax.tree.map(lambda x, y: jnp.where(pred, x, y), arrays_a, arrays_b), static)


# ---------------------------------------------------------------------------------------
# The field.
# ---------------------------------------------------------------------------------------


class Field(eqx.Module):
    """The right-hand side `du/dt = f(t, u)` of the Transformer PDE, on one sequence.

    **Arguments:**

    - `dim`: model width.
    - `num_heads`: attention heads (must divide `dim`).
    - `num_layers`: depth `T`; the field lives on `t in [0, T]`.
    - `key`: a JAX PRNG key.
    - `hidden`: reaction (FFN) width; default `4 * dim`.
    - `schedule`: depth dependence of the weights: `PerLayer()` (default), `Shared()`,
      `Interpolated()`.
    - `composition`: `SequentialBlock()` (default, the standard block) or `ParallelBlock()`.
    - `norm`: a constructor `norm(dim) -> AbstractNorm` (`LayerNorm`, `RMSNorm`, `Identity`).
    - `activation`: the reaction's nonlinearity.
    - `diffusion`: an optional `DiffusionOperator` adding `D Lap(u)` to the rate; for a
      learnable `D >= 0` use `DiffusionOperator(dim, alpha_max=None)`.
    - `attention_implementation`: `MultiHeadAttention`'s `implementation`: `None` (chosen
      per platform, dtype and shapes; see `choose_implementation`), `"xla"`, `"cudnn"`,
      `"blockwise"` or `"einsum"`.
    - `attention_block_size`: the most query rows per block of the blockwise (CPU) attention.
    - `diffusion_at`: insertion points of diffusion layers inside the field, any of
      `"before_norm"`, `"after_norm"`, `"after_attention"`, `"after_ffn"` (in each block's
      branches; their weights follow `schedule` like the block's) and `"between_layers"`
      (a map of the state at the layer boundaries `t = 1 .. L-1`, one layer per boundary);
      see `pdeformer.placement`. Default: none.
    - `diffusion_layer`: the constructor of those layers, called as
      `diffusion_layer(dim, key=key, dtype=dtype)`; default `DiffusionLayer` (use e.g.
      `functools.partial(DiffusionLayer, dilations=(1, 2, 4, 8))` for the multi-scale
      layer, or `AdaptiveDiffusionLayer`).
    - `dtype`: the dtype of the weights (and so of the state they are trained with).
    - `compute_dtype`: mixed precision. `None` (default) computes the rate in the state's
      dtype; e.g. `jnp.bfloat16` evaluates the blocks (norms, attention, reaction and their
      diffusion layers) in that dtype, with weights kept in `dtype` and cast on use, norm
      statistics and softmax taken in float32, and the rate returned in the state's dtype.
      Depth, the state, the `D Lap(u)` term, the between-layer maps and an adaptive
      solver's error norm stay in the state's dtype.

    Pads (where `mask` is `False`) are frozen: their rate is zero, so they neither move nor
    influence the adaptive solver's error estimate.

    With `"between_layers"` the state jumps at the layer boundaries, `u(l) = D_l(u(l^-))`,
    and saved states at integer depths are the post-map states (the input of layer `l`).
    """

    blocks: Block
    transitions: eqx.Module | None
    diffusion: DiffusionOperator | None
    schedule: AbstractSchedule
    composition: AbstractComposition
    num_layers: int = eqx.field(static=True)
    compute_dtype: np.dtype | None = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_layers: int,
        *,
        key: PRNGKeyArray,
        hidden: int | None = None,
        schedule: AbstractSchedule | None = None,
        composition: AbstractComposition | None = None,
        norm: Callable[[int], AbstractNorm] = LayerNorm,
        activation: Callable[[Array], Array] = jax.nn.gelu,
        diffusion: DiffusionOperator | None = None,
        attention_implementation: str | None = None,
        attention_block_size: int = DEFAULT_BLOCK_SIZE,
        diffusion_at: tuple[str, ...] | str | None = (),
        diffusion_layer: DiffusionFactory = DiffusionLayer,
        dtype=jnp.float32,
        compute_dtype=None,
    ):
        points = check_points(diffusion_at, FIELD_POINTS)
        if compute_dtype is not None:
            try:
                compute_dtype = np.dtype(compute_dtype)
            except TypeError:
                compute_dtype = None
            if compute_dtype is None or not jnp.issubdtype(compute_dtype, jnp.floating):
                raise ValueError(
                    "compute_dtype must be a floating dtype such as jnp.bfloat16 (mixed "
                    "precision) or None (compute in the state's dtype); got "
                    f"{compute_dtype!r}."
                )
        if dim < 1:
            raise ValueError(f"dim must be >= 1; got dim={dim}.")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1; got num_layers={num_layers}.")
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(
                f"num_heads must divide dim; got dim={dim}, num_heads={num_heads}. "
                f"Pass a num_heads among the divisors of {dim}."
            )
        hidden = 4 * dim if hidden is None else hidden
        schedule = PerLayer() if schedule is None else schedule
        composition = SequentialBlock() if composition is None else composition
        if not isinstance(schedule, AbstractSchedule):
            raise ValueError(
                f"schedule must be an AbstractSchedule (PerLayer(), Shared(), Interpolated()); "
                f"got {schedule!r}."
            )
        if not isinstance(composition, AbstractComposition):
            raise ValueError(
                "composition must be an AbstractComposition (SequentialBlock(), ParallelBlock()); "
                f"got {composition!r}."
            )

        def make_diffusion(k, point):
            # Keys folded in per point, so adding a point leaves the other weights as they were.
            return diffusion_layer(dim, key=jr.fold_in(k, FIELD_POINTS.index(point)), dtype=dtype)

        def make_block(k):
            ka, kr = jr.split(k)
            branches = {p: make_diffusion(k, p) for p in points if p != "between_layers"}
            return Block(
                attention_norm=norm(dim, dtype=dtype),
                attention=MultiHeadAttention(
                    dim,
                    num_heads,
                    key=ka,
                    implementation=attention_implementation,
                    block_size=attention_block_size,
                    dtype=dtype,
                ),
                reaction_norm=norm(dim, dtype=dtype),
                reaction=Reaction(dim, hidden, key=kr, activation=activation, dtype=dtype),
                **branches,
            )

        keys = jr.split(key, schedule.num_nodes(num_layers))
        self.blocks = eqx.filter_vmap(make_block)(keys)
        if "between_layers" in points and num_layers > 1:
            tkeys = jr.split(jr.fold_in(key, len(FIELD_POINTS)), num_layers - 1)
            self.transitions = eqx.filter_vmap(lambda k: make_diffusion(k, "between_layers"))(tkeys)
        else:
            self.transitions = None
        self.diffusion = diffusion
        self.schedule = schedule
        self.composition = composition
        self.num_layers = num_layers
        self.compute_dtype = compute_dtype

    @property
    def t1(self) -> float:
        """The final depth `T = num_layers`."""
        return float(self.num_layers)

    @property
    def discrete_step(self) -> float:
        """The Euler step under which this field is the standard discrete Transformer."""
        return self.composition.discrete_step

    def jump_times(self) -> tuple[float, ...]:
        """Depths in `(0, T)` where the field is discontinuous in `t` (for the controller)."""
        times = set(self.schedule.jump_times(self.num_layers))
        for layer in range(self.num_layers):
            times.update(layer + o for o in self.composition.jump_offsets())
        return tuple(sorted(t for t in times if 0.0 < t < self.t1))

    @property
    def diffusion_at(self) -> tuple[str, ...]:
        """The insertion points of this field's diffusion layers, in canonical order."""
        points = [p for p in FIELD_POINTS[:4] if getattr(self.blocks, p) is not None]
        if self.transitions is not None:
            points.append("between_layers")
        return tuple(points)

    def transition(
        self,
        boundary: Int[Array, ""] | int,
        u: Float[Array, "seq dim"],
        mask: Bool[Array, " seq"] | None = None,
    ) -> Float[Array, "seq dim"]:
        """The map of the state at the layer boundary `t = boundary + 1` (0-based: after
        layer `boundary`), `u <- D_boundary(u)`; the identity without `"between_layers"`.

        `boundary` may be traced; it is clipped to `[0, num_layers - 2]`.
        """
        if self.transitions is None:
            return u
        i = jnp.clip(jnp.asarray(boundary, jnp.int32), 0, self.num_layers - 2)
        return _index(self.transitions, i)(u, mask)

    def layer(self, t: Scalar, anchor: Scalar | None = None) -> tuple[Block, Scalar]:
        """The block in force at depth `t` and the phase inside its layer.

        `anchor`, a depth strictly inside the smooth piece being integrated, decides which
        piece is meant when `t` sits exactly on a jump (a stage at the end of a step).
        """
        t = jnp.asarray(t)
        a = t if anchor is None else jnp.asarray(anchor, t.dtype)
        index = jnp.clip(jnp.floor(a), 0, self.num_layers - 1)
        phase = a - index
        block = self.schedule.weights(self.blocks, t, self.num_layers, anchor=a)
        return block, phase

    def __call__(
        self,
        t: Scalar,
        u: Float[Array, "*batch seq dim"],
        mask: Bool[Array, "*batch seq"] | None = None,
        *,
        normalize: bool = True,
        anchor: Scalar | None = None,
        phase: float | None = None,
    ) -> Float[Array, "*batch seq dim"]:
        """The rate `du/dt` at depth `t`.

        **Arguments:**

        - `t`: depth, a scalar in `[0, num_layers]`.
        - `u`: token states of one sequence `(seq, dim)`, or of a batch on leading axes.
          Pass a batch here rather than `jax.vmap`-ing the field: attention and the
          reaction then run as whole-batch matmuls, which XLA's CPU backend differentiates
          much faster (see `docs/architecture.md`); diffusion layers are mapped over the
          batch inside.
        - `mask`: key-padding mask (`True` = valid token, valid tokens first), or `None`.
        - `normalize`: `False` drops the pre-norms (used by post-LN discrete mode).
        - `anchor`: a depth inside the smooth piece being integrated; the field is then
          that piece's rate, continued to the piece's closed interval (see `layer`).
        - `phase`: the position inside the layer when it is known at trace time (a Python
          float); the composition then picks its branch without `lax.cond`.

        **Returns:**

        The rate, same shape as `u`; zero on pads.
        """
        block, traced_phase = self.layer(t, anchor)
        phase = traced_phase if phase is None else float(phase)
        if self.compute_dtype is None or self.compute_dtype == u.dtype:
            rate = self.composition.rate(block, phase, u, mask, normalize)
        else:
            # Weights are selected (and interpolated) in their own dtype, then cast; the
            # rate comes back in the state's dtype, where the solver works.
            block = _cast(block, self.compute_dtype)
            rate = self.composition.rate(
                block, phase, u.astype(self.compute_dtype), mask, normalize
            )
            rate = rate.astype(u.dtype)
        if self.diffusion is not None:
            rate = rate + _per_sequence(self.diffusion, u, mask)
        if mask is not None:
            rate = jnp.where(mask[..., None], rate, jnp.zeros_like(rate))
        return rate
