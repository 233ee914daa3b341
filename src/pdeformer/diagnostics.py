"""Diagnostics of token roughness, of how diffusion and attention interact, and of how
often a gradient evaluates the field."""

from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, Scalar

from .depth import AbstractDepth, Discrete
from .field import AbstractComposition
from .models import Encoder
from .operators.diffusion_layer import DiffusionLayer


def _valid(mask: Bool[Array, " seq"] | None, seq: int) -> Bool[Array, " seq"]:
    return jnp.ones((seq,), bool) if mask is None else mask


def dirichlet_energy(
    u: Float[Array, "seq dim"], mask: Bool[Array, " seq"] | None = None
) -> Float[Array, ""]:
    """The Dirichlet energy `sum_i ||u_{i+1} - u_i||^2` over pairs of valid tokens.

    **Arguments:**

    - `u`: token states of one sequence.
    - `mask`: `True` on valid tokens (valid first), or `None`.

    **Returns:**

    A scalar; zero for a constant sequence.
    """
    valid = _valid(mask, u.shape[0])
    pair = valid[1:] & valid[:-1]
    diff = u[1:] - u[:-1]
    return jnp.sum(jnp.where(pair[:, None], diff**2, jnp.zeros_like(diff)))


def _relative_energy(u, mask):
    # Scale-free roughness E(u) / ||u||^2 over valid tokens; it lies in [0, 4] since
    # ||a - b||^2 <= 2 ||a||^2 + 2 ||b||^2.
    valid = _valid(mask, u.shape[0])
    sq = jnp.sum(jnp.where(valid[:, None], u**2, jnp.zeros_like(u)))
    tiny = jnp.asarray(jnp.finfo(u.dtype).tiny, u.dtype)
    return dirichlet_energy(u, mask) / jnp.maximum(sq, tiny)


def roughness_profile(
    encoder: Encoder,
    tokens: Int[Array, "batch seq"],
    mask: Bool[Array, "batch seq"] | None = None,
    depth: AbstractDepth | None = None,
) -> Float[Array, " saves"]:
    """Relative Dirichlet energy of the token states at each integer depth `0, 1, ..., L`.

    At each saved depth the per-sequence roughness is `E(u) / ||u||^2` (Dirichlet energy over
    the squared norm, both over valid tokens): invariant to rescaling the states, so a
    profile falling in depth means the tokens get smoother relative to their size (a value
    in `[0, 4]`; 0 for constant sequences, 4 for the alternating mode). It is averaged over
    the batch.

    **Arguments:**

    - `encoder`: the model.
    - `tokens`: a batch of token ids `(batch, seq)`.
    - `mask`: `True` on valid tokens, or `None`.
    - `depth`: the integrator (default `Discrete()`).

    **Returns:**

    The profile, `L + 1` values.
    """
    depth = Discrete() if depth is None else depth
    u0, m = encoder.embed(tokens, mask)
    num_layers = encoder.field.num_layers
    sol = depth(encoder.field, u0, m, save_at=range(num_layers + 1))
    per = jax.vmap(jax.vmap(_relative_energy), in_axes=(0, None))(sol.us, m)
    return jnp.mean(per, axis=1)


