"""The tolerance trade-off, measured: accuracy against compute at inference, with and
without regularisers of the flow.

On a task whose baseline passes the learning gate (the 8x8 digits by default), for each
seed, three models:

- **discrete baseline**: the standard pre-LN Transformer trained in discrete mode;
- **smooth**: a field that is one smooth piece in depth (`SmoothField`: smooth weights
  with `ParallelBlock()`), trained in continuous mode (adaptive Tsit5 at rtol 1e-2);
- **smooth, regularised**: the same, from the same initialisation and batches, trained
  with regularisers of the flow added to the loss (`Regularisation`: kinetic energy,
  Jacobian Frobenius norm, the solver's error estimates; the presets use the last).

Each is evaluated on the test split with adaptive Bosh3 and Tsit5 at rtol 1 .. 1e-6 and
fixed-step Euler and Heun at 1 .. 16 steps over the whole depth: accuracy (mean and
standard error over seeds), agreement with and largest logit error against the model's
tightest solve, NFE, and block evaluations (one attention plus one reaction: a
parallel-block evaluation counts one, a sequential half step one half). Then:

- `nfe_reduction_from_regularisation`: the smooth model's NFE at the training tolerance over
  the regularised model's;
- `accuracy_change_from_regularisation`: the regularised minus the smooth model's accuracy
  there, in points;
- `depth_compression`: the baseline's block evaluations over the fewest at which the
  regularised model stays within 1 point of its tightest-solve accuracy and within 2
  points of the baseline's accuracy;
- a control: a discrete model with as many layers as that cheapest solve evaluates blocks.

    python experiments/studies/tolerance_tradeoff.py                 # quick: 3 seeds, CPU
    python experiments/studies/tolerance_tradeoff.py --preset full   # more seeds and steps
    python experiments/studies/tolerance_tradeoff.py --preset smoke  # seconds, for tests

Every field of `TradeoffConfig` is a flag (`--help`). Writes `results.md`, `results.json`
and `accuracy_vs_nfe.png` into `--out` (default `runs/tolerance_tradeoff`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: report, _cli

import diffrax  # noqa: E402
import numpy as np  # noqa: E402

import _cli  # noqa: E402
import pdeformer as pf  # noqa: E402
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
from pdeformer.training import TrainConfig, evaluate  # noqa: E402
from report import fmt  # noqa: E402

_log = report.logger("tolerance_tradeoff")

TARGET_NFE_REDUCTION = 2.0
TARGET_ACCURACY_CHANGE = -1.0
TARGET_DEPTH_COMPRESSION = 2.0
"""The targets of issue 26: regularisation at least halves the NFE at the training
tolerance for at most a point of accuracy, and the regularised model needs at most half the
block evaluations of its discrete twin."""


@dataclasses.dataclass(frozen=True)
class Regularisation:
    """The weights of the regularisers of the regularised model (0: left out).

    - `kinetic`: `KineticEnergy`, the integral of `||f||^2` over depth.
    - `jacobian`: `JacobianFrobenius`, of `||df/du||_F^2` (one Hutchinson probe per solve).
    - `error_estimate`: `ErrorEstimate`, the adaptive solver's local error estimates.
    """

    kinetic: float = 0.0
    jacobian: float = 0.0
    error_estimate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("kinetic", "jacobian", "error_estimate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0; got {value}.")

    @property
    def active(self) -> bool:
        """Whether any weight is positive (otherwise there is no regularised model)."""
        return self.kinetic > 0 or self.jacobian > 0 or self.error_estimate > 0

    def regularisers(self) -> tuple[Any, ...]:
        """The regulariser objects (names mapped to objects here, in one place)."""
        out = []
        if self.kinetic > 0:
            out.append(pf.KineticEnergy(self.kinetic))
        if self.jacobian > 0:
            out.append(pf.JacobianFrobenius(self.jacobian))
        if self.error_estimate > 0:
            out.append(pf.ErrorEstimate(self.error_estimate))
        return tuple(out)

    def label(self) -> str:
        """E.g. `KineticEnergy(0.01) + JacobianFrobenius(0.01)`."""
        parts = [
            f"{cls}({w:g})"
            for cls, w in (
                ("KineticEnergy", self.kinetic),
                ("JacobianFrobenius", self.jacobian),
                ("ErrorEstimate", self.error_estimate),
            )
            if w > 0
        ]
        return " + ".join(parts) or "none"


@dataclasses.dataclass(frozen=True)
class TradeoffConfig:
    """Everything the study depends on.

    **Arguments:**

    - `name`: a label for the outputs (`quick`, `full`, `smoke`).
    - `setup`: the task, the model sizes and the discrete baseline's training; its
      `model_seed` is replaced by each seed (initialisation and data order).
    - `seeds`: one set of models per seed.
    - `smooth`: the smooth field of the continuous-trained models (depth
      `setup.num_layers`).
    - `smooth_train`: their training (the data order follows the seed).
    - `train_solver`, `train_rtol`: their training integrator, adaptive with
      `PIDController(rtol, atol=rtol / 10)`; `train_rtol` must be one of `sweep.rtols`
      and `train_solver` one of `sweep.adaptive_solvers` (the training tolerance's row).
    - `regularisation`: the regularised model's weights (all 0: no regularised model).
    - `sweep`: the integrators every model is evaluated with.
    - `control`: train the control (a discrete model with as many layers as the cheapest
      good solve evaluates blocks).
    - `out`: the output directory.
    """

    name: str
    setup: TaskSetup
    seeds: tuple[int, ...]
    smooth_train: TrainConfig
    regularisation: Regularisation
    smooth: SmoothField = SmoothField()
    train_solver: diffrax.AbstractSolver = diffrax.Tsit5()
    train_rtol: float = 1e-2
    sweep: Sweep = Sweep()
    control: bool = True
    out: Path = Path("runs/tolerance_tradeoff")

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("seeds must be non-empty; pass e.g. seeds=(0, 1, 2).")
        if self.train_rtol not in self.sweep.rtols:
            raise ValueError(
                f"train_rtol={self.train_rtol:g} must be one of the sweep's rtols "
                f"{self.sweep.rtols}: the training tolerance's row is compared."
            )
        names = [type(s).__name__ for s in self.sweep.adaptive_solvers]
        if type(self.train_solver).__name__ not in names:
            raise ValueError(
                f"train_solver {type(self.train_solver).__name__} must be one of the sweep's "
                f"adaptive solvers {names}."
            )

    def continuous(self, regularised: bool) -> pf.Continuous:
        """The training integrator of the smooth models."""
        controller = diffrax.PIDController(rtol=self.train_rtol, atol=self.train_rtol / 10)
        if regularised:
            return pf.Continuous(
                self.train_solver,
                controller,
                throw=False,
                regularisers=self.regularisation.regularisers(),
            )
        return pf.Continuous(self.train_solver, controller, throw=False)

    @classmethod
    def quick(cls) -> TradeoffConfig:
        """The digits, 3 seeds, the smooth models 500 steps (the results page gives the
        measured wall time); the regularised model penalises the solver's error estimates.

        Why that regulariser and weight: `KineticEnergy(0.01) + JacobianFrobenius(0.01)`
        (seeds 0 to 2, the run of commit 1d6cbab) cut the NFE at the training tolerance only
        1.08x, and `ErrorEstimate(0.3)` on seeds 3 to 5 (the run of commit a18a564) 1.13x.
        The weight 1 was then picked between one-seed probes of 1 and 3 (seed 0, on the same
        test split; not kept in the repository, so not results): 3 cut the steps to the
        solver's floor and cost about 34 points of accuracy. The study runs it on seeds the
        probes did not see (3 to 5), and its results page is the measurement."""
        setup = TaskSetup.digits(steps=800)
        return cls(
            name="quick",
            setup=setup,
            seeds=(3, 4, 5),
            smooth_train=dataclasses.replace(setup.train, lr=2e-3, total_steps=500),
            regularisation=Regularisation(error_estimate=1.0),
        )

    @classmethod
    def full(cls) -> TradeoffConfig:
        """Five seeds and longer training (for a faster machine)."""
        setup = TaskSetup.digits(steps=2000)
        return cls(
            name="full",
            setup=setup,
            seeds=(0, 1, 2, 3, 4),
            smooth_train=dataclasses.replace(setup.train, lr=2e-3, total_steps=2000),
            regularisation=Regularisation(error_estimate=1.0),
        )

    @classmethod
    def smoke(cls) -> TradeoffConfig:
        """Seconds: a 1-layer width-8 model, 3 steps, one seed, Tsit5 at two tolerances and
        Euler at 1 and 2 steps (for tests)."""
        setup = TaskSetup.smoke()
        return cls(
            name="smoke",
            setup=setup,
            seeds=(0,),
            smooth_train=setup.train,
            regularisation=Regularisation(kinetic=0.01),
            train_rtol=1e-1,
            sweep=Sweep(
                adaptive_solvers=(diffrax.Tsit5(),),
                rtols=(1e-1, 1e-3),
                fixed_solvers=(diffrax.Euler(),),
                fixed_steps=(1, 2),
            ),
        )


def _aggregate(per_seed: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows over seeds (the same integrators in the same order): accuracy mean and standard
    error, the other numbers' means, the logit error's largest value, the worst success."""
    out = []
    for rows in zip(*per_seed, strict=True):
        first = rows[0]
        acc = np.array([r["accuracy"] for r in rows])
        se = float(acc.std(ddof=1) / math.sqrt(acc.size)) if acc.size > 1 else 0.0
        out.append(
            {
                **{k: first[k] for k in ("method", "controller", "kind", "rtol", "atol", "steps")},
                "accuracy": float(acc.mean()),
                "accuracy_se": se,
                "accuracy_per_seed": acc.tolist(),
                "agreement_with_tightest": float(
                    np.mean([r["agreement_with_tightest"] for r in rows])
                ),
                "max_logit_error": float(max(r["max_logit_error"] for r in rows)),
                "mean_nfe": float(np.mean([r["mean_nfe"] for r in rows])),
                "nfe_per_seed": [r["mean_nfe"] for r in rows],
                "block_evaluations": float(np.mean([r["block_evaluations"] for r in rows])),
                "time_per_batch_s": float(np.mean([r["time_per_batch_s"] for r in rows])),
                "success": float(min(r["success"] for r in rows)),
                "as_trained": first["as_trained"],
                "tightest": first["tightest"],
            }
        )
    return out


def _row(rows: list[dict[str, Any]], method: str, rtol: float) -> dict[str, Any]:
    return next(r for r in rows if r["method"] == method and r["rtol"] == rtol)


def _summary(models: dict[str, dict[str, Any]], config: TradeoffConfig) -> dict[str, Any]:
    """The study's numbers: regularisation's effect at the training tolerance, the depth
    compression of each smooth model."""
    method = type(config.train_solver).__name__
    base = models["discrete baseline"]["aggregate"]
    base_own = next(r for r in base if r["as_trained"])
    floor = base_own["accuracy"] - 0.02
    out: dict[str, Any] = {
        "baseline_accuracy": base_own["accuracy"],
        "baseline_block_evaluations": base_own["block_evaluations"],
        "compression": {},
    }
    for name, m in models.items():
        if name == "discrete baseline":
            continue
        cheap = cheapest_within(m["aggregate"], 1.0, floor=floor)
        out["compression"][name] = {
            "cheapest": cheap,
            "depth_compression": (
                None
                if cheap is None
                else base_own["block_evaluations"] / cheap["block_evaluations"]
            ),
        }
    smooth = models.get("smooth")
    reg = models.get("smooth, regularised")
    if smooth is not None and reg is not None:
        per_seed_u = _row(smooth["aggregate"], method, config.train_rtol)
        per_seed_r = _row(reg["aggregate"], method, config.train_rtol)
        nfe_u, nfe_r = np.array(per_seed_u["nfe_per_seed"]), np.array(per_seed_r["nfe_per_seed"])
        acc_u = np.array(per_seed_u["accuracy_per_seed"])
        acc_r = np.array(per_seed_r["accuracy_per_seed"])
        delta = 100 * (acc_r - acc_u)
        out["nfe_reduction_from_regularisation"] = float(nfe_u.mean() / nfe_r.mean())
        out["nfe_reduction_per_seed"] = (nfe_u / nfe_r).tolist()
        out["accuracy_change_from_regularisation"] = float(delta.mean())
        out["accuracy_change_se"] = (
            float(delta.std(ddof=1) / math.sqrt(delta.size)) if delta.size > 1 else 0.0
        )
        out["depth_compression"] = out["compression"]["smooth, regularised"]["depth_compression"]
    else:
        out["nfe_reduction_from_regularisation"] = None
        out["accuracy_change_from_regularisation"] = None
        out["depth_compression"] = None
    return out


def _targets(summary: dict[str, Any], gate_passed: bool) -> list[str]:
    nfe = summary["nfe_reduction_from_regularisation"]
    dacc = summary["accuracy_change_from_regularisation"]
    comp = summary["depth_compression"]
    lines = ["## Summary", ""]
    if not gate_passed:
        lines += [
            "**Not assessed: the discrete baseline failed the learning gate.** The numbers "
            "below are recorded as measured.",
            "",
        ]
    if nfe is None:
        lines.append("- No regularised model in this run: the targets are not tested.")
        return lines
    met = nfe >= TARGET_NFE_REDUCTION and dacc >= TARGET_ACCURACY_CHANGE
    lines.append(
        f"- NFE reduction from regularisation at the training tolerance: {nfe:.2f}x with an "
        f"accuracy change of {dacc:+.1f} ± {summary['accuracy_change_se']:.1f} points "
        f"(target: >= {TARGET_NFE_REDUCTION:g}x with >= {TARGET_ACCURACY_CHANGE:+g} point): "
        f"**{'met' if met else 'missed'}**."
    )
    if comp is None:
        lines.append(
            "- Depth compression: **missed**: no solve of the regularised model stays within 1 "
            "point of its tightest solve and within 2 points of the discrete baseline."
        )
    else:
        lines.append(
            f"- Depth compression: {comp:.2f} (target >= {TARGET_DEPTH_COMPRESSION:g}): "
            f"**{'met' if comp >= TARGET_DEPTH_COMPRESSION else 'missed'}**."
        )
    return lines


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| method | controller | accuracy ± s.e. | agreement with tightest | max logit error "
        "| NFE | block evaluations | success |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mark = " (as trained)" if r["as_trained"] else ""
        mark += " (tightest)" if r["tightest"] else ""
        lines.append(
            f"| {r['method']} | {r['controller']}{mark} "
            f"| {100 * r['accuracy']:.1f} ± {100 * r['accuracy_se']:.1f} "
            f"| {r['agreement_with_tightest']:.3f} | {r['max_logit_error']:.2e} "
            f"| {r['mean_nfe']:.1f} | {r['block_evaluations']:.1f} | {r['success']:.2f} |"
        )
    return lines


def _markdown(results: dict[str, Any], gate_md: str) -> str:
    cfg = results["meta"]["config"]
    setup = cfg["setup"]
    data = results["data"]
    summary = results["summary"]
    lines = [*_targets(summary, results["gate_passed"]), ""]
    for name, c in summary["compression"].items():
        cheap = c["cheapest"]
        if cheap is None:
            tight = next(r for r in results["models"][name]["aggregate"] if r["tightest"])
            lines.append(
                f"- {name}: no solve stays within 1 point of its tightest "
                f"({100 * tight['accuracy']:.1f}% at {tight['block_evaluations']:.1f} block "
                f"evaluations) and within 2 points of the baseline "
                f"({100 * summary['baseline_accuracy']:.1f}% at "
                f"{summary['baseline_block_evaluations']:g})."
            )
        else:
            lines.append(
                f"- {name}: cheapest solve within 1 point of its tightest and 2 points of the "
                f"baseline ({100 * summary['baseline_accuracy']:.1f}% at "
                f"{summary['baseline_block_evaluations']:g} block evaluations): "
                f"{cheap['method']} {cheap['controller']}, {100 * cheap['accuracy']:.1f}% at "
                f"{cheap['block_evaluations']:.1f} block evaluations (compression "
                f"{c['depth_compression']:.2f})."
            )
    control = results.get("control")
    if control is not None:
        layers = control["num_layers"]
        verdict = control["verdict"] if results["gate_passed"] else "(not assessed)."
        lines.append(
            f"- Control: a discrete model with {layers} layer{'s' if layers > 1 else ''} "
            f"({control['note']}) scores {100 * control['accuracy']:.1f} ± "
            f"{100 * control['accuracy_se']:.1f}% against "
            f"{100 * control['compressed_accuracy']:.1f}% for the {control['model']} model's "
            f"cheapest good solve: {verdict}"
        )
    lines += ["", gate_md, ""]
    lines += [
        f"- data: {data['description']}; {data['num_train']} train / {data['num_test']} test "
        "examples",
        f"- sizes: width {setup['dim']}, {setup['num_heads']} heads, depth "
        f"{setup['num_layers']}; seeds {cfg['seeds']} (initialisation and data order; the two "
        "smooth models of a seed start from the same weights and see the same batches)",
    ]
    for m in results["models"].values():
        t = m["training"]
        passed = sum(g["passed"] for g in m["gates"].values())
        lines.append(
            f"- **{m['name']}**: {m['trained_with']}; {t['steps']} steps, final loss "
            f"{fmt(t['final_loss'])} (mean over seeds), {fmt(t['time_per_step_s'])} s/step, "
            f"{fmt(t['wall_s'])} s per seed; its own learning gate passed on {passed} of "
            f"{len(m['gates'])} seeds"
        )
    lines += [
        "",
        "Accuracy in %, mean ± standard error over seeds. The whole test split is one batch, "
        "one ODE solve: NFE counts its vector-field evaluations (rejected steps included), "
        "mean over seeds; block evaluations count one per attention plus reaction (a "
        "parallel-block evaluation is one, a sequential half step one half). atol = rtol / "
        "10. Agreement (mean over seeds) and the largest logit error (largest over seeds) are "
        "against each model's tightest solve. Fixed steps divide the whole depth equally; the "
        "sequential baseline's half layers admit only multiples of their number.",
        "",
        "![accuracy against NFE](accuracy_vs_nfe.png)",
    ]
    for m in results["models"].values():
        lines += ["", f"## {m['name']}", "", *_table(m["aggregate"])]
    return "\n".join(lines) + "\n"


def _plot(results: dict[str, Any], path: Path) -> None:
    plt = report.pyplot(_log)
    if plt is None:
        return
    models = list(results["models"].values())
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4.2), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, m in zip(axes, models, strict=True):
        rows = m["aggregate"]
        for kind, ls in (("adaptive", "-"), ("fixed", "--")):
            for method in dict.fromkeys(r["method"] for r in rows if r["kind"] == kind):
                pts = sorted(
                    (r["mean_nfe"], r["accuracy"], r["accuracy_se"])
                    for r in rows
                    if r["kind"] == kind and r["method"] == method and r["success"] == 1.0
                )
                if pts:
                    x, y, e = zip(*pts, strict=True)
                    ax.errorbar(
                        x, y, yerr=e, marker="o", ms=3, ls=ls, capsize=2, label=f"{method} ({kind})"
                    )
        own = next(r for r in rows if r["as_trained"])
        ax.scatter(
            own["mean_nfe"],
            own["accuracy"],
            marker="*",
            s=150,
            color="k",
            zorder=4,
            label="as trained",
        )
        ax.set_xscale("log")
        ax.set_xlabel("NFE")
        ax.set_title(m["name"], fontsize=9)
        ax.legend(fontsize=6.5, loc="lower right")
    axes[0].set_ylabel("test accuracy (mean ± s.e. over seeds)")
    fig.suptitle("Accuracy against NFE at inference", fontsize=10)
    report.save_figure(fig, path, _log)


