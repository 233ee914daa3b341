"""The training loop: optimiser, one jitted step, evaluation, metrics log and checkpoints."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from ..data import Batch, Split, TaskData, iterate_batches, iterate_forever
from ..depth import AbstractDepth
from ..operators import Dropout
from ..regularisers import penalty
from ._parallel import DataParallel, to_host

CHECKPOINT_NAME = "checkpoint.json"
"""The sidecar naming the latest checkpoint in a run directory."""

METRICS_NAME = "metrics.jsonl"
"""The metrics log (one JSON object per line) in a run directory."""

# Fields that may change between a run and its resumption: they do not alter the trajectory.
_RESUMABLE_CHANGES = frozenset({"eval_every", "eval_batch_size", "checkpoint_every", "progress"})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run.

    **Arguments:**

    - `lr`: peak learning rate of AdamW with the `"cosine"` schedule; the base factor of
      the `"rsqrt"` schedule (its peak is `lr / sqrt(warmup_steps)`).
    - `warmup_steps`: linear warm-up from 0 over this many steps (`"cosine"`: below
      `total_steps`; `"rsqrt"`: `>= 1`, and it may exceed `total_steps`, as in LRA's
      Retrieval config).
    - `total_steps`: number of optimiser steps; the cosine decay reaches
      `lr * final_lr_fraction` here.
    - `final_lr_fraction`: the learning rate at the end, as a fraction of `lr` (`"cosine"`
      only).
    - `schedule`: the learning rate at step `t` (counted from 0), with `w = warmup_steps`:
      `"cosine"` (default): `optax.warmup_cosine_decay_schedule`, linear warm-up to `lr`,
      then cosine decay to `lr * final_lr_fraction` at `total_steps`; `"rsqrt"`: the LRA
      Transformer's `lr * min(1, t / w) / sqrt(max(t, w))`.
    - `b1`, `b2`, `eps`: Adam's moment decay rates and epsilon (defaults optax's, 0.9,
      0.999, 1e-8; the LRA Transformer uses 0.9, 0.98, 1e-9).
    - `weight_decay`: AdamW's decoupled weight decay (matrices only, not biases, norms or
      vectors).
    - `clip_norm`: gradients are clipped to this global norm.
    - `batch_size`: training examples per step.
    - `seed`: seed of the data order (the model's initialisation key is the caller's).
    - `eval_every`: evaluate on the validation split every this many steps (0: never).
    - `eval_batch_size`: batch size of those evaluations (`None`: `batch_size`).
    - `checkpoint_every`: write a checkpoint every this many steps (0: only at the end); only
      with an `out_dir`.
    - `pad_to`: padded sequence length (`None`: the training split's longest sequence, so
      every step has one shape and the step compiles once).
    - `bucket_batches`: length bucketing, see `pdeformer.data.batch_order`.
    - `progress`: show a progress bar on stderr.
    """

    lr: float = 1e-3
    warmup_steps: int = 100
    total_steps: int = 1000
    final_lr_fraction: float = 0.0
    schedule: Literal["cosine", "rsqrt"] = "cosine"
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    batch_size: int = 32
    seed: int = 0
    eval_every: int = 0
    eval_batch_size: int | None = None
    checkpoint_every: int = 0
    pad_to: int | None = None
    bucket_batches: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got lr={self.lr}. Pass e.g. lr=1e-3.")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1; got total_steps={self.total_steps}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"schedule must be one of {SCHEDULES}; got schedule={self.schedule!r}."
            )
        if self.schedule == "rsqrt" and self.warmup_steps < 1:
            raise ValueError(
                "the rsqrt schedule divides by sqrt(max(t, warmup_steps)): warmup_steps must "
                f"be >= 1; got warmup_steps={self.warmup_steps}. Pass e.g. 1000."
            )
        if self.schedule == "cosine" and not 0 <= self.warmup_steps < self.total_steps:
            # optax's cosine decay needs at least one step after the warm-up.
            raise ValueError(
                f"warmup_steps must lie in [0, total_steps={self.total_steps}) for the cosine "
                f"schedule, which decays after the warm-up; got warmup_steps="
                f"{self.warmup_steps}."
            )
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in [0, 1); got {name}={getattr(self, name)}.")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0; got eps={self.eps}. Pass e.g. 1e-8.")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(f"final_lr_fraction must lie in [0, 1]; got {self.final_lr_fraction}.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0; got {self.weight_decay}.")
        if not self.clip_norm > 0:
            raise ValueError(
                f"clip_norm must be > 0; got clip_norm={self.clip_norm}. Pass e.g. 1.0 "
                "(use a large value such as 1e9 to clip nothing)."
            )
        for name in ("batch_size",):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {name}={getattr(self, name)}.")
        for name in ("eval_every", "checkpoint_every", "bucket_batches"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {name}={getattr(self, name)}.")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1 or None; got {self.eval_batch_size}.")
        if self.pad_to is not None and self.pad_to < 1:
            raise ValueError(f"pad_to must be >= 1 or None; got {self.pad_to}.")


