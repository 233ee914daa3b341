"""The PDE right-hand side: one vector field from which every model of the library follows.

    du/dt = A(N(u)) + R(N'(u)) + D Lap(u)

With the sequential composition, layer `l` owns the depth interval `[l, l+1)`: attention
acts on `[l, l+1/2)` with rate `2 A_l(N_l(u))`, the reaction on `[l+1/2, l+1)` with rate
`2 R_l(N'_l(u))`. Forward Euler with step 1/2 is then the pre-LN Transformer, bit for bit.

The field reports its own structure in depth (`Field.pieces`: the intervals on which its rate
is smooth, and `Field.on_piece`: the rate of each); the integrators in `pdeformer.depth` step
over those pieces and pass nothing but `(t, u, mask)` to the field.
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
    Dropout,
    LayerNorm,
    MultiHeadAttention,
    Reaction,
)
from .operators.attention import DEFAULT_BLOCK_SIZE
from .operators.dropout import dropout
from .placement import FIELD_POINTS, DiffusionFactory, check_points


class AbstractLayerTerm(eqx.Module):
    """A term of the rate with its own weights per layer, acting on one sequence.

    Pass a constructor of it to `Field(..., terms=(factory,))`: the field calls
    `factory(dim, key=key, dtype=dtype)` once per depth node and stacks the weights as it
    stacks the block's, so the term follows the field's `schedule` (one weight set per layer
    with `PerLayer()`, one for all depths with `Shared()`, interpolated with
    `Interpolated()`). The term is added to the rate beside the reaction (FFN): on the
    second half of each layer with `SequentialBlock()` (Euler with step 1/2 then gives
    `u + R(N' u) + c(u)`), at every depth with `ParallelBlock()`.
    """

    @abc.abstractmethod
    def __call__(
        self, u: Float[Array, "seq dim"], mask: Bool[Array, " seq"] | None
    ) -> Float[Array, "seq dim"]:
        """The term's rate on the (un-normalised) token states `u` of one sequence."""


