"""Pieces shared by the studies (the command line, the record and the outputs are in
`experiments/_cli.py` and `experiments/report.py`):

- a task, a model and its training: `TaskSetup` (the 8x8 digits or nested ListOps, settings
  whose baseline passes the learning gate), and the older `ListOpsSetup`;
- the learning gate of a study's baseline (`gate_of`, `gate_verdict`, `gate_section`);
- the integrators the studies compare (`fixed`, `fixed_steps`, `adaptive`, with the one
  tolerance rule atol = rtol / 10), their labels, compute in block evaluations
  (`blocks_per_evaluation`), and one evaluation row.

The studies import this module as `_common`: `python experiments/studies/<script>.py`
puts `experiments/studies/` on `sys.path`; the tests put it there themselves.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import diffrax
import jax.random as jr
import numpy as np

import pdeformer as pf
import report
from pdeformer import AbstractDepth, Classifier, Continuous
from pdeformer.data import ListOpsConfig, TaskData, load_task
from pdeformer.training import Evaluation, GateResult, TrainConfig, evaluate, train
from pdeformer.training import final_train_loss as _final_train_loss
from pdeformer.training import learning_gate as _learning_gate
from pdeformer.training import task_rules as _task_rules

# ---------------------------------------------------------------------------------------
# A task that passes the learning gate, its model and its training
# ---------------------------------------------------------------------------------------

NESTED_LISTOPS = ListOpsConfig(
    max_depth=3,
    max_args=4,
    min_length=5,
    max_length=25,
    num_train=20_000,
    num_val=1000,
    num_test=2000,
)
"""Nested ListOps that a 2-layer width-64 model learns past the outermost operator on a CPU
in minutes (2,000 steps, batch 64, lr 3e-3: about 55% against the outermost-operator
rule's 21%)."""


@dataclasses.dataclass(frozen=True)
class TaskSetup:
    """A task, the sizes of its model and its training: the study's baseline.

    **Arguments:**

    - `task`: `"image"` (the 8x8 digits stand-in at `image_size`) or `"listops"` (the
      offline generator with `listops`).
    - `dim`, `num_heads`, `num_layers`: model sizes (pre-LN, mean pooling).
    - `train`: the training run.
    - `model_seed`: seed of the initialisation (studies with seeds replace it).
    - `data_seed`: seed of the generator or of the stand-in's split.
    - `image_size`: side of the digits (8: native, 64 tokens).
    - `listops`: the ListOps generator settings.
    """

    task: Literal["image", "listops"]
    dim: int
    num_heads: int
    num_layers: int
    train: TrainConfig
    model_seed: int = 0
    data_seed: int = 0
    image_size: int = 8
    listops: ListOpsConfig = NESTED_LISTOPS

    @classmethod
    def digits(cls, steps: int = 800) -> TaskSetup:
        """The 8x8 digits at their native size (64 tokens; 1259 / 269 / 269 examples), width
        32, 2 heads, 4 layers, batch 32, lr 1e-3 (warm-up 100, cosine decay): about 92% test
        accuracy after 800 steps, 10% for the majority class; half a CPU-minute."""
        return cls(
            task="image",
            dim=32,
            num_heads=2,
            num_layers=4,
            train=TrainConfig(lr=1e-3, total_steps=steps, batch_size=32, progress=False),
        )

    @classmethod
    def nested_listops(cls, steps: int = 2000) -> TaskSetup:
        """Nested ListOps (`NESTED_LISTOPS`), width 64, 4 heads, 2 layers, batch 64, lr
        3e-3: about 55% after 2,000 steps against 21% for the outermost-operator rule."""
        return cls(
            task="listops",
            dim=64,
            num_heads=4,
            num_layers=2,
            train=TrainConfig(lr=3e-3, total_steps=steps, batch_size=64, progress=False),
        )

    @classmethod
    def smoke(cls) -> TaskSetup:
        """The digits, a 1-layer width-8 model and 3 steps: seconds (learns nothing)."""
        return cls(
            task="image",
            dim=8,
            num_heads=2,
            num_layers=1,
            train=TrainConfig(lr=3e-3, warmup_steps=1, total_steps=3, batch_size=8, progress=False),
        )

    def load(self) -> TaskData:
        """The task's data."""
        if self.task == "image":
            return load_task("image", None, seed=self.data_seed, size=self.image_size)
        return load_task("listops", config=self.listops, seed=self.data_seed)

    def model(
        self,
        task: TaskData,
        *,
        seed: int | None = None,
        num_layers: int | None = None,
        **encoder_kwargs,
    ) -> Classifier:
        """A freshly initialised classifier (`seed`: overrides `model_seed`; `num_layers`:
        overrides the setup's; `encoder_kwargs`: e.g. `schedule=`, `composition=`)."""
        return Classifier(
            task.vocab_size,
            self.dim,
            self.num_heads,
            self.num_layers if num_layers is None else num_layers,
            task.num_classes,
            key=jr.PRNGKey(self.model_seed if seed is None else seed),
            **encoder_kwargs,
        )


@dataclasses.dataclass(frozen=True)
class SmoothField:
    """A field that is one smooth piece in depth: a depth schedule of the weights that is
    smooth in `t`, with the parallel composition (attention and reaction at once), so an
    adaptive solver meets no jump and a fixed-step solve may take steps longer than a layer.

    **Arguments:**

    - `schedule`: `"shared"` (one weight set for all depths) or `"polynomial"` (weights a
      polynomial of degree `degree` in `t`).
    - `degree`: the polynomial's degree.
    """

    schedule: Literal["shared", "polynomial"] = "polynomial"
    degree: int = 3

    def __post_init__(self) -> None:
        if self.degree < 0:
            raise ValueError(f"degree must be >= 0; got {self.degree}.")

    def encoder_kwargs(self) -> dict[str, Any]:
        """`schedule=` and `composition=` for `TaskSetup.model` (names mapped to objects
        here, in one place)."""
        if self.schedule == "shared":
            schedule = pf.Shared()
        else:
            schedule = pf.Polynomial(self.degree)
        return {"schedule": schedule, "composition": pf.ParallelBlock()}

    def label(self) -> str:
        """E.g. `Polynomial(2) + ParallelBlock()`."""
        name = "Shared()" if self.schedule == "shared" else f"Polynomial({self.degree})"
        return f"{name} + ParallelBlock()"


# ---------------------------------------------------------------------------------------
# The learning gate of a study's baseline
# ---------------------------------------------------------------------------------------


def gate_of(task: TaskData, test_accuracy: float, history: list[dict[str, Any]]) -> GateResult:
    """The learning gate of a trained baseline: its test accuracy and final training loss
    (mean of the last 50 steps) against the task's trivial rules (`task_rules`)."""
    return _learning_gate(
        task.train,
        task.test,
        test_accuracy,
        _final_train_loss(history),
        rules=_task_rules(task),
    )


def gate_record(gate: GateResult) -> dict[str, Any]:
    """A gate's outcome for `results.json`."""
    return {
        "passed": gate.passed,
        "reason": gate.reason,
        "test_accuracy": gate.test_accuracy,
        "final_train_loss": gate.final_train_loss,
        "best_rule": gate.best_rule.name,
        "best_rule_accuracy": gate.best_rule.test_accuracy,
        "best_rule_conditional_entropy": gate.best_rule.conditional_entropy,
        "rules": [dataclasses.asdict(r) for r in gate.rules],
        "accuracy_margin": gate.accuracy_margin,
        "loss_margin": gate.loss_margin,
    }


def gate_verdict(gates: Mapping[str, GateResult], what: str = "baseline") -> report.Verdict:
    """One verdict for the gates of several runs of a baseline (seeds, tasks): passed only
    if every one passed.

    **Arguments:**

    - `gates`: label (e.g. `"seed 0"`, a task name) -> that run's gate.
    - `what`: what was gated, for the verdict's name.
    """
    if not gates:
        raise ValueError("gate_verdict needs at least one gate.")
    name = f"Learning gate ({what})"
    if len(gates) == 1:
        (gate,) = gates.values()
        return report.Verdict(name, gate.passed, gate.reason.partition(": ")[2])
    failed = [k for k, g in gates.items() if not g.passed]
    accs = [g.test_accuracy for g in gates.values()]
    rule = [g.best_rule.test_accuracy for g in gates.values()]
    losses = [g.final_train_loss for g in gates.values()]
    entropy = [g.best_rule.conditional_entropy for g in gates.values()]
    text = (
        f"test accuracy {min(accs):.1%} to {max(accs):.1%} against {min(rule):.1%} to "
        f"{max(rule):.1%} for the best trivial rule; final training loss {min(losses):.3f} to "
        f"{max(losses):.3f} against its conditional entropy {min(entropy):.3f} to "
        f"{max(entropy):.3f} nats (need 5 points and 0.2 nats)"
    )
    if failed:
        return report.Verdict(
            name, False, f"{', '.join(failed)} failed; {text}. Draw no conclusion from them."
        )
    return report.Verdict(name, True, f"all {len(gates)} passed: {text}.")


def gate_section(gates: Mapping[str, GateResult]) -> str:
    """The gates' Markdown (`GateResult.markdown()`, one per run) for a results page."""
    lines = ["## Learning gate", ""]
    for label, gate in gates.items():
        if len(gates) > 1:
            lines += [f"*{label}*", ""]
        lines += [gate.markdown(), ""]
    lines.append(
        "The baseline must beat the best trivial rule by at least 5 points on the test split, "
        "and its final training loss (mean of the last 50 steps) must lie at least 0.2 nats "
        "below that rule's conditional label entropy (`pdeformer.training.learning_gate`)."
    )
    return "\n".join(lines)


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
        "name": task.name,
        "description": task.description,
        "num_train": len(task.train),
        "num_val": len(task.val),
        "num_test": len(task.test),
        "test_majority_fraction": float(counts.max() / max(counts.sum(), 1)),
    }


