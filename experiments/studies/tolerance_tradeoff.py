"""Accuracy and compute against the solver tolerance at inference, for two trained models.

The same architecture is trained twice on offline ListOps from the same initialisation: once
in discrete mode (`Discrete()`, the standard pre-LN Transformer) and once in continuous
mode (`Continuous(...)`, the field integrated by a diffrax solver). Each trained model is
then evaluated on the test split in discrete mode, with its own training integrator, and
with adaptive solvers (Tsit5, Dopri5) across relative tolerances `1e-1 .. 1e-6`, reporting
accuracy, mean NFE per batch, wall time per batch, the largest logit difference from the
model's training integrator ("as trained") and from its tightest solve (a proxy for the
exact flow), and the fraction of predictions equal to the as-trained ones.

    python experiments/studies/tolerance_tradeoff.py                 # quick: minutes on a CPU
    python experiments/studies/tolerance_tradeoff.py --preset full   # larger, for a GPU
    python experiments/studies/tolerance_tradeoff.py --preset smoke  # seconds, for tests

Writes `results.md`, `results.json`, `accuracy_vs_rtol.png`, `nfe_vs_rtol.png` and
`logit_error_vs_rtol.png` into `--out` (default `runs/tolerance_tradeoff`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: report, _cli

import diffrax  # noqa: E402
import numpy as np  # noqa: E402

import _cli  # noqa: E402
import report  # noqa: E402
from _common import (  # noqa: E402
    ListOpsSetup,
    adaptive,
    atol_for,
    data_summary,
    depth_label,
    evaluation_row,
    train_model,
)
from pdeformer import Continuous, Discrete  # noqa: E402
from pdeformer.data import ListOpsConfig  # noqa: E402
from pdeformer.training import evaluate  # noqa: E402
from report import fmt  # noqa: E402

_log = report.logger("tolerance_tradeoff")

_RTOLS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


@dataclasses.dataclass(frozen=True)
class TradeoffConfig:
    """Everything the experiment depends on.

    **Arguments:**

    - `name`: a label for the outputs (`quick`, `full`, `smoke`).
    - `setup`: the task, the model and the training (`_common.ListOpsSetup`), the same for
      both models.
    - `continuous`: the integrator of the continuous-mode training.
    - `solvers`: adaptive solvers evaluated with `PIDController(rtol, atol=rtol / 10)`.
    - `rtols`: the tolerances swept.
    - `max_steps`: the most steps a solve may take (failures are reported, not raised).
    - `eval_batch_size`: test examples per batch (one batch = one ODE solve).
    - `out`: the output directory.
    """

    name: str
    setup: ListOpsSetup
    continuous: Continuous
    eval_batch_size: int
    solvers: tuple[diffrax.AbstractSolver, ...] = (diffrax.Tsit5(), diffrax.Dopri5())
    rtols: tuple[float, ...] = _RTOLS
    max_steps: int = 4096
    out: Path = Path("runs/tolerance_tradeoff")

    def __post_init__(self) -> None:
        if not self.rtols or min(self.rtols) <= 0:
            raise ValueError(f"rtols must be positive and non-empty; got {self.rtols}.")
        if not self.solvers:
            raise ValueError("solvers must be non-empty; pass e.g. (diffrax.Tsit5(),).")

    @classmethod
    def quick(cls) -> TradeoffConfig:
        """Minutes on a 2-core CPU: width 32, 2 layers, 300 steps; continuous training by
        adaptive Tsit5 at rtol 1e-2 (about 28 evaluations per forward pass, 7 times the
        discrete model's 4; its first step compiles for about a minute on a CPU)."""
        return cls(
            name="quick",
            setup=ListOpsSetup(
                listops=ListOpsConfig(
                    max_depth=4,
                    min_length=20,
                    max_length=60,
                    num_train=4000,
                    num_val=64,
                    num_test=200,
                ),
                data_seed=0,
                dim=32,
                num_heads=4,
                num_layers=2,
                model_seed=0,
                train=dataclasses.replace(
                    ListOpsSetup.quick().train, total_steps=300, warmup_steps=30, progress=True
                ),
            ),
            continuous=Continuous(
                diffrax.Tsit5(), diffrax.PIDController(rtol=1e-2, atol=1e-3), throw=False
            ),
            eval_batch_size=100,
        )

    @classmethod
    def full(cls) -> TradeoffConfig:
        """The full ListOps setup; continuous training by adaptive Tsit5 at rtol 1e-3."""
        setup = ListOpsSetup.full()
        return cls(
            name="full",
            setup=dataclasses.replace(
                setup, train=dataclasses.replace(setup.train, checkpoint_every=0)
            ),
            continuous=Continuous(
                diffrax.Tsit5(), diffrax.PIDController(rtol=1e-3, atol=1e-4), throw=False
            ),
            eval_batch_size=250,
        )

    @classmethod
    def smoke(cls) -> TradeoffConfig:
        """Seconds: the tiny setup, continuous training by Euler at step 1/2, Tsit5 at two
        tolerances (for tests)."""
        return cls(
            name="smoke",
            setup=ListOpsSetup.smoke(),
            continuous=Continuous(
                diffrax.Euler(), diffrax.ConstantStepSize(), dt0=0.5, throw=False
            ),
            eval_batch_size=16,
            solvers=(diffrax.Tsit5(),),
            rtols=(1e-2, 1e-4),
        )


def _evaluate_model(model, task, trained_with, config: TradeoffConfig) -> list[dict[str, Any]]:
    # (method, controller, rtol, atol, integrator, warm up first, is the training integrator)
    runs: list[tuple[str, str, float | None, float | None, Any, bool, bool]] = [
        ("discrete", "Transformer (pre-LN)", None, None, Discrete(), True, False)
    ]
    if isinstance(trained_with, Discrete):
        runs[0] = (*runs[0][:-1], True)
    else:
        name = type(trained_with.solver).__name__
        label = depth_label(trained_with).split(", ", 1)[1]
        runs.append((name, f"{label} (as trained)", None, None, trained_with, True, True))
    for solver in config.solvers:
        for rtol in config.rtols:
            atol = atol_for(rtol)
            depth = adaptive(solver, rtol, config.max_steps)
            # The first tolerance compiles; the others reuse it (tolerances are arrays).
            first = rtol == config.rtols[0]
            runs.append(
                (type(solver).__name__, f"PID rtol={rtol:g}", rtol, atol, depth, first, False)
            )
    rows, logits = [], []
    for method, controller, rtol, atol, depth, warmup, as_trained in runs:
        _log(f"  evaluating: {method}, {controller}")
        ev = evaluate(model, task.test, depth, config.eval_batch_size, warmup=warmup)
        rows.append(
            {**evaluation_row(method, controller, rtol, atol, ev, None), "as_trained": as_trained}
        )
        logits.append(ev.logits)
    # Differences from the model as trained, and from its tightest solve.
    reference = next(lg for lg, r in zip(logits, rows, strict=True) if r["as_trained"])
    first_solver = type(config.solvers[0]).__name__
    tightest = next(
        lg
        for lg, r in zip(logits, rows, strict=True)
        if r["method"] == first_solver and r["rtol"] == min(config.rtols)
    )
    predictions = np.argmax(reference, axis=-1)
    for row, lg in zip(rows, logits, strict=True):
        row["max_abs_logit_diff"] = float(np.max(np.abs(lg - reference)))
        row["max_abs_logit_diff_vs_tightest"] = float(np.max(np.abs(lg - tightest)))
        row["agreement_with_as_trained"] = float(np.mean(np.argmax(lg, axis=-1) == predictions))
    return rows


def _markdown(results: dict[str, Any]) -> str:
    setup = results["meta"]["config"]["setup"]
    tr = setup["train"]
    tightest = results["meta"]["config"]["solvers"][0]
    lines = [
        f"- data: {results['data']['description']}; {results['data']['num_train']} train / "
        f"{results['data']['num_test']} test examples; always predicting the most frequent "
        f"class scores {results['data']['test_majority_fraction']:.3f} on the test split",
        f"- model: dim {setup['dim']}, {setup['num_heads']} heads, {setup['num_layers']} "
        f"layers; both models start from the same initialisation (seed {setup['model_seed']}) "
        f"and see the same batches: AdamW, peak lr {tr['lr']:g}, {tr['total_steps']} steps, "
        f"batch {tr['batch_size']}",
    ]
    for m in results["models"]:
        t = m["training"]
        lines.append(
            f"- **{m['name']}**: trained with {m['trained_with']}; final training loss "
            f"{t['final_loss']:.3f}, {t['time_per_step_s']:.3f} s/step, {t['wall_s']:.0f} s"
        )
    lines += [
        "",
        "Wall times are indicative only: the machine is shared with other jobs. NFE counts "
        "vector-field evaluations of one batch's forward solve; atol = rtol / 10. The field "
        "jumps at every half layer (attention to reaction and back), and an adaptive solver is "
        "stopped at each jump, so it takes at least one step per half layer whatever the "
        "tolerance: its NFE has a floor (Tsit5 and Dopri5: 7 per half layer, the FSAL stage "
        "included). "
        '"diff vs as trained": largest logit difference from the model\'s training '
        f'integrator; "diff vs tightest": from {tightest} at the tightest rtol.',
    ]
    for m in results["models"]:
        lines += [
            "",
            f"## {m['name']}",
            "",
            "| method | controller | accuracy | agreement with as-trained | mean NFE / batch "
            "| time / batch (s) | diff vs as trained | diff vs tightest | success |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in m["evaluation"]:
            lines.append(
                f"| {r['method']} | {r['controller']} | {r['accuracy']:.4f} "
                f"| {r['agreement_with_as_trained']:.3f} | {r['mean_nfe']:.1f} "
                f"| {r['time_per_batch_s']:.4f} | {r['max_abs_logit_diff']:.2e} "
                f"| {r['max_abs_logit_diff_vs_tightest']:.2e} | {r['success']:.2f} |"
            )
    lines += ["", "## Summary", ""]
    for m in results["models"]:
        s = m["summary"]
        lines.append(
            f"- {m['name']}: accuracy as trained {fmt(s['accuracy_as_trained'], 4)}; under "
            f"the adaptive solvers from {fmt(s['adaptive_accuracy_min'], 4)} to "
            f"{fmt(s['adaptive_accuracy_max'], 4)} over rtol "
            f"{fmt(s['rtol_max'])}..{fmt(s['rtol_min'])}, at {fmt(s['adaptive_nfe_min'])} to "
            f"{fmt(s['adaptive_nfe_max'])} NFE per batch."
        )
    lines += [
        "",
        "## Plots",
        "",
        "![accuracy against rtol](accuracy_vs_rtol.png)",
        "",
        "![NFE against rtol](nfe_vs_rtol.png)",
        "",
        "![distance to the tightest solve against rtol](logit_error_vs_rtol.png)",
        "",
    ]
    return "\n".join(lines)


def _plots(results: dict[str, Any], out: Path) -> None:
    plt = report.pyplot(_log)
    if plt is None:
        return
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ("-", "--", ":", "-.")

    def plot(key: str, ylabel: str, path: str, title: str, logy: bool, fixed_lines: bool):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        positive = False
        for i, m in enumerate(results["models"]):
            color = colors[i % len(colors)]
            rows = m["evaluation"]
            methods = list(dict.fromkeys(r["method"] for r in rows if r["rtol"] is not None))
            for j, method in enumerate(methods):
                pts = sorted(
                    (r["rtol"], r[key])
                    for r in rows
                    if r["method"] == method and r["rtol"] and (r[key] > 0 or not logy)
                )
                if not pts:
                    continue
                positive = True
                ax.plot(
                    *zip(*pts, strict=True),
                    marker="o",
                    color=color,
                    ls=styles[j % len(styles)],
                    label=f"{m['name']}: {method}",
                )
            if fixed_lines:
                for r in rows:
                    if r["rtol"] is None:
                        ls = ":" if r["method"] == "discrete" else "-."
                        ax.axhline(
                            r[key],
                            color=color,
                            ls=ls,
                            lw=0.9,
                            label=f"{m['name']}: {r['method']} ({r['controller']})",
                        )
        ax.set_xscale("log")
        ax.invert_xaxis()
        if logy and positive:
            # Zeros (the tightest solve against itself) are left out of a log axis.
            ax.set_yscale("log")
        ax.set_xlabel("rtol (atol = rtol / 10), tighter to the right")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        report.save_figure(fig, out / path, _log)

    plot(
        "accuracy",
        "test accuracy",
        "accuracy_vs_rtol.png",
        "Accuracy against tolerance at inference",
        False,
        True,
    )
    plot(
        "mean_nfe",
        "mean NFE per batch",
        "nfe_vs_rtol.png",
        "Vector-field evaluations against tolerance",
        True,
        True,
    )
    plot(
        "max_abs_logit_diff_vs_tightest",
        "max |logits - logits at tightest rtol|",
        "logit_error_vs_rtol.png",
        "Distance to the tightest solve (the flow)",
        True,
        False,
    )


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    as_trained = [r for r in rows if r["as_trained"]]
    adaptive_rows = [r for r in rows if r["rtol"] is not None]
    return {
        "accuracy_as_trained": as_trained[0]["accuracy"] if as_trained else None,
        "adaptive_accuracy_min": min(r["accuracy"] for r in adaptive_rows),
        "adaptive_accuracy_max": max(r["accuracy"] for r in adaptive_rows),
        "adaptive_nfe_min": min(r["mean_nfe"] for r in adaptive_rows),
        "adaptive_nfe_max": max(r["mean_nfe"] for r in adaptive_rows),
        "rtol_min": min(r["rtol"] for r in adaptive_rows),
        "rtol_max": max(r["rtol"] for r in adaptive_rows),
    }


def main(config: TradeoffConfig) -> dict[str, Any]:
    """Train both models, sweep the tolerances, write `results.md`, `results.json` and the
    plots into `config.out`.

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
    models = []
    for name, depth in (
        ("discrete-trained", Discrete()),
        ("continuous-trained", config.continuous),
    ):
        model, history, training = train_model(
            setup.model(task), task, depth, setup.train, None, _log
        )
        _log(f"evaluating the {name} model")
        rows = _evaluate_model(model, task, depth, config)
        models.append(
            {
                "name": name,
                "trained_with": depth_label(depth),
                "training": training,
                "loss_curve": [r["loss"] for r in history],
                "evaluation": rows,
                "summary": _summary(rows),
            }
        )
    results = {"meta": info, "data": data_summary(task), "models": models}
    results["meta"]["wall_s"] = time.perf_counter() - start
    _plots(results, out)
    title = "Accuracy and compute against solver tolerance (ListOps)"
    report.write(out, results, title, _markdown(results), log=_log)
    return results


PRESETS = {
    "smoke": TradeoffConfig.smoke,
    "quick": TradeoffConfig.quick,
    "full": TradeoffConfig.full,
}

if __name__ == "__main__":
    _cli.run(PRESETS, main, description=__doc__.split("\n\n")[0])
