"""Data-pipeline throughput: generation + batching, and batching alone from cached arrays.

Set against the examples per second a small training step consumes (`train_steps_per_second`):
data must never be the bottleneck.

Usage: `python experiments/bench_data.py --json` prints one JSON object (the figures, plus
`meta`: command, date, machine, settings); without `--json`, a readable summary.
Settings are flags (`--listops-examples 100`, see `--help`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time

import numpy as np

import _common
from _flags import add_config_flags, config_from_args
from pdeformer.data import (
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
    """

    listops_examples: int = 500
    pathfinder_examples: int = 4096
    listops_min_length: int = 500
    listops_max_length: int = 2000
    batch_size: int = 32
    batching_repeats: int = 5
    train_length: int = 1024
    seed: int = 0


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


def main(config: BenchConfig) -> dict[str, float]:
    """Run the benchmarks.

    **Arguments:**

    - `config`: benchmark settings.

    **Returns:**

    A dict with `listops_examples_per_second`, `pathfinder_examples_per_second` (generation +
    batching), the matching `*_batching_examples_per_second` (cached arrays) and
    `train_steps_per_second`.
    """
    out: dict[str, float | None] = {}
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


def _cli(argv: list[str] | None = None) -> dict[str, object]:
    """Parse `argv`, run, print; returns the printed result."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_config_flags(p, BenchConfig)
    args = p.parse_args(argv)
    config = config_from_args(args, BenchConfig)
    command = shlex.join(["python", "experiments/bench_data.py", *argv])
    meta = _common.meta(command, config)
    start = time.perf_counter()
    result: dict[str, object] = dict(main(config))
    meta["wall_s"] = time.perf_counter() - start
    result["meta"] = meta
    if args.json:
        print(json.dumps(_common.json_safe(result)))
    else:
        for key, value in result.items():
            if key != "meta":
                print(f"{key}: {value if value is None else round(value, 1)}")
    return result


if __name__ == "__main__":
    _cli()
