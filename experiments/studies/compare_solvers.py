"""Compare integrators in depth on one trained model: accuracy against vector-field evaluations.

A small `Classifier` is trained on offline ListOps in discrete mode (the standard pre-LN
Transformer). The SAME weights are then evaluated on the test split with the field integrated
by fixed-step solvers (step 1/2; Euler at 1/2 is the discrete model itself) and by adaptive
solvers across tolerances, reporting accuracy, mean NFE per batch, wall time per batch and
the largest logit difference from the discrete model. Finally a few continuous-mode training
steps with each solver measure the training cost (time per step, forward NFE).

    python experiments/studies/compare_solvers.py                 # quick: minutes on a CPU
    python experiments/studies/compare_solvers.py --preset full   # larger, for a GPU
    python experiments/studies/compare_solvers.py --preset smoke  # seconds, for tests

Every field of `CompareConfig` is a flag too (`--help`). Writes `results.md`,
`results.json` and `pareto.png` into `--out` (default `runs/compare_solvers`), prints the
table to stdout and progress to stderr.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: report, _cli

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import _cli  # noqa: E402
import report  # noqa: E402
from _common import (  # noqa: E402
    ListOpsSetup,
    adaptive,
    atol_for,
    data_summary,
    evaluation_row,
    fixed,
    train_model,
)
from pdeformer import Discrete  # noqa: E402
from pdeformer.data import iterate_forever  # noqa: E402
from pdeformer.training import evaluate, make_optimizer, train_step  # noqa: E402

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
    - `adaptive_solvers`: solvers run with `PIDController(rtol, atol=rtol / 10)`.
    - `rtols`: the tolerances swept.
    - `max_steps`: the most steps an adaptive solve may take (failures are reported).
    - `cost_solvers`: solvers whose continuous-mode training cost is measured; those with an
      error estimate are adaptive at `cost_rtol`, `diffrax.Euler` runs at `fixed_step`.
    - `cost_fixed_solvers`: of those, the ones run at the constant step instead (by class
      name).
    - `cost_rtol`: the tolerance of those training steps.
    - `cost_steps`: timed training steps per solver (after one compiling step).
    - `cost_batch_size`: batch size of those steps.
    - `out`: the output directory.
    """

    name: str
    setup: ListOpsSetup
    eval_batch_size: int
    fixed_solvers: tuple[diffrax.AbstractSolver, ...] = _FIXED
    fixed_step: float = 0.5
    adaptive_solvers: tuple[diffrax.AbstractSolver, ...] = _ADAPTIVE
    rtols: tuple[float, ...] = _RTOLS
    max_steps: int = 4096
    cost_solvers: tuple[diffrax.AbstractSolver, ...] = _COST
    cost_fixed_solvers: tuple[str, ...] = ("Euler", "Heun", "Midpoint")
    cost_rtol: float = 1e-3
    cost_steps: int = 3
    cost_batch_size: int = 16
    out: Path = Path("runs/compare_solvers")

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


_log = report.logger("compare_solvers")


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
    plt = report.pyplot(_log)
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
    report.save_figure(fig, path, _log)


def main(config: CompareConfig) -> dict:
    """Run the comparison and write `results.md`, `results.json` and `pareto.png` into
    `config.out`.

    **Returns:**

    The results as written to `results.json`.
    """
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    info = report.meta(config)
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
            atol = atol_for(rtol)
            _log(f"evaluating: {name}, rtol={rtol:g}, atol={atol:g}")
            depth = adaptive(solver, rtol, config.max_steps)
            # The first tolerance compiles; the others reuse it (tolerances are arrays).
            ev = evaluate(model, test, depth, bs, warmup=rtol == config.rtols[0])
            rows.append(evaluation_row(name, f"PID rtol={rtol:g}", rtol, atol, ev, ref.logits))

    costs = []
    _log("training cost: discrete")
    cost = _training_cost(model, task, config, Discrete())
    costs.append({"method": "discrete", "controller": "Transformer (pre-LN)", **cost})
    for solver in config.cost_solvers:
        name = type(solver).__name__
        if type(solver).__name__ in config.cost_fixed_solvers:
            depth = fixed(solver, config.fixed_step, config.max_steps)
            label = f"constant h={config.fixed_step:g}"
        else:
            rtol = config.cost_rtol
            depth = adaptive(solver, rtol, config.max_steps)
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
    title = "Integrators in depth on one trained model (ListOps)"
    report.write(out, results, title, _markdown(results), log=_log)
    return results


PRESETS = {"smoke": CompareConfig.smoke, "quick": CompareConfig.quick, "full": CompareConfig.full}

if __name__ == "__main__":
    _cli.run(PRESETS, main, description=__doc__.split("\n\n")[0])
