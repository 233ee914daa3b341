"""How the batch is laid out for XLA's CPU backend: a batched field against a vmapped one,
and the blocking of the blockwise attention.

Measures the jitted forward+backward (`grad` of `sum(u_T)` w.r.t. the weights) of
`pf.Discrete()` on a `pf.Field` (pre-LN, `PerLayer`, the CPU default attention):

- `vmapped_vs_batched`: the field evaluated per sequence under `jax.vmap` (how the
  integrators called it before 2026-12-02) against the batch handed to the field (now);
- `blocking`: the same batched step with the attention's blocking forced to other choices
  (query rows per block `block_size`, and the logit budget per block of `_blocking`), at
  two sequence lengths; the default is marked.

Repeats of the variants being compared are interleaved; medians are reported.

Usage:

    python experiments/bench_layout.py            # readable table
    python experiments/bench_layout.py --json     # one JSON object on stdout
    python experiments/bench_layout.py --quick    # smoke test (small sizes, 2 repeats)
"""

from __future__ import annotations

import dataclasses
import datetime
import statistics
import sys
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import pdeformer as pf
from _common import machine
from _flags import json_or_table_main
from _timing import interleaved
from pdeformer.operators import attention as attention_module


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
    """Benchmark settings.

    **Arguments:**

    - `batch`, `dim`, `heads`, `layers`, `hidden`: model and input sizes.
    - `seq_long`, `seq_short`: the two sequence lengths of the blocking comparison (the
      first is also the length of `vmapped_vs_batched`).
    - `repeats`: timed calls per variant (median reported).
    - `seed`: PRNG seed of weights and inputs.
    """

    batch: int = 8
    dim: int = 128
    heads: int = 4
    layers: int = 4
    hidden: int = 512
    seq_long: int = 512
    seq_short: int = 256
    repeats: int = 7
    seed: int = 0


QUICK = dict(batch=2, dim=32, heads=2, layers=2, hidden=64, seq_long=64, seq_short=32, repeats=2)

MIB = 2**20
# (block_size, logit bytes per block); the first is the library default.
BLOCKINGS = (
    (attention_module.DEFAULT_BLOCK_SIZE, attention_module._BLOCK_BYTES),
    (512, 4 * MIB),
    (256, 8 * MIB),
    (512, 16 * MIB),
    (128, 64 * MIB),
    (512, 1024 * MIB),
)


def _log(msg: str) -> None:
    print(f"[bench_layout {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _step(c: LayoutConfig, seq: int, block_size: int, vmapped: bool):
    """A jitted forward+backward and its arguments; compiled before returning."""
    key_field, key_u = jr.split(jr.PRNGKey(c.seed))
    field = pf.Field(
        c.dim,
        c.heads,
        c.layers,
        hidden=c.hidden,
        key=key_field,
        attention_block_size=block_size,
    )
    params, static = eqx.partition(field, eqx.is_array)
    depth = pf.Discrete()
    u = jr.normal(key_u, (c.batch, seq, c.dim), jnp.float32)

    def loss(p, u):
        f = eqx.combine(p, static)
        if vmapped:
            return jnp.sum(jax.vmap(lambda v: depth(f, v).u)(u))
        return jnp.sum(depth(f, u).u)

    grad = jax.jit(jax.grad(loss))
    jax.block_until_ready(grad(params, u))  # compile (the blocking is read at trace time)
    jax.block_until_ready(grad(params, u))  # warm up
    return lambda: jax.block_until_ready(grad(params, u))


def _interleaved(fns: dict[str, Any], repeats: int, what: str) -> dict[str, float]:
    samples = interleaved(fns, repeats, what, _log)
    return {k: 1e3 * statistics.median(v) for k, v in samples.items()}


def _with_budget(budget: int, make):
    saved = attention_module._BLOCK_BYTES
    attention_module._BLOCK_BYTES = budget
    try:
        return make()
    finally:
        attention_module._BLOCK_BYTES = saved


def run(c: LayoutConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    fns = {
        "vmapped": _step(c, c.seq_long, attention_module.DEFAULT_BLOCK_SIZE, True),
        "batched": _step(c, c.seq_long, attention_module.DEFAULT_BLOCK_SIZE, False),
    }
    times = _interleaved(fns, c.repeats, "vmapped vs batched")
    layout = {
        "times_ms": times,
        "ratio": times["vmapped"] / times["batched"],
        "sizes": {
            "batch": c.batch,
            "seq": c.seq_long,
            "dim": c.dim,
            "heads": c.heads,
            "layers": c.layers,
            "hidden": c.hidden,
        },
    }
    blocking = []
    pairs = c.batch * c.heads
    for seq in (c.seq_long, c.seq_short):
        fns, labels = {}, {}
        for i, (block_size, budget) in enumerate(BLOCKINGS):
            g, b = _with_budget(
                budget,
                lambda s=seq, bs=block_size: attention_module._blocking(pairs, s, bs, 4),
            )
            name = f"g={g},b={b}"
            if name in labels:  # the same blocking reached another way: time it once
                continue
            labels[name] = i == 0
            fns[name] = _with_budget(budget, lambda s=seq, bs=block_size: _step(c, s, bs, False))
        times = _interleaved(fns, c.repeats, f"blocking at seq {seq}")
        blocking.append(
            {
                "seq": seq,
                "pairs": pairs,
                "times_ms": times,
                "default": next(k for k, d in labels.items() if d),
            }
        )
    return {
        "vmapped_vs_batched": layout,
        "blocking": blocking,
        "config": dataclasses.asdict(c),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python experiments/bench_layout.py " + " ".join(sys.argv[1:]),
        "wall_s": time.perf_counter() - t_start,
    }


def _table(r: dict[str, Any]) -> str:
    lay = r["vmapped_vs_batched"]
    lines = [
        f"Discrete() forward+backward, sizes {lay['sizes']}",
        f"  vmapped field {lay['times_ms']['vmapped']:.1f} ms, batched field "
        f"{lay['times_ms']['batched']:.1f} ms: ratio {lay['ratio']:.2f}",
    ]
    for b in r["blocking"]:
        lines.append(f"blocking at seq {b['seq']} ({b['pairs']} pairs), g pairs per group, b rows:")
        for name, t in b["times_ms"].items():
            mark = "  (default)" if name == b["default"] else ""
            lines.append(f"  {name:>14}: {t:7.1f} ms{mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return json_or_table_main(
        argv,
        description=__doc__.splitlines()[0],
        config_cls=LayoutConfig,
        quick=QUICK,
        run=run,
        table=_table,
    )


if __name__ == "__main__":
    main()
