"""Where the time goes: a profile of a continuous-depth training step's XLA program, and
the attention operator alone against PyTorch's fused kernel (two modes).

## `--mode solve` (the default)

Profiles the jitted forward+backward (`grad` of `sum(u_T)` with respect to the weights) of
`pf.Continuous(diffrax.Dopri5(), diffrax.PIDController(rtol, atol))` on the default field,
at the sizes of `peers.py`'s continuous comparison (batch 8, seq 256, dim 64, 4 heads,
4 layers, FFN 256). The call runs under `jax.profiler.trace`; the trace's events are
attributed to the compiled program's HLO instructions by name, and each instruction's
*self* time (its duration less that of the events nested inside it) is summed into:

- `pass`: `"backward"` where the instruction's JAX op name lies under a `transpose(...)`
  (the backward pass, which under `RecursiveCheckpointAdjoint` also recomputes each
  step's forward), `"forward"` for the rest of the program;
- `kind`: `"matmul"` for a dot or a fusion that contains one, `"other"` for the rest
  (elementwise passes, reductions, copies, control flow);
- `phase` (finer, in `fields.<name>.breakdown_ms`): the forward solve; in the backward
  pass, the step recomputed from its checkpoint, the stages recomputed inside diffrax's own
  checkpointed stage loop (none when the stages are unrolled, `Continuous`'s default since
  issue 28), and the vector-Jacobian products (`phase()`);
- `category`: the attention core, the other matmuls, the rematerialised norms and GELU,
  the solver's stacked buffers (stages, checkpoints), the weight slice and its transpose,
  zero fills, copies and transposes, the rest (`category()`);
- the instructions with the most self time, with their shape and JAX op name.

Each field of `--solve.fields` (default: `default`, the `PerLayer` / `SequentialBlock`
field; `smooth`, `Polynomial(3)` weights with `ParallelBlock`; `default_stage_loop`, the
default field under diffrax's own stage loop, `unroll_stages=False`) is profiled in turn;
the top-level figures are the first field's.

Events of the runtime itself (thread-pool waits, the executor) are reported apart, by
name, as `runtime_ms`; a "wait" event spans work done on other threads. The figures are
sums over `calls` calls, divided by `calls`. The profiler slows the call (compare
`wall_ms_per_call` with `peers.py`'s time): read the shares, not the sum. They
describe XLA's program on this backend; on a 2-core CPU shared with other jobs a profile is
as noisy as a timing.

## `--mode attention`

`peers.py` finds that what separates pdeformer from PyTorch on some CPUs is the
attention half of the field. This script isolates the operator itself,
`pdeformer.operators.attention.attention` on queries, keys and values of shape
`(batch, seq, heads, head_dim)` without a mask, and times, interleaved with each other:

- each implementation XLA runs on the CPU: `"blockwise"` (the CPU default), `"xla"`
  (`jax.nn.dot_product_attention`) and `"einsum"`;
- when PyTorch is installed (`pip install -e ".[peers]"`),
  `torch.nn.functional.scaled_dot_product_attention` on the same numbers, with as many
  threads as XLA's CPU backend uses.

Each is timed forward only and forward + backward (the gradient of `sum(out * g)` with
respect to `q`, `k` and `v`, for a fixed random `g`); the outputs and gradients of every
arm are checked against the `"einsum"` path before anything is timed. With a fixed `g` the
backward pass does not wait for the forward's output, so a program without loops could
overlap the two, which no layer inside a model can do; the blockwise path's loops keep
them in order, and a variant that unrolls them should be timed inside a model too
(`peers.py`). The defaults are the
sizes of `peers.py`'s continuous comparison (batch 8, seq 256, 4 heads of width 16);
`--seq 512 --head-dim 32` gives those of its discrete one.

`--products` adds the blockwise path's matrix products alone: its seven products per call
come in three shapes (below, `g` pairs of one group, `b` query rows of one block, `s` keys,
`h` the head width), each timed as one XLA batched matmul (the einsum the blockwise path
writes) and as `torch.bmm` on the same contiguous operands, interleaved:

- `rows_by_keys`, `(g, b, h) x (g, h, s)`: the logits, again in the backward, and `dO V^T`
  (three per call);
- `head_width`, `(g, b, s) x (g, s, h)`: `P V` and `dQ = dS K` (two per call);
- `head_width_t`, `(g, h, b) x (g, b, s)`: `dV^T = dO^T P` and `dK^T = Q^T dS` (two per
  call).

`--profile` adds a profile of the blockwise forward + backward (one XLA program) per HLO
instruction, as `--mode solve` does, with each instruction's self time summed by kind:

- `matmul_rows_by_keys`: matmuls whose output holds a `(rows, keys)` block (the logits,
  and in the backward the logits again and `dO V^T`);
- `matmul_head_width`: the other matmuls (`P V`, `dV`, `dK`, `dQ`, of width `head_dim`);
- `exp`: fusions that take an exponential (the probabilities);
- `reduce`: row maxima and sums;
- `other`: the rest (elementwise passes, transposes, copies, control flow).

Usage:

    python experiments/bench/profiling.py                               # the solve profile
    python experiments/bench/profiling.py --solve.unrolled              # with Unrolled(Dopri5())
    python experiments/bench/profiling.py --mode attention              # the operator alone
    python experiments/bench/profiling.py --mode attention --attention.products --attention.profile
    python experiments/bench/profiling.py --preset smoke                # tiny sizes (tests)

Writes `results.json` and `results.md` into `--out` (default `runs/bench/profiling`).
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Literal

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
from _profile import profile  # noqa: E402
from _timing import interleaved  # noqa: E402
from pdeformer.operators import attention as attention_module  # noqa: E402

_log = report.logger("bench profiling")


# ---------------------------------------------------------------------------------------
# Mode `solve`.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SolveConfig:
    """Settings of the solve profile.

    **Arguments:**

    - `batch`, `seq`, `dim`, `heads`, `layers`, `hidden`: model and input sizes.
    - `rtol`: the adaptive controller's tolerance (atol = rtol / 10).
    - `calls`: profiled calls (after a compile and a warm-up call).
    - `top`: how many instructions to list.
    - `seed`: PRNG seed of weights and inputs.
    - `unrolled`: profile `pf.Unrolled(diffrax.Dopri5())` (the same method with its stages
      unrolled) instead of `diffrax.Dopri5()` (this script's only use of `pf.Unrolled`).
    - `fields`: the fields profiled, each in turn: `"default"` (`PerLayer` weights,
      `SequentialBlock`), `"smooth"` (`Polynomial(3)` weights, `ParallelBlock`: one
      smooth piece), and `"default_stage_loop"`: the default field solved with diffrax's
      own stage loop (`Continuous(..., unroll_stages=False)`, the default before issue 28).
    """

    batch: int = 8
    seq: int = 256
    dim: int = 64
    heads: int = 4
    layers: int = 4
    hidden: int = 256
    rtol: float = 1e-3
    calls: int = 3
    top: int = 20
    seed: int = 0
    unrolled: bool = False
    fields: tuple[Literal["default", "smooth", "default_stage_loop"], ...] = (
        "default",
        "smooth",
        "default_stage_loop",
    )


SOLVE_SMOKE = dict(batch=2, seq=16, dim=16, heads=2, layers=2, hidden=32, calls=1, top=5)


PHASES = (
    "forward",
    "backward: step recomputed",
    "backward: stages recomputed",
    "backward: VJP",
)
CATEGORIES = (
    "attention core (logits, softmax, PV)",
    "projections and FFN (matmul)",
    "norms and GELU (rematerialised)",
    "solver buffers (stages, checkpoints)",
    "weight slice and its transpose",
    "zero fills",
    "copies and transposes",
    "other (elementwise, reductions, control)",
)


def phase(op_name: str) -> str:
    """Which part of a checkpointed solve's forward+backward an instruction belongs to,
    from its JAX op name: the forward solve; in the backward pass (under diffrax's
    `RecursiveCheckpointAdjoint`, the `checkpointed-bwd` loop), the step recomputed from
    its checkpoint, the stages recomputed by diffrax's own checkpointed stage loop (a
    second `checkpointed-bwd`, absent with `Unrolled`), and the vector-Jacobian products
    (under `transpose(...)` after the last `checkpointed-bwd`)."""
    if "checkpointed-bwd" not in op_name and "transpose(" not in op_name:
        return PHASES[0]
    if "transpose(" in op_name.rsplit("checkpointed-bwd", 1)[-1]:
        return PHASES[3]
    return PHASES[1] if op_name.count("checkpointed-bwd") == 1 else PHASES[2]


def category(info: dict[str, Any], buffers: tuple[int, ...] = (7, 16)) -> str:
    """What an instruction computes, from its op name, the opcodes it runs and its shape;
    `buffers`: the leading sizes of the solver's stacked buffers of states (Dopri5's 7
    stages, the default adjoint's 16 checkpoints)."""
    name, ops = info["op_name"], set(info["ops"])
    lead = info["shape"].split("[", 1)[-1].split("]", 1)[0].split(",")[0]
    solver_buffer = lead in {str(b) for b in buffers} and info["shape"].count(",") >= 3
    if "closed_call" in name or any(e in name for e in ("gbh,ghs", "ghb,gbs", "gbs,gsh")):
        return CATEGORIES[0]
    if info["matmul"]:
        return CATEGORIES[1]
    if "checkpoint/" in name:
        return CATEGORIES[2]
    if solver_buffer:
        return CATEGORIES[3]
    if ops & {"dynamic-update-slice", "scatter"} or (
        "dynamic-slice" in ops and len(ops - {"bitcast", "parameter", "constant"}) == 1
    ):
        return CATEGORIES[4]
    if ops <= {"broadcast", "parameter", "constant", "bitcast"}:
        return CATEGORIES[5]
    if ops & {"copy", "transpose"}:
        return CATEGORIES[6]
    return CATEGORIES[7]


