"""Pieces shared by the studies (the command line, the record and the outputs are in
`experiments/_cli.py` and `experiments/report.py`):

- a small ListOps classifier: the task, the model and its training (`ListOpsSetup`);
- the integrators the studies compare (`fixed`, `adaptive`, with the one tolerance rule
  atol = rtol / 10), their labels, and one evaluation row.

The studies import this module as `_common`: `python experiments/studies/<script>.py`
puts `experiments/studies/` on `sys.path`; the tests put it there themselves.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffrax
import jax.random as jr
import numpy as np

import report
from pdeformer import AbstractDepth, Classifier, Continuous
from pdeformer.data import ListOpsConfig, TaskData, load_task
from pdeformer.training import Evaluation, TrainConfig, train

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


def depth_label(depth: AbstractDepth) -> str:
    """A short name of an integrator (`report.integrator_label`)."""
    return report.integrator_label(depth)


def fixed(solver: diffrax.AbstractSolver, step: float, max_steps: int) -> Continuous:
    """A constant-step solve that reports failure instead of raising."""
    return Continuous(
        solver, diffrax.ConstantStepSize(), dt0=step, max_steps=max_steps, throw=False
    )


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
