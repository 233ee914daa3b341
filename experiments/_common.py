"""Pieces shared by the experiment scripts.

- the command line (`--quick` (default) / `--full` / `--smoke`, `--out DIR`) and the glue
  from it to a script's `main(config, out_dir, command=...)`;
- the record of where and how a result was obtained (command, date, CPU model, jax
  version, load average), as JSON and as the header of `results.md`;
- writing `results.md` and `results.json` (strict JSON: non-finite numbers become `null`),
  and matplotlib set up for files only;
- a small ListOps classifier: the task, the model and its training (`ListOpsSetup`);
- the integrators the scripts compare (`fixed`, `adaptive`) and one evaluation row.

The scripts import this module as `_common`: `python experiments/<script>.py` puts
`experiments/` on `sys.path`; the tests put it there themselves.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import diffrax
import jax
import jax.random as jr
import numpy as np

from pdeformer import AbstractDepth, Classifier, Continuous, Discrete, cpu_allocator_tuned
from pdeformer.data import ListOpsConfig, TaskData, load_task
from pdeformer.training import Evaluation, TrainConfig, train

DATE_FORMAT = "%Y-%m-%d %H:%M UTC"

# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

_SIZE_HELP = {
    "quick": "minutes on a 2-core CPU (the default)",
    "full": "larger data, model and training: for a GPU",
    "smoke": "seconds: a tiny end-to-end check (for tests)",
}


def parse_args(
    argv: Sequence[str] | None, *, description: str, default_out: str
) -> argparse.Namespace:
    """Parse `--quick | --full | --smoke` and `--out DIR`.

    **Returns:**

    A namespace with `size` (`"quick"`, `"full"` or `"smoke"`) and `out` (a `Path`).
    """
    parser = argparse.ArgumentParser(description=description)
    size = parser.add_mutually_exclusive_group()
    for name, text in _SIZE_HELP.items():
        size.add_argument(f"--{name}", dest="size", action="store_const", const=name, help=text)
    parser.set_defaults(size="quick")
    parser.add_argument(
        "--out",
        default=Path(default_out),
        type=Path,
        help=f"output directory for results.md, results.json and the plots (default: "
        f"{default_out})",
    )
    return parser.parse_args(sys.argv[1:] if argv is None else list(argv))


def cli(
    argv: Sequence[str] | None,
    *,
    script: str,
    description: str,
    configs: Mapping[str, Callable[[], Any]],
    main: Callable[..., dict[str, Any]],
) -> dict[str, Any]:
    """Run a script's `main` from its command line.

    **Arguments:**

    - `argv`: the arguments (`None`: `sys.argv[1:]`).
    - `script`: the script's file name, e.g. `"stabilizers.py"` (the default output
      directory is `runs/<stem>` and the recorded command `python experiments/<script> ...`).
    - `description`: the `--help` text.
    - `configs`: `{"quick": Config.quick, "full": Config.full, "smoke": Config.smoke}`.
    - `main`: called as `main(config, out_dir, command=command)`.

    **Returns:**

    What `main` returns.
    """
    stem = Path(script).stem
    args = parse_args(argv, description=description, default_out=f"runs/{stem}")
    rest = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python", f"experiments/{script}", *rest])
    return main(configs[args.size](), args.out, command=command)


def logger(name: str) -> Callable[[str], None]:
    """A function printing timestamped progress lines to stderr."""

    def log(message: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    return log


# ---------------------------------------------------------------------------------------
# Where and how a result was obtained
# ---------------------------------------------------------------------------------------


def _lscpu() -> dict[str, str]:
    """`lscpu`'s "Field: value" lines as a dict (empty where `lscpu` is missing or fails)."""
    if not shutil.which("lscpu"):
        return {}
    try:
        text = subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=False, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _cpu_model(lscpu: dict[str, str]) -> str:
    if "Model name" in lscpu:
        return lscpu["Model name"]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """CPU model and L3 cache (from `lscpu`), CPU count, platform, Python and jax versions,
    devices (and the first one's kind and backend), load, and the allocator's environment
    variables (`GLIBC_TUNABLES`, `MALLOC_*`) where set, and whether
    `pf.tune_cpu_allocator()` is in force. Call it after choosing JAX's platform."""
    lscpu = _lscpu()
    devices = jax.devices()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": _cpu_model(lscpu),
        "cpu_count": os.cpu_count(),
        "l3_cache": lscpu.get("L3 cache"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind,
        "backend": devices[0].platform,
        "load_average": load,
        # Allocator settings change CPU timings (XLA allocates its working memory on every
        # call; see docs/howto/devices.md, "On a CPU"): recorded where set.
        "malloc_env": {
            k: v for k, v in os.environ.items() if k == "GLIBC_TUNABLES" or k.startswith("MALLOC_")
        },
        "cpu_allocator_tuned": cpu_allocator_tuned(),
    }