def _solve_field(name: str, c: SolveConfig, key) -> pf.Field:
    if name in ("default", "default_stage_loop"):
        return pf.Field(c.dim, c.heads, c.layers, hidden=c.hidden, key=key)
    return pf.Field(
        c.dim,
        c.heads,
        c.layers,
        hidden=c.hidden,
        key=key,
        schedule=pf.Polynomial(3),
        composition=pf.ParallelBlock(),
    )


def _profile_solve(c: SolveConfig, field_name: str) -> dict[str, Any]:
    key_field, key_u = jr.split(jr.PRNGKey(c.seed))
    field = _solve_field(field_name, c, key_field)
    params, static = eqx.partition(field, eqx.is_inexact_array)
    u0 = jr.normal(key_u, (c.batch, c.seq, c.dim), jnp.float32)
    solver = pf.Unrolled(diffrax.Dopri5()) if c.unrolled else diffrax.Dopri5()
    depth = pf.Continuous(
        solver,
        diffrax.PIDController(rtol=c.rtol, atol=c.rtol / 10),
        unroll_stages=field_name != "default_stage_loop",
    )

    def loss(p, u):
        sol = depth(eqx.combine(p, static), u)
        return jnp.sum(sol.u), sol.stats.nfe

    grad = jax.jit(jax.grad(loss, has_aux=True))
    _log(f"{field_name} field: compiling")
    compiled = grad.lower(params, u0).compile()
    _log(f"{field_name} field: profiling {c.calls} calls")
    prof = profile(compiled, (params, u0), c.calls)
    _, nfe = prof["output"]

    totals: collections.Counter = collections.Counter()
    breakdown = {p: dict.fromkeys(CATEGORIES, 0.0) for p in PHASES}
    rows = []
    for name, info in prof["instructions"].items():
        side = "backward" if "transpose(" in info["op_name"] else "forward"
        kind = "matmul" if info["matmul"] else "other"
        totals[f"{side} {kind}"] += info["ms"]
        part, what = phase(info["op_name"]), category(info)
        breakdown[part][what] += info["ms"]
        rows.append(
            {
                "instruction": name,
                "ms": info["ms"],
                "calls": info["calls"],
                "pass": side,
                "phase": part,
                "category": what,
                "kind": kind,
                "shape": info["shape"],
                "op_name": info["op_name"].rsplit("/", 2)[-2:],
            }
        )
    runtime = collections.Counter(prof["runtime_ms"])
    rows.sort(key=lambda r: -r["ms"])
    phase_ms = {p: sum(v.values()) for p, v in breakdown.items()}
    backward_ms = sum(phase_ms[p] for p in PHASES[1:])
    return {
        "field": field_name,
        "nfe": int(nfe),
        "wall_ms_per_call": prof["wall_ms_per_call"],
        "self_ms": {k: totals[k] for k in sorted(totals)},
        "phase_ms": phase_ms,
        "backward_over_forward_self_time": backward_ms / phase_ms[PHASES[0]],
        "breakdown_ms": breakdown,
        "runtime_ms": {k: v for k, v in runtime.most_common(5)},
        "instructions_profiled": len(rows),
        "top": rows[: c.top],
    }


