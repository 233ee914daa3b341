"""Command line: `pdeformer train` and `pdeformer evaluate`.

Names typed on the command line are mapped to objects here, in one place (`SOLVERS`,
`ADJOINTS`, `diffusion_layer`, `data_parallel`; insertion points are the names of
`pdeformer.placement.INSERTION_POINTS`); everything below the edge takes objects.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.random as jr

from .data import TASK_NAMES, load_task
from .depth import AbstractDepth, Continuous, Discrete, default_adjoint
from .models import Classifier, DualClassifier
from .operators import AdaptiveDiffusionLayer, DiffusionLayer
from .placement import INSERTION_POINTS
from .training import (
    DataParallel,
    TrainConfig,
    evaluate,
    load_checkpoint,
    make_optimizer,
    train,
)

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

RUN_NAME = "run.json"
"""The file in a run directory recording how the CLI built the task and the model."""


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def _task_options(pairs: Sequence[str]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(
                f"--task-option expects KEY=VALUE (e.g. max_length=120); got {pair!r}."
            )
        options[key.replace("-", "_")] = _parse_value(value)
    return options


def _depth(args: argparse.Namespace) -> AbstractDepth:
    if args.depth == "discrete":
        return Discrete()
    solver = SOLVERS[args.solver]()
    adjoint = ADJOINTS[args.adjoint](args.max_steps)
    if args.step_size is not None:
        controller = diffrax.ConstantStepSize()
        return Continuous(solver, controller, adjoint, dt0=args.step_size, max_steps=args.max_steps)
    atol = args.rtol / 10 if args.atol is None else args.atol
    controller = diffrax.PIDController(rtol=args.rtol, atol=atol)
    return Continuous(solver, controller, adjoint, max_steps=args.max_steps)


def _add_depth_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("integrator in depth")
    g.add_argument(
        "--depth",
        choices=("discrete", "continuous"),
        default="discrete",
        help="discrete: the standard Transformer (Euler with step 1/2); continuous: integrate "
        "the field with a diffrax solver (default: discrete)",
    )
    g.add_argument(
        "--solver",
        choices=sorted(SOLVERS),
        default="tsit5",
        help="diffrax solver for --depth continuous (default: tsit5)",
    )
    g.add_argument(
        "--rtol", type=float, default=1e-3, help="relative tolerance of the adaptive controller"
    )
    g.add_argument(
        "--atol",
        type=float,
        default=None,
        help="absolute tolerance of the adaptive controller (default: rtol/10)",
    )
    g.add_argument(
        "--step-size",
        type=float,
        default=None,
        help="use a constant step of this size instead of the adaptive controller; it must "
        "divide 1/2 (e.g. 0.5, 0.25)",
    )
    g.add_argument(
        "--adjoint",
        choices=sorted(ADJOINTS),
        default="recursive",
        help="how gradients flow through a continuous solve (default: recursive, i.e. "
        "diffrax.RecursiveCheckpointAdjoint keeping 16 steps, the library's default)",
    )
    g.add_argument(
        "--max-steps", type=int, default=4096, help="most solver steps per solve (default 4096)"
    )


def _add_device_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("devices")
    g.add_argument(
        "--devices",
        default=None,
        metavar="N|all",
        help="data-parallel over the first N devices, or all of them (every host's with "
        "--distributed); the batch size must be a multiple of the count (default: JAX's "
        "default device only)",
    )
    g.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first: one process per host, each started "
        "with the same command (coordinator from the options below, JAX_COORDINATOR_ADDRESS "
        "or the cluster's environment)",
    )
    g.add_argument("--coordinator-address", default=None, help="host:port of process 0")
    g.add_argument("--num-processes", type=int, default=None, help="number of processes")
    g.add_argument("--process-id", type=int, default=None, help="this process's index")


def data_parallel(devices: str | None) -> DataParallel | None:
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


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdeformer",
        description="Train and evaluate Transformers integrated in depth as ODEs/PDEs.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser(
        "train",
        help="train a Classifier on an LRA task",
        description="Train a Classifier on an LRA task (offline generator or official data), "
        "writing metrics.jsonl, checkpoints and run.json into --out.",
    )
    d = tr.add_argument_group("data")
    d.add_argument(
        "--task", choices=TASK_NAMES, default="listops", help="LRA task (default: listops)"
    )
    d.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="directory with the official data; omit to generate the task offline",
    )
    d.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option of load_task, repeatable (e.g. --task-option max_length=120 "
        "--task-option num_train=2000 for offline ListOps)",
    )
    d.add_argument("--data-seed", type=int, default=0, help="seed of the offline generator")
    m = tr.add_argument_group("model")
    m.add_argument("--dim", type=int, default=64, help="model width (default 64)")
    m.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    m.add_argument("--layers", type=int, default=2, help="layers = depth T (default 2)")
    m.add_argument(
        "--hidden", type=int, default=None, help="FFN hidden width (default: the field's)"
    )
    m.add_argument("--model-seed", type=int, default=0, help="seed of the initialisation")
    m.add_argument(
        "--diffusion-at",
        nargs="*",
        choices=INSERTION_POINTS,
        default=[],
        metavar="POINT",
        help="insert the diffusion layer at these points, any of "
        f"{', '.join(INSERTION_POINTS)} (default: none, the baseline Transformer)",
    )
    m.add_argument(
        "--diffusion-dilations",
        type=int,
        nargs="+",
        default=[1],
        metavar="D",
        help="the layer's stencil reaches; several give the multi-scale layer, e.g. "
        "1 2 4 8 (default: 1)",
    )
    m.add_argument(
        "--diffusion-adaptive",
        action="store_true",
        help="use the token-adaptive (flux-form) layer instead of constant coefficients",
    )
    _add_depth_options(tr)
    o = tr.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=1000, help="optimiser steps (default 1000)")
    o.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    o.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    o.add_argument(
        "--warmup", type=int, default=None, help="warm-up steps (default: min(100, steps//10))"
    )
    o.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    o.add_argument("--clip-norm", type=float, default=1.0, help="global gradient-norm clip")
    o.add_argument("--seed", type=int, default=0, help="seed of the data order")
    o.add_argument("--eval-every", type=int, default=0, help="validate every N steps (0: never)")
    o.add_argument(
        "--checkpoint-every", type=int, default=0, help="checkpoint every N steps (0: at the end)"
    )
    r = tr.add_argument_group("run")
    r.add_argument(
        "--out",
        type=Path,
        default=Path("runs/train"),
        help="run directory for metrics.jsonl, checkpoints, run.json (default: runs/train)",
    )
    r.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in --out (same data order); without it, the "
        "run starts afresh and replaces the directory's log and checkpoints",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _add_device_options(tr)

    ev = sub.add_parser(
        "evaluate",
        help="evaluate a trained run under any integrator",
        description="Load the checkpoint of a `pdeformer train` run and report accuracy, mean "
        "NFE and wall time as JSON on stdout. The integrator may differ from training.",
    )
    ev.add_argument("run", type=Path, help="the run directory written by `pdeformer train`")
    ev.add_argument(
        "--split", choices=("val", "test"), default="test", help="split (default: test)"
    )
    ev.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    _add_depth_options(ev)
    _add_device_options(ev)
    return parser


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
    cls = AdaptiveDiffusionLayer if adaptive else DiffusionLayer
    return functools.partial(cls, dilations=tuple(dilations))


def _load(run: dict[str, Any]):
    task = load_task(run["task"], run["data_dir"], **run["task_options"])
    model = (DualClassifier if task.dual else Classifier)(
        task.vocab_size,
        run["dim"],
        run["heads"],
        run["layers"],
        task.num_classes,
        key=jr.PRNGKey(run["model_seed"]),
        hidden=run["hidden"],
        diffusion_at=tuple(run.get("diffusion_at", ())),
        diffusion_layer=diffusion_layer(
            run.get("diffusion_dilations", (1,)), run.get("diffusion_adaptive", False)
        ),
    )
    return task, model


def _train(args: argparse.Namespace) -> int:
    options = _task_options(args.task_option)
    if args.data_dir is None:
        options.setdefault("seed", args.data_seed)
    run = {
        "task": args.task,
        "data_dir": None if args.data_dir is None else str(args.data_dir),
        "task_options": options,
        "dim": args.dim,
        "heads": args.heads,
        "layers": args.layers,
        "hidden": args.hidden,
        "model_seed": args.model_seed,
        "diffusion_at": list(args.diffusion_at),
        "diffusion_dilations": list(args.diffusion_dilations),
        "diffusion_adaptive": bool(args.diffusion_adaptive),
    }
    warmup = min(100, args.steps // 10) if args.warmup is None else args.warmup
    config = TrainConfig(
        lr=args.lr,
        warmup_steps=warmup,
        total_steps=args.steps,
        weight_decay=args.weight_decay,
        clip_norm=args.clip_norm,
        batch_size=args.batch_size,
        seed=args.seed,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
    )
    parallel = data_parallel(args.devices)
    task, model = _load(run)
    depth = _depth(args)
    args.out.mkdir(parents=True, exist_ok=True)
    run["train_config"] = {k: getattr(config, k) for k in config.__dataclass_fields__}
    run["devices"] = 1 if parallel is None else parallel.num_devices
    if jax.process_index() == 0:
        (args.out / RUN_NAME).write_text(json.dumps(run, indent=2) + "\n")
    _, history = train(
        model, task, depth, config, out_dir=args.out, resume=args.resume, parallel=parallel
    )
    last = history[-1] if history else {}
    summary = {k: last.get(k) for k in ("step", "loss", "accuracy", "nfe")}
    print(json.dumps({"out": str(args.out), "steps": len(history), "last": summary}))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    path = args.run / RUN_NAME
    if not path.is_file():
        raise SystemExit(f"{args.run} is not a run directory of `pdeformer train` (no {RUN_NAME}).")
    run = json.loads(path.read_text())
    task, model = _load(run)
    config = TrainConfig(**run["train_config"])
    opt_state = make_optimizer(config).init(eqx.filter(model, eqx.is_inexact_array))
    model, _, meta = load_checkpoint(args.run, model, opt_state)
    split = task.val if args.split == "val" else task.test
    parallel = data_parallel(args.devices)
    result = evaluate(model, split, _depth(args), args.batch_size, parallel=parallel)
    print(
        json.dumps(
            {
                "run": str(args.run),
                "checkpoint_step": meta["step"],
                "split": args.split,
                "depth": args.depth,
                "solver": None if args.depth == "discrete" else args.solver,
                "accuracy": result.accuracy,
                "mean_nfe": result.mean_nfe,
                "wall_time_s": result.wall_time,
                "time_per_batch_s": result.time_per_batch,
                "num_examples": result.num_examples,
                "devices": 1 if parallel is None else parallel.num_devices,
            }
        )
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pdeformer` command.

    **Arguments:**

    - `argv`: the arguments (default: `sys.argv[1:]`).

    **Returns:**

    The exit status.
    """
    args = _build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.distributed:
        # Before anything touches a device: afterwards jax.devices() lists every host's.
        jax.distributed.initialize(
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    if args.command == "train":
        return _train(args)
    return _evaluate(args)


if __name__ == "__main__":
    raise SystemExit(main())
