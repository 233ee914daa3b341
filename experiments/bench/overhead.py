"""Overhead of pdeformer's depth integrators against a plainly written JAX Transformer.

Measures jitted forward+backward (`value_and_grad` of `mean(u_T**2)` w.r.t. the weights) of

- a hand-written pre-LN Transformer encoder (dict of stacked weights, `lax.scan` over layers,
  `jax.nn.dot_product_attention`, hand-written LayerNorm): the reference a user would write;
- `pf.Discrete()` on a `pf.Field` holding the same weights;
- `pf.Continuous(diffrax.Euler(), diffrax.ConstantStepSize(), dt0=0.5)` on that field
  (mathematically identical to `Discrete`),

and the compile time (`jax.jit(...).lower(...).compile()`) of the discrete mode at 16 and at 4
layers. Steady-state times are medians over round-robin repeats after warm-up.

Usage:

    python experiments/bench_overhead.py            # readable table
    python experiments/bench_overhead.py --json     # one JSON object on stdout
    python experiments/bench_overhead.py --quick    # smoke test (seq 128, 3 repeats)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from _flags import add_config_flags, config_from_args
from _reference import field_weights

TARGETS = {
    "discrete_vs_reference": 1.10,
    "continuous_euler_vs_discrete": 1.30,
    "compile_16_vs_4_layers": 1.5,
}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Benchmark settings.

    **Arguments:**

    - `batch`, `seq`, `dim`, `heads`, `layers`, `hidden`: model and input sizes.
    - `compile_layers_small`, `compile_layers_large`: depths compared for compile time.
    - `repeats`: timed forward+backward calls per variant (median reported).
    - `warmup`: untimed calls per variant after compilation.
    - `compile_repeats`: fresh lower+compile measurements per depth (median reported).
    - `masked`: pass a key-padding mask (last quarter of each sequence padded) instead of `None`.
    - `platform`: JAX platform (`cpu`, `gpu`, ...).
    - `dtype`: `float32` or `float64`.
    - `seed`: PRNG seed for weights and inputs.
    """

    batch: int = 8
    seq: int = 512
    dim: int = 128
    heads: int = 4
    layers: int = 4
    hidden: int = 512
    compile_layers_small: int = 4
    compile_layers_large: int = 16
    repeats: int = 10
    warmup: int = 2
    compile_repeats: int = 3
    masked: bool = False
    platform: str = "cpu"
    dtype: str = "float32"
    seed: int = 0


QUICK = {"seq": 128, "repeats": 3, "warmup": 1, "compile_repeats": 1}