def run_solve(c: SolveConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    profiles = {name: _profile_solve(c, name) for name in c.fields}
    first = profiles[c.fields[0]]
    return {
        "sizes": {
            "batch": c.batch,
            "seq": c.seq,
            "dim": c.dim,
            "heads": c.heads,
            "layers": c.layers,
            "hidden": c.hidden,
        },
        # The first field's figures at the top level, as before `fields` existed.
        "nfe": first["nfe"],
        "wall_ms_per_call": first["wall_ms_per_call"],
        "self_ms": first["self_ms"],
        "runtime_ms": first["runtime_ms"],
        "instructions_profiled": first["instructions_profiled"],
        "top": first["top"],
        "fields": profiles,
        "wall_s": time.perf_counter() - t_start,
    }


def solve_table(r: dict[str, Any], c: dict[str, Any]) -> str:
    """The solve profile as a fixed-width text (a Markdown code block): per field, the
    self time by phase and category, the runtime's own events and the top instructions."""
    lines = []
    solver = "Unrolled(Dopri5())" if c["unrolled"] else "Dopri5()"
    for name, f in r["fields"].items():
        lines.append(
            f"{name} field: Continuous {solver} forward+backward, sizes {r['sizes']}, "
            f"{f['nfe']} NFE: {f['wall_ms_per_call']:.1f} ms per call (under the profiler); "
            f"backward / forward self time {f['backward_over_forward_self_time']:.2f}"
        )
        lines.append("self ms per call (share of its phase): " + " | ".join(PHASES))
        for what in CATEGORIES:
            cells = []
            for part in PHASES:
                ms, total = f["breakdown_ms"][part][what], f["phase_ms"][part]
                cells.append(f"{ms:6.1f} ({100 * ms / total if total else 0:2.0f}%)")
            lines.append(f"  {what[:34]:>34}: " + " | ".join(cells))
        lines.append(
            f"  {'total':>34}: " + " | ".join(f"{f['phase_ms'][p]:6.1f}      " for p in PHASES)
        )
        for k, v in f["runtime_ms"].items():
            lines.append(f"  runtime, {k[:40]}: {v:.1f} ms")
        lines.append(f"top instructions of {f['instructions_profiled']}:")
        for row in f["top"]:
            lines.append(
                f"  {row['ms']:6.1f} ms {row['calls']:4d}x {row['phase'][:20]:>20} "
                f"{row['category'][:20]:20} {row['shape'][:28]:28} "
                f"{'/'.join(row['op_name'])[:50]}"
            )
        lines.append("")
    return "\n".join(["```", *lines[:-1], "```"])


# ---------------------------------------------------------------------------------------
# Mode `attention`.
# ---------------------------------------------------------------------------------------


IMPLEMENTATIONS = ("blockwise", "xla", "einsum")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Settings of the attention operator's timing.

    **Arguments:**

    - `batch`, `seq`, `heads`, `head_dim`: the shape of `q`, `k` and `v`.
    - `repeats`: timed rounds (each arm once per round, interleaved).
    - `inner`: calls per timed sample (the sample is their mean).
    - `profile`: also profile the blockwise forward + backward per instruction.
    - `profile_calls`: calls profiled.
    - `products`: also time the blockwise path's three product shapes alone, XLA against
      `torch.bmm` (XLA alone without PyTorch).
    - `torch_threads`: PyTorch's intra-op threads; 0 for `os.cpu_count()`.
    - `seed`: seed of the random inputs.
    """

    batch: int = 8
    seq: int = 256
    heads: int = 4
    head_dim: int = 16
    repeats: int = 15
    inner: int = 5
    profile: bool = False
    profile_calls: int = 10
    products: bool = False
    torch_threads: int = 0
    seed: int = 0


ATTENTION_SMOKE = dict(batch=2, seq=32, heads=2, head_dim=8, repeats=2, inner=1, profile_calls=1)


def _jax_arms(inputs, g):
    """Per implementation: jitted forward and forward+backward, compiled."""
    arms = {}
    for impl in IMPLEMENTATIONS:

        def fwd(q, k, v, impl=impl):
            return attention_module.attention(q, k, v, implementation=impl)

        def loss(q, k, v, impl=impl):
            return jnp.sum(fwd(q, k, v, impl) * g)

        grad = jax.grad(loss, argnums=(0, 1, 2))
        arms[impl] = (jax.jit(fwd).lower(*inputs).compile(), jax.jit(grad).lower(*inputs).compile())
    return arms


def _torch_arm(inputs, g, threads):
    """PyTorch's `scaled_dot_product_attention` on the same numbers, or None."""
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    torch.set_num_threads(threads)
    # PyTorch's layout is (batch, heads, seq, head_dim).
    as_torch = lambda x: torch.tensor(np.asarray(x)).transpose(1, 2).contiguous()
    q, k, v = (as_torch(x).requires_grad_() for x in inputs)
    tg = as_torch(g)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fwd():
        with torch.no_grad():
            return sdpa(q, k, v).transpose(1, 2).numpy()

    def grad():
        for x in (q, k, v):
            x.grad = None
        (sdpa(q, k, v) * tg).sum().backward()
        return tuple(x.grad.transpose(1, 2).numpy() for x in (q, k, v))

    return fwd, grad, torch.__version__


def _check(name, got, want, tol, reference="the einsum path"):
    err = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(got, want, strict=True)
    )
    if not err <= tol:
        raise RuntimeError(f"{name} disagrees with {reference}: max abs diff {err:.3g}.")
    return err


