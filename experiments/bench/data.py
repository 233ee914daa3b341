"""Data-pipeline throughput: generation + batching, and batching alone from cached arrays.

Set against the examples per second a small training step consumes (`train_steps_per_second`):
data must never be the bottleneck.

Usage: `python experiments/bench/data.py [--preset smoke|quick|full] [--out DIR]`; every
setting is a flag too (`--listops-examples 100`, see `--help`). Writes `results.json` (the
figures, plus `meta`: command, date, machine, settings) and `results.md` into `--out`
(default `runs/bench/data`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: report, _cli

import numpy as np  # noqa: E402

import _cli  # noqa: E402
import report  # noqa: E402
from pdeformer.data import (  # noqa: E402
    ListOpsConfig,
    PathfinderConfig,
    Split,
    generate_listops,
    generate_pathfinder,
    iterate_batches,
)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Benchmark settings.

    **Arguments:**

    - `listops_examples`, `pathfinder_examples`: examples generated per measurement.
    - `listops_min_length`, `listops_max_length`: ListOps bounds (LRA: 500, 2000).
    - `batch_size`: batch size for batching (LRA: 32 ListOps, 512 Pathfinder; one size here).
    - `batching_repeats`: epochs over the cached arrays for the batching-only figure.
    - `train_length`: sequence length of the training step's batches (LRA Pathfinder: 1024).
    - `seed`: generation seed.
    - `out`: the output directory (`None`: print only).
    """

    listops_examples: int = 500
    pathfinder_examples: int = 4096
    listops_min_length: int = 500
    listops_max_length: int = 2000
    batch_size: int = 32
    batching_repeats: int = 5
    train_length: int = 1024
    seed: int = 0
    out: Path | None = Path("runs/bench/data")


PRESETS = {
    "smoke": lambda: BenchConfig(
        listops_examples=16,
        pathfinder_examples=16,
        listops_min_length=20,
        listops_max_length=40,
        batch_size=8,
        batching_repeats=1,
        train_length=64,
    ),
    "quick": lambda: BenchConfig(pathfinder_examples=1024, batching_repeats=2),
    "full": BenchConfig,
}


def _drain(split: Split, batch_size: int, epochs: int, pad_to: int | None) -> int:
    count = 0
    for epoch in range(epochs):
        for batch in iterate_batches(split, batch_size, seed=0, epoch=epoch, pad_to=pad_to):
            count += batch.labels.shape[0]
    return count


def train_steps_per_second(config: BenchConfig) -> float:
    """Training steps per second of a small classifier on Pathfinder-shaped batches.

    The library's `pdeformer.training.train_step` (forward+backward and an AdamW update, the
    step `train` runs) of a 2-layer, 64-wide discrete-mode model on `(batch_size,
    train_length)` token batches (default 1024, LRA Pathfinder's length), jitted and warmed
    up.

    **Arguments:**

    - `config`: benchmark settings.

    **Returns:**

    Steps per second (median over 5 timed steps).
    """
    import equinox as eqx
    import jax
    import jax.random as jr

    import pdeformer as pf
    from pdeformer.data import Batch
    from pdeformer.training import TrainConfig, make_optimizer, train_step

    model = pf.Classifier(256, 64, 4, 2, 2, key=jr.PRNGKey(config.seed))
    optimizer = make_optimizer(TrainConfig(batch_size=config.batch_size))
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    depth = pf.Discrete()
    rng = np.random.default_rng(config.seed)
    shape = (config.batch_size, config.train_length)
    batch = Batch(
        rng.integers(0, 256, shape).astype(np.int32),
        np.ones(shape, bool),
        rng.integers(0, 2, (config.batch_size,)).astype(np.int32),
    )
    model, opt_state, metrics = train_step(model, opt_state, batch, depth, optimizer)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        model, opt_state, metrics = train_step(model, opt_state, batch, depth, optimizer)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return 1.0 / float(np.median(times))


def measure(config: BenchConfig) -> dict[str, float]:
    """The figures: `listops_examples_per_second`, `pathfinder_examples_per_second`
    (generation + batching), the matching `*_batching_examples_per_second` (cached arrays),
    `train_steps_per_second` and the ratios of data to training throughput."""
    out: dict[str, float] = {}
    lcfg = ListOpsConfig(min_length=config.listops_min_length, max_length=config.listops_max_length)
    t0 = time.perf_counter()
    listops = generate_listops(config.listops_examples, lcfg, seed=config.seed)
    n = _drain(listops, config.batch_size, 1, pad_to=lcfg.max_length)
    out["listops_examples_per_second"] = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    n = _drain(listops, config.batch_size, config.batching_repeats, pad_to=lcfg.max_length)
    out["listops_batching_examples_per_second"] = n / (time.perf_counter() - t0)

    pcfg = PathfinderConfig()
    t0 = time.perf_counter()
    images, labels = generate_pathfinder(config.pathfinder_examples, pcfg, seed=config.seed)[:2]
    flat = images.reshape(images.shape[0], -1)
    pf = Split(flat, np.full(flat.shape[0], flat.shape[1], np.int32), labels)
    n = _drain(pf, config.batch_size, 1, pad_to=None)
    out["pathfinder_examples_per_second"] = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    n = _drain(pf, config.batch_size, config.batching_repeats, pad_to=None)
    out["pathfinder_batching_examples_per_second"] = n / (time.perf_counter() - t0)
    out["train_steps_per_second"] = train_steps_per_second(config)
    # Data must outpace training: examples/s of cached batching against examples/s consumed.
    consumed = out["train_steps_per_second"] * config.batch_size
    out["train_examples_per_second"] = consumed
    out["batching_vs_training"] = (
        min(
            out["listops_batching_examples_per_second"],
            out["pathfinder_batching_examples_per_second"],
        )
        / consumed
    )
    out["generation_vs_training"] = (
        min(out["listops_examples_per_second"], out["pathfinder_examples_per_second"]) / consumed
    )
    return out


def main(config: BenchConfig) -> dict[str, Any]:
    """Run the benchmark; write `results.json` and `results.md` into `config.out`.

    **Returns:**

    The figures of `measure` and `meta` (command, date, machine, settings, wall time).
    """
    meta = report.meta(config)
    start = time.perf_counter()
    result: dict[str, Any] = dict(measure(config))
    meta["wall_s"] = time.perf_counter() - start
    result["meta"] = meta
    rows = [f"| {k} | {report.fmt(v, 4)} |" for k, v in result.items() if k != "meta"]
    body = "\n".join(["| figure | value |", "|---|---:|", *rows])
    report.write(config.out, result, "Data-pipeline throughput", body)
    return result


if __name__ == "__main__":
    _cli.run(PRESETS, main, description=__doc__.splitlines()[0])