def describe(value: Any) -> Any:
    """A JSON-friendly description of a config value (solvers, integrators, dataclasses)."""
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, AbstractDepth):
        return depth_label(value)
    if isinstance(value, diffrax.AbstractSolver):
        return type(value).__name__
    if dataclasses.is_dataclass(value):
        return {f.name: describe(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [describe(x) for x in value]
    if callable(value) and hasattr(value, "__name__"):
        return value.__name__
    return value


def depth_label(depth: AbstractDepth) -> str:
    """A short name of an integrator, e.g. `Tsit5, PID rtol=0.01` or `Discrete`."""
    if isinstance(depth, Discrete):
        return "Discrete" if depth.residual else "Discrete, no residual"
    if isinstance(depth, Continuous):
        name = type(depth.solver).__name__
        controller = depth.controller
        if isinstance(controller, diffrax.PIDController):
            rtol = float(np.asarray(controller.rtol))
            atol = float(np.asarray(controller.atol))
            return f"{name}, PID rtol={rtol:g} atol={atol:g}"
        return f"{name}, constant h={depth.dt0:g}"
    return type(depth).__name__


def meta(command: str, config: Any) -> dict[str, Any]:
    """The `meta` entry of `results.json`: command, date, machine, config (`wall_s` to fill)."""
    return {
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).strftime(DATE_FORMAT),
        "machine": machine(),
        "config": describe(config),
        "wall_s": None,
    }


def header(title: str, meta: dict[str, Any]) -> list[str]:
    """The first lines of a `results.md`: title, command, date, machine and jax version."""
    m = meta["machine"]
    load = m.get("load_average")
    load_text = "" if load is None else f"; load average at start {load[0]:.2f} (1 min)"
    lines = [
        f"# {title}",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- machine: {m['cpu']} ({m['cpu_count']} CPUs), devices {', '.join(m['devices'])}, "
        f"jax {m['jax']}, Python {m['python']}{load_text}",
    ]
    if meta.get("wall_s") is not None:
        lines.append(f"- wall time of the whole run: {meta['wall_s']:.0f} s")
    return lines


# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------


def json_safe(value: Any) -> Any:
    """Replace non-finite floats by `None` (strict JSON has no NaN or infinity), recursively."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.floating | np.integer | np.bool_):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(
    out: Path, results: dict[str, Any], markdown: str, log: Callable[[str], None]
) -> None:
    """Write `results.md` and `results.json` into `out` and print the markdown to stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown)
    text = json.dumps(json_safe(results), indent=2, allow_nan=False)
    (out / "results.json").write_text(text + "\n")
    log(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    print(markdown)


def pyplot(log: Callable[[str], None]):
    """`matplotlib.pyplot` with the file-only Agg backend, or `None` if not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("warning: matplotlib is not installed; skipping the plots")
        return None
    return plt


def save_figure(fig, path: Path, log: Callable[[str], None]) -> None:
    """Save a figure at a fixed resolution, close it, and say so."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    log(f"wrote {path}")


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for a markdown table (`-` for a missing or non-finite one)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}"


# ---------------------------------------------------------------------------------------
# A small ListOps classifier
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ListOpsSetup:
    """The task, the model and the training of a small ListOps classifier.

    **Arguments:**

    - `listops`: the offline ListOps generator settings (lengths, depth, split sizes).
    - `data_seed`: seed of the generator.
    - `dim`, `num_heads`, `num_layers`: model sizes.
    - `model_seed`: seed of the model's initialisation.
    - `train`: the training run (learning rate, steps, batch size, ...).
    """

    listops: ListOpsConfig
    data_seed: int
    dim: int
    num_heads: int
    num_layers: int
    model_seed: int
    train: TrainConfig

    @classmethod
    def quick(cls) -> ListOpsSetup:
        """Short sequences, a 2-layer width-64 model, 150 steps: minutes on a 2-core CPU."""
        return cls(
            listops=ListOpsConfig(
                max_depth=4, min_length=30, max_length=80, num_train=4000, num_val=128, num_test=64
            ),
            data_seed=0,
            dim=64,
            num_heads=4,
            num_layers=2,
            model_seed=0,
            train=TrainConfig(
                lr=3e-3,
                warmup_steps=25,
                total_steps=150,
                batch_size=32,
                weight_decay=0.01,
                checkpoint_every=0,
                progress=True,
            ),
        )

    @classmethod
    def full(cls) -> ListOpsSetup:
        """Longer sequences, a 4-layer width-128 model and 10,000 steps: for a GPU."""
        return cls(
            listops=ListOpsConfig(
                max_depth=8,
                min_length=100,
                max_length=500,
                num_train=40_000,
                num_val=1000,
                num_test=1000,
            ),
            data_seed=0,
            dim=128,
            num_heads=4,
            num_layers=4,
            model_seed=0,
            train=TrainConfig(
                lr=1e-3,
                warmup_steps=500,
                total_steps=10_000,
                batch_size=64,
                weight_decay=0.05,
                checkpoint_every=1000,
                eval_every=1000,
                progress=True,
            ),
        )

    @classmethod
    def smoke(cls) -> ListOpsSetup:
        """A 1-layer width-16 model, 3 steps on tiny data: seconds."""
        return cls(
            listops=ListOpsConfig(
                max_depth=3, min_length=5, max_length=20, num_train=64, num_val=8, num_test=16
            ),
            data_seed=0,
            dim=16,
            num_heads=2,
            num_layers=1,
            model_seed=0,
            train=TrainConfig(lr=3e-3, warmup_steps=1, total_steps=3, batch_size=8, progress=False),
        )

    def task(self) -> TaskData:
        """The generated ListOps task."""
        return load_task("listops", config=self.listops, seed=self.data_seed)

    def model(self, task: TaskData, *, seed: int | None = None, **encoder_kwargs) -> Classifier:
        """A freshly initialised classifier (`seed`: overrides `model_seed`; `encoder_kwargs`:
        e.g. `norm=Identity, final_norm=Identity`)."""
        return Classifier(
            task.vocab_size,
            self.dim,
            self.num_heads,
            self.num_layers,
            task.num_classes,
            key=jr.PRNGKey(self.model_seed if seed is None else seed),
            **encoder_kwargs,
        )