# The blockwise path's products, per call: (einsum, how many). The letters: `g` pairs of
# one group, `b` query rows of one block, `s` keys, `h` the head width.
PRODUCTS = {
    "rows_by_keys": ("gbh,ghs->gbs", 3),
    "head_width": ("gbs,gsh->gbh", 2),
    "head_width_t": ("ghb,gbs->ghs", 2),
}


def product_dims(
    c: AttentionConfig, block_size: int = attention_module.DEFAULT_BLOCK_SIZE
) -> dict[str, int]:
    """The sizes `g`, `b`, `s`, `h` of the blockwise path's products at `c`'s shapes."""
    g, b = attention_module._blocking(c.batch * c.heads, c.seq, block_size, 4, jax.device_count())
    return {"g": g, "b": b, "s": c.seq, "h": c.head_dim}


def product_operands(spec: str, dims: dict[str, int]) -> list[tuple[int, ...]]:
    """The shapes of an einsum's two operands."""
    return [tuple(dims[d] for d in part) for part in spec.split("->")[0].split(",")]


def _time_products(
    c: AttentionConfig,
    rng,
    threads: int,
    block_size: int = attention_module.DEFAULT_BLOCK_SIZE,
) -> dict[str, Any]:
    """Each product shape of the blockwise path alone: XLA's batched matmul against
    `torch.bmm` (when installed), with GFLOP/s, and the seven products' sum per call."""
    dims = product_dims(c, block_size)
    g, b = dims["g"], dims["b"]
    # Per attention call the path runs each product once per (group, query block).
    per_call = (c.batch * c.heads // g) * -(-c.seq // b)
    torch = None
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(threads)
    fns, flops = {}, {}
    for name, (spec, _) in PRODUCTS.items():
        x, y = (rng.standard_normal(sh).astype(np.float32) for sh in product_operands(spec, dims))
        # A multiply and an add for every combination of the four letters.
        flops[name] = 2 * math.prod(dims[d] for d in set(spec) - set(",->"))
        jx, jy = jnp.asarray(x), jnp.asarray(y)
        compiled = jax.jit(lambda a, bb, spec=spec: jnp.einsum(spec, a, bb)).lower(jx, jy).compile()
        want = np.einsum(spec, x.astype(np.float64), y.astype(np.float64))
        _check(f"xla {name}", [compiled(jx, jy)], [want], 1e-3, "numpy in float64")
        fns[f"xla_{name}"] = lambda f=compiled, a=jx, bb=jy: jax.block_until_ready(f(a, bb))
        if torch is not None:
            tx, ty = torch.from_numpy(x), torch.from_numpy(y)
            _check(f"torch {name}", [torch.bmm(tx, ty).numpy()], [want], 1e-3, "numpy in float64")
            fns[f"torch_{name}"] = lambda a=tx, bb=ty: torch.bmm(a, bb)
    # A jitted call that does nothing: the dispatch each standalone XLA product pays and a
    # product inside the blockwise program does not.
    noop, one = jax.jit(lambda a: a).lower(jnp.zeros(1)).compile(), jnp.zeros(1)
    fns["xla_noop"] = lambda: jax.block_until_ready(noop(one))
    for fn in fns.values():  # warm-up
        fn()
    inner = max(1, c.inner * per_call)
    samples = interleaved(
        {n: (lambda f=f: [f() for _ in range(inner)]) for n, f in fns.items()},
        c.repeats,
        "products round",
        _log,
    )
    out: dict[str, Any] = {
        "group_pairs": g,
        "block_rows": b,
        "per_call": per_call,
        "xla_noop_ms": 1e3 * statistics.median(samples["xla_noop"]) / inner,
    }
    libraries = ("xla", "torch") if torch is not None else ("xla",)
    for name, (spec, count) in PRODUCTS.items():
        row: dict[str, Any] = {
            "einsum": spec,
            "per_call": count * per_call,
            "gflop": flops[name] / 1e9,
        }
        for lib in libraries:
            s = samples[f"{lib}_{name}"]
            med, fast = 1e3 * statistics.median(s) / inner, 1e3 * min(s) / inner
            row[lib] = {"median_ms": med, "min_ms": fast, "gflops_at_min": flops[name] / fast / 1e6}
        if torch is not None:
            row["xla_vs_torch"] = row["xla"]["median_ms"] / row["torch"]["median_ms"]
        out[name] = row
    for lib in libraries:
        out[f"{lib}_seven_products_ms_per_call"] = sum(
            out[n]["per_call"] * out[n][lib]["median_ms"] for n in PRODUCTS
        )
    return out


def _kind(info: dict[str, Any], rows_by_keys: tuple[int, int]) -> str:
    if info["matmul"]:
        # The last two dimensions of a `(rows, keys)` block are `(block rows, seq)`.
        dims = [int(d) for d in info["shape"].split("[", 1)[1].split("]", 1)[0].split(",") if d]
        big = len(dims) >= 2 and dims[-1] == rows_by_keys[1] and dims[-2] == rows_by_keys[0]
        return "matmul_rows_by_keys" if big else "matmul_head_width"
    if "exponential" in info["ops"]:
        return "exp"
    if "reduce" in info["ops"]:
        return "reduce"
    return "other"


def _profile_blockwise(compiled, inputs, c: AttentionConfig) -> dict[str, Any]:
    prof = profile(compiled, inputs, c.profile_calls)
    rows = product_dims(c)["b"]
    by_kind: collections.Counter = collections.Counter()
    top = []
    for name, info in prof["instructions"].items():
        kind = _kind(info, (rows, c.seq))
        by_kind[kind] += info["ms"]
        top.append({"instruction": name, "ms": info["ms"], "kind": kind, "shape": info["shape"]})
    top.sort(key=lambda r: -r["ms"])
    return {
        "self_ms_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "self_ms_total": sum(by_kind.values()),
        "wall_ms_per_call": prof["wall_ms_per_call"],
        "top": top[:12],
    }


def run_attention(c: AttentionConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    rng = np.random.default_rng(c.seed)
    shape = (c.batch, c.seq, c.heads, c.head_dim)
    q, k, v, g = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(4))
    inputs = (q, k, v)
    _log(f"compiling {', '.join(IMPLEMENTATIONS)} at {shape}")
    arms = _jax_arms(inputs, g)
    want_out = arms["einsum"][0](*inputs)
    want_grad = arms["einsum"][1](*inputs)
    agreement = {}
    fns = {}
    for impl, (fwd, grad) in arms.items():
        agreement[impl] = {
            "out": _check(impl, [fwd(*inputs)], [want_out], 1e-4),
            "grad": _check(impl, grad(*inputs), want_grad, 1e-3),
        }
        fns[f"{impl}_fwd"] = lambda f=fwd: jax.block_until_ready(f(*inputs))
        fns[f"{impl}_fwd_bwd"] = lambda f=grad: jax.block_until_ready(f(*inputs))
    threads = c.torch_threads or os.cpu_count() or 1
    torch_arm = _torch_arm(inputs, g, threads)
    torch_version = None
    if torch_arm is not None:
        t_fwd, t_grad, torch_version = torch_arm
        agreement["torch"] = {
            "out": _check("torch", [t_fwd()], [want_out], 1e-4),
            "grad": _check("torch", t_grad(), want_grad, 1e-3),
        }
        fns["torch_fwd"] = t_fwd
        fns["torch_fwd_bwd"] = t_grad
    else:
        _log("PyTorch is not installed: timing the JAX implementations only")
    for fn in fns.values():  # warm-up
        fn()

    def sample(fn):
        return lambda: [fn() for _ in range(c.inner)]

    samples = interleaved({n: sample(f) for n, f in fns.items()}, c.repeats, "round", _log)
    ms = {
        n: {
            "median": 1e3 * statistics.median(s) / c.inner,
            "min": 1e3 * min(s) / c.inner,
        }
        for n, s in samples.items()
    }
    ratios = {}
    if torch_arm is not None:
        for part in ("fwd", "fwd_bwd"):
            ratios[f"blockwise_vs_torch_{part}"] = (
                ms[f"blockwise_{part}"]["median"] / ms[f"torch_{part}"]["median"]
            )
    result = {
        "sizes": {"batch": c.batch, "seq": c.seq, "heads": c.heads, "head_dim": c.head_dim},
        "ms": ms,
        "ratios": ratios,
        "agreement_max_abs_diff": agreement,
        "torch": torch_version,
        "torch_threads": threads if torch_arm is not None else None,
    }
    if c.products:
        _log("timing the blockwise path's products alone")
        result["products"] = _time_products(c, rng, threads)
    if c.profile:
        _log(f"profiling the blockwise forward+backward ({c.profile_calls} calls)")
        result["profile_blockwise_fwd_bwd"] = _profile_blockwise(arms["blockwise"][1], inputs, c)
    result["wall_s"] = time.perf_counter() - t_start
    return result


def attention_table(r: dict[str, Any], c: dict[str, Any]) -> str:
    """The attention timing as a fixed-width text (a Markdown code block)."""
    s = r["sizes"]
    lines = [
        f"attention (batch {s['batch']}, seq {s['seq']}, {s['heads']} heads of {s['head_dim']})"
        ": median (fastest) ms per call",
    ]
    for name, t in r["ms"].items():
        lines.append(f"  {name:>20}: {t['median']:8.2f} ({t['min']:.2f})")
    for name, x in r["ratios"].items():
        lines.append(f"  {name}: {x:.2f}")
    p = r.get("products")
    if p:
        lines.append(
            f"the blockwise path's products alone ({p['group_pairs']} pairs, "
            f"{p['block_rows']} query rows): median (fastest) ms, GFLOP/s at the fastest"
        )
        for name in PRODUCTS:
            row = p[name]
            cells = [
                f"{lib} {row[lib]['median_ms']:.3f} ({row[lib]['min_ms']:.3f}) "
                f"{row[lib]['gflops_at_min']:.0f} GFLOP/s"
                for lib in ("xla", "torch")
                if lib in row
            ]
            lines.append(f"  {name:>14} x{row['per_call']}: " + " | ".join(cells))
        for lib in ("xla", "torch"):
            if f"{lib}_seven_products_ms_per_call" in p:
                lines.append(
                    f"  {lib}: the seven products sum to "
                    f"{p[f'{lib}_seven_products_ms_per_call']:.2f} ms per call"
                )
        lines.append(f"  a jitted call doing nothing: {p['xla_noop_ms']:.3f} ms")
    p = r.get("profile_blockwise_fwd_bwd")
    if p:
        lines.append(
            f"blockwise forward+backward under the profiler: {p['wall_ms_per_call']:.1f} ms "
            "per call; self time by kind:"
        )
        for kind, v in p["self_ms_by_kind"].items():
            lines.append(f"  {kind:>20}: {v:7.2f} ms")
    return "\n".join(["```", *lines, "```"])


# ---------------------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """The profile: which mode, its settings and the output.

    **Arguments:**

    - `mode`: `solve` (a continuous-depth training step, per XLA instruction) or
      `attention` (the attention operator's implementations against PyTorch).
    - `solve`, `attention`: the settings of each mode.
    - `out`: the output directory (`None`: print only).
    """

    mode: Literal["solve", "attention"] = "solve"
    solve: SolveConfig = SolveConfig()
    attention: AttentionConfig = AttentionConfig()
    out: Path | None = Path("runs/bench/profiling")


PRESETS = {
    "smoke": lambda: Config(
        solve=SolveConfig(**SOLVE_SMOKE), attention=AttentionConfig(**ATTENTION_SMOKE)
    ),
    "quick": Config,
    # The sizes of peers.py's discrete comparison for the operator.
    "full": lambda: Config(attention=AttentionConfig(seq=512, head_dim=32)),
}
MODES = {"solve": run_solve, "attention": run_attention}
TABLES = {"solve": solve_table, "attention": attention_table}
TITLES = {
    "solve": "Where the time of a continuous-depth training step goes",
    "attention": "The attention operator alone against PyTorch's fused kernel",
}


def main(config: Config) -> dict[str, Any]:
    """Run the chosen mode; write `results.json` and `results.md` into `config.out`.

    **Returns:**

    The mode's figures and `meta` (command, date, machine, settings, wall time).
    """
    return report.run_mode(config, MODES, TABLES, TITLES, log=_log)


if __name__ == "__main__":
    _cli.run(PRESETS, main, description=__doc__.splitlines()[0])
