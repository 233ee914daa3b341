"""Where the time of a continuous-depth training step goes: a profile of its XLA program.

Profiles the jitted forward+backward (`grad` of `sum(u_T)` with respect to the weights) of
`pf.Continuous(diffrax.Dopri5(), diffrax.PIDController(rtol, atol))` on the default field,
at the sizes of `bench_peers.py`'s continuous comparison (batch 8, seq 256, dim 64, 4 heads,
4 layers, FFN 256). The call runs under `jax.profiler.trace`; the trace's events are
attributed to the compiled program's HLO instructions by name, and each instruction's
*self* time (its duration less that of the events nested inside it) is summed into:

- `pass`: `"backward"` where the instruction's JAX op name lies under a `transpose(...)`
  (the backward pass, which under `RecursiveCheckpointAdjoint` also recomputes each
  step's forward), `"forward"` for the rest of the program;
- `kind`: `"matmul"` for a dot or a fusion that contains one, `"other"` for the rest
  (elementwise passes, reductions, copies, control flow);
- the instructions with the most self time, with their shape and JAX op name.

Events of the runtime itself (thread-pool waits, the executor) are reported apart, by
name, as `runtime_ms`; a "wait" event spans work done on other threads. The figures are
sums over `calls` calls, divided by `calls`. The profiler slows the call (compare
`wall_ms_per_call` with `bench_peers.py`'s time): read the shares, not the sum. They
describe XLA's program on this backend; on a 2-core CPU shared with other jobs a profile is
as noisy as a timing.

Usage:

    python experiments/profile_solve.py            # readable summary
    python experiments/profile_solve.py --json     # one JSON object on stdout
    python experiments/profile_solve.py --quick    # smoke test (tiny sizes)
    python experiments/profile_solve.py --unrolled # the same with Unrolled(Dopri5())
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import sys
import time
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import pdeformer as pf
from _common import machine
from _flags import json_or_table_main
from _profile import profile


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """Profile settings.

    **Arguments:**

    - `batch`, `seq`, `dim`, `heads`, `layers`, `hidden`: model and input sizes.
    - `rtol`, `atol`: the adaptive controller's tolerances.
    - `calls`: profiled calls (after a compile and a warm-up call).
    - `top`: how many instructions to list.
    - `seed`: PRNG seed of weights and inputs.
    - `unrolled`: profile `pf.Unrolled(diffrax.Dopri5())` (the same method with its stages
      unrolled) instead of `diffrax.Dopri5()`.
    """

    batch: int = 8
    seq: int = 256
    dim: int = 64
    heads: int = 4
    layers: int = 4
    hidden: int = 256
    rtol: float = 1e-3
    atol: float = 1e-5
    calls: int = 3
    top: int = 20
    seed: int = 0
    unrolled: bool = False


QUICK = dict(batch=2, seq=16, dim=16, heads=2, layers=2, hidden=32, calls=1, top=5)


def _log(msg: str) -> None:
    print(f"[profile_solve {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(c: ProfileConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    key_field, key_u = jr.split(jr.PRNGKey(c.seed))
    field = pf.Field(c.dim, c.heads, c.layers, hidden=c.hidden, key=key_field)
    params, static = eqx.partition(field, eqx.is_inexact_array)
    u0 = jr.normal(key_u, (c.batch, c.seq, c.dim), jnp.float32)
    solver = pf.Unrolled(diffrax.Dopri5()) if c.unrolled else diffrax.Dopri5()
    depth = pf.Continuous(solver, diffrax.PIDController(rtol=c.rtol, atol=c.atol))

    def loss(p, u):
        sol = depth(eqx.combine(p, static), u)
        return jnp.sum(sol.u), sol.stats.nfe

    grad = jax.jit(jax.grad(loss, has_aux=True))
    _log("compiling")
    compiled = grad.lower(params, u0).compile()
    _log(f"profiling {c.calls} calls")
    prof = profile(compiled, (params, u0), c.calls)
    _, nfe = prof["output"]
    wall_ms = prof["wall_ms_per_call"]

    totals: collections.Counter = collections.Counter()
    rows = []
    for name, info in prof["instructions"].items():
        side = "backward" if "transpose(" in info["op_name"] else "forward"
        kind = "matmul" if info["matmul"] else "other"
        totals[f"{side} {kind}"] += info["ms"]
        rows.append(
            {
                "instruction": name,
                "ms": info["ms"],
                "calls": info["calls"],
                "pass": side,
                "kind": kind,
                "shape": info["shape"],
                "op_name": info["op_name"].rsplit("/", 2)[-2:],
            }
        )
    runtime = collections.Counter(prof["runtime_ms"])
    rows.sort(key=lambda r: -r["ms"])
    return {
        "sizes": {
            "batch": c.batch,
            "seq": c.seq,
            "dim": c.dim,
            "heads": c.heads,
            "layers": c.layers,
            "hidden": c.hidden,
        },
        "nfe": int(nfe),
        "wall_ms_per_call": wall_ms,
        "self_ms": {k: totals[k] for k in sorted(totals)},
        "runtime_ms": {k: v for k, v in runtime.most_common(5)},
        "instructions_profiled": len(rows),
        "top": rows[: c.top],
        "config": dataclasses.asdict(c),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python experiments/profile_solve.py " + " ".join(sys.argv[1:]),
        "wall_s": time.perf_counter() - t_start,
    }


def _table(r: dict[str, Any]) -> str:
    lines = [
        f"Continuous {'Unrolled(Dopri5())' if r['config']['unrolled'] else 'Dopri5()'} "
        f"forward+backward, sizes {r['sizes']}, {r['nfe']} NFE: "
        f"{r['wall_ms_per_call']:.1f} ms per call (under the profiler)",
        "self time per call:",
    ]
    for k, v in r["self_ms"].items():
        lines.append(f"  {k:>16}: {v:7.1f} ms")
    for k, v in r["runtime_ms"].items():
        lines.append(f"  runtime, {k[:40]}: {v:.1f} ms")
    lines.append(f"top instructions of {r['instructions_profiled']}:")
    for row in r["top"]:
        lines.append(
            f"  {row['ms']:6.1f} ms {row['calls']:4d}x {row['pass']:>8} {row['kind']:>6} "
            f"{row['shape'][:32]:32} {'/'.join(row['op_name'])[:60]}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return json_or_table_main(
        argv,
        description=__doc__.splitlines()[0],
        config_cls=ProfileConfig,
        quick=QUICK,
        run=run,
        table=_table,
    )


if __name__ == "__main__":
    main()
