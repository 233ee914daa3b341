"""The diffusion layer's placement study: baseline vs diffusion layers at insertion points.

For every task (the offline tasks by default; the official data with `--data-dir`), train
the baseline Transformer and the same Transformer with one diffusion layer at an insertion
point, over several seeds, all in discrete mode (the papers' setting). Every arm of one seed
starts from the baseline's initialisation (adding a layer leaves the other weights
unchanged: the layers' keys are folded from the model key by insertion point) and sees the
same batches in the same order, so the unit of analysis is the per-seed paired difference
`arm − baseline`: its mean, 95% t-interval and Holm-corrected p-value across the arms of a
task (`_stats.py`), for the final test accuracy and for the mean validation accuracy over
the learning curve (validation every `train.eval_every` steps), which tells faster
learning from a better final model. The learned coefficients per scale are recorded.

Also recorded, for the trained baseline: the roughness of the signal at each point
(`pdeformer.diagnostics.roughness_at_points`) and the diffusion–attention commutator of
its first layer, the quantities the placement argument is about.

Writes `results.md`, `results.json`, `placement.png` and `curves.png` into `--out`
(default `runs/lra_placement/`). `results.json` carries a `replication` list, one entry per
claim of paper A this run measures, that the site's replication table
(`docs/hooks/replication.py`) shows on the theory page.

Run: `python experiments/studies/lra_placement.py [--preset smoke|quick|full] [--out DIR]
[--tasks listops text ...] [--data-dir DIR] [--seeds 0 1 ...] [--baseline-only]
[--steps N]` (every field of `Config` is a flag; `--help`).
The quick preset (the default) runs three CPU-sized tasks whose baselines pass the learning
gate, each with its own model and budget (`Config.quick`; the script prints its time
estimate); `--preset full` studies all five with the LRA
Transformer's per-task configurations (`lra.TASKS`) on the official data of `--data-dir`
(offline stand-ins only with `--allow-stand-in`, and then labelled so), and `--dry-run`
prints the runs' parameter counts, FLOPs and GPU hours as JSON without training
(`lra.dry_run`; see docs/howto/lra-full-runs.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: report, _cli

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402

import _cli  # noqa: E402
import _common as common  # noqa: E402
import _stats as stats  # noqa: E402
import lra  # noqa: E402
import pdeformer as pf  # noqa: E402
import report  # noqa: E402
from pdeformer.data import load_task  # noqa: E402
from pdeformer.diagnostics import model_commutator, roughness_at_points  # noqa: E402
from pdeformer.training import TrainConfig, evaluate, final_train_loss, train  # noqa: E402

SCALES = {"single": (1,), "multi": (1, 2, 4, 8)}
OFFLINE_TASKS = ("listops", "text", "retrieval", "image", "pathfinder")

ALPHA = 0.05
"""Family-wise error rate of each task's family of arms (Holm): a change is *resolved* when
its Holm-adjusted p-value is at most this."""


@dataclasses.dataclass(frozen=True)
class Arm:
    """One diffusion arm: a layer variant at one insertion point.

    Every variant is built as `layer(dim, dilations=dilations, key=..., dtype=...)` with the
    library's initial total coefficient (`init=0.1`, split evenly over the dilations), so
    single-scale, multi-scale and token-adaptive layers start with the same total
    coefficient `sum_s alpha_s = 0.1` under the same budget `alpha_max = 0.45`
    (`tests/test_diffusion_layer.py` checks it).

    **Arguments:**

    - `point`: the insertion point (`pf.INSERTION_POINTS`).
    - `scale`: the variant's label, e.g. `single`, `multi`, `adaptive`.
    - `dilations`: the stencil reaches.
    - `layer`: `pf.DiffusionLayer` (constant coefficients per channel) or
      `pf.AdaptiveDiffusionLayer` (token-adaptive conductances).
    """

    point: str
    scale: str
    dilations: tuple[int, ...] = (1,)
    layer: type[eqx.Module] = pf.DiffusionLayer

    def __post_init__(self) -> None:
        if self.point not in pf.INSERTION_POINTS:
            raise ValueError(
                f"unknown insertion point {self.point!r}; pass one of {pf.INSERTION_POINTS}."
            )

    @property
    def name(self) -> str:
        """E.g. `after_embedding (single)`."""
        return f"{self.point} ({self.scale})"

    def factory(self) -> pf.DiffusionFactory:
        """The layers' constructor for `Classifier(diffusion_layer=...)`."""
        return functools.partial(self.layer, dilations=self.dilations)


QUICK_ARMS = (
    Arm("after_embedding", "single", SCALES["single"]),
    Arm("after_embedding", "multi", SCALES["multi"]),
    Arm("after_embedding", "adaptive", SCALES["single"], pf.AdaptiveDiffusionLayer),
    Arm("before_norm", "single", SCALES["single"]),
    Arm("after_attention", "single", SCALES["single"]),
    Arm("after_attention", "multi", SCALES["multi"]),
)
"""The quick preset's arms: the paper's best point in three variants, its worst in two, and
the early branch point that did best in the first quick study."""


@dataclasses.dataclass(frozen=True)
class TaskPlan:
    """A task of the study with its own generator settings, model and training.

    **Arguments:**

    - `task`: the `load_task` name.
    - `options`: `load_task` options (the offline generator's settings).
    - `dim`, `num_heads`, `num_layers`: model sizes.
    - `train`: the training run of every arm (`eval_every` gives the learning curve).
    - `control`: a task where token locality should not matter; it enters no claim.
    - `note`: what the settings are and what a probe found, for the page.
    - `run_s`: measured seconds of one training run on two cores, for the time estimate
      (`None`: unknown).
    """

    task: str
    options: dict[str, Any]
    dim: int
    num_heads: int
    num_layers: int
    train: TrainConfig
    control: bool = False
    note: str = ""
    run_s: float | None = None

    def __post_init__(self) -> None:
        if self.task not in OFFLINE_TASKS + ("pathx",):
            raise ValueError(
                f"unknown task {self.task!r} in a TaskPlan; pass one of "
                f"{OFFLINE_TASKS + ('pathx',)}."
            )