SCHEDULES = ("cosine", "rsqrt")
"""The learning-rate schedules `TrainConfig.schedule` names."""


def rsqrt_schedule(lr: float, warmup_steps: int) -> optax.Schedule:
    """The LRA Transformer's schedule (its `factors="constant * linear_warmup *
    rsqrt_decay"`): `lr * min(1, t / w) / sqrt(max(t, w))` at step `t`, `w = warmup_steps`.

    **Arguments:**

    - `lr`: the base factor (LRA's `learning_rate`, e.g. 0.05; the peak, at `t = w`, is
      `lr / sqrt(w)`).
    - `warmup_steps`: `w >= 1`.

    **Returns:**

    A function of the step (an int or an integer array) returning the learning rate.
    """
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps must be >= 1; got {warmup_steps}.")

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        w = jnp.asarray(warmup_steps, jnp.float32)
        return lr * jnp.minimum(1.0, t / w) / jnp.sqrt(jnp.maximum(t, w))

    return schedule


class NonFiniteLossError(FloatingPointError):
    """Training met a non-finite loss or gradient and stopped; the last good checkpoint is kept."""


class CorruptCheckpointError(ValueError):
    """A checkpoint that cannot be read back: `checkpoint.json` or the `.eqx` file it names is
    truncated, overwritten or missing. The message names the file; start afresh (without
    `resume`) or restore the run directory from a copy."""


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The result of `evaluate`.

    - `accuracy`: fraction of correct predictions.
    - `mean_nfe`: mean vector-field evaluations per batch (a batch is one ODE solve).
    - `wall_time`: seconds for the whole split, compilation excluded.
    - `time_per_batch`: `wall_time / num_batches`.
    - `num_examples`, `num_batches`.
    - `success`: fraction of batches whose solve succeeded (see `Continuous(throw=False)`)
      and whose logits are all finite: NaN or infinite outputs (NaN weights, a solve that
      blew up under a constant step) count as failures, never as a success.
    - `logits`: the logits, `(num_examples, classes)`, in the split's order.

    An example whose logits are not all finite counts as wrong in `accuracy`.
    """

    accuracy: float
    mean_nfe: float
    wall_time: float
    time_per_batch: float
    num_examples: int
    num_batches: int
    success: float
    logits: np.ndarray = dataclasses.field(repr=False)


class Optimizer(eqx.Module):
    """AdamW with a learning-rate schedule (linear warm-up and cosine decay, or LRA's
    rsqrt), after clipping by the global norm.

    It behaves as an `optax.GradientTransformation` (`init`, `update`). Its hyperparameters
    are static and compared by value, so a jitted `train_step` compiles once for equal
    settings, however many times the optimiser is rebuilt (a resumed run, a second run).
    Weight decay applies to matrices only (see `decay_mask`), not to biases, norm scales,
    diffusion coefficients or the CLS vector, whether stacked per layer or not.
    """

    lr: float = eqx.field(static=True)
    warmup_steps: int = eqx.field(static=True)
    total_steps: int = eqx.field(static=True)
    final_lr_fraction: float = eqx.field(static=True)
    weight_decay: float = eqx.field(static=True)
    clip_norm: float = eqx.field(static=True)
    schedule_name: str = eqx.field(static=True, default="cosine")
    b1: float = eqx.field(static=True, default=0.9)
    b2: float = eqx.field(static=True, default=0.999)
    eps: float = eqx.field(static=True, default=1e-8)

    def schedule(self) -> optax.Schedule:
        """The learning rate as a function of the step (see `TrainConfig.schedule`)."""
        if self.schedule_name == "rsqrt":
            return rsqrt_schedule(self.lr, self.warmup_steps)
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=self.lr,
            warmup_steps=self.warmup_steps,
            decay_steps=self.total_steps,
            end_value=self.lr * self.final_lr_fraction,
        )

    def _transform(self) -> optax.GradientTransformation:
        return optax.chain(
            optax.clip_by_global_norm(self.clip_norm),
            optax.adamw(
                self.schedule(),
                b1=self.b1,
                b2=self.b2,
                eps=self.eps,
                weight_decay=self.weight_decay,
                mask=decay_mask,
            ),
        )

    def init(self, params) -> optax.OptState:
        """The initial state for `params` (e.g. `eqx.filter(model, eqx.is_inexact_array)`)."""
        return self._transform().init(params)

    def update(self, grads, state, params=None):
        """`(updates, state)` as `optax.GradientTransformation.update`."""
        return self._transform().update(grads, state, params)


_STACKED = ("blocks", "transitions")
# Logits of the diffusion layers' coefficients and scale mixtures: shrinking them toward
# zero would push every layer toward one fixed coefficient and uniform scales.
_NO_DECAY = ("theta", "mix", "gate_bias")


def decay_mask(params) -> Any:
    """`True` on the parameters weight decay applies to: weight matrices and embeddings.

    A parameter is a matrix if it has two axes, or three when it lives in a stack with one
    slice per depth node (a `Field`'s `blocks` and `transitions`): stacked biases and norm
    scales have two axes but are vectors per layer. The diffusion layers' coefficient
    logits (`theta`, `mix`, `gate_bias`) are never decayed.
    """

    def is_matrix(path, p):
        names = [getattr(k, "name", None) for k in path]
        if names and names[-1] in _NO_DECAY:
            return False
        stacked = any(n in _STACKED for n in names)
        return p.ndim >= (3 if stacked else 2)

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def _schedule(config: TrainConfig) -> optax.Schedule:
    return make_optimizer(config).schedule()


def make_optimizer(config: TrainConfig) -> Optimizer:
    """AdamW with the config's learning-rate schedule, after `optax.clip_by_global_norm`.

    **Arguments:**

    - `config`: a `TrainConfig` (`lr`, `warmup_steps`, `total_steps`, `final_lr_fraction`,
      `schedule`, `b1`, `b2`, `eps`, `weight_decay`, `clip_norm`).

    **Returns:**

    An `Optimizer` (an `optax.GradientTransformation` in behaviour); initialise it with
    `optimizer.init(eqx.filter(model, eqx.is_inexact_array))`.
    """
    return Optimizer(
        lr=float(config.lr),
        warmup_steps=int(config.warmup_steps),
        total_steps=int(config.total_steps),
        final_lr_fraction=float(config.final_lr_fraction),
        weight_decay=float(config.weight_decay),
        clip_norm=float(config.clip_norm),
        schedule_name=str(config.schedule),
        b1=float(config.b1),
        b2=float(config.b2),
        eps=float(config.eps),
    )


def has_dropout(model: eqx.Module) -> bool:
    """Whether `model` holds a `Dropout` with a positive rate (e.g. an `Encoder` built with
    `dropout=Dropout(0.1, 0.1)`): `train` then passes it a fresh `key` every step."""
    is_dropout = lambda x: isinstance(x, Dropout)
    return any(is_dropout(x) and x.active for x in jax.tree.leaves(model, is_leaf=is_dropout))


def _inputs(batch: Batch) -> tuple[jax.Array, ...]:
    """The model's positional inputs: `(tokens, mask)`, or with `(tokens2, mask2)` for a
    dual-input task (a `DualClassifier`)."""
    arrays = (batch.tokens, batch.mask)
    if batch.tokens2 is not None:
        arrays = arrays + (batch.tokens2, batch.mask2)
    return tuple(jnp.asarray(a) for a in arrays)


def _loss(model, batch: Batch, depth: AbstractDepth, key):
    # A key only where one is given, so that models without a `key` argument still train.
    keyword = {} if key is None else {"key": key}
    logits, sol = model(*_inputs(batch), depth=depth, **keyword)
    labels = jnp.asarray(batch.labels)
    data_loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    # The integrator's regularisers of the flow (weights times integrals; 0 without any).
    regularisation = penalty(getattr(depth, "regularisers", ()), sol.regularisation)
    loss = data_loss + regularisation.astype(data_loss.dtype)
    return loss, (logits, sol.stats, data_loss, sol.regularisation)


def _unregularised(depth: AbstractDepth) -> AbstractDepth:
    """`depth` without its regularisers: evaluation needs no penalty, nor a probe key."""
    if not getattr(depth, "regularisers", ()):
        return depth
    return eqx.tree_at(lambda d: d.regularisers, depth, ())


@eqx.filter_jit
def train_step(
    model: eqx.Module,
    opt_state: optax.OptState,
    batch: Batch,
    depth: AbstractDepth,
    optimizer: Optimizer | optax.GradientTransformation,
    *,
    key: jax.Array | None = None,
) -> tuple[eqx.Module, optax.OptState, dict[str, jax.Array]]:
    """One optimiser step on softmax cross-entropy; the same step serves every task and depth.

    **Arguments:**

    - `model`: a model called as `logits, sol = model(tokens, mask, depth=depth)` (e.g.
      `Classifier`), or, for a dual-input batch,
      `model(tokens, mask, tokens2, mask2, depth=depth)` (`DualClassifier`).
    - `opt_state`: the optimiser state.
    - `batch`: a `pdeformer.data.Batch` (tokens `(batch, seq)`, mask, integer labels).
    - `depth`: the integrator in depth, `Discrete()` or `Continuous(...)`. It is a traced
      argument: a new tolerance does not recompile, a new solver type does.
    - `optimizer`: e.g. `make_optimizer(config)` (static; an `Optimizer` is compared by its
      settings, a plain optax transformation by identity).
    - `key`: passed to the model (its dropout masks, where it has dropout, and the probe
      of a `JacobianFrobenius` regulariser); a new one each step. The loss includes the
      integrator's regularisers, if any.

    **Returns:**

    `(model, opt_state, metrics)` with scalar metrics `loss` (the data loss plus the
    regularisers' penalty), `data_loss` (the cross-entropy alone), with regularisers
    `penalty` and one entry per regulariser named after it (its integral, e.g.
    `kinetic_energy`), `accuracy`, `nfe` (vector-field
    evaluations of the forward solve), `num_rejected_steps`, `success` (whether the forward
    solve succeeded: `False` where a `Continuous(throw=False)` ran out of steps, in which
    case the step trained on the state the solver reached), `grad_norm` (before clipping).
    """
    grad_fn = eqx.filter_value_and_grad(_loss, has_aux=True)
    (loss, (logits, stats, data_loss, integrals)), grads = grad_fn(model, batch, depth, key)
    params = eqx.filter(model, eqx.is_inexact_array)
    # optax computes `b ** count` with a Python float and an int32 step count, which strict
    # dtype promotion refuses; the library's own code stays under the caller's setting.
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer.update(grads, opt_state, params)
    model = eqx.apply_updates(model, updates)
    labels = jnp.asarray(batch.labels)
    # argmax is int64 under jax_enable_x64, the labels int32: compare in the labels' dtype.
    correct = jnp.argmax(logits, axis=-1).astype(labels.dtype) == labels
    accuracy = jnp.mean(correct.astype(logits.dtype))
    metrics = {
        "loss": loss,
        "data_loss": data_loss,
        **_regularisation_metrics(depth, integrals),
        "accuracy": accuracy,
        "nfe": stats.nfe,
        "num_rejected_steps": stats.num_rejected_steps,
        "success": stats.success,
        "grad_norm": optax.tree.norm(grads),
    }
    return model, opt_state, metrics


def _regularisation_metrics(depth: AbstractDepth, integrals) -> dict[str, jax.Array]:
    # The penalty and each regulariser's integral, named in snake case after its class
    # (`KineticEnergy` -> `kinetic_energy`); nothing without regularisers.
    regularisers = getattr(depth, "regularisers", ())
    if not regularisers or integrals is None:
        return {}
    names = [re.sub(r"(?<!^)(?=[A-Z])", "_", type(r).__name__).lower() for r in regularisers]
    return {"penalty": penalty(regularisers, integrals), **dict(zip(names, integrals, strict=True))}


@eqx.filter_jit
def _forward(model, inputs, depth):
    logits, sol = model(*inputs, depth=_unregularised(depth))
    return logits, sol.stats.nfe, sol.stats.success


def _eval_batches(split: Split, batch_size: int, pad_to: int) -> Iterator[tuple[Batch, int]]:
    # The last batch is filled up with copies of its first row (ignored afterwards), so every
    # batch has one shape and the forward pass compiles once.
    for batch in iterate_batches(
        split, batch_size, shuffle=False, drop_remainder=False, pad_to=pad_to
    ):
        n = batch.tokens.shape[0]
        if n < batch_size:
            fill = np.zeros(batch_size - n, dtype=np.int64)
            batch = Batch(*(None if a is None else np.concatenate([a, a[fill]]) for a in batch))
        yield batch, n


def evaluate(
    model: eqx.Module,
    split: Split,
    depth: AbstractDepth,
    batch_size: int,
    *,
    pad_to: int | None = None,
    warmup: bool = True,
    parallel: DataParallel | None = None,
) -> Evaluation:
    """Accuracy, mean NFE and wall time of a model on a split under one integrator.

    **Arguments:**

    - `model`: e.g. a trained `Classifier`.
    - `split`: a `pdeformer.data.Split` (a dual-input split needs a `DualClassifier`).
    - `depth`: the integrator in depth (a new tolerance does not recompile).
    - `batch_size`: examples per batch; every batch, the last included, has this size.
    - `pad_to`: padded length (`None`: the split's longest sequence).
    - `warmup`: run the first batch once untimed, so `wall_time` excludes compilation.
    - `parallel`: a `DataParallel` to split every batch over its devices (the model is
      replicated on them), or `None` (default): JAX's default device.

    **Returns:**

    An `Evaluation`.

    **Raises:**

    `ValueError` for an empty split, `batch_size < 1`, or a `batch_size` that `parallel`'s
    devices do not divide.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    if len(split) == 0:
        raise ValueError("cannot evaluate on an empty split.")
    if parallel is not None:
        parallel.check_batch_size(batch_size)
        model = parallel.replicate(model)
    pad_to = int(split.tokens.shape[1]) if pad_to is None else pad_to

    def place(batch: Batch) -> Batch:
        return batch if parallel is None else parallel.shard(batch)

    if warmup:
        batch, _ = next(_eval_batches(split, batch_size, pad_to))
        jax.block_until_ready(_forward(model, _inputs(place(batch)), depth))
    logits_all, nfes, successes = [], [], []
    num_batches = 0
    start = time.perf_counter()
    for batch, n in _eval_batches(split, batch_size, pad_to):
        logits, nfe, success = to_host(_forward(model, _inputs(place(batch)), depth))
        logits = np.asarray(logits)[:n]
        logits_all.append(logits)
        nfes.append(int(nfe))
        successes.append(bool(success) and bool(np.all(np.isfinite(logits))))
        num_batches += 1
    wall = time.perf_counter() - start
    logits = np.concatenate(logits_all)
    # argmax of a NaN row is an arbitrary class: such an example is never counted correct.
    finite = np.all(np.isfinite(logits), axis=-1)
    accuracy = float(np.mean((np.argmax(logits, axis=-1) == split.labels) & finite))
    return Evaluation(
        accuracy=accuracy,
        mean_nfe=float(np.mean(nfes)),
        wall_time=wall,
        time_per_batch=wall / num_batches,
        num_examples=len(split),
        num_batches=num_batches,
        success=float(np.mean(successes)),
        logits=logits,
    )


# ---------------------------------------------------------------------------------------
# Checkpoints and logs
# ---------------------------------------------------------------------------------------


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    # A reader (or a resumed run after a kill) sees the old file or the new one, never half.
    # A kill between mkstemp and os.replace leaves the temporary file behind: train() removes
    # such files when it starts (`_remove_stale_temporaries`).
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # The rename itself is durable only once the directory's entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows, where a directory cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


# The temporary files `_atomic_write` makes for the files of a run directory.
_TEMPORARY = re.compile(r"^\.(ckpt-\d+\.eqx|checkpoint\.json|metrics\.jsonl|run\.json)\..+\.tmp$")


def _remove_stale_temporaries(out: Path) -> None:
    for path in out.iterdir():
        if _TEMPORARY.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)


class _HashingWriter:
    # Writes through to a file and hashes what passes, so the checksum costs no second read.
    def __init__(self, f):
        self.f = f
        self.hash = hashlib.sha256()

    def write(self, data) -> int:
        self.hash.update(data)
        return self.f.write(data)


def _gather_nonlocal(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: to_host(x) if isinstance(x, jax.Array) and not x.is_fully_addressable else x,
        tree,
    )


def save_checkpoint(
    out_dir: str | Path,
    model: eqx.Module,
    opt_state: optax.OptState,
    step: int,
    config: TrainConfig,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write model and optimiser state, then the JSON sidecar naming them, both atomically.

    The leaves go to `ckpt-{step}.eqx`; `checkpoint.json` (step, data position, config, the
    SHA-256 checksum of the `.eqx` file) is replaced last, so it always names a complete
    file; both renames are made durable by an `fsync` of the directory. Older `ckpt-*.eqx`
    files are removed.
    Arrays on several devices (a `DataParallel` run) are gathered to the host first; with
    several processes, call it from one (`train` writes from process 0).

    **Arguments:**

    - `out_dir`: the run directory.
    - `model`, `opt_state`: what to save.
    - `step`: optimiser steps completed (= the next global data step).
    - `config`: the run's `TrainConfig`.
    - `extra`: further JSON-serialisable entries for the sidecar.

    **Returns:**

    The path of the sidecar.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{step:08d}.eqx"
    # Arrays spanning other processes' devices cannot be read directly; local ones are saved
    # as they are (jnp.save keeps bfloat16), so a file does not depend on the device count.
    leaves = _gather_nonlocal((model, opt_state))
    writer = None

    def write(f) -> None:
        nonlocal writer
        writer = _HashingWriter(f)
        eqx.tree_serialise_leaves(writer, leaves)

    _atomic_write(out / name, write)
    meta = {
        "step": step,
        "file": name,
        "sha256": writer.hash.hexdigest(),
        "data": {"start_step": step, "seed": config.seed, "batch_size": config.batch_size},
        "config": dataclasses.asdict(config),
        "saved_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    sidecar = out / CHECKPOINT_NAME
    _atomic_write(sidecar, lambda f: json.dump(meta, f, indent=2), mode="w")
    for old in out.glob("ckpt-*.eqx"):
        if old.name != name:
            old.unlink()
    return sidecar


def load_checkpoint(
    out_dir: str | Path, model: eqx.Module, opt_state: optax.OptState
) -> tuple[eqx.Module, optax.OptState, dict[str, Any]]:
    """Read the checkpoint named by a run directory's `checkpoint.json`.

    **Arguments:**

    - `out_dir`: the run directory.
    - `model`, `opt_state`: templates of the right structure (e.g. a freshly built model and
      `optimizer.init(...)`); their values are replaced.

    **Returns:**

    `(model, opt_state, meta)` with `meta` the sidecar's contents.

    **Raises:**

    `FileNotFoundError` if the directory holds no checkpoint. `CorruptCheckpointError`,
    naming the file, if `checkpoint.json` is not a valid sidecar, or the `.eqx` file it
    names is missing, fails its SHA-256 checksum (a truncated, overwritten or flipped byte)
    or cannot be read into the templates. `ValueError` if a file that passes its checksum
    does not fit the templates (a model built with other settings).
    """
    out = Path(out_dir)
    sidecar = out / CHECKPOINT_NAME
    if not sidecar.is_file():
        raise FileNotFoundError(
            f"no checkpoint in {out} (expected {CHECKPOINT_NAME}); train with out_dir={out} "
            "first, or pass the directory of a training run."
        )
    fix = "start afresh (resume=False, or without --resume) or restore the run directory"
    try:
        meta = json.loads(sidecar.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(
            f"{sidecar} is corrupt (not valid JSON: {exc}); {fix}."
        ) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("file"), str):
        raise CorruptCheckpointError(
            f'{sidecar} is corrupt: it lacks the "file" entry naming the checkpoint; {fix}.'
        )
    if not isinstance(meta.get("step"), int):
        raise CorruptCheckpointError(
            f'{sidecar} is corrupt: it lacks the integer "step" entry; {fix}.'
        )
    path = out / meta["file"]
    if not path.is_file():
        raise CorruptCheckpointError(
            f"{sidecar} names {path}, which is missing: the checkpoint is corrupt; {fix}."
        )
    data = path.read_bytes()
    expected = meta.get("sha256")  # absent in checkpoints written before checksums
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise CorruptCheckpointError(
            f"{path} is corrupt: its SHA-256 checksum differs from the one {CHECKPOINT_NAME} "
            f"recorded ({len(data)} bytes; truncated or changed after it was written); {fix}."
        )
    try:
        model, opt_state = eqx.tree_deserialise_leaves(io.BytesIO(data), (model, opt_state))
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if expected is None:
            raise CorruptCheckpointError(
                f"{path} is corrupt or does not fit the model ({text}); {fix}."
            ) from None
        raise ValueError(
            f"{path} does not fit the model it is read into ({text}): the checkpoint is "
            "intact, so the model was built with other settings than the run's. Build it "
            "as the run did."
        ) from None
    return model, opt_state, meta


def _json_safe(record: dict[str, Any]) -> dict[str, Any]:
    # Strict JSON has no NaN/inf: non-finite numbers are logged as null.
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }


def _read_log(path: Path) -> list[dict[str, Any]]:
    # A kill in the middle of a write leaves the last line cut short: that line is dropped.
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(
                f"{path} line {i + 1} is corrupt (not valid JSON), before the last line; "
                "remove that line, or start afresh without resume."
            ) from None
        if isinstance(record, dict):
            records.append(record)
    return records


def _data_fingerprint(task_data: TaskData) -> str:
    # The training split's bytes: another data seed, task option or data directory gives
    # other examples, and resuming on them would continue another run.
    h = hashlib.sha256()
    for f in dataclasses.fields(task_data.train):
        value = getattr(task_data.train, f.name)
        if isinstance(value, np.ndarray):
            h.update(f"{f.name}:{value.dtype}:{value.shape}".encode())
            h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def _describe_depth(depth: AbstractDepth) -> str:
    # The integrator with its tolerances as values: another solver, controller, tolerance or
    # step budget is another trajectory.
    text = eqx.tree_pformat(depth, short_arrays=False, width=10**6)
    # No regularisers reads as before integrators had them, so older checkpoints resume.
    text = re.sub(r"regularisers=\(\), |, regularisers=\(\)|regularisers=\(\)", "", text)
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)


def _check_resume(
    meta: dict[str, Any], config: TrainConfig, task_data: TaskData, data: str, depth: str
) -> None:
    old = meta.get("config", {})
    new = dataclasses.asdict(config)
    changed = sorted(
        k for k in new if k not in _RESUMABLE_CHANGES and k in old and old[k] != new[k]
    )
    diffs = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in changed]
    if meta.get("task") not in (None, task_data.name):
        diffs.append(f"task: {meta['task']!r} -> {task_data.name!r}")
    if meta.get("data_sha256") not in (None, data):
        diffs.append(
            "training data: other examples (another data seed, task option or data directory)"
        )
    if meta.get("depth") not in (None, depth):
        diffs.append(f"depth: {meta['depth']} -> {depth}")
    if diffs:
        raise ValueError(
            "cannot resume: the run differs from the checkpoint's in settings that change the "
            f"training trajectory ({'; '.join(diffs)}). Pass the original settings, or "
            "resume=False to start afresh."
        )


def train(
    model: eqx.Module,
    task_data: TaskData,
    depth: AbstractDepth,
    config: TrainConfig,
    out_dir: str | Path | None = None,
    resume: bool = False,
    *,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
    parallel: DataParallel | None = None,
) -> tuple[eqx.Module, list[dict[str, Any]]]:
    """Train a model on a task's training split with one integrator in depth.

    With an `out_dir`, every step is appended to `metrics.jsonl` (step, loss, accuracy, nfe,
    num_rejected_steps, success of the forward solve, grad_norm, lr, time) and checkpoints
    are written atomically every `config.checkpoint_every` steps and at the end.
    `resume=True` continues from the latest checkpoint exactly as if the run had not
    stopped: same parameters, optimiser state and data order
    (`iterate_forever(start_step=...)`); log lines written after that checkpoint are
    dropped, and so is a last line cut short by a kill. A resume is refused (`ValueError`,
    listing the differences) if the config, the task, the training data or the integrator
    `depth` differ from the checkpoint's; nothing in `out_dir` changes before the checkpoint
    has loaded and been compared. Without a checkpoint, `resume=True` starts afresh;
    `resume=False` always starts afresh, replacing the log and checkpoints in `out_dir`.
    Temporary files left by a kill during a write are removed when training starts.

    A model with dropout (`has_dropout`) is called with a fresh key every step,
    `jax.random.fold_in(jax.random.PRNGKey(config.seed), step)` (so a resumed run draws the
    same masks); the validation passes no key (no dropout).

    With `parallel=DataParallel(...)` the model and optimiser state are replicated on its
    devices and every batch is split over them: the same steps, losses and parameters as on
    one device up to the order of floating-point sums (a continuous solve takes the same
    steps, the batch being one ODE). Checkpoints are gathered to the host, so a run resumes
    on any number of devices. With several processes every process calls `train` with the
    same arguments (the data order is the same everywhere; each feeds its devices' rows),
    and only process 0 writes to `out_dir`, which must be shared for a resume; every process
    waits at the end until it has written (`multihost_utils.sync_global_devices`).

    **Arguments:**

    - `model`: the initial model (on resume: the template the checkpoint is read into).
    - `task_data`: a `TaskData` (e.g. `load_task("listops", ...)`; a dual-input task such
      as Retrieval needs a `DualClassifier`).
    - `depth`: `Discrete()` or `Continuous(...)`.
    - `config`: a `TrainConfig`.
    - `out_dir`: run directory for the log and checkpoints, or `None` (nothing written).
    - `resume`: continue from the checkpoint in `out_dir`.
    - `callback`: called as `callback(step, record)` after each step (e.g. for early
      stopping by raising).
    - `parallel`: a `DataParallel` for data-parallel training over several devices, or
      `None` (default): JAX's default device.

    **Returns:**

    `(model, history)`: the trained model and one record per step (on resume, the records
    of the earlier steps are read back from the log).

    **Raises:**

    `NonFiniteLossError` when the loss or gradient norm is not finite; the model of that step
    is discarded and the last checkpoint kept. `CorruptCheckpointError` (naming the file) for a
    resume from a corrupt checkpoint. `ValueError` for a resume with a different config,
    task, training data or integrator, or for a `batch_size` (or `eval_batch_size`) that
    `parallel`'s devices do not divide.
    """
    eval_batch_size = config.eval_batch_size or config.batch_size
    if parallel is not None:
        parallel.check_batch_size(config.batch_size, "TrainConfig.batch_size")
        if config.eval_every:
            parallel.check_batch_size(eval_batch_size, "TrainConfig.eval_batch_size")
    # With several processes, one writes the log and the checkpoints; every one reads them.
    writer = jax.process_index() == 0
    optimizer = make_optimizer(config)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    schedule = _schedule(config)
    pad_to = int(task_data.train.tokens.shape[1]) if config.pad_to is None else config.pad_to
    start = 0
    history: list[dict[str, Any]] = []
    out = None if out_dir is None else Path(out_dir)
    if out is not None:
        fingerprint = _data_fingerprint(task_data)
        depth_text = _describe_depth(depth)
    last_checkpoint: int | None = None
    log = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        log_path = out / METRICS_NAME
        # Nothing in out_dir changes before the checkpoint has loaded and been compared.
        if resume and (out / CHECKPOINT_NAME).is_file():
            model, opt_state, meta = load_checkpoint(out, model, opt_state)
            _check_resume(meta, config, task_data, fingerprint, depth_text)
            start = last_checkpoint = int(meta["step"])
            if log_path.is_file():
                history = [r for r in _read_log(log_path) if r.get("step", math.inf) < start]
            if writer:
                _remove_stale_temporaries(out)
                kept = "".join(json.dumps(r) + "\n" for r in history)
                _atomic_write(log_path, lambda f: f.write(kept), mode="w")
        elif writer:
            _remove_stale_temporaries(out)
            for old in [*out.glob("ckpt-*.eqx"), out / CHECKPOINT_NAME]:
                old.unlink(missing_ok=True)
            log_path.write_text("")
        if writer:
            log = open(log_path, "a")  # noqa: SIM115 (closed in the finally below)
    if parallel is not None:
        model, opt_state = parallel.replicate((model, opt_state))

    def checkpoint(step: int) -> None:
        nonlocal last_checkpoint
        if out is not None:
            # Every process takes part in gathering; one writes.
            saved_model, saved_state = _gather_nonlocal((model, opt_state))
            if writer:
                extra = {
                    "task": task_data.name,
                    "data_sha256": fingerprint,
                    "depth": depth_text,
                    "devices": 1 if parallel is None else parallel.num_devices,
                }
                save_checkpoint(out, saved_model, saved_state, step, config, extra=extra)
            last_checkpoint = step

    # Keys of what a solve holds fixed in depth (dropout masks, regularisers' probes), one
    # per step, drawn only for a model or an integrator that needs them.
    probe_key = jax.random.PRNGKey(config.seed)
    needs_key = has_dropout(model) or any(r.uses_probe for r in getattr(depth, "regularisers", ()))
    progress = tqdm(
        total=config.total_steps,
        initial=start,
        desc="train",
        file=sys.stderr,
        disable=not (writer and config.progress and start < config.total_steps),
    )
    try:
        data = iterate_forever(
            task_data.train,
            config.batch_size,
            seed=config.seed,
            start_step=start,
            pad_to=pad_to,
            bucket_batches=config.bucket_batches,
        )
        for step, batch in data:
            if step >= config.total_steps:
                break
            t0 = time.perf_counter()
            if parallel is not None:
                batch = parallel.shard(batch)
            new_model, new_opt_state, metrics = train_step(
                model,
                opt_state,
                batch,
                depth,
                optimizer,
                key=jax.random.fold_in(probe_key, step) if needs_key else None,
            )
            metrics = to_host(metrics)
            elapsed = time.perf_counter() - t0
            record: dict[str, Any] = {"step": step}
            for k, v in metrics.items():
                kind = np.asarray(v).dtype
                if kind == np.bool_:
                    record[k] = bool(v)
                else:
                    record[k] = float(v) if np.issubdtype(kind, np.floating) else int(v)
            record["lr"] = float(schedule(step))
            record["time"] = elapsed
            if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
                record["event"] = "non_finite"
                if log is not None:
                    log.write(json.dumps(_json_safe(record)) + "\n")
                    log.flush()
                if last_checkpoint is None:
                    kept = "no checkpoint was written" + (
                        "" if out is not None else " (no out_dir was given)"
                    )
                else:
                    kept = (
                        f"the last good checkpoint (step {last_checkpoint}) is kept in {out}; "
                        "continue from it with resume=True"
                    )
                raise NonFiniteLossError(
                    f"non-finite loss at step {step} (loss={record['loss']}, "
                    f"grad_norm={record['grad_norm']}): training stopped and this step's update "
                    f"was discarded; {kept}. Lower the learning rate, tighten clip_norm, or "
                    "check the data."
                )
            model, opt_state = new_model, new_opt_state
            if config.eval_every and (step + 1) % config.eval_every == 0:
                ev = evaluate(
                    model, task_data.val, depth, eval_batch_size, warmup=False, parallel=parallel
                )
                record["val_accuracy"] = ev.accuracy
                record["val_nfe"] = ev.mean_nfe
            history.append(record)
            if log is not None:
                log.write(json.dumps(_json_safe(record)) + "\n")
                log.flush()
            progress.set_postfix_str(
                f"loss {record['loss']:.4f} acc {record['accuracy']:.3f} nfe {record['nfe']}",
                refresh=False,
            )
            progress.update(1)
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
                checkpoint(step + 1)
            if callback is not None:
                callback(step, record)
        if out is not None and last_checkpoint != config.total_steps:
            checkpoint(config.total_steps)
        if out is not None and jax.process_count() > 1:
            # No process returns before process 0 has written: a `train(..., resume=True)`
            # or `load_checkpoint` right after this call then finds the files on every host.
            multihost_utils.sync_global_devices("pdeformer.training.train: out_dir written")
    finally:
        progress.close()
        if log is not None:
            log.close()
    return model, history
