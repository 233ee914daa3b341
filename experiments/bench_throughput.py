"""Throughput and model FLOP utilisation of a discrete-mode training step; TF32 and an
adaptive solve's step count.

Two measurements in one run, on whatever device JAX uses (`--platform`):

1. **Training step.** The library's `pdeformer.training.train_step` (forward + backward and
   an AdamW update, the step `train` runs) of a `Classifier` in discrete mode
   (`pf.Discrete()`) on random `(batch, seq)` token batches, once per compute dtype of
   `compute_dtypes` (`Field(compute_dtype=...)`: weights, state and optimiser in float32,
   the blocks evaluated in the compute dtype; `float32` means no mixed precision).
   The steps of the dtypes are timed interleaved, after warm-up. Reported per dtype:
   median step time, tokens per second (`batch * seq / step time`), model FLOPs per step
   and the model FLOP utilisation (MFU):

   - *model FLOPs* are counted analytically (`model_flops`): the matmuls of the forward
     pass (projections `8 d^2`, FFN `4 d f` and attention `4 S d` per token and layer,
     plus the head), times 3 for forward + backward. Rematerialisation and elementwise
     work are not counted, as is usual for MFU; the count is checked against XLA's cost
     analysis of the compiled forward in `tests/test_bench_throughput.py`.
   - *MFU against the measured matmul rate*: the FLOP rate of square `peak_n x peak_n`
     matmuls in the compute dtype, timed in the same run on the same device (what this
     device's matmul achieves, not a vendor figure). On NVIDIA GPUs from Ampere on,
     `float32` matmuls under JAX's default precision (which `Discrete()` keeps) run in
     TF32, in the training step and in this measurement alike.
   - *MFU against the nominal peak*: the vendor's dense (no sparsity) 16-bit tensor-core
     figure, for the NVIDIA devices listed in `NOMINAL_PEAK_FLOPS` and 16-bit dtypes only;
     `null` elsewhere.

2. **TF32 and an adaptive solve.** One forward solve of a float32 `Field` by
   `pf.Continuous(Dopri5(), PIDController(rtol, atol))` for each `matmul_precision` of
   `precisions` (the library pins `"highest"`; `"tensorfloat32"` lets NVIDIA GPUs from
   Ampere on round matmul inputs to TF32; `"default"` is JAX's default). Reported: steps,
   rejected steps, NFE, time, and the max-abs error of the final state against a reference
   solve at `"highest"` precision with tolerances `reference_factor` (default 1/100) times
   tighter; each solve's `success` (within `MAX_STEPS`). The first step is the field's
   discrete step, the length of one smooth piece, so an exact solve takes one step per
   piece: the fewest NFE there can be, which TF32 can only raise by rejected or shorter
   steps. On a CPU the precisions do not differ (XLA's CPU backend has no TF32).

Usage:

    python experiments/bench_throughput.py            # readable table (CPU sizes)
    python experiments/bench_throughput.py --json     # one JSON object on stdout
    python experiments/bench_throughput.py --gpu      # the GPU sizes (seq 4096, dim 512)
    python experiments/bench_throughput.py --quick    # tiny sizes, seconds (the test)

Progress goes to stderr.
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
from typing import Any

from _flags import add_config_flags, config_from_args
from _timing import interleaved

# Vendor dense (no sparsity) peaks of the 16-bit tensor cores, FLOP/s, by a substring of
# `jax.Device.device_kind`; the first match wins (the NVL and PCIe parts before the SXM ones).
# Sources: NVIDIA's H100/H200 and A100 datasheets (BF16/FP16 Tensor Core, dense).
NOMINAL_PEAK_FLOPS = (
    ("H200 NVL", 835.5e12),
    ("H200", 989.4e12),  # also GH200
    ("H100 NVL", 835.5e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),
    ("A100", 312.0e12),
)
_SIXTEEN_BIT = ("bfloat16", "float16")
# Step budget of the TF32 solves; a solve that runs out is reported (`success: false`), not
# raised: float32 roundoff can keep a tight reference from converging.
MAX_STEPS = 20_000
# Matmuls chained in one compiled call when measuring the matmul rate, so that the dispatch
# of a call (comparable to one matmul on a GPU) does not count as matmul time.
MATMUL_CHAIN = 4


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Benchmark settings.

    **Arguments:**

    - `batch`, `seq`, `dim`, `heads`, `layers`, `hidden`, `vocab`, `classes`: the training
      step's model and batch sizes.
    - `compute_dtypes`: comma-separated compute dtypes of the training step.
    - `repeats`, `warmup`: timed and untimed steps per dtype.
    - `peak_n`: size of the square matmul that measures the device's matmul rate.
    - `tf32_batch`, `tf32_seq`, `tf32_dim`, `tf32_heads`, `tf32_layers`: the TF32 solve's
      sizes (float32 field, FFN `4 * dim`).
    - `rtol`, `atol`: its tolerances; `reference_factor`: how much tighter the reference's.
    - `precisions`: comma-separated `matmul_precision` values compared.
    - `tf32_repeats`: timed solves per precision.
    - `platform`: JAX platform (`cpu`, `gpu`, ...).
    - `seed`: PRNG seed of weights and inputs.
    """

    batch: int = 4
    seq: int = 512
    dim: int = 128
    heads: int = 4
    layers: int = 2
    hidden: int = 512
    vocab: int = 256
    classes: int = 10
    compute_dtypes: str = "float32,bfloat16"
    repeats: int = 11
    warmup: int = 1
    peak_n: int = 2048
    tf32_batch: int = 2
    tf32_seq: int = 256
    tf32_dim: int = 64
    tf32_heads: int = 4
    tf32_layers: int = 2
    rtol: float = 1e-4
    atol: float = 1e-6
    reference_factor: float = 1e-2
    precisions: str = "highest,tensorfloat32,default"
    tf32_repeats: int = 3
    platform: str = "cpu"
    seed: int = 0