class Block(eqx.Module):
    """The weights of one layer: two norms, attention, the reaction (FFN), optional
    diffusion layers at the four branch insertion points, and the user's extra terms.

    A `Field` holds these stacked on a leading axis (one slice per depth node).

    `dropout` (the rates, static) and `key` (the key of this piece's masks, set by the
    field on the block of one piece, `None` in the stacked weights) switch on dropout: on
    the attention weights, on the FFN's hidden activations, and on the output of each
    branch (after its `after_attention` / `after_ffn` layer, before the extra terms are
    added). Without a key the branches are deterministic.
    """

    attention_norm: AbstractNorm
    attention: MultiHeadAttention
    reaction_norm: AbstractNorm
    reaction: Reaction
    before_norm: eqx.Module | None = None
    after_norm: eqx.Module | None = None
    after_attention: eqx.Module | None = None
    after_ffn: eqx.Module | None = None
    # None rather than an empty tuple when there are none: `()` is one shared object, which
    # `eqx.tree_at` (used by diffrax's BacksolveAdjoint on the whole term) cannot tell apart.
    terms: tuple[AbstractLayerTerm, ...] | None = None
    dropout: Dropout | None = None
    key: PRNGKeyArray | None = None

    def _dropout_keys(self) -> tuple:
        # Keys of the four masks: attention weights, attention output, FFN hidden, FFN output.
        if self.key is None or self.dropout is None or not self.dropout.active:
            return (None,) * 4
        return tuple(jr.fold_in(self.key, i) for i in range(4))

    def _rates(self) -> tuple[float, float]:
        if self.dropout is None:
            return 0.0, 0.0
        return self.dropout.rate, self.dropout.attention_rate

    def with_key(self, key: PRNGKeyArray | None) -> "Block":
        """This block with `key` drawing its dropout masks (see above); `None` turns them off."""
        return eqx.tree_at(lambda b: b.key, self, key, is_leaf=lambda x: x is None)

    def attention_signals(
        self,
        u: Float[Array, "*batch seq dim"],
        mask: Bool[Array, "*batch seq"] | None,
    ) -> tuple[Float[Array, "*batch seq dim"], Float[Array, "*batch seq dim"]]:
        """The attention branch's inner signals: the normalised input `N(u)` (after the
        `before_norm` layer, before the `after_norm` layer) and the attention output (before
        the `after_attention` layer; with dropout on its weights where the block has a key)."""
        x = _token_wise(self.attention_norm, _per_sequence(self.before_norm, u, mask))
        _, attention_rate = self._rates()
        out = self.attention(
            _per_sequence(self.after_norm, x, mask),
            mask,
            dropout_rate=attention_rate,
            key=self._dropout_keys()[0],
        )
        return x, out

    def attend(
        self,
        u: Float[Array, "*batch seq dim"],
        mask: Bool[Array, "*batch seq"] | None,
    ) -> Float[Array, "*batch seq dim"]:
        """The attention branch `A(N(u))`, with the `before_norm`, `after_norm` and
        `after_attention` diffusion layers where set, and dropout where the block has a key."""
        _, a = self.attention_signals(u, mask)
        rate, _ = self._rates()
        return dropout(_per_sequence(self.after_attention, a, mask), rate, self._dropout_keys()[1])

    def reaction_signal(self, u: Float[Array, "*batch seq dim"]) -> Float[Array, "*batch seq dim"]:
        """The FFN output `R(N'(u))` before the `after_ffn` layer (with dropout on its
        hidden activations where the block has a key)."""
        rate, _ = self._rates()
        return self.reaction(
            _token_wise(self.reaction_norm, u), dropout_rate=rate, key=self._dropout_keys()[2]
        )

    def react(
        self,
        u: Float[Array, "*batch seq dim"],
        mask: Bool[Array, "*batch seq"] | None,
    ) -> Float[Array, "*batch seq dim"]:
        """The FFN branch `R(N'(u))` plus the extra terms, with the `after_ffn` diffusion
        layer where set (`mask` is read by that layer and by the terms), the FFN output
        dropped out where the block has a key."""
        rate, _ = self._rates()
        r = _per_sequence(self.after_ffn, self.reaction_signal(u), mask)
        r = dropout(r, rate, self._dropout_keys()[3])
        for term in self.terms or ():
            r = r + _per_sequence(term, u, mask)
        return r


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

    @property
    @abc.abstractmethod
    def smooth(self) -> bool:
        """Whether the weights are smooth in `t` over all of `[0, num_layers]` (no jump or
        kink at the layer boundaries): only then can a field be one smooth piece."""

    @abc.abstractmethod
    def num_nodes(self, num_layers: int) -> int:
        """How many weight sets are stacked for `num_layers` layers."""

    @abc.abstractmethod
    def weights(self, stacked: Block, t: Scalar, layer: Int[Array, ""]) -> Block:
        """The block of weights in force at depth `t` on layer `layer`'s interval
        `[layer, layer + 1]` (closed: `t` may sit on either end)."""

    def at_depth(self, num_layers: int) -> "AbstractSchedule":
        """This schedule for a field of `num_layers` layers; `Field` calls it once at
        construction. Most schedules do not depend on the depth and return themselves;
        `Polynomial` places its nodes on `[0, num_layers]`."""
        return self


def _index(stacked: eqx.Module, i) -> eqx.Module:
    """Slice `i` of a module whose arrays are stacked on a leading axis."""
    arrays, static = eqx.partition(stacked, eqx.is_array)
    return eqx.combine(jax.tree.map(lambda x: x[i], arrays), static)


class PerLayer(AbstractSchedule):
    """One weight set per layer, piecewise constant in depth: the standard Transformer."""

    @property
    def smooth(self) -> bool:
        return False

    def num_nodes(self, num_layers: int) -> int:
        return num_layers

    def weights(self, stacked: Block, t: Scalar, layer: Int[Array, ""]) -> Block:
        return _index(stacked, layer)


class Shared(AbstractSchedule):
    """One weight set for all depths: the classic (autonomous) neural ODE."""

    @property
    def smooth(self) -> bool:
        return True

    def num_nodes(self, num_layers: int) -> int:
        return 1

    def weights(self, stacked: Block, t: Scalar, layer: Int[Array, ""]) -> Block:
        return _index(stacked, 0)