def roughness_at_points(
    encoder: Encoder,
    tokens: Int[Array, "batch seq"],
    mask: Bool[Array, "batch seq"] | None = None,
    depth: AbstractDepth | None = None,
) -> dict[str, Float[Array, "..."]]:
    """Roughness of the signal each of the seven insertion points receives.

    For every point of `pdeformer.placement.INSERTION_POINTS`, the relative Dirichlet
    energy `E(x) / ||x||^2` (see `roughness_profile`) of the signal `x` a diffusion layer
    placed there would act on, in this model as it is (its own diffusion layers included,
    upstream of each point), averaged over the batch:

    - `after_embedding`: token embeddings plus positions (scalar);
    - `before_norm`, `after_norm`, `after_attention`, `after_ffn`: per layer (`L` values):
      the stream at `t = l`, the normalised branch input, the attention output, and the
      FFN output (the FFN reads the stream at `t = l + 1/2`; at `t = l` with a parallel
      block);
    - `between_layers`: the stream at the inner boundaries `t = 1 .. L-1` (`L - 1` values;
      in a model that already has between-layer maps, the state after the map);
    - `before_head`: the final states (scalar).

    The branch signals assume the pre-LN arrangement (the field's own norms).

    **Arguments:**

    - `encoder`: the model.
    - `tokens`: a batch of token ids `(batch, seq)`.
    - `mask`: `True` on valid tokens, or `None`.
    - `depth`: the integrator (default `Discrete()`).

    **Returns:**

    A dict from point name to its roughness.
    """
    depth = Discrete() if depth is None else depth
    field = encoder.field
    num_layers = field.num_layers
    if mask is None:
        mask = jnp.ones(tokens.shape, bool)
    rough = jax.vmap(_relative_energy)
    out = {"after_embedding": jnp.mean(rough(encoder.token_embeddings(tokens), mask))}
    u0, m = encoder.embed(tokens, mask)
    # Each branch reads the stream where the field's pieces say it acts: with the
    # sequential composition the FFN at t = l + 1/2, with a parallel block at t = l.
    step = field.discrete_step
    saves = [k * step for k in range(round(num_layers / step) + 1)]
    sol = depth(field, u0, m, save_at=saves)
    at = lambda t: sol.us[round(t / step)]
    ffn_offset = 1.0 - step  # the reaction acts on the layer's last piece
    signals = {p: [] for p in ("before_norm", "after_norm", "after_attention", "after_ffn")}
    for layer in range(num_layers):
        t = jnp.asarray(layer, u0.dtype)
        block = field.schedule.weights(field.blocks, t, jnp.asarray(layer, jnp.int32))
        u = at(layer)
        normed, attended = block.attention_signals(u, m)
        reacted = block.reaction_signal(at(layer + ffn_offset))
        for name, x in (
            ("before_norm", u),
            ("after_norm", normed),
            ("after_attention", attended),
            ("after_ffn", reacted),
        ):
            signals[name].append(jnp.mean(rough(x, m)))
    out.update({name: jnp.stack(v) for name, v in signals.items()})
    inner = [jnp.mean(rough(at(t), m)) for t in range(1, num_layers)]
    out["between_layers"] = jnp.stack(inner) if inner else jnp.zeros((0,), u0.dtype)
    out["before_head"] = jnp.mean(rough(sol.u, m))
    return out


def commutator(
    diffusion: DiffusionLayer,
    attention: Callable[..., Array],
    u: Float[Array, "seq dim"],
    mask: Bool[Array, " seq"] | None = None,
) -> Float[Array, ""]:
    """`||D(A(u)) - A(D(u))|| / ||u||` over valid tokens: how far diffusion and attention commute.

    `D` is the diffusion layer (`u + op(u)`, linear), `A` an attention operator `A(u, mask)`
    (a `MultiHeadAttention`, or any token-mixing map with that signature). Since `D` is
    linear, this is also the commutator of `D` with the residual block `u + A(u)`. It is
    zero for token-wise linear maps when the diffusion coefficients are the same on every
    channel, and for uniform (mean-field) attention, since `D` conserves the token mean.

    **Arguments:**

    - `diffusion`: a `DiffusionLayer`.
    - `attention`: a callable `(u, mask) -> (seq, dim)`.
    - `u`: token states of one sequence.
    - `mask`: `True` on valid tokens (valid first), or `None`.

    **Returns:**

    A non-negative scalar.
    """
    valid = _valid(mask, u.shape[0])[:, None]
    da = diffusion(attention(u, mask), mask)
    ad = attention(diffusion(u, mask), mask)
    diff = jnp.where(valid, da - ad, jnp.zeros_like(u))
    norm_u = jnp.sqrt(jnp.sum(jnp.where(valid, u**2, jnp.zeros_like(u))))
    tiny = jnp.asarray(jnp.finfo(u.dtype).tiny, u.dtype)
    return jnp.sqrt(jnp.sum(diff**2)) / jnp.maximum(norm_u, tiny)


