"""The diffusion layer's placement study: baseline vs each of the seven insertion points.

For every available LRA task (the offline tasks by default; the official data with
`--data-dir`), train the baseline Transformer and the same Transformer with a diffusion
layer at each insertion point, single-scale (dilation 1) and multi-scale (dilations
1, 2, 4, 8), over several seeds, all in discrete mode (the papers' setting), and report
test accuracy as mean ± std in a table shaped like the paper's per-position table. Every
arm of one seed starts from the same Transformer weights (adding a point leaves the other
weights unchanged), and sees the same data in the same order.

Also recorded, for the trained baseline: the roughness of the signal at each point
(`pdeformer.diagnostics.roughness_at_points`) and the diffusion–attention commutator of
its first layer, the quantities the placement argument is about.

Writes `results.md`, `results.json` and `placement.png` into `--out`
(default `runs/lra_placement/`).

Run: `python experiments/studies/lra_placement.py [--preset smoke|quick|full] [--out DIR]
[--tasks listops text ...] [--data-dir DIR] [--seeds 0 1 ...] [--baseline-only]
[--steps N]` (every field of `Config` is a flag; `--help`).
The quick preset (the default, minutes on a 2-core CPU) studies the two offline tasks its
budget learns, ListOps and the 8x8 digits; `--preset full` studies all five with the LRA
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
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402

import _cli  # noqa: E402
import _common as common  # noqa: E402
import lra  # noqa: E402
import pdeformer as pf  # noqa: E402
import report  # noqa: E402
from pdeformer.data import load_task  # noqa: E402
from pdeformer.diagnostics import model_commutator, roughness_at_points  # noqa: E402
from pdeformer.training import TrainConfig, evaluate, train  # noqa: E402

SCALES = {"single": (1,), "multi": (1, 2, 4, 8)}
OFFLINE_TASKS = ("listops", "text", "retrieval", "image", "pathfinder")


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
    - `lra_configs`: use the LRA Transformer's configuration of each task (`lra.TASKS`: sizes,
      dropout, pooling, MLP head, batch, schedule; `dim`, `num_heads`, `num_layers` and
      `train` are then unused, and `steps` keeps LRA's warm-up); needs `data_dir` unless
      `allow_stand_in`.
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
    lra_configs: bool = False
    allow_stand_in: bool = False
    max_length: int | None = None
    dry_run: bool = False
    mfu: float = lra.DEFAULT_MFU
    peak_tflops: float = lra.H100_BF16_DENSE_TFLOPS

    def __post_init__(self) -> None:
        unknown = set(self.tasks) - set(OFFLINE_TASKS) - {"pathx"}
        if unknown:
            raise ValueError(
                f"unknown tasks {sorted(unknown)}; pass some of {OFFLINE_TASKS + ('pathx',)}."
            )
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 or None; got {self.steps}.")

    def lra_task(self, name: str) -> lra.LraTask:
        """The LRA configuration of a task (by its name, or a loaded task's `name` such as
        `pathfinder_generated`), with `max_length` applied."""
        config = lra.TASKS[name.split("_")[0]]
        if self.max_length is not None:
            config = dataclasses.replace(config, max_length=self.max_length)
        return config

    def training(self, task=None) -> TrainConfig:
        """The training run of every arm (`train` with `steps` applied); with `lra_configs`,
        that of `task`'s (a `TaskData`) LRA configuration."""
        if self.lra_configs and task is not None:
            return self.lra_task(task.name).train_config(self.steps, self.train.seed)
        if self.steps is None:
            return self.train
        return dataclasses.replace(
            self.train, total_steps=self.steps, warmup_steps=max(1, self.steps // 10)
        )

    @classmethod
    def quick(cls) -> Config:
        """ListOps and the 8x8 digits, width 32, 2 layers, 300 steps, 3 seeds: minutes.

        Only the two offline tasks this budget learns: at width 32 and 1,000 steps the
        baseline stays at chance on the synthetic text, the synthetic retrieval and
        Pathfinder (`--tasks text retrieval pathfinder --baseline-only` shows it), and a
        task the baseline does not learn cannot show a placement effect. Name them with
        `--tasks` to include them anyway; `--preset full` runs all five.
        """
        return cls(
            tasks=("listops", "image"),
            options=_offline_options("quick"),
            seeds=(0, 1, 2),
            dim=32,
            num_heads=2,
            num_layers=2,
            train=TrainConfig(
                lr=3e-3, warmup_steps=30, total_steps=300, batch_size=32, progress=False
            ),
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
        """One tiny dual-input task, 2 steps, 1 seed, 3 points: seconds."""
        return cls(
            tasks=("retrieval",),
            options=_offline_options("smoke"),
            seeds=(0,),
            dim=16,
            num_heads=2,
            num_layers=2,
            train=TrainConfig(lr=3e-3, warmup_steps=1, total_steps=2, batch_size=8, progress=False),
            points=("after_embedding", "after_attention", "between_layers"),
            scales=(("multi", (1, 2)),),
            eval_batch_size=16,
        )


def _model(task, config: Config, seed: int, dilations: tuple[int, ...], active: str | None):
    """The baseline classifier (`active=None`) or the same classifier with one diffusion
    layer at `active`.

    The layers' keys are folded from the model key by insertion point, so adding a layer
    leaves every other weight as it is: every arm of a seed starts from the baseline's
    Transformer weights. (Switching the other points off inside one shared structure would
    compile once per scale instead of once per arm, but the switched-off layers still cost
    their compute on every step, which at the quick sizes outweighs the compiles; the seeds
    of an arm share one compile.)
    """
    if config.lra_configs:
        splits = (task.train, task.val, task.test)
        return config.lra_task(task.name).model(
            key=jr.PRNGKey(seed),
            vocab_size=task.vocab_size,
            num_classes=task.num_classes,
            max_len=max(int(s.tokens.shape[1]) for s in splits),
            diffusion_at=() if active is None else (active,),
            dilations=dilations or (1,),
        )
    cls = pf.DualClassifier if task.dual else pf.Classifier
    return cls(
        task.vocab_size,
        config.dim,
        config.num_heads,
        config.num_layers,
        task.num_classes,
        key=jr.PRNGKey(seed),
        diffusion_at=() if active is None else (active,),
        diffusion_layer=functools.partial(pf.DiffusionLayer, dilations=dilations),
    )


def _layer(model, point: str):
    encoder = model.encoder
    if point in ("after_embedding", "before_head"):
        return getattr(encoder, point)
    if point == "between_layers":
        return encoder.field.transitions
    return getattr(encoder.field.blocks, point)


def _coefficient_sum(model, point: str) -> float:
    """The largest total coefficient of the layer at `point`."""
    op = _layer(model, point).operator
    total = lambda o: o.total()
    for _ in range(op.theta.ndim - 1):  # stacked per layer or per boundary
        total = eqx.filter_vmap(total)
    return float(jnp.max(total(op)))


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


def _arms(config: Config) -> list[tuple[str, str | None, tuple[int, ...]]]:
    """`(name, point, dilations)`: the baseline, then every point at every scale."""
    arms: list[tuple[str, str | None, tuple[int, ...]]] = [("baseline", None, ())]
    if config.baseline_only:
        return arms
    for scale, dilations in config.scales:
        arms += [(f"{p} ({scale})", p, dilations) for p in config.points]
    return arms


def main(config: Config) -> dict[str, Any]:
    """Train every arm on every task and seed; write `results.md`, `results.json` and
    `placement.png` into `config.out`.

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
    total = len(config.tasks) * len(arms) * len(config.seeds)
    done = 0
    all_gates: dict[str, dict[str, Any]] = {}
    for name in config.tasks:
        opts = _task_options(config, name)
        task = load_task(name, config.data_dir, **opts)
        log(f"{task.name}: {len(task.train)} train / {len(task.test)} test examples")
        entry: dict[str, Any] = {"data": common.data_summary(task), "arms": {}}
        if config.lra_configs:
            entry["stand_in"] = config.data_dir is None
        gates: dict[str, Any] = {}
        for arm, point, dilations in arms:
            accs, times = [], []
            for seed in config.seeds:
                model = _model(task, config, seed, dilations, point)
                train_config = dataclasses.replace(config.training(task), seed=seed)
                t0 = time.perf_counter()
                model, history = train(model, task, pf.Discrete(), train_config)
                wall = time.perf_counter() - t0
                ev = evaluate(model, task.test, pf.Discrete(), config.eval_batch_size)
                accs.append(ev.accuracy)
                times.append(wall)
                done += 1
                coef = (
                    ""
                    if point is None
                    else f", total coefficient {_coefficient_sum(model, point):.3f}"
                )
                log(
                    f"[{done}/{total}] {task.name} | {arm} | seed {seed}: test accuracy "
                    f"{ev.accuracy:.3f}, final loss {history[-1]['loss']:.3f}{coef}, {wall:.1f} s"
                )
                if point is None:
                    gates[f"seed {seed}"] = common.gate_of(task, ev.accuracy, history)
                if point is None and seed == config.seeds[0]:
                    entry["baseline_diagnostics"] = _diagnostics(
                        model, task, config.eval_batch_size
                    )
            entry["arms"][arm] = {
                "accuracy": accs,
                "mean": float(np.mean(accs)),
                "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
                "train_wall_s": times,
            }
        # The learning gate of the baseline, every seed: a task enters the study's claims
        # only if the baseline passed it on all of them.
        entry["gate"] = {k: common.gate_record(g) for k, g in gates.items()}
        entry["gate_passed"] = all(g.passed for g in gates.values())
        all_gates[task.name] = gates
        results["tasks"][task.name] = entry
    meta["wall_s"] = time.perf_counter() - t_start
    results["gate_passed"] = any(e["gate_passed"] for e in results["tasks"].values())
    results["summary"] = _summary(results, config)
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
    return results


def _informative(entry: dict[str, Any]) -> bool:
    """Whether the trained baseline passed the learning gate on every seed
    (`pdeformer.training.learning_gate`: 5 points above the best trivial rule, training loss
    0.2 nats below its conditional entropy): a task it has not learnt cannot show a
    placement effect."""
    return bool(entry["gate_passed"])


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
    return {
        "average_accuracy": avg,
        "delta_points_vs_baseline": delta,
        "delta_standard_error_points": {a: se for a, (_, se) in paired.items()},
        "informative_tasks": informative,
        "delta_points_on_informative_tasks": learnt,
        "ranking": ranking,
        "per_scale": per_scale,
    }


def _title(config: Config) -> str:
    if config.baseline_only:
        title = "Placement study budget: does the baseline learn each task?"
    else:
        title = "Diffusion layer placement study"
    if config.lra_configs and config.data_dir is None:
        title += " (STAND-IN DATA, not the LRA benchmark)"
    return title


def _task_options(config: Config, name: str) -> dict[str, Any]:
    """`load_task` options: the official reader's (LRA's maximum length with `lra_configs`), or
    the offline generator's (`options`, seed 0)."""
    if config.data_dir:
        return config.lra_task(name).data_options() if config.lra_configs else {}
    opts = dict(config.options.get(name, {}))
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
        f"discrete mode, on {data}: " + "; ".join(parts) + f". Seeds: {list(config.seeds)}. "
        "Test accuracy in %, mean ± std over seeds."
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
    estimate = lra.dry_run(
        config.tasks,
        _arms(config),
        steps=config.steps,
        seeds=len(config.seeds),
        mfu=config.mfu,
        peak_tflops=config.peak_tflops,
        configs=configs,
    )
    estimate["data"] = "official" if config.data_dir else "stand-in"
    print(json.dumps(estimate, indent=2))
    return estimate


def _markdown(results: dict[str, Any], config: Config) -> str:
    tasks = list(results["tasks"])
    summary = results["summary"]
    lines = [
        f"Model: width {config.dim}, {config.num_heads} heads, {config.num_layers} layers, "
        f"pre-LN, discrete mode. Training: {config.training().total_steps} steps, batch "
        f"{config.train.batch_size}, lr {config.train.lr:g} (AdamW, warmup + cosine). "
        f"Seeds: {list(config.seeds)}. Test accuracy in %, mean ± std over seeds.",
    ]
    if config.lra_configs:
        lines[0] = _lra_setup_text(config)
    if not config.baseline_only:
        lines.append(
            "Single scale: dilation 1; multi-scale: dilations 1, 2, 4, 8 (one budget "
            "sum alpha < 0.45). Δ avg: change of the task-averaged accuracy from the baseline, "
            "in points, mean ± standard error over seeds of the per-seed (paired) change: "
            "every arm of a seed starts from the baseline's weights and sees its data in its "
            "order."
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
    majority = [100 * results["tasks"][t]["data"]["test_majority_fraction"] for t in tasks]
    lines.append(
        "| *majority class* | "
        + " | ".join(f"{m:.1f}" for m in majority)
        + f" | {np.mean(majority):.1f} | |"
    )
    best_rule = []
    for t in tasks:
        first = next(iter(results["tasks"][t]["gate"].values()))
        best_rule.append((first["best_rule"], 100 * first["best_rule_accuracy"]))
    lines.append(
        "| *best trivial rule* | "
        + " | ".join(f"{a:.1f} ({n})" for n, a in best_rule)
        + f" | {np.mean([a for _, a in best_rule]):.1f} | |"
    )
    informative = summary["informative_tasks"]
    lines += ["", "## Does the baseline learn each task?", ""]
    for t in tasks:
        entry = results["tasks"][t]
        base = 100 * entry["arms"]["baseline"]["mean"]
        name, rule = best_rule[tasks.index(t)]
        verdict = (
            "learnt (passed the learning gate on every seed)"
            if t in informative
            else "**not learnt** (failed the learning gate): no placement effect can show "
            "on this task"
        )
        lines.append(
            f"- {t}: baseline {base:.1f}% against {rule:.1f}% for the best trivial rule "
            f"({name}; {entry['data']['num_test']} test examples): {verdict}."
        )
    if delta:
        lines += _claim_lines(results, config)
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


def _claim_lines(results: dict[str, Any], config: Config) -> list[str]:
    """The markdown section on the papers' claims, with each change's resolution."""
    tasks = list(results["tasks"])
    summary = results["summary"]
    delta = summary["delta_points_vs_baseline"]
    se = summary["delta_standard_error_points"]
    informative = summary["informative_tasks"]
    lines: list[str] = []
    resolved = lambda a: abs(delta[a]) > 2 * se[a] > 0
    mark = lambda a: f"{delta[a]:+.1f} ± {se[a]:.1f}" + ("" if resolved(a) else " (not resolved)")
    lines += ["", "## The papers' claims in this run", ""]
    lines.append(
        "A change is *resolved* when it exceeds twice its standard error over seeds; "
        f"this run has {len(config.seeds)} seeds."
    )
    ae_prefix = "after_embedding "
    if informative and len(informative) < len(tasks):
        learnt = summary["delta_points_on_informative_tasks"]
        best = max(learnt, key=learnt.get)
        lines.append(
            f"- On the tasks the baseline learnt ({', '.join(informative)}) alone: best arm "
            f"{best} ({learnt[best]:+.1f}); after_embedding "
            + ", ".join(f"{a[16:]} {learnt[a]:+.1f}" for a in learnt if a.startswith(ae_prefix))
            + "."
        )
    elif not informative:
        lines.append(
            "- **The baseline learnt none of the tasks: this run cannot test the claims.**"
        )
    for scale, sc in summary["per_scale"].items():
        lines.append(
            f"- {scale} scale: best point {sc['best']} ({mark(sc['best'])}), worst "
            f"{sc['worst']} ({mark(sc['worst'])}), mean over points "
            f"{sc['mean_delta_points']:+.1f} points."
        )
    ae = [a for a in delta if a.startswith("after_embedding")]
    aa = [a for a in delta if a.startswith("after_attention")]
    if ae:
        best = summary["ranking"][0]
        verdict = "holds" if best.startswith("after_embedding") else "does not hold"
        lines.append(
            f"- Claim 'after_embedding helps most (+4.1 points)': {verdict} here; "
            + ", ".join(f"{a}: {mark(a)}" for a in ae)
            + f"; best arm overall: {best} ({mark(best)})."
        )
    if aa:
        worst = summary["ranking"][-1]
        verdict = "holds" if worst.startswith("after_attention") else "does not hold"
        lines.append(
            f"- Claim 'after_attention hurts most (−2.5 points)': {verdict} here; "
            + ", ".join(f"{a}: {mark(a)}" for a in aa)
            + f"; worst arm overall: {worst} ({mark(worst)})."
        )
    if len(summary["per_scale"]) == 2:
        sc, m = summary["per_scale"]["single"], summary["per_scale"]["multi"]
        better = sum(
            delta[f"{p} (multi)"] > delta[f"{p} (single)"]
            for p in config.points
            if f"{p} (multi)" in delta and f"{p} (single)" in delta
        )
        lines.append(
            f"- Claim 'multi-scale beats single scale': multi-scale is better at {better} of "
            f"{len(config.points)} points; mean Δ {m['mean_delta_points']:+.1f} (multi) vs "
            f"{sc['mean_delta_points']:+.1f} (single)."
        )
    spread = max(
        100 * results["tasks"][t]["arms"][a]["std"] for t in tasks for a in results["arms"]
    )
    unresolved = sum(not resolved(a) for a in delta)
    lines.append(
        f"- Seed-to-seed std of single accuracies reaches {spread:.1f} points; "
        f"{unresolved} of {len(delta)} arms' changes are not resolved."
    )
    return lines


def _plot(results: dict[str, Any], config: Config, out: Path, log) -> None:
    plt = report.pyplot(log)
    if plt is None:
        return
    tasks = list(results["tasks"])
    delta = results["summary"]["delta_points_vs_baseline"]
    se = results["summary"]["delta_standard_error_points"]
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(config.points))
    width = 0.8 / max(1, len(config.scales))
    for k, (scale, _) in enumerate(config.scales):
        vals = [delta[f"{p} ({scale})"] for p in config.points]
        # Error bar: the standard error over seeds of the paired change, in points.
        errs = [se[f"{p} ({scale})"] for p in config.points]
        ax.bar(x + k * width, vals, width, yerr=errs, capsize=3, label=scale)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x + width * (len(config.scales) - 1) / 2)
    ax.set_xticklabels(config.points, rotation=30, ha="right")
    ax.set_ylabel("Δ task-averaged test accuracy (points)\n± s.e. of the paired change")
    ax.set_title(f"Diffusion layer vs baseline ({', '.join(tasks)})")
    ax.legend()
    report.save_figure(fig, out / "placement.png", log)


PRESETS = {"smoke": Config.smoke, "quick": Config.quick, "full": Config.full}

if __name__ == "__main__":
    _cli.run(PRESETS, main, description=__doc__.split("\n\n")[0])
