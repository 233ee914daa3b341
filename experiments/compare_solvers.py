"""Compare integrators in depth on one trained model: accuracy against vector-field evaluations.

A small `Classifier` is trained on offline ListOps in discrete mode (the standard pre-LN
Transformer). The SAME weights are then evaluated on the test split with the field integrated
by fixed-step solvers (step 1/2; Euler at 1/2 is the discrete model itself) and by adaptive
solvers across tolerances, reporting accuracy, mean NFE per batch, wall time per batch and
the largest logit difference from the discrete model. Finally a few continuous-mode training
steps with each solver measure the training cost (time per step, forward NFE).

    python experiments/compare_solvers.py            # --quick (default): minutes on a CPU
    python experiments/compare_solvers.py --full     # larger, for a GPU
    python experiments/compare_solvers.py --smoke    # seconds, for tests

Writes `results.md`, `results.json` and `pareto.png` into `--out` (default
`runs/compare_solvers`), prints the table to stdout and progress to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.random as jr
import numpy as np

from pdeformer import Classifier, Continuous, Discrete
from pdeformer.data import ListOpsConfig, iterate_forever, load_task
from pdeformer.training import TrainConfig, evaluate, make_optimizer, train, train_step

_FIXED = (diffrax.Euler(), diffrax.Heun(), diffrax.Midpoint(), diffrax.Bosh3())
_ADAPTIVE = (diffrax.Bosh3(), diffrax.Tsit5(), diffrax.Dopri5(), diffrax.Dopri8())
_COST = (
    diffrax.Euler(),
    diffrax.Heun(),
    diffrax.Midpoint(),
    diffrax.Bosh3(),
    diffrax.Tsit5(),
    diffrax.Dopri5(),
    diffrax.Dopri8(),
)
_RTOLS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """Everything the experiment depends on.

    **Arguments:**

    - `name`: a label for the outputs (`quick`, `full`, `smoke`).
    - `listops`: the offline ListOps generator settings (lengths, depth, split sizes).
    - `data_seed`: seed of the generator.
    - `dim`, `num_heads`, `num_layers`: model sizes.
    - `model_seed`: seed of the model's initialisation.
    - `train`: the discrete-mode training run.
    - `eval_batch_size`: test examples per batch (one batch = one ODE solve).
    - `fixed_solvers`: solvers run with a constant step `fixed_step`.
    - `fixed_step`: the constant step (must divide the field's smooth pieces of width 1/2).
    - `adaptive_solvers`: solvers run with `PIDController(rtol, atol=rtol * atol_ratio)`.
    - `rtols`, `atol_ratio`: the tolerances swept.
    - `max_steps`: the most steps an adaptive solve may take (failures are reported).
    - `cost_solvers`: solvers whose continuous-mode training cost is measured; those with an
      error estimate are adaptive at `cost_rtol`, `diffrax.Euler` runs at `fixed_step`.
    - `cost_fixed_solvers`: of those, the ones run at the constant step instead.
    - `cost_rtol`: the tolerance of those training steps.
    - `cost_steps`: timed training steps per solver (after one compiling step).
    - `cost_batch_size`: batch size of those steps.
    """

    name: str
    listops: ListOpsConfig
    data_seed: int
    dim: int
    num_heads: int
    num_layers: int
    model_seed: int
    train: TrainConfig
    eval_batch_size: int
    fixed_solvers: tuple[diffrax.AbstractSolver, ...] = _FIXED
    fixed_step: float = 0.5
    adaptive_solvers: tuple[diffrax.AbstractSolver, ...] = _ADAPTIVE
    rtols: tuple[float, ...] = _RTOLS
    atol_ratio: float = 0.1
    max_steps: int = 4096
    cost_solvers: tuple[diffrax.AbstractSolver, ...] = _COST
    cost_fixed_solvers: tuple[type, ...] = (diffrax.Euler, diffrax.Heun, diffrax.Midpoint)
    cost_rtol: float = 1e-3
    cost_steps: int = 3
    cost_batch_size: int = 16

    def __post_init__(self) -> None:
        if not self.rtols or min(self.rtols) <= 0:
            raise ValueError(f"rtols must be positive and non-empty; got {self.rtols}.")
        if not self.fixed_step > 0:
            raise ValueError(f"fixed_step must be > 0; got {self.fixed_step}. Pass e.g. 0.5.")
        if self.cost_steps < 1:
            raise ValueError(f"cost_steps must be >= 1; got {self.cost_steps}.")

    @classmethod
    def quick(cls) -> CompareConfig:
        """A few minutes on a 2-core CPU."""
        return cls(
            name="quick",
            listops=ListOpsConfig(
                max_depth=4,
                min_length=30,
                max_length=80,
                num_train=4000,
                num_val=128,
                num_test=64,
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
            eval_batch_size=128,
            cost_steps=1,
            # Training cost in quick mode: the discrete model, Euler and one adaptive solver
            # (each continuous backward pass is a long XLA compile on a CPU).
            cost_solvers=(diffrax.Euler(), diffrax.Tsit5()),
            cost_batch_size=16,
        )

    @classmethod
    def full(cls) -> CompareConfig:
        """Longer sequences, a bigger model and more training: for a GPU."""
        return cls(
            name="full",
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
            eval_batch_size=250,
            cost_steps=10,
            cost_batch_size=64,
        )

    @classmethod
    def smoke(cls) -> CompareConfig:
        """Seconds: a tiny model, two solvers, two tolerances (for tests)."""
        return cls(
            name="smoke",
            listops=ListOpsConfig(
                max_depth=3,
                min_length=5,
                max_length=20,
                num_train=64,
                num_val=8,
                num_test=16,
            ),
            data_seed=0,
            dim=16,
            num_heads=2,
            num_layers=1,
            model_seed=0,
            train=TrainConfig(
                lr=3e-3,
                warmup_steps=1,
                total_steps=3,
                batch_size=8,
                progress=False,
            ),
            eval_batch_size=16,
            fixed_solvers=(diffrax.Euler(),),
            adaptive_solvers=(diffrax.Tsit5(),),
            rtols=(1e-2, 1e-4),
            cost_solvers=(),
            cost_steps=1,
            cost_batch_size=8,
        )


def _log(message: str) -> None:
    print(f"[compare_solvers {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
    }


def _config_json(config: CompareConfig) -> dict[str, Any]:
    def encode(v):
        if isinstance(v, diffrax.AbstractSolver):
            return type(v).__name__
        if isinstance(v, type):
            return v.__name__
        if dataclasses.is_dataclass(v):
            return {f.name: encode(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple | list):
            return [encode(x) for x in v]
        return v

    return encode(config)


def _fixed(solver, step: float, max_steps: int) -> Continuous:
    return Continuous(
        solver, diffrax.ConstantStepSize(), dt0=step, max_steps=max_steps, throw=False
    )


def _adaptive(solver, rtol: float, atol: float, max_steps: int) -> Continuous:
    controller = diffrax.PIDController(rtol=rtol, atol=atol)
    return Continuous(solver, controller, max_steps=max_steps, throw=False)


def _row(method: str, controller: str, rtol, atol, ev, reference) -> dict[str, Any]:
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


def _training_cost(model, task, config: CompareConfig, depth) -> dict[str, Any]:
    # Timed from the trained weights (the field's stiffness after training is what matters);
    # the first step compiles and is not timed.
    optimizer = make_optimizer(dataclasses.replace(config.train, warmup_steps=0))
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    data = iterate_forever(
        task.train,
        config.cost_batch_size,
        seed=config.train.seed,
        pad_to=int(task.train.tokens.shape[1]),
    )
    times, nfes = [], []
    for step, batch in data:
        t0 = time.perf_counter()
        model, opt_state, metrics = train_step(model, opt_state, batch, depth, optimizer)
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - t0
        if step > 0:
            times.append(elapsed)
            nfes.append(int(metrics["nfe"]))
        if step >= config.cost_steps:
            break
    return {"time_per_step_s": float(np.mean(times)), "forward_nfe": float(np.mean(nfes))}


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    tr = results["training"]
    lines = [
        "# Integrators in depth on one trained model (ListOps)",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']['cpu']} ({meta['machine']['cpu_count']} CPUs), "
        f"devices {', '.join(meta['machine']['devices'])}, jax {meta['machine']['jax']}",
        f"- data: {results['data']['description']}; "
        f"{results['data']['num_train']} train / {results['data']['num_test']} test examples",
        f"- model: dim {meta['config']['dim']}, {meta['config']['num_heads']} heads, "
        f"{meta['config']['num_layers']} layers; trained in discrete mode for {tr['steps']} "
        f"steps (final loss {tr['final_loss']:.3f}, {tr['time_per_step_s']:.3f} s/step, "
        f"total {tr['wall_s']:.1f} s)",
        "",
        "## Evaluation of the same weights under each integrator (test split)",
        "",
        "| method | controller | accuracy | mean NFE / batch | time / batch (s) "
        "| max abs logit diff vs discrete | success |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["evaluation"]:
        lines.append(
            f"| {r['method']} | {r['controller']} | {r['accuracy']:.4f} | {r['mean_nfe']:.1f} "
            f"| {r['time_per_batch_s']:.4f} | {r['max_abs_logit_diff']:.2e} "
            f"| {r['success']:.2f} |"
        )
    lines += [
        "",
        "## Training cost per integrator (continuous mode, from the trained weights)",
        "",
        "| method | controller | time / step (s) | forward NFE / step |",
        "|---|---|---:|---:|",
    ]
    for r in results["training_cost"]:
        lines.append(
            f"| {r['method']} | {r['controller']} | {r['time_per_step_s']:.4f} "
            f"| {r['forward_nfe']:.1f} |"
        )
    lines += [
        "",
        "NFE counts vector-field evaluations of one batch's forward solve (the batch is one "
        "ODE); the discrete model takes 2 per layer. Times exclude compilation.",
        "",
    ]
    return "\n".join(lines)


def _plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("warning: matplotlib is not installed; skipping the Pareto plot")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = results["evaluation"]
    adaptive = [r for r in rows if r["rtol"] is not None]
    for method in dict.fromkeys(r["method"] for r in adaptive):
        pts = sorted((r["mean_nfe"], r["accuracy"]) for r in adaptive if r["method"] == method)
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"{method} (adaptive)")
    for r in rows:
        if r["rtol"] is None:
            marker = "*" if r["method"] == "discrete" else "s"
            ax.scatter(
                r["mean_nfe"],
                r["accuracy"],
                marker=marker,
                s=90,
                zorder=3,
                label=f"{r['method']} ({r['controller']})",
            )
    pts = sorted({(r["mean_nfe"], r["accuracy"]) for r in rows})
    front, best = [], -1.0
    for nfe, acc in pts:
        if acc > best:
            front.append((nfe, acc))
            best = acc
    ax.step(
        *zip(*front, strict=True), where="post", color="k", lw=0.8, alpha=0.5, label="Pareto front"
    )
    ax.set_xscale("log")
    ax.set_xlabel("mean NFE per batch")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy vs vector-field evaluations (same weights)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(
    config: CompareConfig,
    out_dir: str | Path = "runs/compare_solvers",
    *,
    command: str | None = None,
) -> dict:
    """Run the comparison and write `results.md`, `results.json` and `pareto.png`.

    **Arguments:**

    - `config`: a `CompareConfig` (e.g. `CompareConfig.quick()`).
    - `out_dir`: the output directory (created).
    - `command`: the command line, recorded in the outputs.

    **Returns:**

    The results as written to `results.json`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    command = command or f"compare_solvers.main({config.name})"

    _log(f"generating ListOps ({config.name})")
    task = load_task("listops", config=config.listops, seed=config.data_seed)
    model = Classifier(
        task.vocab_size,
        config.dim,
        config.num_heads,
        config.num_layers,
        task.num_classes,
        key=jr.PRNGKey(config.model_seed),
    )

    _log(f"training in discrete mode for {config.train.total_steps} steps")
    t0 = time.perf_counter()
    model, history = train(model, task, Discrete(), config.train, out_dir=out / "train")
    train_wall = time.perf_counter() - t0
    times = [r["time"] for r in history[1:]] or [history[0]["time"]]
    training = {
        "steps": len(history),
        "final_loss": float(np.mean([r["loss"] for r in history[-10:]])),
        "final_train_accuracy": float(np.mean([r["accuracy"] for r in history[-10:]])),
        "time_per_step_s": float(np.median(times)),
        "wall_s": train_wall,
    }

    test, bs, rows = task.test, config.eval_batch_size, []
    _log("evaluating: discrete")
    ref = evaluate(model, test, Discrete(), bs)
    rows.append(_row("discrete", "Transformer (pre-LN)", None, None, ref, None))
    for solver in config.fixed_solvers:
        name = type(solver).__name__
        _log(f"evaluating: {name}, constant step {config.fixed_step}")
        ev = evaluate(model, test, _fixed(solver, config.fixed_step, config.max_steps), bs)
        rows.append(_row(name, f"constant h={config.fixed_step:g}", None, None, ev, ref.logits))
    for solver in config.adaptive_solvers:
        name = type(solver).__name__
        for rtol in config.rtols:
            atol = rtol * config.atol_ratio
            _log(f"evaluating: {name}, rtol={rtol:g}, atol={atol:g}")
            depth = _adaptive(solver, rtol, atol, config.max_steps)
            # The first tolerance compiles; the others reuse it (tolerances are arrays).
            ev = evaluate(model, test, depth, bs, warmup=rtol == config.rtols[0])
            rows.append(_row(name, f"PID rtol={rtol:g}", rtol, atol, ev, ref.logits))

    costs = []
    _log("training cost: discrete")
    cost = _training_cost(model, task, config, Discrete())
    costs.append({"method": "discrete", "controller": "Transformer (pre-LN)", **cost})
    for solver in config.cost_solvers:
        name = type(solver).__name__
        if isinstance(solver, config.cost_fixed_solvers):
            depth = _fixed(solver, config.fixed_step, config.max_steps)
            label = f"constant h={config.fixed_step:g}"
        else:
            rtol = config.cost_rtol
            depth = _adaptive(solver, rtol, rtol * config.atol_ratio, config.max_steps)
            label = f"PID rtol={rtol:g}"
        _log(f"training cost: {name} ({label})")
        costs.append(
            {"method": name, "controller": label, **_training_cost(model, task, config, depth)}
        )

    results = {
        "meta": {
            "command": command,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": _machine(),
            "config": _config_json(config),
            "wall_s": None,
        },
        "data": {
            "description": task.description,
            "num_train": len(task.train),
            "num_test": len(task.test),
        },
        "training": training,
        "evaluation": rows,
        "training_cost": costs,
    }
    results["meta"]["wall_s"] = time.perf_counter() - start
    table = _markdown(results)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if _plot(results, out / "pareto.png"):
        _log(f"wrote {out / 'pareto.png'}")
    _log(
        f"wrote {out / 'results.md'} and {out / 'results.json'} "
        f"in {results['meta']['wall_s']:.1f} s"
    )
    print(table)
    return results


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a small Transformer on offline ListOps in discrete mode, then "
        "evaluate the same weights under fixed-step and adaptive ODE solvers across "
        "tolerances (accuracy vs NFE), and measure continuous-mode training cost per solver."
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        dest="size",
        action="store_const",
        const="quick",
        help="a few minutes on a 2-core CPU (the default)",
    )
    size.add_argument(
        "--full",
        dest="size",
        action="store_const",
        const="full",
        help="longer sequences, a bigger model, more training: for a GPU",
    )
    size.add_argument(
        "--smoke",
        dest="size",
        action="store_const",
        const="smoke",
        help="seconds: a tiny end-to-end check",
    )
    parser.set_defaults(size="quick")
    parser.add_argument(
        "--out",
        default="runs/compare_solvers",
        type=Path,
        help="output directory for results.md, results.json, pareto.png and the training log "
        "(default: runs/compare_solvers)",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = _parse(sys.argv[1:])
    configs = {
        "quick": CompareConfig.quick,
        "full": CompareConfig.full,
        "smoke": CompareConfig.smoke,
    }
    main(configs[args.size](), args.out, command=" ".join(["python", *sys.argv]))