class Interpolated(AbstractSchedule):
    """Weights linear in `t` between nodes at `t = 0, 1, ..., num_layers`: no weight jumps,
    but a kink at every node, so each layer is its own smooth piece."""

    @property
    def smooth(self) -> bool:
        return False

    def num_nodes(self, num_layers: int) -> int:
        return num_layers + 1

    def weights(self, stacked: Block, t: Scalar, layer: Int[Array, ""]) -> Block:
        s = t - jnp.asarray(layer).astype(t.dtype)
        arrays, static = eqx.partition(stacked, eqx.is_array)
        mixed = jax.tree.map(
            lambda x: (1 - s).astype(x.dtype) * x[layer] + s.astype(x.dtype) * x[layer + 1],
            arrays,
        )
        return eqx.combine(mixed, static)


def chebyshev_nodes(degree: int, num_layers: int) -> np.ndarray:
    """The `degree + 1` Chebyshev points (first kind) of `[0, num_layers]`, increasing; the
    midpoint for `degree=0`."""
    k = np.arange(degree + 1)
    x = -np.cos((2 * k + 1) * np.pi / (2 * (degree + 1)))
    return 0.5 * num_layers * (x + 1)


def _lagrange_basis(t: Scalar, nodes: np.ndarray) -> Float[Array, " nodes"]:
    """The Lagrange basis polynomials of `nodes` at `t`: `l_k(t) = prod_{j != k} (t - t_j) /
    (t_k - t_j)`, summing to 1 at every `t`."""
    values = []
    for k, tk in enumerate(nodes):
        v = jnp.ones((), t.dtype)
        for j, tj in enumerate(nodes):
            if j != k:
                v = v * (t - tj) / (tk - tj)
        values.append(v)
    return jnp.stack(values)


class Polynomial(AbstractSchedule):
    """Weights a polynomial of degree `degree` in `t`, smooth everywhere: no jumps and no
    kinks, so with `ParallelBlock()` the field is one smooth piece and an adaptive solver
    may step across layers (a short spectral expansion in depth, as in Galerkin neural
    ODEs, Massaroli et al. 2020).

    The stacked weights are the polynomial's values at the `degree + 1` Chebyshev points of
    `[0, num_layers]` (`chebyshev_nodes`), and the weights at `t` their Lagrange
    interpolation: each node is initialised like one layer, the interpolation weights sum
    to 1 (a norm's scale stays 1 at initialisation), and the basis is well conditioned at
    low degree. `Polynomial(0)` is `Shared()`.

    **Arguments:**

    - `degree`: the polynomial degree, `>= 0` (e.g. 3).
    - `num_layers`: the depth `T` whose interval `[0, T]` carries the nodes; `Field` sets
      it (`at_depth`), so leave it out.
    """

    degree: int = eqx.field(static=True, default=3)
    num_layers: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if not isinstance(self.degree, int) or isinstance(self.degree, bool) or self.degree < 0:
            raise ValueError(
                f"Polynomial degree must be an int >= 0; got degree={self.degree!r}. "
                "Pass e.g. Polynomial(degree=3) (degree 0 is Shared())."
            )

    @property
    def smooth(self) -> bool:
        return True

    def num_nodes(self, num_layers: int) -> int:
        return self.degree + 1

    def at_depth(self, num_layers: int) -> "Polynomial":
        return Polynomial(self.degree, num_layers)

    def weights(self, stacked: Block, t: Scalar, layer: Int[Array, ""]) -> Block:
        if self.degree == 0:
            return _index(stacked, 0)
        if self.num_layers is None:
            raise ValueError(
                f"Polynomial({self.degree}) places its nodes on [0, num_layers], which it "
                "learns from the field: build the field with it, Field(..., "
                f"schedule=Polynomial({self.degree})), rather than calling it directly."
            )
        t = jnp.asarray(t)
        basis = _lagrange_basis(t, chebyshev_nodes(self.degree, self.num_layers))
        arrays, static = eqx.partition(stacked, eqx.is_array)
        mixed = jax.tree.map(lambda x: jnp.tensordot(basis.astype(x.dtype), x, axes=1), arrays)
        return eqx.combine(mixed, static)


# ---------------------------------------------------------------------------------------
# Compositions: how attention and reaction share a layer's depth interval.
# ---------------------------------------------------------------------------------------