def _with_steps(train_config: TrainConfig, steps: int | None) -> TrainConfig:
    if steps is None:
        return train_config
    # A tenth of the run, at least one step for rsqrt, and below the run for cosine.
    warmup = max(1, steps // 10)
    if train_config.schedule == "cosine":
        warmup = min(warmup, steps - 1)
    return dataclasses.replace(train_config, total_steps=steps, warmup_steps=warmup)


NESTED_LISTOPS_QUICK = dict(
    max_depth=3,
    max_args=3,
    min_length=5,
    max_length=20,
    num_train=20_000,
    num_val=500,
    num_test=2000,
)
"""Nested ListOps a 2-layer width-32 model learns past the outermost-operator rule in 800
steps. Probes (2 cores, batch 32, lr 3e-3, seed 0; test accuracy against the
outermost-operator rule): depth 3, 4 arguments, lengths 5-25, 1,000 steps: 46.9% vs
20.6% (25 s); depth 3, 3 arguments, lengths 5-20, 1,000 steps: 49.0% vs 18.6% (25 s); the
same at width 64 and batch 64, 800 steps: 51.7% vs 18.6% (31 s). The LRA-like quick
setting (depth 4, lengths 30-80, 300 steps) scored what the rule scores."""

FLAT_LISTOPS = dict(
    max_depth=2,
    max_args=10,
    min_length=3,
    max_length=13,
    num_train=20_000,
    num_val=500,
    num_test=2000,
)
"""The control: one operator over 2 to 10 digits (4 to 12 tokens). The answer is a function
of the multiset of digits, so where a digit sits, and hence local smoothing, should not
matter. Probe (width 32, 2 layers, batch 32, lr 3e-3, 800 steps, 18 s on 2 cores): 73.2%
against 34.0% for the outermost-operator rule."""


def _offline_options(size: str) -> dict[str, dict[str, Any]]:
    """Generator settings per task: short sequences for the CPU modes."""
    if size == "full":
        n = dict(num_train=20_000, num_val=1000, num_test=1000)
        return {
            "listops": dict(max_depth=8, min_length=100, max_length=500, **n),
            "text": dict(min_length=1000, max_length=1000, **n),
            "retrieval": dict(min_length=1000, max_length=1000, **n),
            "image": dict(size=32),
            "pathfinder": dict(resolution=32, num_train=20_000, num_val=1000, num_test=1000),
        }
    if size == "smoke":
        n = dict(num_train=64, num_val=8, num_test=16)
        return {
            "listops": dict(max_depth=3, min_length=5, max_length=20, **n),
            "text": dict(min_length=80, max_length=80, **n),
            "retrieval": dict(min_length=16, max_length=24, **n),
            "image": dict(size=8),
            "pathfinder": dict(
                resolution=12, contour_length=3, seed_distance=4.0, num_distractors=1, **n
            ),
        }
    n = dict(num_train=3000, num_val=128, num_test=256)
    return {
        "listops": dict(max_depth=4, min_length=30, max_length=80, **n),
        "text": dict(min_length=96, max_length=128, **n),
        "retrieval": dict(min_length=48, max_length=64, **n),
        # The digits at their native 8x8: 64 tokens, a quarter of the 16x16 cost.
        "image": dict(size=8),
        "pathfinder": dict(
            resolution=16, contour_length=6, seed_distance=5.0, num_distractors=2, **n
        ),
    }


@dataclasses.dataclass(frozen=True)
class Config:
    """One placement study.

    - `tasks`: task names; `options`: `load_task` options per task (offline generators).
    - `seeds`: model seeds (the data order follows the seed too).
    - `dim`, `num_heads`, `num_layers`: model sizes.
    - `train`: the training run of every arm.
    - `points`: the insertion points compared with the baseline.
    - `scales`: layer variants, name -> dilations.
    - `eval_batch_size`: batch size of the test evaluation.
    - `data_dir`: read the official LRA data from here instead of generating tasks.
    - `baseline_only`: train the baseline arm only (does this budget learn the task?).
    - `steps`: training steps of every arm, warm-up a tenth of them (`None`: `train`'s).
    - `out`: the output directory.
    - `plans`: per-task generator, model and training (`TaskPlan`), by the task's label in
      `tasks`; a task without a plan uses `options`, `dim`, `num_heads`, `num_layers` and
      `train`.
    - `arms`: the diffusion arms (`Arm`); empty: every point of `points` at every scale of
      `scales`.
    - `lra_configs`: use the LRA Transformer's configuration of each task (`lra.TASKS`: sizes,
      dropout, pooling, MLP head, batch, schedule; `dim`, `num_heads`, `num_layers`,
      `train` and `plans` are then unused, and `steps` keeps LRA's warm-up); needs `data_dir` unless
      `allow_stand_in`, and arms of `pf.DiffusionLayer` only.
    - `allow_stand_in`: with `lra_configs`, train on the offline stand-ins (`options`) when no
      `data_dir` is given; the results say so.
    - `max_length`: with `lra_configs`, cut inputs to this length instead of LRA's (a CPU check).
    - `dry_run`: print `lra.dry_run`'s JSON for these tasks and arms and stop.
    - `mfu`, `peak_tflops`: the dry run's assumed utilisation and peak per GPU.
    """

    tasks: tuple[str, ...]
    options: dict[str, dict[str, Any]]
    seeds: tuple[int, ...]
    dim: int
    num_heads: int
    num_layers: int
    train: TrainConfig
    points: tuple[str, ...] = pf.INSERTION_POINTS
    scales: tuple[tuple[str, tuple[int, ...]], ...] = tuple(SCALES.items())
    eval_batch_size: int = 128
    data_dir: str | None = None
    baseline_only: bool = False
    steps: int | None = None
    out: Path = Path("runs/lra_placement")
    plans: dict[str, TaskPlan] = dataclasses.field(default_factory=dict)
    arms: tuple[Arm, ...] = ()
    lra_configs: bool = False
    allow_stand_in: bool = False
    max_length: int | None = None
    dry_run: bool = False
    mfu: float = lra.DEFAULT_MFU
    peak_tflops: float = lra.H100_BF16_DENSE_TFLOPS

    def __post_init__(self) -> None:
        unknown = set(self.tasks) - set(OFFLINE_TASKS) - {"pathx"} - set(self.plans)
        if unknown:
            raise ValueError(
                f"unknown tasks {sorted(unknown)}; pass some of "
                f"{OFFLINE_TASKS + ('pathx',) + tuple(self.plans)}."
            )
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 or None; got {self.steps}.")
        if len({a.name for a in self.arms}) != len(self.arms):
            raise ValueError(f"arms must have distinct names; got {[a.name for a in self.arms]}.")

    def lra_task(self, name: str) -> lra.LraTask:
        """The LRA configuration of a task (by its name, or a loaded task's `name` such as
        `pathfinder_generated`), with `max_length` applied."""
        config = lra.TASKS[name.split("_")[0]]
        if self.max_length is not None:
            config = dataclasses.replace(config, max_length=self.max_length)
        return config

    def training(self, task=None) -> TrainConfig:
        """The training run of every arm (`train` with `steps` applied); with `lra_configs`,
        that of `task`'s (a `TaskData`, or a task name) LRA configuration."""
        if self.lra_configs and task is not None:
            name = task if isinstance(task, str) else task.name
            return self.lra_task(name).train_config(self.steps, self.train.seed)
        return _with_steps(self.train, self.steps)

    def plan(self, name: str) -> TaskPlan:
        """The task `name`'s plan, with `steps` applied (the config's own settings where it
        has no plan; with `lra_configs`, the task's LRA sizes and training)."""
        if self.lra_configs:
            c = self.lra_task(name)
            return TaskPlan(
                name,
                dict(self.options.get(name, {})),
                c.dim,
                c.num_heads,
                c.num_layers,
                self.training(name),
            )
        plan = self.plans.get(name)
        if plan is None:
            return TaskPlan(
                name,
                dict(self.options.get(name, {})),
                self.dim,
                self.num_heads,
                self.num_layers,
                self.training(),
            )
        return dataclasses.replace(plan, train=_with_steps(plan.train, self.steps))

    @classmethod
    def quick(cls) -> Config:
        """Three CPU-sized tasks whose baselines pass the learning gate, each with its own
        model and budget, the six `QUICK_ARMS` and the baseline, 8 paired seeds, validation
        every 100 steps (the script prints its time estimate).

        - `image`: the 8x8 digits at their native size (64 tokens), 4 layers, width 32, lr
          1e-3, 700 steps: 89% test accuracy in a probe, 10% for the majority class.
        - `listops`: shallow nested ListOps (`NESTED_LISTOPS_QUICK`), 2 layers, width 32, lr
          3e-3, 800 steps: about 45-49% against 19% for the outermost-operator rule.
        - `listops_flat`: the control (`FLAT_LISTOPS`): 73% against 34%.

        The LRA-like offline tasks at CPU sizes (text, retrieval, pathfinder, and ListOps
        at depth 4 and lengths 30-80) stay at their trivial rules in such budgets, and a
        task the baseline does not learn cannot show a placement effect. `--preset full`
        runs all five at GPU sizes.
        """
        digits = common.TaskSetup.digits(700)
        listops_train = TrainConfig(
            lr=3e-3,
            warmup_steps=80,
            total_steps=800,
            batch_size=32,
            eval_every=100,
            eval_batch_size=250,
            progress=False,
        )
        plans = {
            "image": TaskPlan(
                "image",
                dict(size=8),
                digits.dim,
                digits.num_heads,
                digits.num_layers,
                dataclasses.replace(
                    digits.train, warmup_steps=70, eval_every=100, eval_batch_size=269
                ),
                note="the 8x8 digits stand-in at its native size (64 tokens)",
                run_s=21.0,
            ),
            "listops": TaskPlan(
                "listops",
                NESTED_LISTOPS_QUICK,
                32,
                2,
                2,
                listops_train,
                note="nested ListOps, depth <= 3, <= 3 arguments, 6-19 tokens",
                run_s=20.0,
            ),
            "listops_flat": TaskPlan(
                "listops",
                FLAT_LISTOPS,
                32,
                2,
                2,
                listops_train,
                control=True,
                note="control: flat ListOps, one operator over 2-10 digits (4-12 tokens)",
                run_s=18.0,
            ),
        }
        return cls(
            tasks=tuple(plans),
            options=_offline_options("quick"),
            seeds=tuple(range(8)),
            dim=32,
            num_heads=2,
            num_layers=2,
            train=listops_train,
            eval_batch_size=256,
            plans=plans,
            arms=QUICK_ARMS,
        )

    @classmethod
    def full(cls) -> Config:
        """The five LRA tasks with the LRA Transformer's per-task configurations
        (`lra.TASKS`), 3 seeds, on the official data of `--data-dir`: for a GPU.

        Without `--data-dir` it refuses to run unless `--allow-stand-in` (then the
        offline tasks at LRA-like lengths, labelled stand-in); `--dry-run` prices it.
        """
        return cls(
            tasks=OFFLINE_TASKS,
            options=_offline_options("full"),
            seeds=(0, 1, 2),
            dim=128,
            num_heads=4,
            num_layers=4,
            train=TrainConfig(
                lr=1e-3, warmup_steps=500, total_steps=5000, batch_size=32, progress=False
            ),
            eval_batch_size=32,
            lra_configs=True,
        )

    @classmethod
    def smoke(cls) -> Config:
        """A tiny dual-input task and a tiny control, 2 steps, 2 seeds, 3 arms: seconds of
        training (a minute or two of compilation)."""
        tiny = TrainConfig(
            lr=3e-3, warmup_steps=1, total_steps=2, batch_size=8, eval_every=1, progress=False
        )
        flat = dict(FLAT_LISTOPS, num_train=64, num_val=8, num_test=16)
        return cls(
            tasks=("retrieval", "flat"),
            options=_offline_options("smoke"),
            seeds=(0, 1),
            dim=16,
            num_heads=2,
            num_layers=2,
            train=tiny,
            eval_batch_size=16,
            plans={"flat": TaskPlan("listops", flat, 8, 2, 2, tiny, control=True, run_s=1.0)},
            arms=(
                Arm("after_embedding", "multi", (1, 2)),
                Arm("after_embedding", "adaptive", (1,), pf.AdaptiveDiffusionLayer),
                Arm("between_layers", "multi", (1, 2)),
            ),
        )


def _model(task, plan: TaskPlan, seed: int, arm: Arm | None, lra_config=None):
    """The baseline classifier (`arm=None`) or the same classifier with the arm's diffusion
    layer at its point: of `plan`'s sizes, or with `lra_config` (an `lra.LraTask`), that
    configuration's model (dropout, pooling, MLP head; `pf.DiffusionLayer` arms only).

    The layers' keys are folded from the model key by insertion point, so adding a layer
    leaves every other weight as it is: every arm of a seed starts from the baseline's
    Transformer weights. (Switching the other points off inside one shared structure would
    compile once per scale instead of once per arm, but the switched-off layers still cost
    their compute on every step, which at the quick sizes outweighs the compiles; the seeds
    of an arm share one compile.)
    """
    if lra_config is not None:
        splits = (task.train, task.val, task.test)
        return lra_config.model(
            key=jr.PRNGKey(seed),
            vocab_size=task.vocab_size,
            num_classes=task.num_classes,
            max_len=max(int(s.tokens.shape[1]) for s in splits),
            diffusion_at=() if arm is None else (arm.point,),
            dilations=(1,) if arm is None else arm.dilations,
        )
    cls = pf.DualClassifier if task.dual else pf.Classifier
    return cls(
        task.vocab_size,
        plan.dim,
        plan.num_heads,
        plan.num_layers,
        task.num_classes,
        key=jr.PRNGKey(seed),
        diffusion_at=() if arm is None else (arm.point,),
        diffusion_layer=pf.DiffusionLayer if arm is None else arm.factory(),
    )


def _layer(model, point: str):
    encoder = model.encoder
    if point in ("after_embedding", "before_head"):
        return getattr(encoder, point)
    if point == "between_layers":
        return encoder.field.transitions
    return getattr(encoder.field.blocks, point)


def _alphas(model, point: str) -> np.ndarray:
    """The coefficients of the layer at `point` per scale, averaged over channels: shape
    `(scales,)`, or `(layers, scales)` for a layer stacked per layer or boundary.

    `DiffusionLayer`: `alpha_s`. `AdaptiveDiffusionLayer`: the conductance of an edge whose
    gate input `W^T (u_a + u_b) / 2` is zero, `alpha_max softmax(mix)_s sigmoid(b_s)` (its
    value at `W = 0`, where the layer is the constant-coefficient one).
    """
    layer = _layer(model, point)
    if isinstance(layer, pf.AdaptiveDiffusionLayer):
        mix = jax.nn.softmax(layer.mix, axis=-2)
        coef = layer.alpha_max * mix * jax.nn.sigmoid(layer.gate_bias)
    else:
        op = layer.operator
        total = op.alpha_max * jax.nn.sigmoid(op.theta)
        coef = total[..., None, :] * jax.nn.softmax(op.mix, axis=-2)
    return np.asarray(jnp.mean(coef, axis=-1))


def _coefficient_sum(model, point: str) -> float:
    """The largest total coefficient of the layer at `point` (over layers, mean over
    channels)."""
    return float(np.max(np.sum(_alphas(model, point), axis=-1)))


def _diagnostics(model, task, batch_size: int) -> dict[str, Any]:
    """Roughness at each point and the first layer's commutator, on test inputs."""
    split = task.test
    n = min(batch_size, len(split))
    lengths = split.lengths[:n]
    seq = int(lengths.max())
    tokens = jnp.asarray(split.tokens[:n, :seq].astype(np.int32))
    mask = jnp.arange(seq)[None, :] < jnp.asarray(lengths)[:, None]
    encoder = model.encoder
    rough = eqx.filter_jit(roughness_at_points)(encoder, tokens, mask)
    comm = eqx.filter_jit(model_commutator)(encoder, tokens, mask)
    return {
        "roughness": {k: np.asarray(v).tolist() for k, v in rough.items()},
        "commutator_layer0": float(comm),
    }


def _arms(config: Config) -> list[tuple[str, Arm | None]]:
    """`(name, arm)`: the baseline (`None`), then the config's arms (by default every point
    at every scale)."""
    arms: list[tuple[str, Arm | None]] = [("baseline", None)]
    if config.baseline_only:
        return arms
    chosen = config.arms
    if not chosen:
        chosen = tuple(Arm(p, scale, d) for scale, d in config.scales for p in config.points)
    return arms + [(a.name, a) for a in chosen]


def _estimate(config: Config, runs_per_task: int) -> tuple[float | None, dict[str, float]]:
    """Seconds the study should take from the plans' measured run times (`None` where a
    task's is unknown), in total and per task."""
    per_task = {}
    for name in config.tasks:
        run_s = config.plan(name).run_s
        if run_s is not None:
            per_task[name] = run_s * runs_per_task
    total = sum(per_task.values()) if len(per_task) == len(config.tasks) else None
    return total, per_task


def _curve(history: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """The validation accuracy recorded during training: steps (1-based) and values."""
    rows = [r for r in history if "val_accuracy" in r]
    return [r["step"] + 1 for r in rows], [float(r["val_accuracy"]) for r in rows]


def main(config: Config) -> dict[str, Any]:
    """Train every arm on every task and seed; write `results.md`, `results.json`,
    `placement.png` and `curves.png` into `config.out`.

    **Returns:**

    The results as written to `results.json`.
    """
    if config.dry_run:
        return _dry_run(config)
    _check_lra_data(config)
    log = report.logger("lra_placement")
    out = config.out
    meta = report.meta(config)
    t_start = time.perf_counter()
    arms = _arms(config)
    results: dict[str, Any] = {"meta": meta, "tasks": {}, "arms": [a[0] for a in arms]}
    if config.lra_configs:
        results["lra"] = _lra_record(config)
    runs_per_task = len(arms) * len(config.seeds)
    total = len(config.tasks) * runs_per_task
    estimate, per_task = _estimate(config, runs_per_task)
    log(
        f"{total} training runs ({len(config.tasks)} tasks x {len(arms)} arms x "
        f"{len(config.seeds)} seeds); estimated "
        + (
            f"{estimate / 60:.0f} min on two cores ("
            + ", ".join(f"{t} {v / 60:.0f} min" for t, v in per_task.items())
            + ") plus compilation"
            if estimate is not None
            else "time unknown (no measured run time for every task)"
        )
    )
    meta["estimated_s"] = estimate
    done = 0
    all_gates: dict[str, dict[str, Any]] = {}
    for name in config.tasks:
        plan = config.plan(name)
        task = load_task(plan.task, config.data_dir, **_task_options(config, plan))
        lra_config = config.lra_task(plan.task) if config.lra_configs else None
        log(f"{name} ({task.name}): {len(task.train)} train / {len(task.test)} test examples")
        t_task = time.perf_counter()
        entry: dict[str, Any] = {
            "data": common.data_summary(task),
            "loader": plan.task,
            "control": plan.control,
            "note": plan.note,
            "model": {"dim": plan.dim, "num_heads": plan.num_heads, "num_layers": plan.num_layers},
            "train": report.describe(plan.train),
            "arms": {},
        }
        if config.lra_configs:
            entry["stand_in"] = config.data_dir is None
        gates: dict[str, Any] = {}
        for arm_name, arm in arms:
            record: dict[str, Any] = {
                "accuracy": [],
                "train_wall_s": [],
                "final_loss": [],
                "curves": [],
                "alphas_init": None,
                "alphas": [],
            }
            for seed in config.seeds:
                model = _model(task, plan, seed, arm, lra_config)
                if arm is not None and record["alphas_init"] is None:
                    record["alphas_init"] = _alphas(model, arm.point).tolist()
                train_config = dataclasses.replace(plan.train, seed=seed)
                t0 = time.perf_counter()
                model, history = train(model, task, pf.Discrete(), train_config)
                wall = time.perf_counter() - t0
                ev = evaluate(model, task.test, pf.Discrete(), config.eval_batch_size)
                steps, curve = _curve(history)
                record["accuracy"].append(ev.accuracy)
                record["train_wall_s"].append(wall)
                record["final_loss"].append(final_train_loss(history))
                record["curves"].append(curve)
                record["curve_steps"] = steps
                done += 1
                coef = ""
                if arm is not None:
                    alphas = _alphas(model, arm.point)
                    record["alphas"].append(alphas.tolist())
                    coef = f", total coefficient {_coefficient_sum(model, arm.point):.3f}"
                log(
                    f"[{done}/{total}] {name} | {arm_name} | seed {seed}: test accuracy "
                    f"{ev.accuracy:.3f}, final loss {history[-1]['loss']:.3f}{coef}, {wall:.1f} s"
                )
                if arm is None:
                    gates[f"seed {seed}"] = common.gate_of(task, ev.accuracy, history)
                if arm is None and seed == config.seeds[0]:
                    left = (runs_per_task - 1) * (time.perf_counter() - t_task)
                    log(f"{name}: about {left / 60:.1f} min left for this task at this pace")
                    entry["baseline_diagnostics"] = _diagnostics(
                        model, task, config.eval_batch_size
                    )
            accs = record["accuracy"]
            record["mean"] = float(np.mean(accs))
            record["std"] = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
            entry["arms"][arm_name] = record
        # The learning gate of the baseline, every seed: a task enters the study's claims
        # only if the baseline passed it on all of them.
        entry["gate"] = {k: common.gate_record(g) for k, g in gates.items()}
        entry["gate_passed"] = all(g.passed for g in gates.values())
        entry["paired"] = _paired_task(entry)
        entry["wall_s"] = time.perf_counter() - t_task
        all_gates[name] = gates
        results["tasks"][name] = entry
    meta["wall_s"] = time.perf_counter() - t_start
    results["gate_passed"] = any(e["gate_passed"] for e in results["tasks"].values())
    results["summary"] = _summary(results, config)
    results["replication"] = _replication(results, config)
    report.write(
        out,
        results,
        _title(config),
        _gate_markdown(all_gates) + "\n\n" + _markdown(results, config),
        verdict=_verdict(results),
        log=log,
    )
    if config.baseline_only:
        log("baseline only: no placement plot")
    else:
        _plot(results, config, out, log)
        _plot_curves(results, out, log)
    return results


def _paired_record(p: stats.Paired, p_holm: float) -> dict[str, Any]:
    return {**dataclasses.asdict(p), "p_holm": p_holm, "resolved": p_holm <= ALPHA}


def _paired_task(entry: dict[str, Any]) -> dict[str, Any]:
    """Per arm, the paired differences from the baseline over seeds, in points: of the final
    test accuracy (`final`) and of the mean validation accuracy over the learning curve
    (`curve`, where one was recorded), each with its 95% t-interval and its p-value
    Holm-corrected across the task's arms."""
    arms = entry["arms"]
    base = arms["baseline"]
    out: dict[str, Any] = {}
    for key in ("final", "curve"):
        found: dict[str, stats.Paired] = {}
        for arm, rec in arms.items():
            if arm == "baseline":
                continue
            if key == "final":
                d = np.subtract(rec["accuracy"], base["accuracy"])
            else:
                if not all(rec["curves"]) or not all(base["curves"]):
                    continue
                d = np.subtract(
                    [np.mean(c) for c in rec["curves"]], [np.mean(c) for c in base["curves"]]
                )
            found[arm] = stats.paired(100 * d)
        adjusted = stats.holm({a: p.p for a, p in found.items()})
        for arm, p in found.items():
            out.setdefault(arm, {})[key] = _paired_record(p, adjusted[arm])
    return out


def _informative(entry: dict[str, Any]) -> bool:
    """Whether the trained baseline passed the learning gate on every seed
    (`pdeformer.training.learning_gate`: 5 points above the best trivial rule, training loss
    0.2 nats below its conditional entropy): a task it has not learnt cannot show a
    placement effect. A control task (where locality should not matter) enters no claim."""
    return bool(entry["gate_passed"]) and not entry.get("control", False)


def _verdict(results: dict[str, Any]) -> report.Verdict:
    """The page's verdict: which tasks passed the learning gate and enter the claims."""
    tasks = results["tasks"]
    passed = [t for t, e in tasks.items() if e["gate_passed"]]
    failed = [t for t in tasks if t not in passed]
    name = "Learning gate (baseline, every seed)"
    if not passed:
        return report.Verdict(name, False, f"the baseline failed it on {', '.join(failed)}.")
    text = f"passed on {', '.join(passed)}"
    if failed:
        text += f"; failed on {', '.join(failed)}, which enter no claim below"
    return report.Verdict(name, True, text + ".")


def _gate_markdown(all_gates: dict[str, dict[str, Any]]) -> str:
    """Every task's gate tables (`GateResult.markdown()`, per seed)."""
    parts = []
    for task, gates in all_gates.items():
        section = common.gate_section(gates).replace(
            "## Learning gate", f"## Learning gate: {task}"
        )
        parts.append(section)
    return "\n\n".join(parts)


def _paired_delta(results: dict[str, Any], arm: str, tasks: list[str]) -> tuple[float, float]:
    """The arm's task-averaged change from the baseline in points, seed by seed (every arm
    of a seed starts from the baseline's weights and sees its data order): the mean over
    seeds and its standard error (0 with one seed)."""
    per_seed = np.mean(
        [
            np.subtract(
                results["tasks"][t]["arms"][arm]["accuracy"],
                results["tasks"][t]["arms"]["baseline"]["accuracy"],
            )
            for t in tasks
        ],
        axis=0,
    )
    se = float(np.std(per_seed, ddof=1) / np.sqrt(per_seed.size)) if per_seed.size > 1 else 0.0
    return 100 * float(np.mean(per_seed)), 100 * se


def _summary(results: dict[str, Any], config: Config) -> dict[str, Any]:
    """Average accuracy over tasks per arm, its paired change from the baseline (over all
    tasks, and over the tasks the baseline learnt), and the ranking."""
    tasks = list(results["tasks"])
    informative = [t for t in tasks if _informative(results["tasks"][t])]
    avg = {
        arm: float(np.mean([results["tasks"][t]["arms"][arm]["mean"] for t in tasks]))
        for arm in results["arms"]
    }
    arms = [a for a in results["arms"] if a != "baseline"]
    paired = {a: _paired_delta(results, a, tasks) for a in arms}
    delta = {a: d for a, (d, _) in paired.items()}
    learnt = {a: _paired_delta(results, a, informative)[0] for a in arms} if informative else {}
    ranking = sorted(delta, key=delta.get, reverse=True)
    per_scale = {}
    for scale, _ in config.scales:
        scale_arms = [a for a in delta if a.endswith(f"({scale})")]
        if scale_arms:
            per_scale[scale] = {
                "best": max(scale_arms, key=delta.get),
                "worst": min(scale_arms, key=delta.get),
                "mean_delta_points": float(np.mean([delta[a] for a in scale_arms])),
            }
    on_learnt = _paired_average(results, arms, informative)
    return {
        "average_accuracy": avg,
        "paired_on_informative_tasks": on_learnt,
        "delta_points_vs_baseline": delta,
        "delta_standard_error_points": {a: se for a, (_, se) in paired.items()},
        "informative_tasks": informative,
        "delta_points_on_informative_tasks": learnt,
        "ranking": ranking,
        "per_scale": per_scale,
    }


def _per_seed(results: dict[str, Any], arm: str, tasks: list[str], other: str = "baseline"):
    """The per-seed change `arm − other` in points, averaged over `tasks`."""
    return 100 * np.mean(
        [
            np.subtract(
                results["tasks"][t]["arms"][arm]["accuracy"],
                results["tasks"][t]["arms"][other]["accuracy"],
            )
            for t in tasks
        ],
        axis=0,
    )


def _paired_average(results: dict[str, Any], arms: list[str], tasks: list[str]) -> dict:
    """Per arm, the paired change from the baseline averaged over `tasks` (seed by seed),
    with its 95% t-interval and Holm-corrected p-value across the arms (empty without
    tasks)."""
    if not tasks or not arms:
        return {}
    found = {a: stats.paired(_per_seed(results, a, tasks)) for a in arms}
    adjusted = stats.holm({a: p.p for a, p in found.items()})
    return {a: _paired_record(p, adjusted[a]) for a, p in found.items()}


def _replication(results: dict[str, Any], config: Config) -> list[dict[str, Any]]:
    """The entries of paper A's claims that this run measures, for the site's replication
    table (`docs/hooks/replication.py`): each with the measured change in points, its 95%
    interval, the basis and a verdict by `report.claim_verdict` (holds: the interval lies on
    the claimed side of zero with a Holm-corrected p-value at most `ALPHA`; does not hold:
    the same on the other side; not resolved otherwise). Only the tasks whose baseline
    passed the learning gate on every seed, controls excluded, count; without one, every
    claim is not resolved. A1 and A2 use the Holm p-value across the arms; A3 (multi −
    single, one row per point that has both) and A4 (the best after_embedding arm − the
    best other arm; the pair is chosen by the same data, so read it as descriptive) use the
    uncorrected p-value of their one comparison."""
    summary = results["summary"]
    tasks = summary["informative_tasks"]
    arms = [a for a in results["arms"] if a != "baseline"]
    if not arms:
        return []
    seeds = len(config.seeds)
    basis = (
        f"{', '.join(tasks) if tasks else 'no task passed the learning gate'}; "
        f"{seeds} paired seeds; "
        + ("official data" if config.data_dir else _stand_in_basis(config))
        + ("; the LRA Transformer's per-task configurations" if config.lra_configs else "")
    )
    scale = "lra" if config.data_dir else "cpu"
    paired = summary["paired_on_informative_tasks"]
    entries = []

    def entry(claim, measured, *, direction, p_holm, note=""):
        if measured is None:
            verdict, text = "not resolved", "no task passed the learning gate"
        else:
            verdict = report.claim_verdict(
                measured["low"], measured["high"], 0.0, direction, p_holm, ALPHA
            )
            text = (
                f"{measured['mean']:+.1f} points [{measured['low']:+.1f}, "
                f"{measured['high']:+.1f}]" + ("" if p_holm is None else f", Holm p = {p_holm:.2g}")
            )
        entries.append(
            {
                "id": claim,
                "measured": text + (f"; {note}" if note else ""),
                "mean": None if measured is None else measured["mean"],
                "low": None if measured is None else measured["low"],
                "high": None if measured is None else measured["high"],
                "verdict": verdict,
                "basis": basis,
                "scale": scale,
            }
        )

    for claim, point, direction, paper in (
        ("A1", "after_embedding (single)", "above", 4.1),
        ("A2", "after_attention (single)", "below", -2.5),
    ):
        if point in arms:
            m = paired.get(point)
            # The paper's effect size against the interval: an interval that excludes it
            # says more than "not resolved".
            outside = m is not None and not m["low"] <= paper <= m["high"]
            note = f"the paper's {paper:+.1f} lies outside the interval" if outside else ""
            entry(
                claim,
                m,
                direction=direction,
                p_holm=None if m is None else m["p_holm"],
                note=note,
            )
    for point in pf.INSERTION_POINTS:
        single, multi = f"{point} (single)", f"{point} (multi)"
        if single in arms and multi in arms:
            m = None
            if tasks:
                m = dataclasses.asdict(stats.paired(_per_seed(results, multi, tasks, other=single)))
            entry(
                "A3",
                m,
                direction="above",
                p_holm=None if m is None else m["p"],
                note=f"multi − single at {point}",
            )
    ae = [a for a in arms if a.startswith("after_embedding ")]
    rest = [a for a in arms if not a.startswith("after_embedding ")]
    if ae and rest:
        m = None
        note = ""
        if tasks:
            delta = summary["delta_points_on_informative_tasks"]
            best_ae, best_rest = max(ae, key=delta.get), max(rest, key=delta.get)
            m = dataclasses.asdict(
                stats.paired(_per_seed(results, best_ae, tasks, other=best_rest))
            )
            note = f"{best_ae} − {best_rest} (the best arm elsewhere)"
        entry("A4", m, direction="above", p_holm=None if m is None else m["p"], note=note)
    return entries


def _stand_in_basis(config: Config) -> str:
    if config.lra_configs:
        return "offline STAND-IN data, not LRA"
    return "offline CPU-sized tasks, not LRA"


def _title(config: Config) -> str:
    if config.baseline_only:
        title = "Placement study budget: does the baseline learn each task?"
    else:
        title = "Diffusion layer placement study"
    if config.lra_configs and config.data_dir is None:
        title += " (STAND-IN DATA, not the LRA benchmark)"
    return title


def _task_options(config: Config, plan: TaskPlan) -> dict[str, Any]:
    """`load_task` options: the official reader's (LRA's maximum length with `lra_configs`), or
    the offline generator's (the plan's `options`, seed 0)."""
    if config.data_dir:
        return config.lra_task(plan.task).data_options() if config.lra_configs else {}
    opts = dict(plan.options)
    opts.setdefault("seed", 0)
    return opts


def _check_lra_data(config: Config) -> None:
    """With `lra_configs`: every task has a configuration, and the data is official unless the
    stand-ins were asked for."""
    if not config.lra_configs:
        return
    missing = [t for t in config.tasks if t not in lra.TASKS]
    if missing:
        raise ValueError(
            f"no LRA configuration for {missing}; with --lra-configs (--preset full) pass "
            f"tasks of {tuple(lra.TASKS)}."
        )
    other = [a.name for a in config.arms if a.layer is not pf.DiffusionLayer]
    if other:
        raise ValueError(
            f"the LRA configurations build pf.DiffusionLayer arms only; drop {other} or "
            "leave --lra-configs off."
        )
    if config.data_dir is None and not config.allow_stand_in:
        raise ValueError(
            "--preset full trains the LRA configurations on the official data: pass "
            "--data-dir DIR (see docs/howto/lra.md), or --allow-stand-in to train on the "
            "offline stand-ins (the results are then labelled stand-in)."
        )


def _lra_setup_text(config: Config) -> str:
    """The results page's sentence on the model and training with `lra_configs`."""
    parts = []
    for t in config.tasks:
        c = config.lra_task(t)
        steps = c.total_steps if config.steps is None else config.steps
        parts.append(
            f"{t}: {c.num_layers} layers, width {c.dim}, {c.num_heads} heads, FFN {c.mlp_dim}, "
            f"dropout {c.dropout:g}/{c.attention_dropout:g}, {c.pooling} pooling, MLP head, "
            f"{steps} steps, batch {c.batch_size}, lr {c.lr:g} ({c.schedule})"
        )
    data = "offline STAND-IN data" if config.data_dir is None else "the official data"
    return (
        "The LRA Transformer's per-task configurations (experiments/studies/lra.py), pre-LN, "
        f"discrete mode, on {data}: " + "; ".join(parts) + "."
    )


def _lra_record(config: Config) -> dict[str, Any]:
    """The LRA configurations used, and whether the data is a stand-in."""
    return {
        "stand_in": config.data_dir is None,
        "configs": {t: dataclasses.asdict(config.lra_task(t)) for t in config.tasks},
        "deviations_from_lra": list(lra.DEVIATIONS),
    }


def _dry_run(config: Config) -> dict[str, Any]:
    """Print `lra.dry_run`'s JSON for the config's tasks, arms and seeds; train nothing."""
    if not config.lra_configs:
        raise ValueError(
            "--dry-run prices the LRA configurations: pass --preset full (or --lra-configs)."
        )
    _check_lra_data(dataclasses.replace(config, allow_stand_in=True))
    configs = {t: config.lra_task(t) for t in config.tasks}
    arms = [(n, None, ()) if a is None else (n, a.point, a.dilations) for n, a in _arms(config)]
    estimate = lra.dry_run(
        config.tasks,
        arms,
        steps=config.steps,
        seeds=len(config.seeds),
        mfu=config.mfu,
        peak_tflops=config.peak_tflops,
        configs=configs,
    )
    estimate["data"] = "official" if config.data_dir else "stand-in"
    print(json.dumps(estimate, indent=2))
    return estimate


def _rule_rows(results: dict[str, Any], tasks: list[str]) -> list[str]:
    """One row per trivial rule of the learning gate (majority class; for ListOps the
    outermost operator), its test accuracy on each task."""
    by_rule: dict[str, dict[str, float]] = {}
    for t in tasks:
        gate = results["tasks"][t].get("gate") or {}
        if not gate:
            continue
        for rule in next(iter(gate.values()))["rules"]:
            by_rule.setdefault(rule["name"], {})[t] = 100 * rule["test_accuracy"]
    rows = []
    for name, accs in by_rule.items():
        cells = [f"{accs[t]:.1f}" if t in accs else "" for t in tasks]
        avg = f"{np.mean(list(accs.values())):.1f}" if len(accs) == len(tasks) else ""
        rows.append(f"| *{name} (rule)* | " + " | ".join(cells) + f" | {avg} | |")
    return rows


def _interval(p: dict[str, Any] | None) -> str:
    if p is None:
        return "-"
    return f"{p['mean']:+.1f} [{p['low']:+.1f}, {p['high']:+.1f}]"


def _markdown(results: dict[str, Any], config: Config) -> str:
    tasks = list(results["tasks"])
    summary = results["summary"]
    lines = ["Every run: pre-LN, discrete mode, AdamW with warm-up and cosine decay.", ""]
    lines += ["| task | data | model | training | seeds |", "|---|---|---|---|---|"]
    for t in tasks:
        e = results["tasks"][t]
        m, tr = e["model"], e["train"]
        kind = " (control)" if e["control"] else ""
        lines.append(
            f"| {t}{kind} | {e['note'] or e['data'].get('description', e['loader'])}; "
            f"{e['data']['num_train']} train / {e['data']['num_test']} test | width "
            f"{m['dim']}, {m['num_heads']} heads, {m['num_layers']} layers | "
            f"{tr['total_steps']} steps, batch {tr['batch_size']}, lr {tr['lr']:g} | "
            f"{len(config.seeds)} |"
        )
    lines += [
        "",
        "Test accuracy in %, mean ± std over seeds.",
    ]
    if config.lra_configs:
        lines[0] = _lra_setup_text(config)
    if not config.baseline_only:
        lines.append(
            "Single scale: dilation 1; multi-scale: dilations 1, 2, 4, 8; adaptive: "
            "token-adaptive conductances, dilation 1; all under one budget (sum alpha < "
            "0.45), starting from the same total coefficient 0.1. Δ avg: change of the "
            "accuracy averaged over the tasks, in points, mean ± standard error over seeds "
            "of the per-seed (paired) change: every arm of a seed starts from the "
            "baseline's weights and sees its data in its order."
        )
    lines += [
        "",
        "| arm | " + " | ".join(tasks) + " | avg | Δ avg |",
        "|---|" + "---|" * (len(tasks) + 2),
    ]
    se = summary["delta_standard_error_points"]
    delta = summary["delta_points_vs_baseline"]
    for arm in results["arms"]:
        cells = []
        for t in tasks:
            a = results["tasks"][t]["arms"][arm]
            cells.append(f"{100 * a['mean']:.1f} ± {100 * a['std']:.1f}")
        avg = 100 * summary["average_accuracy"][arm]
        d = "" if arm == "baseline" else f"{delta[arm]:+.1f} ± {se[arm]:.1f}"
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {avg:.1f} | {d} |")
    lines += _rule_rows(results, tasks)
    informative = summary["informative_tasks"]
    lines += ["", "## Does the baseline learn each task?", ""]
    for t in tasks:
        entry = results["tasks"][t]
        base = 100 * entry["arms"]["baseline"]["mean"]
        first = next(iter(entry["gate"].values()))
        name, rule = first["best_rule"], 100 * first["best_rule_accuracy"]
        if t in informative:
            verdict = "learnt (passed the learning gate on every seed)"
        elif entry["gate_passed"]:
            verdict = "learnt; a control, which enters no claim"
        else:
            verdict = (
                "**not learnt** (failed the learning gate): no placement effect can show "
                "on this task"
            )
        lines.append(
            f"- {t}: baseline {base:.1f}% against {rule:.1f}% for the best trivial rule "
            f"({name}; {entry['data']['num_test']} test examples): {verdict}."
        )
    if delta:
        lines += _paired_lines(results)
        lines += _claim_lines(results, config)
        lines += _curve_lines(results)
    lines += ["", "## Roughness at each point (trained baseline, first seed)", ""]
    lines.append(
        "Relative Dirichlet energy E(x)/‖x‖² of the signal each point receives (0 smooth, "
        "4 alternating), per layer for the branch points; and the commutator "
        "‖D(A(u)) − A(D(u))‖/‖u‖ of layer 0."
    )
    lines += ["", "| task | " + " | ".join(pf.INSERTION_POINTS) + " | commutator |"]
    lines.append("|---|" + "---|" * (len(pf.INSERTION_POINTS) + 1))
    for t in tasks:
        diag = results["tasks"][t].get("baseline_diagnostics")
        if diag is None:
            continue
        cells = []
        for p in pf.INSERTION_POINTS:
            v = np.atleast_1d(np.asarray(diag["roughness"][p], dtype=float))
            cells.append(", ".join(f"{x:.3f}" for x in v) if v.size else "-")
        lines.append(f"| {t} | " + " | ".join(cells) + f" | {diag['commutator_layer0']:.3g} |")
    return "\n".join(lines) + "\n"


def _alpha_text(rec: dict[str, Any]) -> str:
    """The learned coefficients per scale, mean over seeds (and the initial ones)."""
    if not rec.get("alphas"):
        return ""
    mean = np.mean(np.asarray(rec["alphas"], dtype=float), axis=0)
    init = np.asarray(rec["alphas_init"], dtype=float)
    show = lambda a: "; ".join(
        "(" + ", ".join(f"{x:.3f}" for x in row) + ")" for row in np.atleast_2d(a)
    )
    return f"{show(mean)} (init {show(init)})"


def _paired_lines(results: dict[str, Any]) -> list[str]:
    """Per task, each arm's paired change from the baseline with its interval and its
    Holm-corrected p-value, final and over the learning curve, and its coefficients."""
    lines = [
        "",
        "## Paired changes from the baseline, per task",
        "",
        "Change in points, mean over seeds of `arm − baseline` with its 95% t-interval; p: "
        f"two-sided t-test, Holm-corrected across the task's arms (resolved: p ≤ {ALPHA:g}). "
        "*Final*: test accuracy after training. *Curve*: mean validation accuracy over the "
        "learning curve (a faster-learning arm gains here even where its final model does "
        "not). α per scale: the learned coefficients (mean over channels and seeds; one "
        "tuple per layer for the branch points; adaptive: the conductance at zero gate "
        "input).",
    ]
    for t, entry in results["tasks"].items():
        paired = entry.get("paired", {})
        if not paired:
            continue
        lines += [
            "",
            f"**{t}**" + (" (control)" if entry.get("control") else ""),
            "",
            "| arm | final Δ [95% CI] | Holm p | curve Δ [95% CI] | Holm p | α per scale |",
            "|---|---|---|---|---|---|",
        ]
        for arm, rec in paired.items():
            f, c = rec.get("final"), rec.get("curve")
            lines.append(
                f"| {arm} | {_interval(f)} | {f['p_holm']:.2g} | {_interval(c)} | "
                + ("-" if c is None else f"{c['p_holm']:.2g}")
                + f" | {_alpha_text(entry['arms'][arm])} |"
            )
    return lines


def _curve_lines(results: dict[str, Any]) -> list[str]:
    """Mean validation accuracy (%) at each evaluation, per task and arm."""
    lines: list[str] = []
    for t, entry in results["tasks"].items():
        base = entry["arms"]["baseline"]
        steps = base.get("curve_steps") or []
        if not steps or not all(base["curves"]):
            continue
        if not lines:
            lines += ["", "## Learning curves (validation accuracy in %, mean over seeds)"]
        lines += [
            "",
            f"**{t}**",
            "",
            "| arm | " + " | ".join(str(s) for s in steps) + " |",
            "|---|" + "---:|" * len(steps),
        ]
        for arm, rec in entry["arms"].items():
            mean = 100 * np.mean(np.asarray(rec["curves"], dtype=float), axis=0)
            lines.append(f"| {arm} | " + " | ".join(f"{x:.1f}" for x in mean) + " |")
    if lines:
        lines += ["", "![learning curves](curves.png)"]
    return lines


def _claim_lines(results: dict[str, Any], config: Config) -> list[str]:
    """The markdown section on the papers' claims, from the replication entries."""
    summary = results["summary"]
    informative = summary["informative_tasks"]
    lines = ["", "## The papers' claims in this run", ""]
    lines.append(
        "Over the tasks whose baseline passed the learning gate on every seed, controls "
        f"excluded (here: {', '.join(informative) or 'none'}), per-seed changes averaged over "
        f"those tasks; {len(config.seeds)} paired seeds. A claim *holds* when the 95% "
        "interval lies on its side of zero (and, for an arm against the baseline, the "
        f"Holm-corrected p-value across arms is at most {ALPHA:g}), *does not hold* when it "
        "lies on the other side, and is *not resolved* otherwise. These are CPU-scale "
        "tasks, not LRA."
    )
    lines.append("")
    if not informative:
        lines.append(
            "- **The baseline learnt none of the tasks: this run cannot test the claims.**"
        )
    names = {
        "A1": "after_embedding (single) improves accuracy (paper: +4.1 points)",
        "A2": "after_attention (single) lowers accuracy (paper: −2.5 points)",
        "A3": "multi-scale beats single scale (paper: on every task)",
        "A4": "after_embedding is the best point",
    }
    for e in results["replication"]:
        lines.append(f"- {names[e['id']]}: **{e['verdict']}**; {e['measured']}.")
    paired = summary["paired_on_informative_tasks"]
    if paired:
        lines += [
            "",
            "| arm | Δ over the learnt tasks [95% CI] | Holm p |",
            "|---|---|---|",
        ]
        for arm, p in paired.items():
            lines.append(f"| {arm} | {_interval(p)} | {p['p_holm']:.2g} |")
    return lines


def _plot(results: dict[str, Any], config: Config, out: Path, log) -> None:
    plt = report.pyplot(log)
    if plt is None:
        return
    tasks = list(results["tasks"])
    arms = results["arms"][1:]
    delta = results["summary"]["delta_points_vs_baseline"]
    se = results["summary"]["delta_standard_error_points"]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(arms) + 2), 4))
    x = np.arange(len(arms))
    # Error bar: the standard error over seeds of the paired change, in points.
    ax.bar(x, [delta[a] for a in arms], 0.7, yerr=[se[a] for a in arms], capsize=3)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(arms, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("Δ task-averaged test accuracy (points)\n± s.e. of the paired change")
    ax.set_title(f"Diffusion layer vs baseline ({', '.join(tasks)})")
    report.save_figure(fig, out / "placement.png", log)


def _plot_curves(results: dict[str, Any], out: Path, log) -> None:
    """Mean validation accuracy against the step, one panel per task, one line per arm."""
    curved = {
        t: e
        for t, e in results["tasks"].items()
        if e["arms"]["baseline"].get("curve_steps") and all(e["arms"]["baseline"]["curves"])
    }
    if not curved:
        return
    plt = report.pyplot(log)
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(curved), figsize=(5 * len(curved), 4), squeeze=False)
    for ax, (t, e) in zip(axes[0], curved.items(), strict=True):
        for arm, rec in e["arms"].items():
            mean = 100 * np.mean(np.asarray(rec["curves"], dtype=float), axis=0)
            style = dict(color="k", lw=2) if arm == "baseline" else dict(lw=1)
            ax.plot(rec["curve_steps"], mean, label=arm, **style)
        ax.set_xlabel("training step")
        ax.set_ylabel("validation accuracy (%), mean over seeds")
        ax.set_title(t + (" (control)" if e.get("control") else ""))
    axes[0][0].legend(fontsize=7)
    report.save_figure(fig, out / "curves.png", log)


PRESETS = {"smoke": Config.smoke, "quick": Config.quick, "full": Config.full}

if __name__ == "__main__":
    _cli.run(PRESETS, main, description=__doc__.split("\n\n")[0])
