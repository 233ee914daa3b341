"""The main job: what the solver and its tolerance trade at inference, on models that learned.

Two classifiers are trained on the 8x8 digits (a task whose baseline passes the learning
gate in half a minute on a CPU):

- the standard pre-LN Transformer, trained in discrete mode (`Discrete()`): the baseline,
  whose learning gate heads the page;
- a field that is one smooth piece in depth (`Shared()` or `Polynomial(degree)` weights
  with `ParallelBlock()`), trained in continuous mode by adaptive Tsit5 at rtol 1e-2.

Each is then evaluated on the test split under `Discrete()`, adaptive Bosh3 and Tsit5
across tolerances, and fixed-step Euler and Heun at 1 to 16 steps over the whole depth,
reporting accuracy, agreement with and largest logit error against the tightest solve
(Tsit5 at the smallest rtol), NFE, and block evaluations (one attention plus one reaction:
a parallel-block evaluation counts one, a sequential half step one half).

    python experiments/studies/compare_solvers.py                 # quick: minutes on a CPU
    python experiments/studies/compare_solvers.py --preset full   # longer training
    python experiments/studies/compare_solvers.py --preset smoke  # seconds, for tests

Every field of `CompareConfig` is a flag too (`--help`; `--setup.task listops` with
`--setup.dim 64 --setup.num-heads 4 --setup.num-layers 2` and the training of
`TaskSetup.nested_listops()` for nested ListOps). Writes `results.md`, `results.json` and
`accuracy_vs_nfe.png` into `--out` (default `runs/compare_solvers`), prints the page to
stdout and progress to stderr.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: report, _cli

import diffrax  # noqa: E402

import _cli  # noqa: E402
import report  # noqa: E402
from _common import (  # noqa: E402
    SmoothField,
    Sweep,
    TaskSetup,
    cheapest_within,
    data_summary,
    depth_label,
    gate_of,
    gate_record,
    gate_section,
    gate_verdict,
    sweep,
    train_model,
)
from pdeformer import Continuous, Discrete  # noqa: E402
from pdeformer.training import TrainConfig  # noqa: E402

_log = report.logger("compare_solvers")


def _continuous_training() -> Continuous:
    return Continuous(diffrax.Tsit5(), diffrax.PIDController(rtol=1e-2, atol=1e-3), throw=False)


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """Everything the main job depends on.

    **Arguments:**

    - `name`: a label for the outputs (`quick`, `full`, `smoke`).
    - `setup`: the task, the model sizes and the discrete baseline's training.
    - `smooth`: the smooth field of the second model (same sizes, `setup.num_layers` its
      depth).
    - `smooth_train`: its training in continuous mode.
    - `with_smooth`: train and evaluate the second model (`False`: the baseline only).
    - `continuous`: the integrator of that training.
    - `sweep`: the integrators both models are evaluated with.
    - `out`: the output directory.
    """

    name: str
    setup: TaskSetup
    smooth_train: TrainConfig
    with_smooth: bool = True
    smooth: SmoothField = SmoothField()
    continuous: Continuous = dataclasses.field(default_factory=_continuous_training)
    sweep: Sweep = Sweep()
    out: Path = Path("runs/compare_solvers")

    @classmethod
    def quick(cls) -> CompareConfig:
        """The README's main job: the digits, a discrete model (800 steps) and a smooth one
        trained in continuous mode (500 steps), then the solver and tolerance sweep (the
        results page gives the measured wall time)."""
        setup = TaskSetup.digits(steps=800)
        return cls(
            name="quick",
            setup=setup,
            smooth_train=dataclasses.replace(setup.train, lr=2e-3, total_steps=500),
        )

    @classmethod
    def full(cls) -> CompareConfig:
        """Longer training of both models (for a faster machine)."""
        setup = TaskSetup.digits(steps=2000)
        return cls(
            name="full",
            setup=setup,
            smooth_train=dataclasses.replace(setup.train, lr=2e-3, total_steps=2000),
        )

    @classmethod
    def smoke(cls) -> CompareConfig:
        """Seconds: a 1-layer width-8 model, 3 steps each, two tolerances (for tests)."""
        setup = TaskSetup.smoke()
        return cls(
            name="smoke",
            setup=setup,
            smooth_train=setup.train,
            continuous=Continuous(diffrax.Euler(), diffrax.ConstantStepSize(), dt0=0.5),
            sweep=Sweep(
                adaptive_solvers=(diffrax.Tsit5(),),
                rtols=(1e-1, 1e-3),
                fixed_solvers=(diffrax.Euler(),),
                fixed_steps=(1, 2),
            ),
        )


def _model_entry(name, trained_with, training, gate, rows) -> dict[str, Any]:
    return {
        "name": name,
        "trained_with": trained_with,
        "training": training,
        "gate": gate_record(gate),
        "evaluation": rows,
    }


def _takeaways(models: list[dict[str, Any]], baseline_passed: bool) -> list[str]:
    """What a user should take from the run, in sentences built from its numbers."""
    if not baseline_passed:
        return [
            "**The baseline did not pass the learning gate: this run shows nothing about the "
            "integrators.**"
        ]
    out = []
    base = models[0]
    rows = base["evaluation"]
    own = next(r for r in rows if r["as_trained"])
    tight = next(r for r in rows if r["tightest"])
    drop = 100 * (own["accuracy"] - tight["accuracy"])
    verdict = (
        f"a model trained at one step size is not an ODE: keep the integrator it was trained "
        f"with (it loses {drop:.1f} points off it)"
        if drop > 2
        else f"here its exact flow does as well ({-drop:+.1f} points), but that is not "
        "guaranteed for a model trained at one step size"
    )
    out.append(
        f"The standard Transformer trained in discrete mode scores {own['accuracy']:.1%} with "
        f"its own step ({own['block_evaluations']:g} block evaluations) and "
        f"{tight['accuracy']:.1%} under the exact flow of the same weights ({tight['method']}, "
        f"{tight['controller']}, {tight['block_evaluations']:.0f} block evaluations): "
        f"{verdict}."
    )
    if len(models) > 1:
        smooth = models[1]
        if not smooth["gate"]["passed"]:
            out.append(
                f"The smooth-field model trained in continuous mode did not pass the learning "
                f"gate ({smooth['gate']['test_accuracy']:.1%} test accuracy): no conclusion "
                "about its tolerance."
            )
            return out
        srows = smooth["evaluation"]
        trained = next(r for r in srows if r["as_trained"])
        stight = next(r for r in srows if r["tightest"])
        cheap = cheapest_within(srows, 1.0)
        solved = [r for r in srows if r["kind"] == "adaptive" and r["success"] == 1.0]
        loosest = max(solved, key=lambda r: (r["rtol"], -r["block_evaluations"]))
        spread = 100 * (max(r["accuracy"] for r in solved) - min(r["accuracy"] for r in solved))
        if spread > 2:
            dial = (
                f"its tolerance moves it along a curve, from {loosest['accuracy']:.1%} at "
                f"{loosest['block_evaluations']:.0f} block evaluations ({loosest['method']}, "
                f"rtol {loosest['rtol']:g}) to {stight['accuracy']:.1%} at "
                f"{stight['block_evaluations']:.0f} (the tightest solve)"
            )
        else:
            dial = (
                f"its accuracy moves by only {spread:.1f} points across the tolerances "
                f"({loosest['block_evaluations']:.0f} to {stight['block_evaluations']:.0f} "
                "block evaluations)"
            )
        ratio = cheap["block_evaluations"] / own["block_evaluations"]
        gap = 100 * (own["accuracy"] - cheap["accuracy"])
        versus = (
            f"{gap:.1f} points below the discrete baseline at {ratio:.1f} times its "
            f"{own['block_evaluations']:g} block evaluations"
            if gap > 0
            else f"{-gap:.1f} points above the discrete baseline at {ratio:.1f} times its "
            f"{own['block_evaluations']:g} block evaluations"
        )
        # Is the model fitted to its training solver's steps? The same solver, looser.
        looser = [
            r
            for r in solved
            if r["method"] == trained["method"]
            and trained["rtol"] is not None
            and r["rtol"] > trained["rtol"]
        ]
        worst = min(looser, key=lambda r: r["accuracy"], default=None)
        fitted = (
            f" (but {worst['method']} at rtol {worst['rtol']:g} only {worst['accuracy']:.1%}: "
            "it is fitted to its training solver's steps)"
            if worst is not None and worst["accuracy"] < trained["accuracy"] - 0.05
            else ""
        )
        out.append(
            f"The smooth-field model trained in continuous mode scores {trained['accuracy']:.1%} "
            f"at its training tolerance ({trained['block_evaluations']:.0f} block "
            f"evaluations){fitted} and {dial}; its cheapest solve within 1 point of the tightest "
            f"({cheap['method']}, {cheap['controller']}: {cheap['accuracy']:.1%}) is "
            f"{versus}."
        )
    return out


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| method | controller | accuracy | agreement with tightest | max logit error "
        "| NFE | block evaluations | time / batch (s) | success |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mark = " (as trained)" if r["as_trained"] else ""
        mark += " (tightest)" if r["tightest"] else ""
        lines.append(
            f"| {r['method']} | {r['controller']}{mark} | {r['accuracy']:.4f} "
            f"| {r['agreement_with_tightest']:.3f} | {r['max_logit_error']:.2e} "
            f"| {r['mean_nfe']:.0f} | {r['block_evaluations']:g} "
            f"| {r['time_per_batch_s']:.3f} | {r['success']:.2f} |"
        )
    return lines


def _markdown(results: dict[str, Any], gate_md: str) -> str:
    setup = results["meta"]["config"]["setup"]
    data = results["data"]
    lines = [*(f"{s}" for s in results["takeaways"]), ""]
    lines += [gate_md, ""]
    lines += [
        f"- data: {data['description']}; {data['num_train']} train / {data['num_test']} test "
        "examples",
        f"- sizes: width {setup['dim']}, {setup['num_heads']} heads, depth "
        f"{setup['num_layers']} (layers of the discrete model); mean pooling, pre-LN; AdamW "
        "with warm-up and cosine decay",
    ]
    for m in results["models"]:
        t = m["training"]
        lines.append(
            f"- **{m['name']}**: trained with {m['trained_with']} for {t['steps']} steps "
            f"(final loss {t['final_loss']:.3f}, {t['time_per_step_s']:.3f} s/step, "
            f"{t['wall_s']:.0f} s); learning gate "
            f"{'passed' if m['gate']['passed'] else 'FAILED'} "
            f"({m['gate']['test_accuracy']:.1%} against {m['gate']['best_rule_accuracy']:.1%} "
            f"for the {m['gate']['best_rule']})"
        )
    lines += [
        "",
        "The whole test split is one batch, one ODE solve: NFE counts its vector-field "
        "evaluations (rejected steps included), block evaluations count one per attention "
        "plus reaction (a parallel-block evaluation is one, a sequential half step one "
        "half). atol = rtol / 10. Agreement and logit error are measured against the "
        "tightest solve of the same weights. Fixed steps divide the whole depth equally; the "
        "sequential model's 8 half layers admit only multiples of 8. Times exclude "
        "compilation.",
        "",
        "![accuracy against NFE](accuracy_vs_nfe.png)",
    ]
    for m in results["models"]:
        lines += ["", f"## {m['name']}", "", *_table(m["evaluation"])]
    return "\n".join(lines) + "\n"


def _plot(results: dict[str, Any], path: Path) -> None:
    plt = report.pyplot(_log)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"adaptive": "-", "fixed": "--"}
    k = 0
    for m in results["models"]:
        rows = m["evaluation"]
        for kind in ("adaptive", "fixed"):
            for method in dict.fromkeys(r["method"] for r in rows if r["kind"] == kind):
                pts = sorted(
                    (r["mean_nfe"], r["accuracy"])
                    for r in rows
                    if r["kind"] == kind and r["method"] == method and r["success"] == 1.0
                )
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True),
                        marker="o",
                        ms=3.5,
                        ls=styles[kind],
                        color=colors[k % len(colors)],
                        label=f"{m['name']}: {method} ({kind})",
                    )
                    k += 1
        own = next(r for r in rows if r["as_trained"])
        ax.scatter(
            own["mean_nfe"],
            own["accuracy"],
            marker="*",
            s=160,
            zorder=4,
            color="k",
        )
    ax.scatter([], [], marker="*", s=90, color="k", label="as trained")
    ax.set_xscale("log")
    ax.set_xlabel("NFE (vector-field evaluations of one solve)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy against compute at inference")
    ax.legend(fontsize=6.5, loc="lower right")
    report.save_figure(fig, path, _log)


def main(config: CompareConfig) -> dict[str, Any]:
    """Train both models, evaluate them under every integrator, write `results.md`,
    `results.json` and `accuracy_vs_nfe.png` into `config.out`.

    **Returns:**

    The results as written to `results.json`.
    """
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    info = report.meta(config)
    setup = config.setup
    _log(f"loading the task ({setup.task}, {config.name})")
    task = setup.load()
    models, gates = [], {}

    model, history, training = train_model(
        setup.model(task), task, Discrete(), setup.train, None, _log
    )
    rows = sweep(model, task.test, config.sweep, _log, as_trained=Discrete())
    own = next(r for r in rows if r["as_trained"])
    gate = gate_of(task, own["accuracy"], history)
    gates["discrete baseline"] = gate
    _log(f"learning gate: {'passed' if gate.passed else 'FAILED'}")
    models.append(_model_entry("discrete baseline", "Discrete()", training, gate, rows))

    if config.with_smooth:
        smooth = setup.model(task, **config.smooth.encoder_kwargs())
        smooth, history, training = train_model(
            smooth, task, config.continuous, config.smooth_train, None, _log
        )
        rows = sweep(smooth, task.test, config.sweep, _log, as_trained=config.continuous)
        own = next(r for r in rows if r["as_trained"])
        sgate = gate_of(task, own["accuracy"], history)
        gates[f"smooth field ({config.smooth.label()})"] = sgate
        name = f"smooth field, continuous-trained: {config.smooth.label()}"
        trained_with = depth_label(config.continuous)
        models.append(_model_entry(name, trained_with, training, sgate, rows))

    baseline_passed = gates["discrete baseline"].passed
    results = {
        "meta": info,
        "data": data_summary(task),
        "gate_passed": baseline_passed,
        "models": models,
        "takeaways": _takeaways(models, baseline_passed),
    }
    results["meta"]["wall_s"] = time.perf_counter() - start
    _plot(results, out / "accuracy_vs_nfe.png")
    title = f"Integrators in depth at inference ({task.name})"
    verdict = gate_verdict({"discrete baseline": gates["discrete baseline"]}, "discrete baseline")
    body = _markdown(results, gate_section(gates))
    report.write(out, results, title, body, verdict=verdict, log=_log)
    return results


PRESETS = {"smoke": CompareConfig.smoke, "quick": CompareConfig.quick, "full": CompareConfig.full}

if __name__ == "__main__":
    _cli.run(PRESETS, main, description=__doc__.split("\n\n")[0])
