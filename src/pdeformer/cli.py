"""Command line: `pdeformer train` and `pdeformer evaluate`.

Both commands parse into frozen config dataclasses (`TrainCommand`, `EvaluateCommand`, made
of `DataConfig`, `ModelConfig`, `DepthConfig`, `OptimConfig` and `DeviceConfig`) with
[tyro](https://brentyi.github.io/tyro/); the run record `run.json` is the `TrainCommand`
serialised (`write_run`, `read_run`). Names typed on the command line are mapped to objects
here, in one place (`SOLVERS`, `ADJOINTS`, `SCHEDULES`, `COMPOSITIONS`, `integrator`,
`field_options`, `diffusion_layer`, `data_parallel`; insertion points are the names of
`pdeformer.placement.INSERTION_POINTS`);
everything below the edge takes objects.

Errors are one line on stderr: a usage error (a bad option value, a missing data
directory, a resume with other settings) exits with status 2, a failed run (a solve out of
steps, a non-finite loss, a corrupt checkpoint) with 1. `--debug` shows the traceback.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import io
import json
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import diffrax
import jax
import tyro

from .depth import AbstractDepth, Continuous, Discrete, default_adjoint
from .field import (
    AbstractComposition,
    AbstractSchedule,
    Interpolated,
    ParallelBlock,
    PerLayer,
    Polynomial,
    SequentialBlock,
    Shared,
)
from .placement import INSERTION_POINTS
from .regularisers import ErrorEstimate, JacobianFrobenius, KineticEnergy

# `pdeformer.data` and `pdeformer.training` (which imports it) are imported inside the
# functions that need them: `import pdeformer.cli` does not load the LRA data package.

SOLVERS: dict[str, type[diffrax.AbstractSolver]] = {
    "euler": diffrax.Euler,
    "heun": diffrax.Heun,
    "midpoint": diffrax.Midpoint,
    "bosh3": diffrax.Bosh3,
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,
}
"""Command-line solver names."""

ADJOINTS: dict[str, Callable[[int], diffrax.AbstractAdjoint]] = {
    "recursive": default_adjoint,
    "direct": lambda max_steps: diffrax.DirectAdjoint(),
    "backsolve": lambda max_steps: diffrax.BacksolveAdjoint(),
}
"""Command-line adjoint names (how gradients flow through a continuous solve), each mapped
to a function of the step budget `max_steps` returning the adjoint. `"recursive"` is the
library's default, `pdeformer.depth.default_adjoint` (diffrax's
`RecursiveCheckpointAdjoint` keeping `min(16, max_steps)` steps)."""

SCHEDULES: dict[str, Callable[[int], AbstractSchedule]] = {
    "per-layer": lambda degree: PerLayer(),
    "shared": lambda degree: Shared(),
    "interpolated": lambda degree: Interpolated(),
    "polynomial": Polynomial,
}
"""Command-line schedule names (how the weights depend on depth), each mapped to a
function of `--degree` (read by `"polynomial"` only) returning the schedule."""

COMPOSITIONS: dict[str, type[AbstractComposition]] = {
    "sequential": SequentialBlock,
    "parallel": ParallelBlock,
}
"""Command-line composition names (how attention and reaction share a layer)."""

RUN_NAME = "run.json"
"""The file in a run directory recording the `TrainCommand` that made it (see `write_run`)."""

RUN_FORMAT = 1
"""The version of the `run.json` layout written by `write_run`."""

# The names of `pdeformer.data.TASK_NAMES`, spelled out so that parsing a command line does
# not import the data package (tests/test_training.py keeps the two equal).
_TaskName = Literal["listops", "text", "retrieval", "image", "pathfinder", "pathx"]
_SolverName = Literal["euler", "heun", "midpoint", "bosh3", "tsit5", "dopri5", "dopri8"]
_AdjointName = Literal["recursive", "direct", "backsolve"]
_ScheduleName = Literal["per-layer", "shared", "interpolated", "polynomial"]
_CompositionName = Literal["sequential", "parallel"]
_InsertionPoint = Literal[INSERTION_POINTS]  # type: ignore[valid-type]


class _UsageError(ValueError):
    # A command line that cannot run as given; main() prints it as one line, exit status 2.
    pass


# While `parse` runs: the messages of the config dataclasses' refusals. tyro catches a
# ValueError raised while it builds a nested dataclass and prints it in a box of its own;
# `parse` prints the message as one line instead.
_refusals: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "pdeformer_cli_refusals", default=None
)


def _require(ok: bool, message: str) -> None:
    if not ok:
        refusals = _refusals.get()
        if refusals is not None:
            refusals.append(message)
        raise _UsageError(message)


# ---------------------------------------------------------------------------------------
# The config dataclasses
# ---------------------------------------------------------------------------------------


def _group(help: str) -> Any:
    # The --help text of a group of options (the dataclass's docstring is for the API pages).
    return tyro.conf.arg(help=help)


_DEPTH_HELP = (
    "the integrator in depth; the adaptive controller's atol is rtol/10 unless --atol is given"
)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The task and where its data comes from.

    **Arguments:**

    - `task`: the LRA task, one of `pdeformer.data.TASK_NAMES`.
    - `data_dir`: the directory with the official data, or `None` to generate the task
      offline.
    - `task_option`: options of `pdeformer.data.load_task` as `KEY=VALUE` texts, converted
      to the type the task's reader wants (`task_options`).
    - `data_seed`: the seed of the offline generator (ignored with a `data_dir`).
    """

    task: _TaskName = "listops"
    """LRA task."""
    data_dir: Path | None = None
    """directory with the official data; omit to generate the task offline."""
    task_option: Annotated[
        tyro.conf.UseAppendAction[tuple[str, ...]], tyro.conf.arg(metavar="KEY=VALUE")
    ] = ()
    """option of load_task as KEY=VALUE, repeatable (e.g. --task-option max_length=120
    --task-option num_train=2000 for offline ListOps); values are converted to the type the
    option wants."""
    data_seed: int = 0
    """seed of the offline generator."""

    def task_options(self) -> dict[str, Any]:
        """The options for `load_task`, typed, with the offline generator's `seed`.

        **Returns:**

        A dict of keyword arguments of `pdeformer.data.load_task`.

        **Raises:**

        `ValueError` naming the option for a text that is not `KEY=VALUE`, an option the task
        does not have, or a value of the wrong type (saying the type wanted).
        """
        offline = self.data_dir is None
        wanted = _option_types(self.task, offline)
        options: dict[str, Any] = {}
        for pair in self.task_option:
            key, sep, text = pair.partition("=")
            key = key.strip().replace("-", "_")
            _require(
                bool(sep and key),
                f"--task-option expects KEY=VALUE (e.g. max_length=120); got {pair!r}.",
            )
            where = "offline" if offline else "official"
            _require(
                key in wanted,
                f"--task-option {key}: the {where} {self.task} task has no option {key!r}; "
                f"its options are {', '.join(sorted(wanted))}.",
            )
            options[key] = _convert_option(key, text.strip(), wanted[key])
        if offline:
            options.setdefault("seed", self.data_seed)
        return options


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The `Classifier` (or, for a dual-input task, `DualClassifier`) to build.

    **Arguments:**

    - `dim`, `heads`, `layers`, `hidden`: width, attention heads (dividing `dim`), layers
      (the depth `T`) and FFN width (`None`: the field's default, `4 * dim`).
    - `model_seed`: the seed of the initialisation.
    - `diffusion_at`, `diffusion_dilations`, `diffusion_adaptive`: diffusion layers at
      these insertion points, with these stencil reaches, token-adaptive or not.
    - `schedule`, `degree`, `composition`: how the weights depend on depth (a name of
      `SCHEDULES`; `degree` for `"polynomial"`) and how attention and reaction share a
      layer (a name of `COMPOSITIONS`); `field_options` maps them to objects.
    - `pooling`, `positions`, `head`, `head_dim`: `"mean"` (`MeanPooling`) or `"cls"`
      (`ClsPooling`); `"sinusoidal"` or `"learned"` positions (a table as long as the
      task's longest sequence); the `Classifier`'s `"linear"` or `"mlp"` head (LRA's) and
      the MLP head's width (`None`: the FFN width). A dual-input task (Retrieval) always
      has LRA's matching MLP head, `head_dim` wide (`None`: `dim`).
    - `dropout`, `attention_dropout`: the rates of `Dropout` (embedding, FFN hidden and
      branch outputs; attention weights), active in training only.

    **Raises:**

    `ValueError` for sizes below 1, `heads` not dividing `dim`, a negative `degree`, a
    dropout rate outside `[0, 1)` or a `head_dim` with the linear head, saying what to pass.
    """

    dim: int = 64
    """model width."""
    heads: int = 4
    """attention heads; must divide --dim."""
    layers: int = 2
    """layers = depth T."""
    hidden: int | None = None
    """FFN hidden width (None: the field's, 4 * dim)."""
    model_seed: int = 0
    """seed of the initialisation."""
    diffusion_at: tuple[_InsertionPoint, ...] = ()
    """insert the diffusion layer at these points (none: the baseline Transformer)."""
    diffusion_dilations: tuple[int, ...] = (1,)
    """the layer's stencil reaches; several give the multi-scale layer, e.g. 1 2 4 8."""
    diffusion_adaptive: bool = False
    """use the token-adaptive (flux-form) layer instead of constant coefficients."""
    schedule: _ScheduleName = "per-layer"
    """how the weights depend on depth: per-layer (the standard Transformer), shared (one
    set: a neural ODE), interpolated (linear between layers), polynomial (a polynomial of
    --degree in depth). shared or polynomial with --composition parallel is one smooth
    piece: adaptive and fixed steps may then be longer than a layer."""
    degree: int = 3
    """the polynomial's degree for --schedule polynomial."""
    composition: _CompositionName = "sequential"
    """sequential: attention then FFN on each half layer (the standard block); parallel:
    both at once."""
    pooling: Literal["mean", "cls"] = "mean"
    """how the final states become one vector: the mean of the valid tokens, or a learned
    CLS token's state (LRA's default)."""
    positions: Literal["sinusoidal", "learned"] = "sinusoidal"
    """positional encoding: fixed sinusoids, or a learned table (LRA's Image config)."""
    head: Literal["linear", "mlp"] = "linear"
    """classifier head: one dense layer, or LRA's Dense(--head-dim) -> ReLU -> Dense."""
    head_dim: int | None = None
    """hidden width of the MLP head (None: the FFN width; for Retrieval's matching head,
    --dim)."""
    dropout: float = 0.0
    """dropout rate on the embedding, the FFN's hidden activations and each branch's
    output, in training (LRA: 0.1)."""
    attention_dropout: float = 0.0
    """dropout rate on the attention weights, in training (LRA: 0.1)."""

    def __post_init__(self) -> None:
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            flag = "--" + name.replace("_", "-")
            _require(0 <= value < 1, f"{flag} must lie in [0, 1); got {value}. Pass e.g. 0.1.")
        _require(
            self.head_dim is None or self.head_dim >= 1,
            f"--head-dim must be >= 1; got {self.head_dim}.",
        )
        for name in ("dim", "heads", "layers"):
            value = getattr(self, name)
            _require(value >= 1, f"--{name} must be >= 1; got {value}.")
        divisors = [d for d in range(1, self.dim + 1) if self.dim % d == 0]
        _require(
            self.dim % self.heads == 0,
            f"--heads must divide --dim={self.dim}; got --heads {self.heads}. Pass one of "
            f"{divisors}.",
        )
        _require(
            self.hidden is None or self.hidden >= 1,
            f"--hidden must be >= 1; got {self.hidden}.",
        )
        _require(
            len(self.diffusion_dilations) > 0 and min(self.diffusion_dilations) >= 1,
            "--diffusion-dilations must be integers >= 1 (e.g. 1 2 4 8); got "
            f"{list(self.diffusion_dilations)}.",
        )
        _require(self.degree >= 0, f"--degree must be >= 0; got {self.degree}. Pass e.g. 3.")


@dataclasses.dataclass(frozen=True)
class DepthConfig:
    """The integrator in depth, by name (`integrator` maps it to the object).

    **Arguments:**

    - `depth`: `"discrete"` (the standard Transformer) or `"continuous"` (a diffrax solve).
    - `solver`: a name of `SOLVERS`.
    - `rtol`, `atol`: the adaptive controller's tolerances; `atol=None` means `rtol / 10`,
      the library's one tolerance rule.
    - `step_size`: a constant step instead of the adaptive controller, or `None`.
    - `adjoint`: a name of `ADJOINTS`.
    - `max_steps`: the most solver steps per solve.
    - `kinetic_energy`, `jacobian_frobenius`, `error_estimate`: the weights of the
      regularisers of the flow added to the training loss (`KineticEnergy`,
      `JacobianFrobenius`, `ErrorEstimate`; `0`: left out). Evaluation ignores them.

    **Raises:**

    `ValueError` for a tolerance, step size, step budget or weight out of range, and for
    an error-estimate weight without an adaptive continuous solve.
    """

    depth: Literal["discrete", "continuous"] = "discrete"
    """discrete: the standard Transformer (Euler with step 1/2); continuous: integrate the
    field with a diffrax solver."""
    solver: _SolverName = "tsit5"
    """diffrax solver for --depth continuous."""
    rtol: float = 1e-3
    """relative tolerance of the adaptive controller (a solve out of steps needs a looser one)."""
    atol: float | None = None
    """absolute tolerance of the adaptive controller (None: rtol/10, the tolerance rule)."""
    step_size: float | None = None
    """use a constant step of this size instead of the adaptive controller; it must divide
    1/2 (e.g. 0.5, 0.25)."""
    adjoint: _AdjointName = "recursive"
    """how gradients flow through a continuous solve (recursive: the library's default,
    diffrax.RecursiveCheckpointAdjoint keeping 16 steps)."""
    max_steps: int = 4096
    """most solver steps per solve."""
    kinetic_energy: float = 0.0
    """weight of the kinetic-energy regulariser, the integral of ||f||^2 over depth per
    token, in the training loss (0: none)."""
    jacobian_frobenius: float = 0.0
    """weight of the Jacobian regulariser, the integral of ||df/du||_F^2 (one Hutchinson
    probe per step), in the training loss (0: none)."""
    error_estimate: float = 0.0
    """weight of the adaptive solver's summed local error estimates in the training loss
    (0: none; needs --depth continuous without --step-size)."""

    def __post_init__(self) -> None:
        _require(self.rtol > 0, f"--rtol must be > 0; got {self.rtol}. Pass e.g. --rtol 1e-3.")
        _require(
            self.atol is None or self.atol >= 0,
            f"--atol must be >= 0; got {self.atol}. Omit it for rtol/10.",
        )
        _require(
            self.step_size is None or self.step_size > 0,
            f"--step-size must be > 0 and divide the field's smooth pieces (1/2 for the "
            f"sequential block); got {self.step_size}. Pass e.g. 0.25.",
        )
        _require(self.max_steps >= 1, f"--max-steps must be >= 1; got {self.max_steps}.")
        # Checked here, before any data is built: Continuous refuses the pair too, in the
        # library's terms rather than the command line's.
        _require(
            self.step_size is None or self.adjoint != "backsolve",
            f"--adjoint backsolve needs the adaptive controller; got --step-size "
            f"{self.step_size}, a fixed-step solve, which is differentiated through its steps. "
            "Pass --adjoint recursive (the default) or direct, or drop --step-size.",
        )
        for name in ("kinetic_energy", "jacobian_frobenius", "error_estimate"):
            value = getattr(self, name)
            flag = "--" + name.replace("_", "-")
            _require(value >= 0, f"{flag} must be >= 0 (0: none); got {value}. Pass e.g. 0.01.")
        _require(
            self.error_estimate == 0 or (self.depth == "continuous" and self.step_size is None),
            "--error-estimate penalises an adaptive solver's error estimates: it needs "
            "--depth continuous without --step-size; got "
            f"--depth {self.depth}"
            + ("" if self.step_size is None else f" --step-size {self.step_size}")
            + ". Drop --error-estimate, or use --kinetic-energy / --jacobian-frobenius.",
        )


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimisation, mapped onto `pdeformer.training.TrainConfig` by `train_config`.

    **Arguments:**

    - `steps`, `batch_size`, `lr`, `warmup` (`None`: `min(100, steps // 10)`),
      `weight_decay`, `clip_norm`: AdamW with warm-up and cosine decay.
    - `lr_schedule`, `b1`, `b2`, `eps`: the learning-rate schedule (`"cosine"` or LRA's
      `"rsqrt"`, whose `lr` is a base factor; see `TrainConfig`) and Adam's constants.
    - `seed`: the seed of the data order.
    - `eval_every`, `checkpoint_every`: validate and checkpoint every so many steps (0:
      never, and only at the end).

    **Raises:**

    `ValueError` for values `TrainConfig` refuses, naming the option.
    """

    steps: int = 1000
    """optimiser steps."""
    batch_size: int = 32
    """batch size."""
    lr: float = 1e-3
    """peak learning rate."""
    warmup: int | None = None
    """warm-up steps (None: min(100, steps//10))."""
    lr_schedule: Literal["cosine", "rsqrt"] = "cosine"
    """learning-rate schedule: cosine (warm-up to --lr, cosine decay) or rsqrt (LRA's:
    lr * min(1, t/warmup) / sqrt(max(t, warmup)); --lr is then a base factor, e.g. 0.05)."""
    b1: float = 0.9
    """Adam's first-moment decay."""
    b2: float = 0.999
    """Adam's second-moment decay (LRA: 0.98)."""
    eps: float = 1e-8
    """Adam's epsilon (LRA: 1e-9)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    clip_norm: float = 1.0
    """global gradient-norm clip."""
    seed: int = 0
    """seed of the data order."""
    eval_every: int = 0
    """validate every N steps (0: never)."""
    checkpoint_every: int = 0
    """checkpoint every N steps (0: at the end only)."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"--lr must be > 0; got {self.lr}. Pass e.g. --lr 1e-3.")
        _require(self.steps >= 1, f"--steps must be >= 1; got {self.steps}.")
        _require(self.batch_size >= 1, f"--batch-size must be >= 1; got {self.batch_size}.")
        if self.lr_schedule == "rsqrt":
            _require(
                self.warmup is None or self.warmup >= 1,
                f"--warmup must be >= 1 with --lr-schedule rsqrt; got {self.warmup}.",
            )
        else:
            _require(
                self.warmup is None or 0 <= self.warmup <= self.steps,
                f"--warmup must lie in [0, --steps={self.steps}]; got {self.warmup}.",
            )
        for name in ("b1", "b2"):
            value = getattr(self, name)
            _require(0 <= value < 1, f"--{name} must lie in [0, 1); got {value}.")
        _require(self.eps > 0, f"--eps must be > 0; got {self.eps}. Pass e.g. 1e-8.")
        _require(self.weight_decay >= 0, f"--weight-decay must be >= 0; got {self.weight_decay}.")
        _require(
            self.clip_norm > 0,
            f"--clip-norm must be > 0; got {self.clip_norm} (1e9 clips nothing).",
        )
        for name in ("eval_every", "checkpoint_every"):
            value = getattr(self, name)
            _require(value >= 0, f"--{name.replace('_', '-')} must be >= 0; got {value}.")

    def train_config(self, progress: bool = True):
        """The `pdeformer.training.TrainConfig` of these settings.

        **Arguments:**

        - `progress`: show a progress bar.

        **Returns:**

        A `TrainConfig`.
        """
        from .training import TrainConfig

        warmup = min(100, self.steps // 10) if self.warmup is None else self.warmup
        if self.lr_schedule == "rsqrt":
            warmup = max(1, warmup)
        return TrainConfig(
            lr=self.lr,
            warmup_steps=warmup,
            total_steps=self.steps,
            schedule=self.lr_schedule,
            b1=self.b1,
            b2=self.b2,
            eps=self.eps,
            weight_decay=self.weight_decay,
            clip_norm=self.clip_norm,
            batch_size=self.batch_size,
            seed=self.seed,
            eval_every=self.eval_every,
            checkpoint_every=self.checkpoint_every,
            progress=progress,
        )


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
    """Devices and processes (see `data_parallel`).

    **Arguments:**

    - `devices`: `None` (JAX's default device), `"all"` or a device count.
    - `distributed`: call `jax.distributed.initialize()` first, with the three settings
      below (each `None`: from the environment).
    """

    devices: str | None = None
    """data-parallel over the first N devices, or all of them (N|all; every host's with
    --distributed); the batch size must be a multiple of the count (default: JAX's default
    device only)."""
    distributed: bool = False
    """call jax.distributed.initialize() first: one process per host, each started with the
    same command (coordinator from the options below, JAX_COORDINATOR_ADDRESS or the
    cluster's environment)."""
    coordinator_address: str | None = None
    """host:port of process 0."""
    num_processes: int | None = None
    """number of processes."""
    process_id: int | None = None
    """this process's index."""


@dataclasses.dataclass(frozen=True)
class TrainCommand:
    """Train a Classifier on an LRA task (offline generator or official data), writing
    metrics.jsonl, checkpoints and run.json into --out.

    `run.json` is this object serialised (`write_run`); `--resume` refuses to continue a
    run whose `run.json` differs in anything that changes the trajectory.

    **Arguments:**

    - `out`: the run directory.
    - `resume`: continue from the checkpoint in `out`.
    - `progress`: a tqdm progress bar on stderr.
    - `debug`: show Python tracebacks.
    - `data`, `model`, `integrator`, `optim`, `devices`: the parts above.
    """

    out: Path = Path("runs/train")
    """run directory for metrics.jsonl, checkpoints, run.json."""
    resume: bool = False
    """continue from the checkpoint in --out, with the same settings; without it the run
    starts afresh, replacing the directory's log and checkpoints."""
    progress: bool = True
    """progress bar on stderr."""
    debug: bool = False
    """show Python tracebacks instead of one-line errors."""
    data: Annotated[DataConfig, _group("the task and its data")] = DataConfig()
    model: Annotated[ModelConfig, _group("the model")] = ModelConfig()
    integrator: Annotated[DepthConfig, _group(_DEPTH_HELP)] = DepthConfig()
    optim: Annotated[OptimConfig, _group("optimisation")] = OptimConfig()
    devices: Annotated[DeviceConfig, _group("devices and processes")] = DeviceConfig()


@dataclasses.dataclass(frozen=True)
class EvaluateCommand:
    """Load the checkpoint of a `pdeformer train` run and report accuracy, solve success,
    mean NFE and wall time as JSON on stdout. The integrator may differ from training.

    **Arguments:**

    - `run`: the run directory.
    - `split`: `"val"` or `"test"`.
    - `batch_size`: examples per batch.
    - `debug`: show Python tracebacks.
    - `integrator`, `devices`: as for `TrainCommand`.
    """

    run: tyro.conf.Positional[Path]
    """the run directory written by `pdeformer train`."""
    split: Literal["val", "test"] = "test"
    """split."""
    batch_size: int = 64
    """batch size."""
    debug: bool = False
    """show Python tracebacks instead of one-line errors."""
    integrator: Annotated[DepthConfig, _group(_DEPTH_HELP)] = DepthConfig()
    devices: Annotated[DeviceConfig, _group("devices and processes")] = DeviceConfig()

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, f"--batch-size must be >= 1; got {self.batch_size}.")


# Settings a resumed run may change: they do not alter the trajectory.
_RESUMABLE = frozenset(
    {
        "out",
        "resume",
        "progress",
        "debug",
        "devices",  # the same steps on any device count, up to the order of float sums
        "optim.eval_every",
        "optim.checkpoint_every",
    }
)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_flatten(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def _resume_differences(old: TrainCommand, new: TrainCommand) -> list[str]:
    differences = []
    a, b = _flatten(old), _flatten(new)
    for name in a:
        if name in _RESUMABLE or name.split(".")[0] in _RESUMABLE:
            continue
        before, after = a[name], b[name]
        if name == "data.task_option":  # order does not matter; compare what load_task gets
            before, after = sorted(before), sorted(after)
        if before != after:
            flag = "--" + name.split(".")[-1].replace("_", "-")
            differences.append(f"{flag}: {_show(before)} -> {_show(after)}")
    return differences


def _show(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


# ---------------------------------------------------------------------------------------
# run.json
# ---------------------------------------------------------------------------------------


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


def _from_json(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object; got {data!r}.")
    hints = typing.get_type_hints(cls, include_extras=False)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where} has unknown entries {unknown}.")
    kwargs = {}
    for name in names & set(data):
        tp, value = hints[name], data[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_json(tp, value, f"{where}.{name}")
        elif value is None:
            kwargs[name] = None
        elif Path in _members(tp):
            kwargs[name] = Path(value)
        elif typing.get_origin(tp) is tuple or tuple in _members(tp):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _members(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(typing.get_origin(a) or a for a in typing.get_args(tp))
    return (typing.get_origin(tp) or tp,)


def write_run(command: TrainCommand) -> Path:
    """Write `run.json`: the command serialised, into its run directory (made if missing),
    atomically.

    **Arguments:**

    - `command`: the `TrainCommand` of the run.

    **Returns:**

    The path of `run.json`: `{"format": RUN_FORMAT, "command": {...}}`, the command's
    fields as JSON (paths as strings, tuples as lists), nested as the dataclasses are.
    """
    from .training._train import _atomic_write

    text = json.dumps({"format": RUN_FORMAT, "command": _to_json(command)}, indent=2) + "\n"
    command.out.mkdir(parents=True, exist_ok=True)
    path = command.out / RUN_NAME
    _atomic_write(path, lambda f: f.write(text), mode="w")
    return path


def read_run(run_dir: str | Path) -> TrainCommand:
    """Read a run directory's `run.json` back into the `TrainCommand` that wrote it.

    **Arguments:**

    - `run_dir`: the run directory.

    **Returns:**

    The `TrainCommand`.

    **Raises:**

    `FileNotFoundError` if the directory has no `run.json`; `ValueError` naming the file if
    it is corrupt or not written by this version's `write_run`.
    """
    path = Path(run_dir) / RUN_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a run directory of `pdeformer train` (no {RUN_NAME})."
        )
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
        if isinstance(record, dict) and "format" not in record and "train_config" in record:
            return _from_first_format(record, Path(run_dir))
        if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
            raise ValueError(f'it lacks "format": {RUN_FORMAT}')
        return _from_json(TrainCommand, record["command"], "command")
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(
            f"{path} is corrupt or from another version of pdeformer ({exc}); it must hold "
            f'{{"format": {RUN_FORMAT}, "command": ...}} as written by `pdeformer train`.'
        ) from None


def _from_first_format(record: dict[str, Any], run_dir: Path) -> TrainCommand:
    # run.json as the command line wrote it before the config dataclasses: flat, with the
    # TrainConfig's fields under "train_config". Runs made then still evaluate and resume.
    options = dict(record.get("task_options", {}))
    seed = options.pop("seed", 0) if record.get("data_dir") is None else 0
    config = record["train_config"]
    return TrainCommand(
        out=run_dir,
        data=DataConfig(
            task=record["task"],
            data_dir=None if record.get("data_dir") is None else Path(record["data_dir"]),
            task_option=tuple(f"{k}={v}" for k, v in options.items()),
            data_seed=seed,
        ),
        model=ModelConfig(
            dim=record["dim"],
            heads=record["heads"],
            layers=record["layers"],
            hidden=record.get("hidden"),
            model_seed=record.get("model_seed", 0),
            diffusion_at=tuple(record.get("diffusion_at", ())),
            diffusion_dilations=tuple(record.get("diffusion_dilations", (1,))),
            diffusion_adaptive=record.get("diffusion_adaptive", False),
        ),
        optim=OptimConfig(
            steps=config["total_steps"],
            batch_size=config["batch_size"],
            lr=config["lr"],
            warmup=config["warmup_steps"],
            weight_decay=config["weight_decay"],
            clip_norm=config["clip_norm"],
            seed=config["seed"],
            eval_every=config["eval_every"],
            checkpoint_every=config["checkpoint_every"],
        ),
    )


# ---------------------------------------------------------------------------------------
# Names to objects
# ---------------------------------------------------------------------------------------


def integrator(config: DepthConfig) -> AbstractDepth:
    """The integrator in depth named by a `DepthConfig`.

    **Arguments:**

    - `config`: the names and numbers of `--depth`, `--solver`, `--rtol`, `--atol`,
      `--step-size`, `--adjoint` and `--max-steps`.

    **Returns:**

    `Discrete()`, or a `Continuous` with the named diffrax solver and adjoint: a
    `ConstantStepSize` with `dt0=step_size` if a step size is given, otherwise a
    `PIDController(rtol=rtol, atol=rtol / 10 if atol is None else atol)`; with the
    regularisers whose weights are positive (`KineticEnergy`, `JacobianFrobenius`,
    `ErrorEstimate`, in that order).
    """
    weighted = (
        (KineticEnergy, config.kinetic_energy),
        (JacobianFrobenius, config.jacobian_frobenius),
        (ErrorEstimate, config.error_estimate),
    )
    regularisers = tuple(cls(weight) for cls, weight in weighted if weight > 0)
    if config.depth == "discrete":
        return Discrete(regularisers=regularisers)
    solver = SOLVERS[config.solver]()
    adjoint = ADJOINTS[config.adjoint](config.max_steps)
    if config.step_size is not None:
        return Continuous(
            solver,
            diffrax.ConstantStepSize(),
            adjoint,
            dt0=config.step_size,
            max_steps=config.max_steps,
            regularisers=regularisers,
        )
    atol = config.rtol / 10 if config.atol is None else config.atol
    controller = diffrax.PIDController(rtol=config.rtol, atol=atol)
    return Continuous(
        solver, controller, adjoint, max_steps=config.max_steps, regularisers=regularisers
    )


def field_options(config: ModelConfig) -> dict[str, Any]:
    """The field's depth schedule and composition named by a `ModelConfig`.

    **Arguments:**

    - `config`: the names of `--schedule` and `--composition`, and `--degree`.

    **Returns:**

    `{"schedule": ..., "composition": ...}`, keyword arguments of `Field` (and so of
    `Classifier`), e.g. `Polynomial(3)` and `ParallelBlock()`.
    """
    return {
        "schedule": SCHEDULES[config.schedule](config.degree),
        "composition": COMPOSITIONS[config.composition](),
    }


def data_parallel(devices: str | None):
    """The data parallelism named by the command line's `--devices`.

    **Arguments:**

    - `devices`: `None` (the option absent), `"all"`, or a positive device count such as
      `"4"`.

    **Returns:**

    `None` (JAX's default device) for `None`, `DataParallel()` (every device of
    `jax.devices()`) for `"all"`, `DataParallel(devices=n)` for a count `n`.

    **Raises:**

    `ValueError` for any other text, or a count JAX's devices cannot provide.
    """
    from .training import DataParallel

    if devices is None:
        return None
    if devices.strip().lower() == "all":
        return DataParallel()
    try:
        count = int(devices)
    except ValueError:
        raise ValueError(
            f"--devices expects a device count or 'all'; got {devices!r}. Pass e.g. "
            "--devices 4 or --devices all."
        ) from None
    return DataParallel(devices=count)


def diffusion_layer(dilations: Sequence[int] = (1,), adaptive: bool = False):
    """The diffusion layer constructor named by the command line's options.

    **Arguments:**

    - `dilations`: the stencil reaches (`--diffusion-dilations`); several give the
      multi-scale layer.
    - `adaptive`: the token-adaptive layer (`--diffusion-adaptive`) instead of
      constant coefficients.

    **Returns:**

    A constructor `layer(dim, key=..., dtype=...)` of `DiffusionLayer` or
    `AdaptiveDiffusionLayer`, as `Encoder(..., diffusion_layer=...)` takes it.
    """
    from .operators import AdaptiveDiffusionLayer, DiffusionLayer

    cls = AdaptiveDiffusionLayer if adaptive else DiffusionLayer
    return functools.partial(cls, dilations=tuple(dilations))


# ---------------------------------------------------------------------------------------
# Task options
# ---------------------------------------------------------------------------------------


def _option_types(task: str, offline: bool) -> dict[str, Any]:
    import inspect

    from . import data

    def parameters(fn, skip=()):
        hints = typing.get_type_hints(fn)
        return {
            name: hints.get(name, Any)
            for name in inspect.signature(fn).parameters
            if name not in skip
        }

    if not offline:
        reader = {
            "listops": data.load_listops,
            "text": data.load_imdb,
            "retrieval": data.load_aan,
            "image": data.load_cifar10,
            "pathfinder": data.load_pathfinder,
            "pathx": data.load_pathfinder,
        }[task]
        return parameters(reader, skip=("data_dir", "resolution"))
    if task == "image":
        return parameters(data.make_digits_task)
    config = {
        "listops": data.ListOpsConfig,
        "text": data.SyntheticTextConfig,
        "retrieval": data.SyntheticRetrievalConfig,
        "pathfinder": data.PathfinderConfig,
        "pathx": data.PathfinderConfig,
    }[task]
    hints = typing.get_type_hints(config)
    wanted: dict[str, Any] = {f.name: hints[f.name] for f in dataclasses.fields(config)}
    wanted["seed"] = int
    if task in ("pathfinder", "pathx"):
        wanted["difficulty"] = str
    return wanted


def _type_name(tp: Any) -> str:
    names = {bool: "a boolean (true or false)", int: "an integer", float: "a number"}
    names[str] = "a text"
    members = typing.get_args(tp) if typing.get_origin(tp) is Literal else None
    if members:
        return "one of " + ", ".join(str(m) for m in members)
    kinds = [a for a in _members(tp) if a is not type(None)]
    text = " or ".join(names.get(k, getattr(k, "__name__", str(k))) for k in kinds)
    return text + (" or none" if type(None) in _members(tp) else "")


def _convert_option(key: str, text: str, tp: Any) -> Any:
    def wrong(example: str = "") -> _UsageError:
        hint = f" Pass e.g. {key}={example}." if example else ""
        return _UsageError(
            f"--task-option {key}={text}: {key} wants {_type_name(tp)}; got {text!r}.{hint}"
        )

    members = _members(tp)
    if type(None) in members and text.lower() == "none":
        return None
    if typing.get_origin(tp) is Literal:
        for choice in typing.get_args(tp):
            if str(choice) == text:
                return choice
        raise wrong()
    if bool in members:
        if text.lower() in ("true", "false", "1", "0"):
            return text.lower() in ("true", "1")
        raise wrong("true")
    if int in members:
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            number = None
        if float not in members:
            example = str(int(number)) if number is not None and number.is_integer() else ""
            raise wrong(example) from None
    if float in members:
        try:
            return float(text)
        except ValueError:
            raise wrong() from None
    if str in members or Any in members:
        return text
    raise wrong()


# ---------------------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------------------


def model_options(model_config: ModelConfig, *, dual: bool, max_len: int, key) -> dict[str, Any]:
    """The model options named by a `ModelConfig`'s pooling, positions, head and dropout.

    **Arguments:**

    - `model_config`: the names of `--pooling`, `--positions`, `--head`, and
      `--head-dim`, `--dropout`, `--attention-dropout`.
    - `dual`: whether the model is a `DualClassifier` (its head is always LRA's matching
      MLP head).
    - `max_len`: the longest sequence a learned position table must cover.
    - `key`: a JAX PRNG key for the CLS token and the position table.

    **Returns:**

    Keyword arguments of `Classifier` / `DualClassifier`: `pooling`, `positions` and
    `dropout` where they differ from the defaults, `head` and `mlp_dim`.
    """
    from .models import ClsPooling, LearnedPositions
    from .operators import Dropout

    options: dict[str, Any] = {}
    kc, kp = jax.random.split(key)
    if model_config.pooling == "cls":
        options["pooling"] = ClsPooling(model_config.dim, key=kc)
    if model_config.positions == "learned":
        options["positions"] = LearnedPositions(max_len, model_config.dim, key=kp)
    dropout = Dropout(model_config.dropout, model_config.attention_dropout)
    if dropout.active:
        options["dropout"] = dropout
    if dual:
        options["mlp_dim"] = model_config.head_dim
    else:
        options["head"] = model_config.head
        if model_config.head == "mlp":
            hidden = 4 * model_config.dim if model_config.hidden is None else model_config.hidden
            options["mlp_dim"] = hidden if model_config.head_dim is None else model_config.head_dim
    return options


def _build(data_config: DataConfig, model_config: ModelConfig):
    from .data import load_task
    from .models import Classifier, DualClassifier

    if model_config.head_dim is not None and model_config.head == "linear":
        dual = data_config.task == "retrieval"
        _require(
            dual,
            f"--head-dim is the width of the MLP head; got --head-dim {model_config.head_dim} "
            "with --head linear. Pass --head mlp, or drop --head-dim.",
        )

    options = data_config.task_options()
    if data_config.data_dir is not None and not data_config.data_dir.is_dir():
        raise _UsageError(
            f"--data-dir {data_config.data_dir}: no such directory. Pass the directory of the "
            "official data, or omit --data-dir to generate the task offline."
        )
    task = load_task(data_config.task, data_config.data_dir, **options)
    # The longest padded sequence of any split: what a learned position table must cover.
    max_len = max(
        max(split.tokens.shape[1], 0 if split.tokens2 is None else split.tokens2.shape[1])
        for split in (task.train, task.val, task.test)
    )
    # Keyed apart from the model's own key, so the options leave its other weights as they were.
    extra = model_options(
        model_config,
        dual=task.dual,
        max_len=int(max_len),
        key=jax.random.fold_in(jax.random.PRNGKey(model_config.model_seed), 1),
    )
    model = (DualClassifier if task.dual else Classifier)(
        task.vocab_size,
        model_config.dim,
        model_config.heads,
        model_config.layers,
        task.num_classes,
        key=jax.random.PRNGKey(model_config.model_seed),
        hidden=model_config.hidden,
        diffusion_at=tuple(model_config.diffusion_at),
        diffusion_layer=diffusion_layer(
            model_config.diffusion_dilations, model_config.diffusion_adaptive
        ),
        **field_options(model_config),
        **extra,
    )
    return task, model


def _check_resume(command: TrainCommand) -> None:
    from .training import CHECKPOINT_NAME

    if not (command.out / CHECKPOINT_NAME).is_file():
        return  # nothing to resume: the run starts afresh
    if not (command.out / RUN_NAME).is_file():
        return  # a checkpoint written by the library alone; train() checks what it can
    differences = _resume_differences(read_run(command.out), command)
    if differences:
        raise _UsageError(
            f"cannot resume {command.out}: the command differs from the run's {RUN_NAME} in "
            f"settings that change the trajectory ({'; '.join(differences)}). Pass the "
            "original settings, or drop --resume to start afresh (replacing the run)."
        )


def _train(command: TrainCommand) -> int:
    """Run `pdeformer train`: build the task and model, write `run.json`, train.

    With `resume`, nothing in the run directory changes until the command has been compared
    with the run's `run.json` and the checkpoint has loaded.

    **Arguments:**

    - `command`: the parsed command.

    **Returns:**

    The exit status (0); prints a JSON summary on stdout.

    **Raises:**

    Whatever `pdeformer.training.train` raises; `main` turns it into one line.
    """
    import equinox as eqx

    from .training import CHECKPOINT_NAME, load_checkpoint, make_optimizer, train

    parallel = data_parallel(command.devices.devices)
    if command.resume:
        _check_resume(command)
    task, model = _build(command.data, command.model)
    depth = integrator(command.integrator)
    config = command.optim.train_config(progress=command.progress)
    if parallel is not None:
        parallel.check_batch_size(config.batch_size, "--batch-size")
    if command.resume and (command.out / CHECKPOINT_NAME).is_file():
        # Load once before anything is written: a checkpoint that does not fit (or is
        # corrupt) then leaves the run directory as it was.
        opt_state = make_optimizer(config).init(eqx.filter(model, eqx.is_inexact_array))
        load_checkpoint(command.out, model, opt_state)
    if jax.process_index() == 0:
        write_run(command)
    _, history = train(
        model,
        task,
        depth,
        config,
        out_dir=command.out,
        resume=command.resume,
        parallel=parallel,
    )
    last = history[-1] if history else {}
    summary = {k: last.get(k) for k in ("step", "loss", "accuracy", "nfe", "success")}
    print(json.dumps({"out": str(command.out), "steps": len(history), "last": summary}))
    return 0


def _evaluate(command: EvaluateCommand) -> int:
    """Run `pdeformer evaluate`: load a run's checkpoint and evaluate it.

    **Arguments:**

    - `command`: the parsed command.

    **Returns:**

    The exit status (0); prints the result as JSON on stdout (`accuracy`, `success`: the
    fraction of batches whose solve succeeded with finite logits, `mean_nfe`, times).
    """
    import equinox as eqx

    from .training import evaluate, load_checkpoint, make_optimizer

    run = read_run(command.run)
    task, model = _build(run.data, run.model)
    config = run.optim.train_config(progress=False)
    opt_state = make_optimizer(config).init(eqx.filter(model, eqx.is_inexact_array))
    model, _, meta = load_checkpoint(command.run, model, opt_state)
    split = task.val if command.split == "val" else task.test
    parallel = data_parallel(command.devices.devices)
    depth = integrator(command.integrator)
    result = evaluate(model, split, depth, command.batch_size, parallel=parallel)
    print(
        json.dumps(
            {
                "run": str(command.run),
                "checkpoint_step": meta["step"],
                "split": command.split,
                "depth": command.integrator.depth,
                "solver": None
                if command.integrator.depth == "discrete"
                else command.integrator.solver,
                "accuracy": result.accuracy,
                "success": result.success,
                "mean_nfe": result.mean_nfe,
                "wall_time_s": result.wall_time,
                "time_per_batch_s": result.time_per_batch,
                "num_examples": result.num_examples,
                "devices": 1 if parallel is None else parallel.num_devices,
            }
        )
    )
    return 0


_TRAIN_HELP = (
    "Train a Classifier on an LRA task (offline generator or official data), writing "
    "metrics.jsonl, checkpoints and run.json into --out. Errors are one line (exit status 2 "
    "for a usage error, 1 for a failed run); --debug shows the traceback."
)
_EVAL_HELP = (
    "Evaluate a trained run under any integrator: load the checkpoint of a `pdeformer train` "
    "run and print accuracy, solve success, mean NFE and wall time as JSON on stdout."
)


def parse(argv: Sequence[str]) -> TrainCommand | EvaluateCommand:
    """Parse a command line into its config object.

    **Arguments:**

    - `argv`: the arguments after the program name, e.g. `["train", "--dim", "32"]`.

    **Returns:**

    A `TrainCommand` or an `EvaluateCommand`.

    **Raises:**

    `SystemExit` (status 2, tyro's message) for options that do not parse, 0 for `--help`;
    `ValueError` for values the config dataclasses refuse.
    """
    commands = Annotated[
        Annotated[TrainCommand, tyro.conf.subcommand("train", description=_TRAIN_HELP)]
        | Annotated[EvaluateCommand, tyro.conf.subcommand("evaluate", description=_EVAL_HELP)],
        tyro.conf.OmitArgPrefixes,
        tyro.conf.OmitSubcommandPrefixes,
    ]

    def cli(console_outputs: bool):
        return tyro.cli(
            commands,  # type: ignore[arg-type]
            prog="pdeformer",
            description="Train and evaluate Transformers integrated in depth as ODEs/PDEs.",
            args=list(argv),
            console_outputs=console_outputs,
        )

    if any(a in ("-h", "--help") for a in argv):
        return cli(console_outputs=True)  # prints the help and exits
    refusals: list[str] = []
    token = _refusals.set(refusals)
    captured = io.StringIO()
    try:
        # tyro prints its errors in a box on stderr (a refusal's even with
        # console_outputs=False); they become one line here.
        with contextlib.redirect_stderr(captured):
            return cli(console_outputs=True)
    except SystemExit as exc:
        if exc.code in (0, None):
            raise
        message = refusals[0] if refusals else _box_text(captured.getvalue())
        raise _UsageError(message) from None
    finally:
        _refusals.reset(token)


def _box_text(text: str) -> str:
    # The message inside tyro's error box, up to its first rule, as one line.
    # (A box drawn with lines, or, without a terminal, plain text under a rule of dashes.)
    words: list[str] = []
    for line in text.splitlines()[1:]:
        inner = line.strip().strip("│╭╮╰╯").strip()
        if not inner:
            continue
        if set(inner) <= set("─-"):
            if words:
                break
            continue
        words.append(inner)
    return " ".join(words) or text.strip() or "the command line does not parse."


def _explain(exc: BaseException) -> tuple[int, str]:
    # One line and an exit status for every way a command ends early.
    import equinox as eqx

    from .training import CorruptCheckpointError, NonFiniteLossError

    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted; continue from the last checkpoint with --resume."
    if isinstance(exc, CorruptCheckpointError | NonFiniteLossError):
        return 1, first
    if isinstance(exc, eqx.EquinoxRuntimeError):
        if "max_steps" in str(exc) or "maximum number of solver steps" in str(exc):
            return 1, (
                "the solve in depth ran out of steps (--max-steps): raise --max-steps, "
                "loosen --rtol, or use a constant --step-size."
            )
        return 1, f"the solve in depth failed ({first}); loosen --rtol or raise --max-steps."
    if isinstance(exc, ValueError | TypeError | FileNotFoundError | NotADirectoryError):
        return 2, first
    return 1, f"{type(exc).__name__}: {first} (rerun with --debug for the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pdeformer` command.

    **Arguments:**

    - `argv`: the arguments (default: `sys.argv[1:]`).

    **Returns:**

    The exit status: 0, 1 for a failed run (a solve out of steps, a non-finite loss, a
    corrupt checkpoint), 2 for a usage error (a bad option value, a missing data directory,
    a resume with other settings), 130 when interrupted. Errors are one line on stderr;
    `--debug` raises them with their traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        command = parse(argv)
        if command.devices.distributed:
            # Before anything touches a device: afterwards jax.devices() lists every host's.
            jax.distributed.initialize(
                coordinator_address=command.devices.coordinator_address,
                num_processes=command.devices.num_processes,
                process_id=command.devices.process_id,
            )
        if isinstance(command, TrainCommand):
            return _train(command)
        return _evaluate(command)
    except (Exception, KeyboardInterrupt) as exc:
        if debug:
            raise
        status, line = _explain(exc)
        print(f"pdeformer: error: {line}", file=sys.stderr)
        return status


if __name__ == "__main__":
    raise SystemExit(main())