def model_commutator(
    encoder: Encoder,
    tokens: Int[Array, "batch seq"],
    mask: Bool[Array, "batch seq"] | None = None,
    layer: int = 0,
    diffusion: DiffusionLayer | None = None,
) -> Scalar:
    """The commutator of a diffusion step with the attention term of one layer of a model.

    The attention term is the field's `A(N(u))` of that layer (the block at depth node
    `layer`), evaluated on the embedded tokens `u(0)`; the diffusion is `diffusion` or a
    default `DiffusionLayer(dim)`. Averaged over the batch.

    **Arguments:**

    - `encoder`: the model.
    - `tokens`: a batch of token ids `(batch, seq)`.
    - `mask`: `True` on valid tokens, or `None`.
    - `layer`: which depth node's block.
    - `diffusion`: the diffusion layer, or `None` for the default.

    **Returns:**

    A scalar.
    """
    field = encoder.field
    nodes = jax.tree.leaves(field.blocks)[0].shape[0]
    if not 0 <= layer < nodes:
        raise ValueError(
            f"layer must index one of the field's {nodes} blocks; got layer={layer}. Pass "
            f"0 <= layer < {nodes}."
        )
    arrays, static = eqx.partition(field.blocks, eqx.is_array)
    block = eqx.combine(jax.tree.map(lambda x: x[layer], arrays), static)
    u0, m = encoder.embed(tokens, mask)
    if diffusion is None:
        diffusion = DiffusionLayer(u0.shape[-1], dtype=u0.dtype)
    attend = lambda v, mm: block.attend(v, mm)
    values = jax.vmap(lambda v, mm: commutator(diffusion, attend, v, mm))(u0, m)
    return jnp.mean(values)


# ---------------------------------------------------------------------------------------
# Evaluations of the field in a gradient.
# ---------------------------------------------------------------------------------------


class EvaluationCounts(NamedTuple):
    """How often one `jax.value_and_grad` evaluated the field (see `evaluation_counts`).

    - `forward`: evaluations of the rate in the forward pass (for a solve, what
      `DepthSolution.stats.nfe` reports).
    - `backward_recomputed`: evaluations of the rate run again during the backward pass
      (checkpoint recomputation, the backward solve of `diffrax.BacksolveAdjoint`).
    - `backward_vjp`: vector–Jacobian products of the rate in the backward pass.
    """

    forward: int
    backward_recomputed: int
    backward_vjp: int


class _Counted(AbstractComposition):
    # Delegates to `inner`; every call of its rate reports itself to `record` from inside
    # the compiled program. The callbacks carry data (a sum of the state or cotangent):
    # callbacks without operands were merged by JAX inside a scan, undercounting.
    inner: AbstractComposition
    record: Callable = eqx.field(static=True)

    @property
    def num_branches(self) -> int:
        return self.inner.num_branches

    @property
    def discrete_step(self) -> float:
        return self.inner.discrete_step

    def post_norm(self, block, branch):
        return self.inner.post_norm(block, branch)

    def rate(self, block, branch, u, mask):
        inner, record = self.inner, self.record
        arrays, static = eqx.partition(block, eqx.is_inexact_array)

        def plain(a, v, m):
            return inner.rate(eqx.combine(a, static), branch, v, m)

        @jax.custom_vjp
        def counted(a, v, m):
            # Reached when the rate is evaluated outside differentiation (a diffrax solve
            # under its adjoint's own custom VJP, or a forward recomputed for one).
            jax.debug.callback(lambda x: record("evaluation"), jnp.sum(v), ordered=True)
            return plain(a, v, m)

        def fwd(a, v, m):
            out, pull = jax.vjp(lambda a_, v_: plain(a_, v_, m), a, v)
            jax.debug.callback(lambda x: record("evaluation"), jnp.sum(v), ordered=True)
            return out, pull

        def bwd(pull, ct):
            jax.debug.callback(lambda x: record("vjp"), jnp.sum(ct), ordered=True)
            da, dv = pull(ct)
            return da, dv, None

        counted.defvjp(fwd, bwd)
        return counted(arrays, u, mask)


