"""A data-parallel training step on several devices against the same step on one.

Measures the jitted forward+backward (`grad` of `mean(u_T**2)` w.r.t. the weights) of
`pf.Discrete()` on a `pf.Field` (pre-LN, `PerLayer`, the platform's default attention), once
on one device and once with the batch split over `--devices` devices (a one-axis mesh, the
weights replicated: what `pdeformer.training.DataParallel` does), side by side in one run.
It prints:

- `sharded_vs_one_device`: the time ratio (median of interleaved repeats);
- `gathering_collectives`: all-gather / all-to-all / collective-permute instructions in the
  sharded step's compiled program. Data parallelism needs none (only the weight gradients'
  all-reduce); a gather means some operator makes every device compute every sequence;
- `grad_max_diff`: the largest difference between the two steps' gradients.

On a CPU the devices are virtual (`--xla_force_host_platform_device_count`, set by this
script before JAX starts) and share the machine's cores, so the ratio shows the cost of
the partitioning, not a speed-up; on a multi-GPU host run it with `--platform gpu`.

Usage:

    python experiments/bench_parallel.py            # readable table, 2 CPU devices
    python experiments/bench_parallel.py --json     # one JSON object on stdout
    python experiments/bench_parallel.py --quick    # smoke test (small sizes, 2 repeats)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
from typing import Any

from _flags import add_config_flags, config_from_args


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Benchmark settings.

    **Arguments:**

    - `devices`: devices the batch is split over (virtual ones on a CPU).
    - `platform`: the JAX platform, `"cpu"` or `"gpu"`.
    - `batch`, `seq`, `dim`, `heads`, `layers`, `hidden`: model and input sizes (`batch`
      must be a multiple of `devices`).
    - `repeats`: timed calls per variant (median reported).
    - `seed`: PRNG seed of weights and inputs.
    """

    devices: int = 2
    platform: str = "cpu"
    batch: int = 8
    seq: int = 512
    dim: int = 128
    heads: int = 4
    layers: int = 4
    hidden: int = 512
    repeats: int = 7
    seed: int = 0


QUICK = dict(batch=4, seq=32, dim=16, heads=2, layers=1, hidden=32, repeats=2)

GATHERS = ("all-gather(", "all-to-all(", "collective-permute(")


def run(c: ParallelConfig) -> dict[str, Any]:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    import pdeformer as pf
    from _common import logger, machine
    from _timing import interleaved

    if jax.device_count() < c.devices:
        raise SystemExit(
            f"bench_parallel needs {c.devices} devices; JAX sees {jax.device_count()}. Run "
            "it as a script (it sets XLA_FLAGS for the CPU itself) or pass --devices."
        )
    if c.batch % c.devices != 0:
        raise SystemExit(f"--batch ({c.batch}) must be a multiple of --devices ({c.devices}).")
    t_start = time.perf_counter()
    log = logger("bench_parallel")
    key_field, key_u = jr.split(jr.PRNGKey(c.seed))
    field = pf.Field(c.dim, c.heads, c.layers, hidden=c.hidden, key=key_field)
    params, static = eqx.partition(field, eqx.is_array)
    u = jr.normal(key_u, (c.batch, c.seq, c.dim), jnp.float32)
    depth = pf.Discrete()

    @jax.jit
    def grad(params, u):
        loss = lambda p: jnp.mean(depth(eqx.combine(p, static), u).u ** 2)
        return jax.grad(loss)(params)

    mesh = jax.make_mesh(
        (c.devices,), ("batch",), axis_types=(AxisType.Auto,), devices=jax.devices()[: c.devices]
    )
    one = jax.device_put((params, u), jax.devices()[0])
    sharded = (
        jax.device_put(params, NamedSharding(mesh, PartitionSpec())),
        jax.device_put(u, NamedSharding(mesh, PartitionSpec("batch"))),
    )
    log(f"compiling ({c.devices} devices, {jax.default_backend()})")
    hlo = grad.lower(*sharded).compile().as_text()
    gathers = sum(hlo.count(op) for op in GATHERS)
    g_one, g_sharded = grad(*one), grad(*sharded)
    diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(g_one), jax.tree.leaves(g_sharded), strict=True)
    )
    fns = {
        "one_device": lambda: jax.block_until_ready(grad(*one)),
        "sharded": lambda: jax.block_until_ready(grad(*sharded)),
    }
    for fn in fns.values():
        fn()  # warm up
    samples = interleaved(fns, c.repeats, "one device vs sharded", log)
    times = {k: 1e3 * statistics.median(v) for k, v in samples.items()}
    return {
        "sharded_vs_one_device": times["sharded"] / times["one_device"],
        "times_ms": times,
        "gathering_collectives": gathers,
        "grad_max_diff": diff,
        "devices": c.devices,
        "backend": jax.default_backend(),
        "config": dataclasses.asdict(c),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python experiments/bench_parallel.py " + " ".join(sys.argv[1:]),
        "wall_s": time.perf_counter() - t_start,
    }


def _table(r: dict[str, Any]) -> str:
    t = r["times_ms"]
    return "\n".join(
        [
            f"Discrete() forward+backward on {r['backend']}, config {r['config']}",
            f"  one device {t['one_device']:.1f} ms, batch split over {r['devices']} devices "
            f"{t['sharded']:.1f} ms: ratio {r['sharded_vs_one_device']:.2f}",
            f"  gathering collectives in the sharded step: {r['gathering_collectives']}",
            f"  largest gradient difference: {r['grad_max_diff']:.2e}",
        ]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes")
    add_config_flags(parser, ParallelConfig, choices={"platform": ("cpu", "gpu")})
    args = parser.parse_args(argv)
    config = config_from_args(args, ParallelConfig, QUICK if args.quick else None)
    if "jax" not in sys.modules:  # the device count is fixed when JAX starts
        os.environ["JAX_PLATFORMS"] = config.platform
        if config.platform == "cpu":
            flag = f"--xla_force_host_platform_device_count={config.devices}"
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    result = run(config)
    print(json.dumps(result) if args.json else _table(result))
    return result


if __name__ == "__main__":
    main()
