"""Peak memory of a training step against depth, for each integrator and adjoint.

For every variant the script compiles `value_and_grad` of `mean(u_T**2)` with respect to
the field's weights (the training step's forward and backward through the depth
integration) and reads XLA's own memory analysis of the compiled program
(`compiled.memory_analysis()`): `temp` is the working memory beyond the arguments and
outputs, what grows with depth when the backward pass stores states. The same program is
then timed (jitted, warmed up, median of repeats), so each memory figure comes with its
cost in time. Three sweeps:

- **layers**: depth `L` of the default field (per-layer weights, sequential blocks) under
  `Discrete()`, fixed-step Euler with step 1/2 (the same function), and adaptive Tsit5,
  the last differentiated by the library's default adjoint (`RecursiveCheckpointAdjoint`
  with 16 checkpoints, `pdeformer.depth.DEFAULT_CHECKPOINTS`), by diffrax's default
  `RecursiveCheckpointAdjoint()` and by `BacksolveAdjoint`. (Fixed-step Euler with
  `BacksolveAdjoint` is no longer an arm: `Continuous` refuses a fixed-step solve with any
  adjoint but `RecursiveCheckpointAdjoint` or `DirectAdjoint`, since fixed-step solves are
  differentiated through their steps, like `Discrete()`.)
- **max_steps**: an adaptive Tsit5 solve of a fixed field with growing `max_steps` (the
  solver's step budget, which sizes the checkpointing adjoint's buffers), for the library's
  default (16 checkpoints), diffrax's `RecursiveCheckpointAdjoint()` (about
  `sqrt(2 max_steps)` checkpoints, 90 at 4096), `RecursiveCheckpointAdjoint(checkpoints=
  max_steps)` (every step stored), `BacksolveAdjoint` (no stored steps; a backward solve)
  and, up to `DIRECT_MAX_STEPS`, `DirectAdjoint` (reverse mode through equinox's bounded
  loop: the budget rounded up to a power of 16, nested scans of 16 steps; the innermost
  scan keeps its steps' residuals, each level above it is under `jax.checkpoint` and
  recomputed, so at a budget of 16 nothing is recomputed);
- **steps taken**: the same solve at `max_steps=4096` forced to take more steps by a largest
  step `dtmax`, for the two checkpoint counts: what 16 checkpoints cost once the steps
  outnumber them and the backward pass recomputes some; beside them `DirectAdjoint` at a
  budget of twice the steps the solve needs (`2 * ceil(layers / min(dtmax, 1/2))`), and
  the same method with its stage loop done three ways: diffrax's default `Tsit5()` (a
  checkpointed stage loop, `scan_kind="checkpointed"`), `Tsit5(scan_kind="bounded")`
  (diffrax's other stage loop that reverse mode can differentiate; `scan_kind="lax"`
  cannot be) and `pf.Unrolled(Tsit5())` (stages unrolled in Python). `unrolled_ratios`
  gives, per `dtmax`, the interleaved median time of the unrolled arm over each of the
  other two.

XLA's analysis is exact for the compiled program and the same on every backend that
reports it (CPU and GPU); it is not a measured resident set size.

Usage:

    python experiments/bench/memory.py                   # quick: fewer sizes
    python experiments/bench/memory.py --preset full     # the recorded sizes
    python experiments/bench/memory.py --preset smoke    # seconds: tiny sizes (for tests)
    python experiments/bench/memory.py --variants Discrete Backsolve

Writes `results.json` and `results.md` (the tables) into `--out` (default
`runs/bench/memory`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: report, _cli

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402

import _cli  # noqa: E402
import pdeformer as pf  # noqa: E402
import report  # noqa: E402
from _timing import interleaved  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    """Benchmark settings.

    **Arguments:**

    - `batch`, `seq`, `dim`, `heads`: input and model sizes (FFN width `4 * dim`).
    - `layers`: depths of the layer sweep.
    - `max_steps`: step budgets of the `max_steps` sweep (at `fixed_layers` layers).
    - `dtmax`: largest steps of the steps-taken sweep (at `fixed_layers` layers): each
      forces at least `fixed_layers / dtmax` steps.
    - `fixed_layers`: depth of the field in the `max_steps` and steps-taken sweeps.
    - `rtol`: tolerance of the adaptive solves (atol = rtol / 10).
    - `repeats`: timed calls per variant (median reported), after one warm-up call.
    - `seed`: PRNG seed of weights and inputs.
    - `variants`: names of the variants to run (see `layer_variants`, `step_variants`,
      `taken_variants`); `None`: all.
    - `out`: the output directory (`None`: print only).
    """

    batch: int = 4
    seq: int = 256
    dim: int = 64
    heads: int = 4
    layers: tuple[int, ...] = (2, 4, 8, 16)
    max_steps: tuple[int, ...] = (64, 256, 1024, 4096)
    dtmax: tuple[float, ...] = (0.5, 0.125, 0.03125)
    fixed_layers: int = 4
    rtol: float = 1e-3
    repeats: int = 3
    seed: int = 0
    variants: tuple[str, ...] | None = None
    out: Path | None = Path("runs/bench/memory")


# diffrax documents `DirectAdjoint`'s cost as growing with `max_steps` (every budgeted step is
# an iteration of its nested scans, and above 256 a third level is recomputed): the
# `max_steps` sweep runs it up to this budget only. Larger budgets, `Continuous`'s default
# 4096 among them, are not measured.
DIRECT_MAX_STEPS = 256


SMOKE = Config(
    batch=1,
    seq=8,
    dim=8,
    heads=2,
    layers=(1,),
    max_steps=(16,),
    fixed_layers=1,
    repeats=1,
    variants=(
        "Discrete",
        "Euler 1/2, RecursiveCheckpoint",
        "RecursiveCheckpoint (16, default)",
        "Direct (bounded loop)",
        "Unrolled stages, RecursiveCheckpoint (16, default)",
        "Bounded stages, RecursiveCheckpoint (16, default)",
    ),
    dtmax=(0.25,),
)
QUICK = Config(layers=(2, 4, 8), max_steps=(64, 256, 1024), dtmax=(0.5, 0.125))
PRESETS = {"smoke": lambda: SMOKE, "quick": lambda: QUICK, "full": Config}


def _loss(field, u0, depth):
    return jnp.mean(depth(field, u0).u ** 2)


def _measure(config: Config, field, u0, depth, timed: bool = True) -> dict[str, Any]:
    """Compile the forward+backward of one variant, read its memory, time it (with
    `timed=False`, return the warmed-up call as `call` instead of timing it)."""
    # Arrays as arguments (weights, tolerances), the rest closed over: the gradient is
    # taken with respect to the field's weights only.
    (params, depth_arrays), static = eqx.partition((field, depth), eqx.is_array)

    @jax.jit
    def fn(params, depth_arrays, u):
        def loss(p):
            f, d = eqx.combine((p, depth_arrays), static)
            return _loss(f, u, d)

        return jax.value_and_grad(loss)(params)

    t0 = time.perf_counter()
    compiled = fn.lower(params, depth_arrays, u0).compile()
    compile_s = time.perf_counter() - t0
    analysis = compiled.memory_analysis()
    jax.block_until_ready(compiled(params, depth_arrays, u0))  # warm-up
    nfe = int(eqx.filter_jit(lambda f, d, u: d(f, u).stats.nfe)(field, depth, u0))
    memory = {
        "temp_mib": analysis.temp_size_in_bytes / 2**20,
        "argument_mib": analysis.argument_size_in_bytes / 2**20,
        "output_mib": analysis.output_size_in_bytes / 2**20,
        "compile_s": compile_s,
        "nfe": nfe,
    }
    if not timed:
        return memory | {"call": lambda: jax.block_until_ready(compiled(params, depth_arrays, u0))}
    times = []
    for _ in range(config.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, depth_arrays, u0))
        times.append(time.perf_counter() - t0)
    return memory | {"time_ms": 1e3 * statistics.median(times)}


# The steps-taken sweep's three stage loops of the same Tsit5 solve.
DEFAULT = "RecursiveCheckpoint (16, default)"
UNROLLED = "Unrolled stages, RecursiveCheckpoint (16, default)"
BOUNDED = "Bounded stages, RecursiveCheckpoint (16, default)"


def _adaptive(config: Config, adjoint, max_steps: int = 4096) -> pf.Continuous:
    return pf.Continuous(
        diffrax.Tsit5(),
        diffrax.PIDController(rtol=config.rtol, atol=config.rtol / 10),
        adjoint,
        max_steps=max_steps,
    )


def _euler_half() -> pf.Continuous:
    # Differentiated through its steps, as every fixed-step solve is.
    return pf.Continuous(diffrax.Euler(), diffrax.ConstantStepSize(), dt0=0.5)


def layer_variants(config: Config) -> dict[str, Callable[[], pf.AbstractDepth]]:
    rc, bs = diffrax.RecursiveCheckpointAdjoint, diffrax.BacksolveAdjoint
    return {
        "Discrete": pf.Discrete,
        "Euler 1/2, RecursiveCheckpoint": _euler_half,
        "Tsit5 adaptive, RecursiveCheckpoint (16, default)": lambda: _adaptive(config, None),
        "Tsit5 adaptive, RecursiveCheckpoint (diffrax default)": lambda: _adaptive(config, rc()),
        "Tsit5 adaptive, Backsolve": lambda: _adaptive(config, bs()),
    }


def step_variants(config: Config) -> dict[str, Callable[[int], pf.AbstractDepth]]:
    rc, bs = diffrax.RecursiveCheckpointAdjoint, diffrax.BacksolveAdjoint
    return {
        "RecursiveCheckpoint (16, default)": lambda n: _adaptive(config, None, n),
        "RecursiveCheckpoint (diffrax default)": lambda n: _adaptive(config, rc(), n),
        "RecursiveCheckpoint (checkpoints=max_steps)": lambda n: _adaptive(
            config, rc(checkpoints=n), n
        ),
        "Backsolve": lambda n: _adaptive(config, bs(), n),
        "Direct (bounded loop)": lambda n: (
            _adaptive(config, diffrax.DirectAdjoint(), n) if n <= DIRECT_MAX_STEPS else None
        ),
    }


def taken_variants(config: Config) -> dict[str, Callable[[float], pf.AbstractDepth]]:
    """Adaptive Tsit5 at `max_steps=4096` made to take more steps by a largest step `dtmax`:
    where 16 checkpoints no longer hold every step and the backward pass recomputes.
    `pf.Unrolled(Tsit5())` is the same method with its stages unrolled (each stage's
    intermediates kept for the step being differentiated, not recomputed);
    `Tsit5(scan_kind="bounded")` is the same method with its stages in diffrax's bounded
    loop, the other reverse-differentiable choice diffrax offers. `DirectAdjoint` gets
    twice the steps the solve needs (at least two per layer, one per smooth half-layer,
    and `layers / dtmax`) as its budget, which sizes what it stores (rounded up to a power
    of 16 by its loop).

    The unrolled variant is this benchmark's only use of `pf.Unrolled`: where the library
    drops it, drop it here (and `unrolled_ratios`)."""
    rc = diffrax.RecursiveCheckpointAdjoint

    def make(adjoint, dtmax, max_steps=4096, solver=None):
        return pf.Continuous(
            diffrax.Tsit5() if solver is None else solver,
            diffrax.PIDController(rtol=config.rtol, atol=config.rtol / 10, dtmax=dtmax),
            adjoint,
            max_steps=max_steps,
        )

    def direct_budget(dtmax: float) -> int:
        # Twice the accepted steps the jumps and `dtmax` force: room for rejected steps at
        # these tolerances (the recorded runs rejected none). A solve that needed more
        # would stop with diffrax's max_steps error, not give a wrong figure.
        return 2 * math.ceil(config.fixed_layers / min(dtmax, 0.5))

    return {
        DEFAULT: lambda d: make(None, d),
        "RecursiveCheckpoint (diffrax default)": lambda d: make(rc(), d),
        "Direct (bounded loop)": lambda d: make(diffrax.DirectAdjoint(), d, direct_budget(d)),
        UNROLLED: lambda d: make(None, d, solver=pf.Unrolled(diffrax.Tsit5())),
        BOUNDED: lambda d: make(None, d, solver=diffrax.Tsit5(scan_kind="bounded")),
    }


def main(config: Config) -> dict[str, Any]:
    """Run the three sweeps; write `results.json` and `results.md` into `config.out`.

    **Returns:**

    `layers_sweep`, `max_steps_sweep`, `steps_taken_sweep` (a row per variant and size),
    `unrolled_ratios`, `growth` and `meta`.

    **Raises:**

    `ValueError` if `config.variants` names an unknown variant.
    """
    if config.variants is not None:
        known = set(layer_variants(config)) | set(step_variants(config))
        known |= set(taken_variants(config))
        unknown = [v for v in config.variants if v not in known]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; choose from {sorted(known)}.")
    log = report.logger("bench memory")
    meta = report.meta(config)
    start = time.perf_counter()
    key = jr.PRNGKey(config.seed)
    kf, ku = jr.split(key)
    u0 = jr.normal(ku, (config.batch, config.seq, config.dim))

    def field(layers: int) -> pf.Field:
        return pf.Field(config.dim, config.heads, layers, key=kf)

    def chosen(variants: dict[str, Any]) -> dict[str, Any]:
        if config.variants is None:
            return variants
        return {k: v for k, v in variants.items() if k in config.variants}

    layer_rows = []
    for name, make in chosen(layer_variants(config)).items():
        for layers in config.layers:
            row = {"variant": name, "layers": layers, **_measure(config, field(layers), u0, make())}
            log(
                f"{name:40s} L={layers:3d} temp {row['temp_mib']:9.1f} MiB {row['time_ms']:8.1f} ms"
            )
            layer_rows.append(row)
    step_rows = []
    fixed = field(config.fixed_layers)
    for name, make in chosen(step_variants(config)).items():
        for n in config.max_steps:
            depth = make(n)
            if depth is None:
                log(f"{name:45s} max_steps={n:5d} not run (above DIRECT_MAX_STEPS)")
                continue
            row = {"variant": name, "max_steps": n, **_measure(config, fixed, u0, depth)}
            log(f"{name:45s} max_steps={n:5d} temp {row['temp_mib']:9.1f} MiB "
                f"{row['time_ms']:8.1f} ms")  # fmt: skip
            step_rows.append(row)
    taken_rows = []
    taken = chosen(taken_variants(config))
    for d in config.dtmax:
        # The checkpoint counts are timed interleaved (`_timing.interleaved`), each call of
        # one next to a call of the other: their ratio is the figure of this sweep.
        measured = {
            name: _measure(config, fixed, u0, make(d), timed=False) for name, make in taken.items()
        }
        samples = interleaved(
            {name: m.pop("call") for name, m in measured.items()},
            max(config.repeats, 5),
            f"dtmax={d:g}",
            log,
        )
        for name, m in measured.items():
            depth = taken[name](d)
            steps = eqx.filter_jit(lambda f, dd, u: dd(f, u).stats.num_steps)(fixed, depth, u0)
            row = {
                "variant": name,
                "dtmax": d,
                "max_steps": depth.max_steps,
                "steps": int(steps),
                **m,
                "time_ms": 1e3 * statistics.median(samples[name]),
                "time_ms_min": 1e3 * min(samples[name]),
            }
            log(f"{name:45s} dtmax={d:<8g} steps={row['steps']:4d} temp {row['temp_mib']:9.1f} "
                f"MiB {row['time_ms']:8.1f} ms")  # fmt: skip
            taken_rows.append(row)
    result = {
        "layers_sweep": layer_rows,
        "max_steps_sweep": step_rows,
        "steps_taken_sweep": taken_rows,
        "unrolled_ratios": unrolled_ratios(taken_rows),
        "growth": _growth(layer_rows, "layers") | _growth(step_rows, "max_steps"),
        "meta": meta,
    }
    meta["wall_s"] = time.perf_counter() - start
    title = "Peak memory of a training step against depth"
    report.write(config.out, result, title, markdown(result), log=log)
    return result


def unrolled_ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per `dtmax` (keyed by its `%g` text): the unrolled arm's interleaved median time
    over that of diffrax's default `Tsit5()` (`vs_tsit5`) and of `Tsit5(scan_kind="bounded")`
    (`vs_tsit5_bounded`), where those arms ran."""
    out: dict[str, dict[str, float]] = {}
    by_key = {(r["variant"], r["dtmax"]): r for r in rows}
    for (name, d), row in by_key.items():
        if name != UNROLLED:
            continue
        ratios = {
            label: row["time_ms"] / by_key[(other, d)]["time_ms"]
            for label, other in (("vs_tsit5", DEFAULT), ("vs_tsit5_bounded", BOUNDED))
            if (other, d) in by_key
        }
        if ratios:
            out[f"{d:g}"] = ratios
    return out