def _log(msg: str) -> None:
    print(f"[bench_overhead] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# The hand-written reference: what a user would write without the library.
# ---------------------------------------------------------------------------------------


def _reference_forward(params: dict, u, mask, num_heads: int, eps: float = 1e-5):
    """Pre-LN Transformer encoder stack: `u += Attn(LN(u)); u += FFN(LN'(u))` per layer."""
    import jax
    import jax.numpy as jnp

    batch, seq, dim = u.shape
    head_dim = dim // num_heads
    attn_mask = None if mask is None else mask[:, None, None, :]

    def layer_norm(x, w, b):
        mean = jnp.mean(x, axis=-1, keepdims=True)
        c = x - mean
        var = jnp.mean(c * c, axis=-1, keepdims=True)
        return c * jax.lax.rsqrt(var + eps) * w + b

    def layer(x, p):
        h = layer_norm(x, p["ln1_w"], p["ln1_b"])
        qkv = (h @ p["qkv_w"] + p["qkv_b"]).reshape(batch, seq, 3, num_heads, head_dim)
        a = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask=attn_mask)
        x = x + a.reshape(batch, seq, dim) @ p["out_w"] + p["out_b"]
        h = layer_norm(x, p["ln2_w"], p["ln2_b"])
        x = x + jax.nn.gelu(h @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return x, None

    out, _ = jax.lax.scan(layer, u, params)
    return out


# ---------------------------------------------------------------------------------------
# Building the jitted value_and_grad functions.
# ---------------------------------------------------------------------------------------


def _field(config: BenchConfig, num_layers: int):
    import jax.numpy as jnp
    import jax.random as jr

    import pdeformer as pf

    return pf.Field(
        config.dim,
        config.heads,
        num_layers,
        key=jr.PRNGKey(config.seed),
        hidden=config.hidden,
        dtype=getattr(jnp, config.dtype),
    )


def _inputs(config: BenchConfig):
    import jax.numpy as jnp
    import jax.random as jr

    dtype = getattr(jnp, config.dtype)
    u0 = jr.normal(jr.PRNGKey(config.seed + 1), (config.batch, config.seq, config.dim), dtype)
    mask = None
    if config.masked:
        valid = max(1, (3 * config.seq) // 4)
        mask = jnp.broadcast_to(jnp.arange(config.seq) < valid, (config.batch, config.seq))
    return u0, mask


def _library_grad_fn(field, depth) -> tuple[Callable, Any]:
    """`(params, u0, mask) -> (loss, grads)` for a pdeformer integrator, unjitted."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    params, static = eqx.partition(field, eqx.is_array)

    def loss(p, u0, mask):
        return jnp.mean(depth(eqx.combine(p, static), u0, mask).u ** 2)

    return jax.value_and_grad(loss), params


def _reference_grad_fn(field, num_heads: int) -> tuple[Callable, Any]:
    import jax
    import jax.numpy as jnp

    def loss(p, u0, mask):
        return jnp.mean(_reference_forward(p, u0, mask, num_heads) ** 2)

    return jax.value_and_grad(loss), field_weights(field)


def _compile_seconds(config: BenchConfig, num_layers: int, u0, mask) -> dict[str, float]:
    """Wall time of tracing+lowering and of XLA compilation of a fresh jitted fwd+bwd."""
    import jax

    import pdeformer as pf

    fn, params = _library_grad_fn(_field(config, num_layers), pf.Discrete())
    jitted = jax.jit(fn)  # a fresh function object: no trace or compile cache hit
    t0 = time.perf_counter()
    lowered = jitted.lower(params, u0, mask)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"lower": t1 - t0, "compile": t2 - t1, "total": t2 - t0}


def _max_abs(a, b) -> float:
    import jax
    import jax.numpy as jnp

    leaves = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.max(jnp.abs(x - y)), a, b))
    return float(max(leaves))


# ---------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------


def main(config: BenchConfig) -> dict[str, Any]:
    """Run the benchmark.

    **Arguments:**

    - `config`: benchmark settings.

    **Returns:**

    A JSON-serialisable dict with `ratios`, `targets`, `passed_targets`, raw `times_ms`,
    `compile_s`, numerical agreement checks, `machine`, `date`, `config`.
    """
    import jax

    jax.config.update("jax_platforms", config.platform)
    if config.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import diffrax

    import _common  # after the platform is chosen: it imports jax and the library
    import pdeformer as pf

    field = _field(config, config.layers)
    u0, mask = _inputs(config)
    fns: dict[str, tuple[Callable, Any]] = {
        "reference": _reference_grad_fn(field, config.heads),
        "discrete": _library_grad_fn(field, pf.Discrete()),
        "continuous_euler": _library_grad_fn(
            field, pf.Continuous(diffrax.Euler(), diffrax.ConstantStepSize(), dt0=0.5)
        ),
    }
    jitted: dict[str, Callable] = {}
    first_call_s: dict[str, float] = {}
    results: dict[str, Any] = {}
    for name, (fn, params) in fns.items():
        _log(f"compiling {name}")
        jitted[name] = jax.jit(fn)
        t0 = time.perf_counter()
        results[name] = jax.block_until_ready(jitted[name](params, u0, mask))
        first_call_s[name] = time.perf_counter() - t0
        for _ in range(config.warmup):
            jax.block_until_ready(jitted[name](params, u0, mask))

    # The library's gradients are pytrees of the Field; compare them as the reference dict.
    ref_loss, ref_grads = results["reference"]
    agreement = {}
    for name in ("discrete", "continuous_euler"):
        loss, grads = results[name]
        agreement[name] = {
            "loss_abs_diff": abs(float(loss) - float(ref_loss)),
            "grad_max_abs_diff": _max_abs(_grads_as_dict(grads), ref_grads),
        }

    # Round-robin repeats so that drift (thermal, other processes) hits all variants alike.
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(config.repeats):
        for name, (_, params) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(jitted[name](params, u0, mask))
            samples[name].append(time.perf_counter() - t0)
        _log(
            f"repeat {r + 1}/{config.repeats}: "
            + ", ".join(f"{n} {1e3 * s[-1]:.1f} ms" for n, s in samples.items())
        )
    times_ms = {name: 1e3 * statistics.median(s) for name, s in samples.items()}

    # Compile time of the discrete mode: fresh functions, measured after the three compilations
    # above have paid the one-off backend setup; depths alternate so drift hits both alike.
    small, large = config.compile_layers_small, config.compile_layers_large
    compile_samples: dict[int, list[dict[str, float]]] = {small: [], large: []}
    for r in range(config.compile_repeats):
        for n in (small, large):
            compile_samples[n].append(_compile_seconds(config, n, u0, mask))
            _log(
                f"compile {r + 1}/{config.compile_repeats}, {n} layers: "
                f"{compile_samples[n][-1]['total']:.2f} s"
            )
    compile_s = {
        f"{n}_layers": {
            k: statistics.median(s[k] for s in compile_samples[n])
            for k in ("lower", "compile", "total")
        }
        for n in (small, large)
    }

    ratios = {
        "discrete_vs_reference": times_ms["discrete"] / times_ms["reference"],
        "continuous_euler_vs_discrete": times_ms["continuous_euler"] / times_ms["discrete"],
        "compile_16_vs_4_layers": compile_s[f"{large}_layers"]["total"]
        / compile_s[f"{small}_layers"]["total"],
    }
    return {
        "ratios": ratios,
        "targets": TARGETS,
        "passed_targets": {k: bool(ratios[k] <= TARGETS[k]) for k in TARGETS},
        "times_ms": times_ms,
        "times_ms_min": {name: 1e3 * min(s) for name, s in samples.items()},
        "first_call_s": first_call_s,
        "compile_s": compile_s,
        "agreement_with_reference": agreement,
        "config": dataclasses.asdict(config),
        "machine": _common.machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
    }


def _grads_as_dict(grads) -> dict:
    """A Field-shaped gradient pytree as the reference's dict of stacked arrays."""
    return field_weights(grads)


def _print_table(result: dict[str, Any]) -> None:
    cfg = result["config"]
    print(
        f"pdeformer overhead, forward+backward, batch {cfg['batch']} seq {cfg['seq']} "
        f"dim {cfg['dim']} heads {cfg['heads']} layers {cfg['layers']} hidden {cfg['hidden']}, "
        f"{cfg['dtype']}, median of {cfg['repeats']}"
    )
    m = result["machine"]
    print(f"machine: {m['cpu']} ({m['cpu_count']} cpus), device {m['device_kind']}, jax {m['jax']}")
    print(f"date: {result['date']}   command: {result['command']}")
    print()
    print(f"{'variant':<20}{'median ms':>12}{'min ms':>12}{'first call s':>14}")
    for name, t in result["times_ms"].items():
        print(
            f"{name:<20}{t:>12.1f}{result['times_ms_min'][name]:>12.1f}"
            f"{result['first_call_s'][name]:>14.2f}"
        )
    print()
    print(f"{'compile (discrete)':<20}{'lower s':>12}{'compile s':>12}{'total s':>14}")
    for name, c in result["compile_s"].items():
        print(f"{name:<20}{c['lower']:>12.2f}{c['compile']:>12.2f}{c['total']:>14.2f}")
    print()
    print(f"{'ratio':<32}{'value':>8}{'target':>8}  ok")
    for name, v in result["ratios"].items():
        ok = "yes" if result["passed_targets"][name] else "NO"
        print(f"{name:<32}{v:>8.3f}{result['targets'][name]:>8.2f}  {ok}")
    print()
    for name, a in result["agreement_with_reference"].items():
        print(
            f"{name} vs reference: |loss diff| {a['loss_abs_diff']:.2e}, "
            f"max |grad diff| {a['grad_max_abs_diff']:.2e}"
        )


def _parse(argv: list[str] | None = None) -> tuple[BenchConfig, bool]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK} unless given")
    add_config_flags(p, BenchConfig, choices={"dtype": ("float32", "float64")})
    args = p.parse_args(argv)
    return config_from_args(args, BenchConfig, QUICK if args.quick else None), args.json


if __name__ == "__main__":
    cfg, as_json = _parse()
    result = main(cfg)
    if as_json:
        print(json.dumps(result))
    else:
        _print_table(result)