# ---------------------------------------------------------------------------------------
# Integrators and evaluation rows
# ---------------------------------------------------------------------------------------


def depth_label(depth: AbstractDepth) -> str:
    """A short name of an integrator (`report.integrator_label`)."""
    return report.integrator_label(depth)


def fixed(solver: diffrax.AbstractSolver, step: float, max_steps: int) -> Continuous:
    """A constant-step solve that reports failure instead of raising."""
    return Continuous(
        solver, diffrax.ConstantStepSize(), dt0=step, max_steps=max_steps, throw=False
    )


def fixed_steps(model: Classifier, solver: diffrax.AbstractSolver, steps: int) -> Continuous | None:
    """A solve of `model`'s field over all its depth in `steps` equal steps, or `None` where
    the field's smooth pieces forbid it (a step must not cross a piece's end: the
    sequential composition's 4 layers have 8 pieces, so it takes 8, 16, ... steps)."""
    field = model.encoder.field
    pieces = field.pieces().count
    if steps < 1 or steps % pieces:
        return None
    return fixed(solver, field.t1 / steps, max_steps=max(steps, 16))


def blocks_per_evaluation(model: Classifier) -> float:
    """Block evaluations (one attention plus one reaction) per vector-field evaluation: 1 for
    the parallel composition, 1/2 for the sequential one (each evaluation is one half)."""
    return 1.0 / model.encoder.field.composition.num_branches