def _control(
    task, config: TradeoffConfig, name: str, cheap: dict[str, Any], base_rows
) -> dict[str, Any]:
    """A discrete model with as many layers as the cheapest good solve evaluates blocks."""
    layers = max(1, math.ceil(cheap["block_evaluations"] - 1e-9))
    setup = config.setup
    if layers >= setup.num_layers:
        base = next(r for r in base_rows if r["as_trained"])
        accs = np.array(base["accuracy_per_seed"])
        note = "the baseline itself (the compressed solve evaluates as many blocks)"
    else:
        accs = []
        for seed in config.seeds:
            train_config = dataclasses.replace(setup.train, seed=seed)
            model = setup.model(task, seed=seed, num_layers=layers)
            model, _, _ = train_model(model, task, pf.Discrete(), train_config, None, _log)
            accs.append(evaluate(model, task.test, pf.Discrete(), len(task.test)).accuracy)
        accs = np.array(accs)
        note = "trained like the baseline"
    se = float(accs.std(ddof=1) / math.sqrt(accs.size)) if accs.size > 1 else 0.0
    as_well = accs.mean() >= cheap["accuracy"] - 0.01
    verdict = (
        "**the control does as well** (within 1 point or better): at this size, continuous "
        "depth buys nothing a shallower discrete model does not."
        if as_well
        else "the control does worse by more than 1 point."
    )
    return {
        "model": name,
        "num_layers": layers,
        "block_evaluations": float(layers),
        "accuracy": float(accs.mean()),
        "accuracy_se": se,
        "accuracy_per_seed": accs.tolist(),
        "compressed_accuracy": cheap["accuracy"],
        "does_as_well": bool(as_well),
        "note": note,
        "verdict": verdict,
    }


