"""Benchmark: the diffusion layer's cost against attention, its scaling, and the stiff path.

Prints one JSON object:

- `diffusion_vs_attention_at_4096`: time of a 3-scale `DiffusionLayer` (one step) over the
  time of one `MultiHeadAttention`, seq 4096, dim 128, 4 heads, forward+backward
  (`value_and_grad` of the sum of squares w.r.t. the module), jitted, warmed, median.
  Target <= 0.05.
- `scaling_exponent`: fitted `p` in `time ~ seq^p` for the layer over seq 1k..16k.
  Target <= 1.15. `scaling_minor_faults_per_call` gives the page faults of each length's
  calls (a CPU call whose working memory glibc maps afresh pays the kernel for zeroing it),
  `scaling_temp_mib` that working memory (XLA's memory analysis of the compiled program).
- `nfe_explicit_vs_stiff_path_at_high_D`: NFE of explicit Tsit5 (`Continuous`) over NFE of
  the exponential path (`ExponentialContinuous(ExpRK3())`) at the same tolerance
  (`PIDController(rtol=stiff_rtol, atol=stiff_rtol / 10)`), for the field with the largest `D` of
  `stiff_ds`. Target >= 5. The `stiff` entry has, for every `D`, both solvers' NFE, steps,
  rejected steps, wall time and max error against a tight Tsit5 reference (rtol 1e-10).

Run: `python experiments/bench/diffusion.py [--preset smoke|quick|full] [--out DIR]`
(`smoke`: tiny sizes, seconds, for the tests, its figures mean nothing; `quick`: a smaller
sweep, about a minute; `full`: the sizes of the targets). Writes `results.json` and
`results.md` into `--out` (default `runs/bench/diffusion`).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: report, _cli

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402

import _cli  # noqa: E402
import pdeformer as pf  # noqa: E402
import report  # noqa: E402
from _timing import interleaved  # noqa: E402
from pdeformer.operators.diffusion_layer import DiffusionLayer  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    """Benchmark settings: the layer and attention sizes (`dim`, `heads`), the length of the
    cost comparison (`seq_compare`), the lengths of the scaling fit (`seqs`), the layer's
    `dilations`, timed `repeats`; the stiff comparison's diffusion coefficients (`stiff_ds`),
    tolerance (`stiff_rtol`, atol = rtol / 10) and field sizes; `seed`; `out`, the output
    directory (`None`: print only)."""

    dim: int = 128
    heads: int = 4
    seq_compare: int = 4096
    seqs: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    dilations: tuple[int, ...] = (1, 2, 4)
    repeats: int = 7
    stiff_ds: tuple[float, ...] = (12.5, 50.0, 200.0)
    stiff_rtol: float = 1e-4
    stiff_seq: int = 16
    stiff_dim: int = 16
    stiff_layers: int = 2
    seed: int = 0
    out: Path | None = Path("runs/bench/diffusion")


# Quick mode compares at seq 2048 (attention fwd+bwd at 4096 alone takes ~8 s on 2 CPU cores);
# the ratio key keeps its name, and `config.seq_compare` says which length was used.
QUICK = Config(seq_compare=2048, seqs=(1024, 2048, 4096), repeats=2, stiff_seq=8, stiff_dim=8)
SMOKE = Config(
    dim=8,
    heads=2,
    seq_compare=64,
    seqs=(64, 128),
    repeats=1,
    stiff_ds=(12.5,),
    stiff_seq=8,
    stiff_dim=8,
    stiff_layers=1,
)


def _time_fwd_bwd(module, u, repeats: int) -> tuple[float, float, float]:
    """Median seconds of a jitted forward+backward (gradient with respect to the module's
    floating-point arrays), the minor page faults per timed call (the kernel zero-filling
    freshly mapped working memory; see `docs/howto/devices.md`), and the compiled program's
    working memory in MiB (XLA's memory analysis, `temp`)."""
    params, static = eqx.partition(module, eqx.is_inexact_array)

    @jax.jit
    def run(p, u):
        return jax.value_and_grad(lambda p: jnp.sum(eqx.combine(p, static)(u) ** 2))(p)

    compiled = run.lower(params, u).compile()
    temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
    jax.block_until_ready(compiled(params, u))  # warm
    jax.block_until_ready(compiled(params, u))
    counters: dict[str, dict[str, list[float]]] = {}
    samples = interleaved(
        {"call": lambda: jax.block_until_ready(compiled(params, u))},
        repeats,
        "",
        lambda msg: None,
        counters,
    )
    faults = statistics.mean(counters["call"]["minor_faults"])
    return statistics.median(samples["call"]), faults, temp_mib


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _stiff(config: Config) -> dict:
    with jax.enable_x64(True):
        key = jr.PRNGKey(config.seed)
        kf, kx = jr.split(key)
        dim, seq = config.stiff_dim, config.stiff_seq
        field = pf.Field(dim, 2, config.stiff_layers, key=kf, dtype=jnp.float64)
        x = jr.normal(kx, (2, seq, dim), jnp.float64)
        mask = jnp.arange(seq)[None, :] < jnp.asarray([seq, seq // 2])[:, None]

        # One compilation per integrator: tolerances are arrays, D a parameter of the field.
        @eqx.filter_jit
        def explicit(field, rtol, atol):
            pid = diffrax.PIDController(rtol=rtol, atol=atol)
            return pf.Continuous(diffrax.Tsit5(), pid, max_steps=200_000)(field, x, mask)

        @eqx.filter_jit
        def exponential(field, rtol, atol):
            pid = diffrax.PIDController(rtol=rtol, atol=atol)
            return pf.ExponentialContinuous(pf.ExpRK3(), pid, max_steps=200_000)(field, x, mask)

        tol = (jnp.asarray(config.stiff_rtol), jnp.asarray(config.stiff_rtol / 10))
        tight = (jnp.asarray(1e-10), jnp.asarray(1e-11))
        rows = []
        for d in config.stiff_ds:
            op = pf.DiffusionOperator(dim, alpha_max=None, init=d, dtype=jnp.float64)
            f = eqx.tree_at(lambda g: g.diffusion, field, op, is_leaf=lambda v: v is None)
            ref = explicit(f, *tight).u
            valid = jnp.where(mask[..., None], ref, 0.0)
            row = {"D": d, "max_abs_valid_state": float(jnp.max(jnp.abs(valid)))}
            for name, solve in (("tsit5", explicit), ("exponential", exponential)):
                sol = solve(f, *tol)
                row[name] = dict(
                    nfe=int(sol.stats.nfe),
                    steps=int(sol.stats.num_steps),
                    rejected=int(sol.stats.num_rejected_steps),
                    wall_s=_time(lambda solve=solve, f=f: solve(f, *tol).u, config.repeats),
                    max_abs_error=float(jnp.max(jnp.abs(sol.u - ref))),
                )
            row["nfe_ratio"] = row["tsit5"]["nfe"] / row["exponential"]["nfe"]
            rows.append(row)
        return dict(
            method="ExponentialContinuous(ExpRK3()) vs Continuous(Tsit5())",
            rtol=config.stiff_rtol,
            atol=config.stiff_rtol / 10,
            reference="Continuous(Tsit5(), PIDController(rtol=1e-10, atol=1e-11))",
            high_D=max(config.stiff_ds),
            by_D=rows,
        )


def main(config: Config) -> dict:
    """Run the benchmark; write `results.json` and `results.md` into `config.out`.

    **Returns:**

    The figures (see the module's docstring) and `meta`.
    """
    meta = report.meta(config)
    start = time.perf_counter()
    key = jr.PRNGKey(config.seed)
    ka, ku = jr.split(key)
    layer = DiffusionLayer(config.dim, dilations=config.dilations)
    attention = pf.MultiHeadAttention(config.dim, config.heads, key=ka)
    u = jr.normal(ku, (config.seq_compare, config.dim))
    t_layer, _, _ = _time_fwd_bwd(layer, u, config.repeats)
    t_attn, _, _ = _time_fwd_bwd(attention, u, config.repeats)
    times, faults, temps = [], [], []
    for seq in config.seqs:
        t, f, m = _time_fwd_bwd(layer, jr.normal(ku, (seq, config.dim)), config.repeats)
        times.append(t)
        faults.append(f)
        temps.append(m)
    p = float(np.polyfit(np.log(config.seqs), np.log(times), 1)[0])
    stiff = _stiff(config)
    high = next(r for r in stiff["by_D"] if r["D"] == stiff["high_D"])
    ratio_nfe = high["nfe_ratio"]
    ratio_time = t_layer / t_attn
    targets = {
        "diffusion_vs_attention_at_4096<=0.05": ratio_time <= 0.05,
        "scaling_exponent<=1.15": p <= 1.15,
        "nfe_explicit_vs_stiff_path_at_high_D>=5": ratio_nfe >= 5,
    }
    result = {
        "diffusion_vs_attention_at_4096": ratio_time,
        "time_diffusion_s": t_layer,
        "time_attention_s": t_attn,
        "scaling_exponent": p,
        "scaling_seqs": list(config.seqs),
        "scaling_times_s": times,
        "scaling_minor_faults_per_call": faults,
        "scaling_temp_mib": temps,
        "nfe_explicit_vs_stiff_path_at_high_D": ratio_nfe,
        "stiff": stiff,
        "passed_targets": all(targets.values()),
        "targets": targets,
        "meta": meta,
    }
    meta["wall_s"] = time.perf_counter() - start
    report.write(config.out, result, "The diffusion layer's cost", _markdown(result))
    return result


def _markdown(r: dict) -> str:
    fmt = report.fmt
    lines = [
        "| figure | value | target |",
        "|---|---:|---|",
        f"| diffusion layer / attention, fwd+bwd, seq {r['meta']['config']['seq_compare']} "
        f"| {fmt(r['diffusion_vs_attention_at_4096'])} "
        f"| {r['targets']['diffusion_vs_attention_at_4096<=0.05']} (<= 0.05) |",
        f"| scaling exponent over seq {r['scaling_seqs']} | {fmt(r['scaling_exponent'])} "
        f"| {r['targets']['scaling_exponent<=1.15']} (<= 1.15) |",
        f"| NFE Tsit5 / exponential path at D = {r['stiff']['high_D']:g} "
        f"| {fmt(r['nfe_explicit_vs_stiff_path_at_high_D'])} "
        f"| {r['targets']['nfe_explicit_vs_stiff_path_at_high_D>=5']} (>= 5) |",
        "",
        "| D | Tsit5 NFE | exponential NFE | Tsit5 max error | exponential max error |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in r["stiff"]["by_D"]:
        lines.append(
            f"| {row['D']:g} | {row['tsit5']['nfe']} | {row['exponential']['nfe']} "
            f"| {fmt(row['tsit5']['max_abs_error'])} | {fmt(row['exponential']['max_abs_error'])} |"
        )
    return "\n".join(lines)


PRESETS = {"smoke": lambda: SMOKE, "quick": lambda: QUICK, "full": Config}

if __name__ == "__main__":
    _cli.run(PRESETS, main, description=__doc__.splitlines()[0])