def atol_for(rtol: float) -> float:
    """The one tolerance rule of the library, the CLI and the experiments: atol = rtol / 10."""
    return rtol / 10


def adaptive(solver: diffrax.AbstractSolver, rtol: float, max_steps: int) -> Continuous:
    """An adaptive (PID) solve at `rtol` (atol = rtol / 10) that reports failure instead of
    raising."""
    controller = diffrax.PIDController(rtol=rtol, atol=atol_for(rtol))
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


# ---------------------------------------------------------------------------------------
# One model under many integrators
# ---------------------------------------------------------------------------------------

RTOLS = (1.0, 0.3, 0.1, 3e-2, 1e-2, 1e-3, 1e-4, 1e-6)
"""The tolerances of the sweeps, loosest first."""

FIXED_STEPS = (1, 2, 4, 8, 16)
"""The step counts of the fixed-step solves over the whole depth."""


@dataclasses.dataclass(frozen=True)
class Sweep:
    """The integrators one trained model is evaluated with.

    **Arguments:**

    - `adaptive_solvers`: run with `PIDController(rtol, atol=rtol / 10)` at each of `rtols`;
      the last one at the smallest rtol is the *tightest solve*, the reference of every
      row's agreement and logit error.
    - `rtols`: the tolerances.
    - `fixed_solvers`: run with `steps` equal steps over the whole depth, for each of
      `fixed_steps` the field's pieces allow (`fixed_steps`).
    - `fixed_steps`: the step counts.
    - `max_steps`: the most steps an adaptive solve may take (failures are reported).
    - `eval_batch_size`: test examples per batch, one batch being one ODE solve (`None`: the
      whole test split in one batch, so each row's NFE is that of one solve).
    """

    adaptive_solvers: tuple[diffrax.AbstractSolver, ...] = (diffrax.Bosh3(), diffrax.Tsit5())
    rtols: tuple[float, ...] = RTOLS
    fixed_solvers: tuple[diffrax.AbstractSolver, ...] = (diffrax.Euler(), diffrax.Heun())
    fixed_steps: tuple[int, ...] = FIXED_STEPS
    max_steps: int = 4096
    eval_batch_size: int | None = None

    def __post_init__(self) -> None:
        if not self.adaptive_solvers or not self.rtols or min(self.rtols) <= 0:
            raise ValueError(
                "a sweep needs at least one adaptive solver and positive rtols (the tightest "
                f"solve is its reference); got {self.adaptive_solvers} and {self.rtols}."
            )
        if any(n < 1 for n in self.fixed_steps):
            raise ValueError(f"fixed_steps must be >= 1; got {self.fixed_steps}.")