# The GPU run the performance issue asks for: a discrete-mode training step at seq 4096,
# dim 512 in bfloat16 (float32 after it: its XLA attention keeps every layer's
# (batch, heads, seq, seq) float32 weights for the backward pass, 2 GiB per layer and per
# array kept at batch 4, so a batch of 8 may not fit an 80 GB card), and the TF32 solve at
# a size where matmuls dominate.
GPU = {
    "batch": 4,
    "compute_dtypes": "bfloat16,float32",
    "seq": 4096,
    "dim": 512,
    "heads": 8,
    "layers": 6,
    "hidden": 2048,
    "repeats": 10,
    "warmup": 2,
    "peak_n": 8192,
    "tf32_batch": 8,
    "tf32_seq": 1024,
    "tf32_dim": 512,
    "tf32_heads": 8,
    "tf32_layers": 4,
    "tf32_repeats": 5,
    "platform": "gpu",
}
QUICK = {
    "batch": 2,
    "seq": 32,
    "dim": 32,
    "heads": 2,
    "layers": 1,
    "hidden": 64,
    "repeats": 2,
    "warmup": 0,
    "peak_n": 128,
    "tf32_batch": 1,
    "tf32_seq": 16,
    "tf32_dim": 16,
    "tf32_heads": 2,
    "tf32_layers": 1,
    "tf32_repeats": 1,
}