def training_summary(history: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Steps, final loss and train accuracy (mean of the last 10 steps), time per step."""
    times = [r["time"] for r in history[1:]] or [history[0]["time"]]
    return {
        "steps": len(history),
        "final_loss": float(np.mean([r["loss"] for r in history[-10:]])),
        "final_train_accuracy": float(np.mean([r["accuracy"] for r in history[-10:]])),
        "time_per_step_s": float(np.median(times)),
        "wall_s": wall_s,
    }


def train_model(
    model: Classifier,
    task: TaskData,
    depth: AbstractDepth,
    config: TrainConfig,
    out_dir: Path | None,
    log: Callable[[str], None],
) -> tuple[Classifier, list[dict[str, Any]], dict[str, Any]]:
    """Train with `pdeformer.training.train`; return the model, its history and a summary."""
    log(f"training ({depth_label(depth)}) for {config.total_steps} steps")
    t0 = time.perf_counter()
    model, history = train(model, task, depth, config, out_dir=out_dir)
    summary = training_summary(history, time.perf_counter() - t0)
    log(
        f"trained: final loss {summary['final_loss']:.3f}, "
        f"{summary['time_per_step_s']:.3f} s/step, {summary['wall_s']:.0f} s"
    )
    return model, history, summary


def data_summary(task: TaskData) -> dict[str, Any]:
    """The task's description, split sizes, and the test accuracy of always predicting the
    most frequent test label (the floor a model must beat)."""
    counts = np.bincount(np.asarray(task.test.labels), minlength=task.num_classes)
    return {
        "description": task.description,
        "num_train": len(task.train),
        "num_val": len(task.val),
        "num_test": len(task.test),
        "test_majority_fraction": float(counts.max() / max(counts.sum(), 1)),
    }


# ---------------------------------------------------------------------------------------
# Integrators and evaluation rows
# ---------------------------------------------------------------------------------------


def fixed(solver: diffrax.AbstractSolver, step: float, max_steps: int) -> Continuous:
    """A constant-step solve that reports failure instead of raising."""
    return Continuous(
        solver, diffrax.ConstantStepSize(), dt0=step, max_steps=max_steps, throw=False
    )


def adaptive(
    solver: diffrax.AbstractSolver, rtol: float, atol: float, max_steps: int
) -> Continuous:
    """An adaptive (PID) solve that reports failure instead of raising."""
    controller = diffrax.PIDController(rtol=rtol, atol=atol)
    return Continuous(solver, controller, max_steps=max_steps, throw=False)


def evaluation_row(
    method: str,
    controller: str,
    rtol: float | None,
    atol: float | None,
    ev: Evaluation,
    reference: np.ndarray | None,
) -> dict[str, Any]:
    """One row of an evaluation table; `reference`: logits to compare with (or `None`)."""
    diff = float(np.max(np.abs(ev.logits - reference))) if reference is not None else 0.0
    return {
        "method": method,
        "controller": controller,
        "rtol": rtol,
        "atol": atol,
        "accuracy": ev.accuracy,
        "mean_nfe": ev.mean_nfe,
        "time_per_batch_s": ev.time_per_batch,
        "max_abs_logit_diff": diff,
        "success": ev.success,
    }