def sweep(
    model: Classifier,
    split,
    config: Sweep,
    log: Callable[[str], None],
    *,
    as_trained: AbstractDepth | None = None,
) -> list[dict[str, Any]]:
    """Evaluate one model under `Discrete()`, every adaptive solver at every tolerance and
    every fixed-step solve, in that order.

    **Arguments:**

    - `model`: the trained classifier.
    - `split`: the test split.
    - `config`: the integrators.
    - `log`: progress.
    - `as_trained`: the model's training integrator, marked `as_trained` in its row (it is
      evaluated in addition where it is not one of the sweep's own).

    **Returns:**

    Rows with `method`, `controller`, `kind` (`discrete`, `adaptive`, `fixed`), `rtol`,
    `steps`, `accuracy`, `mean_nfe`, `block_evaluations` (NFE times
    `blocks_per_evaluation`), `time_per_batch_s`, `success`, `agreement_with_tightest`
    (fraction of predictions equal to the tightest solve's), `max_logit_error` (largest
    absolute logit difference from it) and `as_trained`.
    """
    bs = len(split) if config.eval_batch_size is None else config.eval_batch_size
    per_eval = blocks_per_evaluation(model)
    runs: list[tuple[str, str, str, float | None, int | None, AbstractDepth, bool]] = [
        ("discrete", "Discrete()", "discrete", None, None, pf.Discrete(), True)
    ]
    for solver in config.adaptive_solvers:
        for rtol in config.rtols:
            runs.append(
                (
                    type(solver).__name__,
                    f"PID rtol={rtol:g}",
                    "adaptive",
                    rtol,
                    None,
                    adaptive(solver, rtol, config.max_steps),
                    # The first tolerance compiles; the others reuse it (tolerances are arrays).
                    rtol == config.rtols[0],
                )
            )
    for solver in config.fixed_solvers:
        for n in config.fixed_steps:
            depth = fixed_steps(model, solver, n)
            if depth is not None:
                name = type(solver).__name__
                label = f"{n} step" if n == 1 else f"{n} steps"
                runs.append((name, label, "fixed", None, n, depth, True))
    trained_label = None if as_trained is None else depth_label(as_trained)
    if as_trained is not None and not any(depth_label(r[5]) == trained_label for r in runs):
        label = f"{trained_label.split(', ', 1)[-1]} (as trained)"
        runs.append(("as trained", label, "as_trained", None, None, as_trained, True))
    rows, logits = [], []
    for method, controller, kind, rtol, steps, depth, warmup in runs:
        log(f"  evaluating: {method}, {controller}")
        ev = evaluate(model, split, depth, bs, warmup=warmup)
        rows.append(
            {
                "method": method,
                "controller": controller,
                "kind": kind,
                "rtol": rtol,
                "atol": None if rtol is None else atol_for(rtol),
                "steps": steps,
                "accuracy": ev.accuracy,
                "mean_nfe": ev.mean_nfe,
                "block_evaluations": ev.mean_nfe * per_eval,
                "time_per_batch_s": ev.time_per_batch,
                "success": ev.success,
                "as_trained": trained_label is not None and depth_label(depth) == trained_label,
            }
        )
        logits.append(ev.logits)
        log(f"    accuracy {ev.accuracy:.4f}, NFE {ev.mean_nfe:g}, success {ev.success:g}")
    tight_method = type(config.adaptive_solvers[-1]).__name__
    tight_rtol = min(config.rtols)
    tightest = next(
        lg
        for lg, r in zip(logits, rows, strict=True)
        if r["method"] == tight_method and r["rtol"] == tight_rtol
    )
    predictions = np.argmax(tightest, axis=-1)
    for row, lg in zip(rows, logits, strict=True):
        row["agreement_with_tightest"] = float(np.mean(np.argmax(lg, axis=-1) == predictions))
        row["max_logit_error"] = float(np.max(np.abs(lg - tightest)))
        row["tightest"] = row["method"] == tight_method and row["rtol"] == tight_rtol
    return rows


def cheapest_within(
    rows: Sequence[Mapping[str, Any]],
    points: float = 1.0,
    *,
    floor: float | None = None,
) -> Mapping[str, Any] | None:
    """The row with the fewest block evaluations whose accuracy is within `points` of the
    tightest solve's, and not below `floor` (an accuracy, a fraction) where given; `None` if
    none is. Failed solves do not count."""
    tight = next(r for r in rows if r["tightest"])
    ok = [
        r
        for r in rows
        if r["success"] == 1.0
        and r["accuracy"] >= tight["accuracy"] - points / 100 - 1e-12
        and (floor is None or r["accuracy"] >= floor - 1e-12)
    ]
    return min(ok, key=lambda r: (r["block_evaluations"], -r["accuracy"]), default=None)