def _log(msg: str) -> None:
    print(f"[bench_throughput {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _names(text: str, what: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"{what} must name one or more distinct values; got {text!r}.")
    return names


def _check(config: BenchConfig) -> None:
    """Refuse settings the run cannot use, before anything is compiled."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, int) and value < (0 if f.name in ("warmup", "seed") else 1):
            raise ValueError(f"{f.name} must be >= 1 (warmup, seed >= 0); got {value}.")
    for name in _names(config.compute_dtypes, "compute_dtypes"):
        if name not in ("float32", *_SIXTEEN_BIT):
            raise ValueError(f"compute dtypes are float32, bfloat16 or float16; got {name!r}.")
    if config.dim % config.heads or config.tf32_dim % config.tf32_heads:
        raise ValueError(
            f"dim must be a multiple of heads and tf32_dim of tf32_heads; got {config.dim}, "
            f"{config.heads}, {config.tf32_dim}, {config.tf32_heads}."
        )
    if not (config.rtol > 0 and config.atol > 0 and 0 < config.reference_factor < 1):
        raise ValueError("rtol and atol must be > 0 and reference_factor in (0, 1).")


def model_flops(
    batch: int, seq: int, dim: int, hidden: int, layers: int, classes: int
) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of a `Classifier`'s forward pass in discrete mode.

    Per token and layer: the query, key, value and output projections `2 * 4 d^2`, the FFN
    `2 * 2 d f`, and attention's logits and weighted values `2 * 2 S d` (every query
    against every key: no causal mask); once per sequence, the head `2 d C`. A training
    step is counted as 3 forward passes (the backward pass computes two products for each
    of the forward's), without rematerialisation.

    **Returns:**

    `{"forward": ..., "train_step": ...}` in FLOPs.
    """
    tokens = batch * seq
    per_token_layer = 8 * dim * dim + 4 * dim * hidden + 4 * seq * dim
    forward = float(layers * tokens * per_token_layer + 2 * batch * dim * classes)
    return {"forward": forward, "train_step": 3.0 * forward}


def nominal_peak(device_kind: str, dtype: str) -> float | None:
    """The vendor's dense FLOP/s for `device_kind` in a 16-bit `dtype`, or `None`."""
    if dtype not in _SIXTEEN_BIT:
        return None
    for name, flops in NOMINAL_PEAK_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return None


def _matmul_rate(n: int, dtype: str, repeats: int) -> float:
    """FLOP/s of `n x n` by `n x n` matmuls in `dtype`: `MATMUL_CHAIN` dependent products
    in one compiled call, median of `repeats` calls."""
    import jax
    import jax.numpy as jnp
    import jax.random as jr

    ka, kb = jr.split(jr.PRNGKey(0))
    a = jr.normal(ka, (n, n), jnp.float32).astype(dtype)
    # Scaled so that repeated products keep the entries' size (no overflow, no denormals).
    b = (jr.normal(kb, (n, n), jnp.float32) / n**0.5).astype(dtype)
    f = jax.jit(lambda x, y: jax.lax.fori_loop(0, MATMUL_CHAIN, lambda _, z: z @ y, x))
    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 * MATMUL_CHAIN / statistics.median(times)


def _training_steps(config: BenchConfig, dtypes: list[str]) -> dict[str, Any]:
    """Time the discrete-mode training step once per compute dtype, interleaved."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np

    import pdeformer as pf
    from pdeformer.data import Batch

    # The platform as the attention operator itself reads it (ROCm is told apart).
    from pdeformer.operators.attention import _current_platform, choose_implementation
    from pdeformer.training import TrainConfig, make_optimizer, train_step

    rng = np.random.default_rng(config.seed)
    shape = (config.batch, config.seq)
    batch = Batch(
        rng.integers(0, config.vocab, shape).astype(np.int32),
        np.ones(shape, bool),
        rng.integers(0, config.classes, (config.batch,)).astype(np.int32),
    )
    depth = pf.Discrete()
    optimizer = make_optimizer(TrainConfig(batch_size=config.batch))
    states: dict[str, list] = {}
    first_call_s: dict[str, float] = {}
    first_loss: dict[str, float] = {}
    attention: dict[str, str] = {}
    for name in dtypes:
        compute = None if name == "float32" else getattr(jnp, name)
        model = pf.Classifier(
            config.vocab,
            config.dim,
            config.heads,
            config.layers,
            config.classes,
            key=jr.PRNGKey(config.seed),
            hidden=config.hidden,
            compute_dtype=compute,
        )
        attention[name] = choose_implementation(
            _current_platform(),
            compute or jnp.float32,
            config.seq,
            config.dim // config.heads,
            masked=True,
        )
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        _log(f"compiling the {name} training step (attention: {attention[name]})")
        t0 = time.perf_counter()
        model, opt_state, metrics = train_step(model, opt_state, batch, depth, optimizer)
        first_loss[name] = float(jax.block_until_ready(metrics["loss"]))
        first_call_s[name] = time.perf_counter() - t0
        for _ in range(config.warmup):
            model, opt_state, metrics = train_step(model, opt_state, batch, depth, optimizer)
            jax.block_until_ready(metrics)
        states[name] = [model, opt_state]

    def step(name: str):
        def run():
            model, opt_state = states[name]
            model, opt_state, metrics = train_step(model, opt_state, batch, depth, optimizer)
            jax.block_until_ready(metrics)
            states[name] = [model, opt_state]

        return run

    samples = interleaved({n: step(n) for n in dtypes}, config.repeats, "training step", _log)
    return {
        "step_s": {n: statistics.median(s) for n, s in samples.items()},
        "step_s_min": {n: min(s) for n, s in samples.items()},
        "first_call_s": first_call_s,
        "first_loss": first_loss,
        "attention_implementation": attention,
    }


def _tf32_solves(config: BenchConfig, precisions: list[str]) -> dict[str, Any]:
    """One adaptive forward solve per matmul precision, against a tight reference."""
    import diffrax
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr

    import pdeformer as pf

    field = pf.Field(
        config.tf32_dim, config.tf32_heads, config.tf32_layers, key=jr.PRNGKey(config.seed)
    )
    u0 = jr.normal(
        jr.PRNGKey(config.seed + 1), (config.tf32_batch, config.tf32_seq, config.tf32_dim)
    )

    def solver(rtol: float, atol: float, precision: str) -> Any:
        depth = pf.Continuous(
            diffrax.Dopri5(),
            diffrax.PIDController(rtol=rtol, atol=atol),
            max_steps=MAX_STEPS,
            throw=False,
            matmul_precision=precision,
        )
        return eqx.filter_jit(lambda f, u: depth(f, u))

    f = config.reference_factor
    _log(f"reference solve (highest, rtol {config.rtol * f:g}, atol {config.atol * f:g})")
    reference = jax.block_until_ready(
        solver(config.rtol * f, config.atol * f, "highest")(field, u0)
    )
    if not bool(reference.stats.success):
        _log(
            f"warning: the reference solve did not finish within {MAX_STEPS} steps (float32 "
            "roundoff at its tolerance?); the errors are against where it stopped. Pass a "
            "larger --reference-factor."
        )
    rows: dict[str, dict[str, Any]] = {}
    fns = {}
    for p in precisions:
        fns[p] = solver(config.rtol, config.atol, p)
        sol = jax.block_until_ready(fns[p](field, u0))
        rows[p] = {
            "nfe": int(sol.stats.nfe),
            "steps": int(sol.stats.num_steps),
            "rejected_steps": int(sol.stats.num_rejected_steps),
            "max_abs_error": float(jnp.max(jnp.abs(sol.u - reference.u))),
            "success": bool(sol.stats.success),
        }
        _log(f"{p}: {rows[p]['nfe']} NFE, error {rows[p]['max_abs_error']:.2e}")
    samples = interleaved(
        {p: (lambda fn=fn: jax.block_until_ready(fn(field, u0))) for p, fn in fns.items()},
        config.tf32_repeats,
        "tf32 solve",
        _log,
    )
    for p, s in samples.items():
        rows[p]["time_s"] = statistics.median(s)
    return {
        "reference": {
            "nfe": int(reference.stats.nfe),
            "steps": int(reference.stats.num_steps),
            "success": bool(reference.stats.success),
        },
        "solves": rows,
        "scale": float(jnp.max(jnp.abs(reference.u))),
    }


def main(config: BenchConfig) -> dict[str, Any]:
    """Run the benchmark.

    **Arguments:**

    - `config`: benchmark settings.

    **Returns:**

    A JSON-serialisable dict: `training` (per compute dtype: step time, tokens/s, model
    FLOP/s, MFU against the measured matmul rate and the nominal peak), `matmul_flops_per_s`
    (measured, per dtype), `model_flops`, `tf32` (per precision: NFE, steps, rejected
    steps, error against the reference, time), `machine`, `date`, `config`, `command`.
    """
    _check(config)
    dtypes = _names(config.compute_dtypes, "compute_dtypes")
    precisions = _names(config.precisions, "precisions")
    import jax

    jax.config.update("jax_platforms", config.platform)
    import _common  # after the platform is chosen: it imports jax and the library
    import pdeformer as pf

    for p in precisions:  # refused here, not after the training steps have run
        pf.Continuous(matmul_precision=p)
    t_start = time.perf_counter()
    device_kind = jax.devices()[0].device_kind
    _log(f"device: {device_kind}")

    flops = model_flops(
        config.batch, config.seq, config.dim, config.hidden, config.layers, config.classes
    )
    steps = _training_steps(config, dtypes)
    rates = {}
    for name in dtypes:
        _log(f"measuring the {config.peak_n}^3 matmul rate in {name}")
        rates[name] = _matmul_rate(config.peak_n, name, config.repeats)
    training = {}
    tokens = config.batch * config.seq
    for name in dtypes:
        step_s = steps["step_s"][name]
        achieved = flops["train_step"] / step_s
        peak = nominal_peak(device_kind, name)
        training[name] = {
            "step_ms": 1e3 * step_s,
            "step_ms_min": 1e3 * steps["step_s_min"][name],
            "tokens_per_s": tokens / step_s,
            "model_flops_per_s": achieved,
            "mfu_vs_matmul": achieved / rates[name],
            "nominal_peak_flops_per_s": peak,
            "mfu_vs_nominal": None if peak is None else achieved / peak,
            "first_call_s": steps["first_call_s"][name],
            "first_loss": steps["first_loss"][name],
            "attention_implementation": steps["attention_implementation"][name],
        }
    tf32 = _tf32_solves(config, precisions)
    return {
        "training": training,
        "matmul_flops_per_s": rates,
        "model_flops": flops,
        "tf32": tf32,
        "config": dataclasses.asdict(config),
        "machine": _common.machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
        "wall_s": time.perf_counter() - t_start,
    }


def table(result: dict[str, Any]) -> str:
    """A readable summary of `main`'s result."""
    c, m = result["config"], result["machine"]
    lines = [
        f"machine: {m['cpu']} ({m['cpu_count']} CPUs), device {m['device_kind']}, jax {m['jax']}",
        f"date: {result['date']}   command: {result['command']}",
        "",
        f"discrete-mode training step (train_step), batch {c['batch']} seq {c['seq']} "
        f"dim {c['dim']} heads {c['heads']} layers {c['layers']} FFN {c['hidden']}, "
        f"median of {c['repeats']}; model FLOPs {result['model_flops']['train_step']:.3g}/step",
        f"{'compute':<10}{'step ms':>10}{'tokens/s':>12}{'TFLOP/s':>10}"
        f"{'matmul TFLOP/s':>16}{'MFU (matmul)':>14}{'MFU (nominal)':>15}",
    ]
    for name, r in result["training"].items():
        nominal = "-" if r["mfu_vs_nominal"] is None else f"{r['mfu_vs_nominal']:.3f}"
        lines.append(
            f"{name:<10}{r['step_ms']:>10.1f}{r['tokens_per_s']:>12.0f}"
            f"{r['model_flops_per_s'] / 1e12:>10.3f}"
            f"{result['matmul_flops_per_s'][name] / 1e12:>16.3f}"
            f"{r['mfu_vs_matmul']:>14.3f}{nominal:>15}"
        )
    t = result["tf32"]
    lines += [
        "",
        f"adaptive solve (Dopri5, rtol {c['rtol']:g} atol {c['atol']:g}), batch {c['tf32_batch']} "
        f"seq {c['tf32_seq']} dim {c['tf32_dim']} layers {c['tf32_layers']}; reference: "
        f"{t['reference']['nfe']} NFE (success {t['reference']['success']}), "
        f"max |u| {t['scale']:.3g}",
        f"{'precision':<16}{'NFE':>6}{'steps':>7}{'rejected':>10}{'error':>11}{'time ms':>10}"
        f"{'success':>9}",
    ]
    for p, r in t["solves"].items():
        lines.append(
            f"{p:<16}{r['nfe']:>6}{r['steps']:>7}{r['rejected_steps']:>10}"
            f"{r['max_abs_error']:>11.2e}{1e3 * r['time_s']:>10.1f}{str(r['success']):>9}"
        )
    return "\n".join(lines)


def _parse(argv: list[str] | None = None) -> tuple[BenchConfig, bool]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help=f"tiny sizes: {QUICK} unless given")
    size.add_argument("--gpu", action="store_true", help=f"the GPU run: {GPU} unless given")
    add_config_flags(p, BenchConfig)
    args = p.parse_args(argv)
    preset = QUICK if args.quick else GPU if args.gpu else None
    return config_from_args(args, BenchConfig, preset), args.json


if __name__ == "__main__":
    cfg, as_json = _parse()
    result = main(cfg)
    print(json.dumps(result) if as_json else table(result))