def _growth(rows: list[dict[str, Any]], axis: str) -> dict[str, dict[str, float]]:
    """Per variant: temp memory and time at the largest depth over those at the smallest."""
    out = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = sorted((r for r in rows if r["variant"] == name), key=lambda r: r[axis])
        lo, hi = mine[0], mine[-1]
        out[f"{name} [{axis} {lo[axis]}->{hi[axis]}]"] = {
            "temp_ratio": hi["temp_mib"] / max(lo["temp_mib"], 1e-9),
            "time_ratio": hi["time_ms"] / lo["time_ms"],
        }
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = ["| variant | layers | temp MiB | time ms | NFE |", "|---|---|---|---|---|"]
    for r in result["layers_sweep"]:
        lines.append(
            f"| {r['variant']} | {r['layers']} | {r['temp_mib']:.1f} | {r['time_ms']:.0f} | "
            f"{r['nfe']} |"
        )
    lines += ["", "| variant | max_steps | temp MiB | time ms | NFE |", "|---|---|---|---|---|"]
    for r in result["max_steps_sweep"]:
        lines.append(
            f"| {r['variant']} | {r['max_steps']} | {r['temp_mib']:.1f} | {r['time_ms']:.0f} | "
            f"{r['nfe']} |"
        )
    lines += [
        "",
        "| variant | dtmax | max_steps | steps | temp MiB | time ms, interleaved |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["steps_taken_sweep"]:
        lines.append(
            f"| {r['variant']} | {r['dtmax']:g} | {r['max_steps']} | {r['steps']} | "
            f"{r['temp_mib']:.1f} | "
            f"{r['time_ms']:.0f} (min {r['time_ms_min']:.0f}) |"
        )
    ratios = result.get("unrolled_ratios") or {}
    if ratios:
        lines += [
            "",
            "| dtmax | Unrolled / Tsit5() | Unrolled / Tsit5(scan_kind='bounded') |",
            "|---|---|---|",
        ]
        for d, r in ratios.items():
            cells = [f"{r[k]:.2f}" if k in r else "-" for k in ("vs_tsit5", "vs_tsit5_bounded")]
            lines.append(f"| {d} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    _cli.run(PRESETS, main, description=__doc__.splitlines()[0])