def main(config: TradeoffConfig) -> dict[str, Any]:
    """Train the models of every seed, sweep the integrators, write `results.md`,
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
    arms = [("discrete baseline", None), ("smooth", False)]
    if config.regularisation.active:
        arms.append(("smooth, regularised", True))
    per_seed: dict[str, list] = {name: [] for name, _ in arms}
    trainings: dict[str, list] = {name: [] for name, _ in arms}
    gates: dict[str, dict[str, Any]] = {name: {} for name, _ in arms}
    for seed in config.seeds:
        for name, regularised in arms:
            _log(f"seed {seed}: {name}")
            if regularised is None:
                model = setup.model(task, seed=seed)
                depth, as_trained = pf.Discrete(), pf.Discrete()
                train_config = dataclasses.replace(setup.train, seed=seed)
            else:
                model = setup.model(task, seed=seed, **config.smooth.encoder_kwargs())
                depth = config.continuous(regularised)
                as_trained = config.continuous(False)
                train_config = dataclasses.replace(config.smooth_train, seed=seed)
            model, history, training = train_model(model, task, depth, train_config, None, _log)
            rows = sweep(model, task.test, config.sweep, _log, as_trained=as_trained)
            own = next(r for r in rows if r["as_trained"])
            gates[name][f"seed {seed}"] = gate_of(task, own["accuracy"], history)
            per_seed[name].append(rows)
            trainings[name].append(training)
    models: dict[str, dict[str, Any]] = {}
    for name, regularised in arms:
        if regularised is None:
            trained_with = "Discrete()"
        else:
            trained_with = f"{config.smooth.label()}, {depth_label(config.continuous(False))}"
            if regularised:
                trained_with += f", regularisers {config.regularisation.label()}"
        ts = trainings[name]
        models[name] = {
            "name": name,
            "trained_with": trained_with,
            "training": {
                "steps": ts[0]["steps"],
                "final_loss": float(np.mean([t["final_loss"] for t in ts])),
                "time_per_step_s": float(np.mean([t["time_per_step_s"] for t in ts])),
                "wall_s": float(np.mean([t["wall_s"] for t in ts])),
                "per_seed": ts,
            },
            "gates": {k: gate_record(g) for k, g in gates[name].items()},
            "aggregate": _aggregate(per_seed[name]),
            "per_seed": per_seed[name],
        }
    summary = _summary(models, config)
    base_gates = gates["discrete baseline"]
    gate_passed = all(g.passed for g in base_gates.values())
    results: dict[str, Any] = {
        "meta": info,
        "data": data_summary(task),
        "gate_passed": gate_passed,
        "seeds": list(config.seeds),
        "nfe_reduction_from_regularisation": summary["nfe_reduction_from_regularisation"],
        "accuracy_change_from_regularisation": summary["accuracy_change_from_regularisation"],
        "depth_compression": summary["depth_compression"],
        "summary": summary,
        "models": models,
    }
    compressed = "smooth, regularised" if config.regularisation.active else "smooth"
    cheap = summary["compression"][compressed]["cheapest"]
    results["control"] = None
    if config.control and cheap is not None:
        _log(f"control: a discrete model of {math.ceil(cheap['block_evaluations'] - 1e-9)} layers")
        base_rows = models["discrete baseline"]["aggregate"]
        results["control"] = _control(task, config, compressed, cheap, base_rows)
    results["meta"]["wall_s"] = time.perf_counter() - start
    _plot(results, out / "accuracy_vs_nfe.png")
    title = f"The tolerance trade-off, with and without regularisers ({task.name})"
    verdict = gate_verdict(base_gates, "discrete baseline, every seed")
    body = _markdown(results, gate_section(base_gates))
    report.write(out, results, title, body, verdict=verdict, log=_log)
    return results


PRESETS = {
    "smoke": TradeoffConfig.smoke,
    "quick": TradeoffConfig.quick,
    "full": TradeoffConfig.full,
}

if __name__ == "__main__":
    _cli.run(PRESETS, main, description=__doc__.split("\n\n")[0])