class AbstractComposition(eqx.Module):
    """How attention and reaction combine inside one layer interval `[l, l+1)`.

    The layer is cut into `num_branches` pieces of equal width; on piece `b` the rate is
    `rate(block, b, u, mask)`, smooth in `u` and in the block's weights.
    """

    @property
    @abc.abstractmethod
    def num_branches(self) -> int:
        """How many pieces of equal width a layer is cut into (one rate each)."""

    @property
    def discrete_step(self) -> float:
        """The Euler step that makes this composition the standard (discrete) block: one
        step per piece of a layer."""
        return 1.0 / self.num_branches

    @abc.abstractmethod
    def rate(
        self,
        block: Block,
        branch: int,
        u: Float[Array, "*batch seq dim"],
        mask: Bool[Array, "*batch seq"] | None,
    ) -> Float[Array, "*batch seq dim"]:
        """The rate of the block on piece `branch` (a Python int) of its layer."""

    @abc.abstractmethod
    def post_norm(self, block: Block, branch: int) -> AbstractNorm:
        """The norm applied after a discrete step on piece `branch` (post-LN)."""


class SequentialBlock(AbstractComposition):
    """Attention on the first half of each layer, the reaction on the second (Lie–Trotter).

    Euler with step 1/2 gives `u + A(N u)`, then `+ R(N' u)`: the standard pre-LN block.
    """

    @property
    def num_branches(self) -> int:
        return 2

    def rate(self, block, branch, u, mask):
        if branch == 0:
            return 2 * block.attend(u, mask)
        return 2 * block.react(u, mask)

    def post_norm(self, block, branch):
        return block.attention_norm if branch == 0 else block.reaction_norm


class ParallelBlock(AbstractComposition):
    """Attention and reaction act at once: `du/dt = A(N u) + R(N' u)`.

    Euler with step 1 gives the parallel block `u + A(N u) + R(N' u)`.
    """

    @property
    def num_branches(self) -> int:
        return 1

    def rate(self, block, branch, u, mask):
        return block.attend(u, mask) + block.react(u, mask)

    def post_norm(self, block, branch):
        return block.reaction_norm


# ---------------------------------------------------------------------------------------
# The field's smooth pieces.
# ---------------------------------------------------------------------------------------


class Pieces(eqx.Module):
    """The depth intervals on which a field's rate is smooth, as the field reports them.

    `[0, T]` is cut into `periods` consecutive periods, each cut into `len(branches)`
    pieces of width `width`; piece `j` of period `p` covers
    `[p * period + j * width, p * period + (j + 1) * width]` and carries the rate
    `field.on_piece(p, branches[j])`. A period is one layer, or all of `[0, T]` for a
    field that is one smooth piece. The regular structure is what lets integrators scan
    over periods (compile time flat in depth) with the branch known at trace time.
    """

    width: float = eqx.field(static=True)
    branches: tuple[int, ...] = eqx.field(static=True)
    periods: int = eqx.field(static=True)

    @property
    def period(self) -> float:
        """The width of one period."""
        return self.width * len(self.branches)

    @property
    def count(self) -> int:
        """The number of pieces."""
        return self.periods * len(self.branches)

    def edges(self) -> np.ndarray:
        """The pieces' ends, `0` and `T` included (float64)."""
        return np.arange(self.count + 1, dtype=np.float64) * self.width

    def jump_times(self) -> tuple[float, ...]:
        """The inner edges, where the rate may jump (for adaptive controllers)."""
        return tuple(float(t) for t in self.edges()[1:-1])


class PieceRate(eqx.Module):
    """The field's rate on one smooth piece, continued to the piece's closed interval.

    Returned by `Field.on_piece`; call it as `rate(t, u, mask)`. A module (not a closure),
    so that the field's weights are leaves of a diffrax term built from it.
    """

    field: "Field"
    layer: Int[Array, ""]
    branch: int = eqx.field(static=True)

    def __call__(
        self,
        t: Scalar,
        u: Float[Array, "*batch seq dim"],
        mask: Bool[Array, "*batch seq"] | None = None,
    ) -> Float[Array, "*batch seq dim"]:
        field = self.field
        t = jnp.asarray(t)
        block = field.schedule.weights(field.blocks, t, self.layer)
        if field.dropout_key is not None:
            # The piece's masks follow from the solve's key, the period and the branch: the
            # same at every evaluation on the piece (held fixed in depth), so the rate stays
            # a deterministic function of (t, u) within one solve.
            piece_key = jr.fold_in(jr.fold_in(field.dropout_key, self.layer), self.branch)
            block = block.with_key(piece_key)
        if field.compute_dtype is None or field.compute_dtype == u.dtype:
            rate = field.composition.rate(block, self.branch, u, mask)
        else:
            # Weights are selected (and interpolated) in their own dtype, then cast; the
            # rate comes back in the state's dtype, where the solver works.
            block = _cast(block, field.compute_dtype)
            rate = field.composition.rate(
                block, self.branch, u.astype(field.compute_dtype), mask
            ).astype(u.dtype)
        if field.diffusion is not None:
            rate = rate + _per_sequence(field.diffusion, u, mask)
        if mask is not None:
            rate = jnp.where(mask[..., None], rate, jnp.zeros_like(rate))
        return rate


