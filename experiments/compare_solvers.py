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

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import diffrax
import equinox as eqx
import jax
import numpy as np

from _common import (
    ListOpsSetup,
    adaptive,
    data_summary,
    evaluation_row,
    fixed,
    header,
    logger,
    meta,
    pyplot,
    save_figure,
    train_model,
    write_results,
)
from _common import cli as _cli
from pdeformer import Discrete
from pdeformer.data import iterate_forever
from pdeformer.training import evaluate, make_optimizer, train_step

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
    - `setup`: the ListOps task, the model and its discrete-mode training
      (`_common.ListOpsSetup`).
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
    setup: ListOpsSetup
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
            setup=ListOpsSetup.quick(),
            # One batch holds the whole test split (64 examples): a larger batch would be
            # filled up with copies and cost more per solve.
            eval_batch_size=64,
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
            setup=ListOpsSetup.full(),
            eval_batch_size=250,
            cost_steps=10,
            cost_batch_size=64,
        )

    @classmethod
    def smoke(cls) -> CompareConfig:
        """Seconds: a tiny model, two solvers, two tolerances (for tests)."""
        return cls(
            name="smoke",
            setup=ListOpsSetup.smoke(),
            eval_batch_size=16,
            fixed_solvers=(diffrax.Euler(),),
            adaptive_solvers=(diffrax.Tsit5(),),
            rtols=(1e-2, 1e-4),
            cost_solvers=(),
            cost_steps=1,
            cost_batch_size=8,
        )


_log = logger("compare_solvers")


def _training_cost(model, task, config: CompareConfig, depth) -> dict[str, Any]:
    # Timed from the trained weights (the field's stiffness after training is what matters);
    # the first step compiles and is not timed. The training run's own optimizer settings
    # (its warm-up keeps these few updates small) let the discrete step reuse the
    # compilation of the training run where the batch shapes agree.
    train_config = config.setup.train
    optimizer = make_optimizer(train_config)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    data = iterate_forever(
        task.train,
        config.cost_batch_size,
        seed=train_config.seed,
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


def _markdown(results: dict[str, Any]) -> str:
    setup = results["meta"]["config"]["setup"]
    tr = results["training"]
    lines = [
        *header("Integrators in depth on one trained model (ListOps)", results["meta"]),
        f"- data: {results['data']['description']}; "
        f"{results['data']['num_train']} train / {results['data']['num_test']} test examples",
        f"- model: dim {setup['dim']}, {setup['num_heads']} heads, "
        f"{setup['num_layers']} layers; trained in discrete mode for {tr['steps']} "
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


def _plot(results: dict[str, Any], path: Path) -> None:
    plt = pyplot(_log)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = results["evaluation"]
    adaptive_rows = [r for r in rows if r["rtol"] is not None]
    for method in dict.fromkeys(r["method"] for r in adaptive_rows):
        pts = sorted((r["mean_nfe"], r["accuracy"]) for r in adaptive_rows if r["method"] == method)
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
    save_figure(fig, path, _log)


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
    info = meta(command or f"compare_solvers.main({config.name})", config)
    setup = config.setup

    _log(f"generating ListOps ({config.name})")
    task = setup.task()
    model, _, training = train_model(
        setup.model(task), task, Discrete(), setup.train, out / "train", _log
    )

    test, bs, rows = task.test, config.eval_batch_size, []
    _log("evaluating: discrete")
    ref = evaluate(model, test, Discrete(), bs)
    rows.append(evaluation_row("discrete", "Transformer (pre-LN)", None, None, ref, None))
    for solver in config.fixed_solvers:
        name = type(solver).__name__
        _log(f"evaluating: {name}, constant step {config.fixed_step}")
        ev = evaluate(model, test, fixed(solver, config.fixed_step, config.max_steps), bs)
        label = f"constant h={config.fixed_step:g}"
        rows.append(evaluation_row(name, label, None, None, ev, ref.logits))
    for solver in config.adaptive_solvers:
        name = type(solver).__name__
        for rtol in config.rtols:
            atol = rtol * config.atol_ratio
            _log(f"evaluating: {name}, rtol={rtol:g}, atol={atol:g}")
            depth = adaptive(solver, rtol, atol, config.max_steps)
            # The first tolerance compiles; the others reuse it (tolerances are arrays).
            ev = evaluate(model, test, depth, bs, warmup=rtol == config.rtols[0])
            rows.append(evaluation_row(name, f"PID rtol={rtol:g}", rtol, atol, ev, ref.logits))

    costs = []
    _log("training cost: discrete")
    cost = _training_cost(model, task, config, Discrete())
    costs.append({"method": "discrete", "controller": "Transformer (pre-LN)", **cost})
    for solver in config.cost_solvers:
        name = type(solver).__name__
        if isinstance(solver, config.cost_fixed_solvers):
            depth = fixed(solver, config.fixed_step, config.max_steps)
            label = f"constant h={config.fixed_step:g}"
        else:
            rtol = config.cost_rtol
            depth = adaptive(solver, rtol, rtol * config.atol_ratio, config.max_steps)
            label = f"PID rtol={rtol:g}"
        _log(f"training cost: {name} ({label})")
        costs.append(
            {"method": name, "controller": label, **_training_cost(model, task, config, depth)}
        )

    results = {
        "meta": info,
        "data": data_summary(task),
        "training": training,
        "evaluation": rows,
        "training_cost": costs,
    }
    results["meta"]["wall_s"] = time.perf_counter() - start
    _plot(results, out / "pareto.png")
    write_results(out, results, _markdown(results), _log)
    return results


def cli(argv: list[str] | None = None) -> dict:
    """The command line: `--quick` (default), `--full` or `--smoke`, and `--out DIR`."""
    return _cli(
        argv,
        script="compare_solvers.py",
        description="Train a small Transformer on offline ListOps in discrete mode, then "
        "evaluate the same weights under fixed-step and adaptive ODE solvers across "
        "tolerances (accuracy vs NFE), and measure continuous-mode training cost per solver.",
        configs={
            "quick": CompareConfig.quick,
            "full": CompareConfig.full,
            "smoke": CompareConfig.smoke,
        },
        main=main,
    )


if __name__ == "__main__":
    cli(sys.argv[1:])