def _backward_marker(record):
    # The identity, whose backward rule is the first thing the backward pass runs: an
    # ordered callback there splits the program's callbacks into the two passes.
    @jax.custom_vjp
    def marker(x):
        return x

    def fwd(x):
        return x, None

    def bwd(_, ct):
        jax.debug.callback(lambda c: record("backward"), ct, ordered=True)
        return (ct,)

    marker.defvjp(fwd, bwd)
    return marker


def evaluation_counts(fn: Callable[..., Scalar], model, *args) -> EvaluationCounts:
    """Counts the field's evaluations in one `jax.value_and_grad` of `fn(model, *args)`.

    `DepthSolution.stats.nfe` counts the forward solve only: the backward pass evaluates
    the field again, by how much depending on the integrator and its adjoint. This runs
    `eqx.filter_value_and_grad(fn)(model, *args)` (the gradient with respect to `model`'s
    floating-point arrays) once, on a copy of `model` in which every `Field`'s composition
    counts the calls of its rate, and returns the counts. The gradient itself is the
    uncounted model's.

    What is counted: one call of the composition's rate (`AbstractComposition.rate`, the
    attention or reaction part of the field on one piece, through `Field`, `PieceRate`
    and every integrator and regulariser) is one evaluation, whether or not it is
    differentiated; its VJP is one `backward_vjp`. Evaluations made before the backward
    pass starts are `forward`; those after are `backward_recomputed`. A diffusion
    operator applied on its own (`ExponentialContinuous`'s exact part) is not counted,
    nor is the recomputation of the norms that `Field` checkpoints inside one rate (it
    runs inside that rate's VJP). What was measured (2 layers,
    Tsit5): `Discrete()` and a constant-step `Continuous` recompute nothing (one VJP per
    step); diffrax's `RecursiveCheckpointAdjoint` with at least as many checkpoints as
    steps, over diffrax's own stage loop (`Continuous(..., unroll_stages=False)`), runs
    every forward evaluation twice more in the backward pass (the step re-run, then each
    stage again under its VJP: 244 forward, 488 recomputed, 244 VJPs over 40 steps), and
    more with fewer checkpoints (636 recomputed with 16); with the stages unrolled
    (`Continuous`'s default) the stage loop's recomputation is gone, one fewer per VJP;
    `BacksolveAdjoint`'s backward solve evaluates the rate once per VJP.

    Counts are of evaluations in the program run, not of executed arithmetic: the
    counting callbacks keep an evaluation whose result is unused from being removed as
    dead code, so the counts bound the uninstrumented program's from above. Call it on a
    batch on leading axes (the field takes one), not under `jax.vmap`. It compiles `fn`
    afresh, and is meant for diagnosis, not for a training loop.

    **Arguments:**

    - `fn`: a scalar function `fn(model, *args)`, e.g. a loss.
    - `model`: a pytree holding one or more `Field`s (a `Field`, an `Encoder`, a
      `Classifier`, ...).
    - `*args`: the other arguments of `fn`.

    **Returns:**

    An `EvaluationCounts`.

    **Raises:**

    `ValueError` when `model` holds no `Field` composition.
    """
    events: list[str] = []
    record = events.append
    is_composition = lambda x: isinstance(x, AbstractComposition)
    found = [x for x in jax.tree.leaves(model, is_leaf=is_composition) if is_composition(x)]
    if not found:
        raise ValueError(
            f"model must hold a Field, whose composition is counted; got {type(model).__name__}. "
            "Pass the model (or field) as the first argument after fn."
        )
    counted = jax.tree.map(
        lambda x: _Counted(x, record) if is_composition(x) else x, model, is_leaf=is_composition
    )
    marker = _backward_marker(record)
    grad = eqx.filter_value_and_grad(lambda m, *a: marker(fn(m, *a)))
    jax.block_until_ready(eqx.filter_jit(grad)(counted, *args))
    jax.effects_barrier()
    if "backward" not in events:
        split = len(events)
    else:
        split = events.index("backward")
    before, after = events[:split], events[split:]
    return EvaluationCounts(
        forward=before.count("evaluation"),
        backward_recomputed=after.count("evaluation"),
        backward_vjp=after.count("vjp"),
    )