def _cast(module: eqx.Module, dtype) -> eqx.Module:
    """`module` with its floating-point arrays cast to `dtype`."""
    return jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, module)


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
      `Interpolated()`, `Polynomial(degree)`.
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
    - `terms`: constructors of extra terms with their own per-layer weights (see
      `AbstractLayerTerm`), each called as `factory(dim, key=key, dtype=dtype)` once per
      depth node; default none.
    - `dtype`: the dtype of the weights (and so of the state they are trained with); a
      given `diffusion` operator is cast to it.
    - `dropout`: a `Dropout` with the rates of dropout on the attention weights, the FFN's
      hidden activations and each branch's output (LRA's Transformer); `None` (default) or
      zero rates: none. Dropout acts only on a field given a key (`with_dropout_key`).
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

    The field reports its own structure in depth: `pieces()` lists the intervals on which
    its rate is smooth (the half layers of the sequential composition; one piece for a
    parallel block with smooth weights, `Shared()` or `Polynomial(degree)`), `on_piece`
    gives each piece's rate, and every integrator works from those.
    """

    blocks: Block
    transitions: eqx.Module | None
    diffusion: DiffusionOperator | None
    schedule: AbstractSchedule
    composition: AbstractComposition
    num_layers: int = eqx.field(static=True)
    compute_dtype: np.dtype | None = eqx.field(static=True)
    dropout_key: PRNGKeyArray | None = None

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
        terms: tuple[Callable[..., AbstractLayerTerm], ...] = (),
        dropout: Dropout | None = None,
        dtype=jnp.float32,
        compute_dtype=None,
    ):
        points = check_points(diffusion_at, FIELD_POINTS)
        if dropout is not None and not isinstance(dropout, Dropout):
            raise ValueError(
                f"dropout must be a Dropout (e.g. Dropout(rate=0.1, attention_rate=0.1)) or "
                f"None; got {dropout!r}."
            )
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
                "schedule must be an AbstractSchedule (PerLayer(), Shared(), Interpolated(), "
                f"Polynomial(degree)); "
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
            extra = tuple(
                factory(dim, key=jr.fold_in(k, len(FIELD_POINTS) + 1 + i), dtype=dtype)
                for i, factory in enumerate(terms)
            )
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
                terms=extra or None,
                dropout=dropout if dropout is not None and dropout.active else None,
                **branches,
            )

        keys = jr.split(key, schedule.num_nodes(num_layers))
        self.blocks = eqx.filter_vmap(make_block)(keys)
        if "between_layers" in points and num_layers > 1:
            tkeys = jr.split(jr.fold_in(key, len(FIELD_POINTS)), num_layers - 1)
            self.transitions = eqx.filter_vmap(lambda k: make_diffusion(k, "between_layers"))(tkeys)
        else:
            self.transitions = None
        self.diffusion = None if diffusion is None else _cast(diffusion, dtype)
        self.schedule = schedule.at_depth(num_layers)
        self.composition = composition
        self.num_layers = num_layers
        self.compute_dtype = compute_dtype
        self.dropout_key = None

    @property
    def dropout(self) -> Dropout:
        """The field's dropout rates (`Dropout(0, 0)` for a field built without)."""
        return Dropout() if self.blocks.dropout is None else self.blocks.dropout

    def with_dropout_key(self, key: PRNGKeyArray | None) -> "Field":
        """This field with its dropout masks drawn from `key` (`None`: no dropout).

        The masks of each smooth piece (`pieces()`) follow from `key`, the piece's period
        and its branch, and are the same at every evaluation on the piece: within one solve
        the masks are drawn once and held fixed in depth, and the rate is a deterministic
        function of `(t, u)`, as an adaptive solver needs. With per-layer pieces (the
        sequential composition, or any field cut into layers) each layer's branch has its
        own masks; a field that is one smooth piece has one set for all depths. Every
        integrator steps the same pieces, so `Discrete()` and
        `Continuous(diffrax.Euler(), diffrax.ConstantStepSize(), dt0=field.discrete_step)`
        drop the same entries. Pass a new key for every training step.

        **Arguments:**

        - `key`: a JAX PRNG key, or `None`.

        **Returns:**

        The field with the key set; nothing else changes (a field without dropout rates
        ignores it).
        """
        return eqx.tree_at(lambda f: f.dropout_key, self, key, is_leaf=lambda x: x is None)

    @property
    def t1(self) -> float:
        """The final depth `T = num_layers`."""
        return float(self.num_layers)

    @property
    def discrete_step(self) -> float:
        """The Euler step under which this field is the standard discrete Transformer."""
        return self.composition.discrete_step

    def pieces(self) -> Pieces:
        """The depth intervals on which the rate is smooth (see `Pieces`).

        One piece `[0, T]` when the composition has one branch, the schedule is smooth
        and there are no maps between layers; otherwise the composition's pieces of every
        layer (the half layers of `SequentialBlock()`, whole layers of `ParallelBlock()`).
        """
        nb = self.composition.num_branches
        if nb == 1 and self.schedule.smooth and self.transitions is None:
            return Pieces(width=self.t1, branches=(0,), periods=1)
        return Pieces(width=1.0 / nb, branches=tuple(range(nb)), periods=self.num_layers)

    def jump_times(self) -> tuple[float, ...]:
        """Depths in `(0, T)` where the rate may jump: the inner edges of `pieces()`."""
        return self.pieces().jump_times()

    def on_piece(self, period: Int[Array, ""] | int, branch: int) -> PieceRate:
        """The rate on piece `branch` (a Python int) of period `period` (may be traced),
        continued to the piece's closed interval, so that a stage evaluated on the piece's
        end takes this piece's rate (see `Pieces`)."""
        return PieceRate(self, jnp.asarray(period, jnp.int32), branch)

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
        u: Float[Array, "*batch seq dim"],
        mask: Bool[Array, "*batch seq"] | None = None,
    ) -> Float[Array, "*batch seq dim"]:
        """The map of the state at the layer boundary `t = boundary + 1` (0-based: after
        layer `boundary`), `u <- D_boundary(u)`; the identity without `"between_layers"`.

        `boundary` may be traced; it is clipped to `[0, num_layers - 2]`.
        """
        if self.transitions is None:
            return u
        i = jnp.clip(jnp.asarray(boundary, jnp.int32), 0, self.num_layers - 2)
        return _per_sequence(_index(self.transitions, i), u, mask)

    def __call__(
        self,
        t: Scalar,
        u: Float[Array, "*batch seq dim"],
        mask: Bool[Array, "*batch seq"] | None = None,
    ) -> Float[Array, "*batch seq dim"]:
        """The rate `du/dt` at depth `t`, right-continuous at the pieces' edges.

        **Arguments:**

        - `t`: depth, a scalar in `[0, num_layers]` (`t = T` takes the last piece).
        - `u`: token states of one sequence `(seq, dim)`, or of a batch on leading axes.
          Pass a batch here rather than `jax.vmap`-ing the field: attention and the
          reaction then run as whole-batch matmuls, which XLA's CPU backend differentiates
          much faster; diffusion layers are mapped over the batch inside.
        - `mask`: key-padding mask (`True` = valid token, valid tokens first), or `None`.

        **Returns:**

        The rate, same shape as `u`; zero on pads.
        """
        pieces = self.pieces()
        t = jnp.asarray(t)
        period = jnp.clip(jnp.floor(t / pieces.period), 0, pieces.periods - 1)
        offset = t - period * pieces.period
        period = period.astype(jnp.int32)
        rates = [self.on_piece(period, b) for b in pieces.branches]
        if len(rates) == 1:
            return rates[0](t, u, mask)
        branch = jnp.clip(jnp.floor(offset / pieces.width), 0, len(rates) - 1).astype(jnp.int32)
        return jax.lax.switch(branch, [lambda v, r=r: r(t, v, mask) for r in rates], u)
