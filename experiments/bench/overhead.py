"""Overhead of pdeformer's depth integrators against a plainly written JAX Transformer, the
throughput of a training step, and the time to build a model (three modes).

**`--mode integrators`** (the default) measures jitted forward+backward (`value_and_grad`
of `mean(u_T**2)` w.r.t. the weights) of

- a hand-written pre-LN Transformer encoder (dict of stacked weights, `lax.scan` over layers,
  `jax.nn.dot_product_attention`, hand-written LayerNorm): the reference a user would write;
- `pf.Discrete()` on a `pf.Field` holding the same weights;
- `pf.Continuous(diffrax.Euler(), diffrax.ConstantStepSize(), dt0=0.5)` on that field
  (mathematically identical to `Discrete`),

and the compile time (`jax.jit(...).lower(...).compile()`) of the discrete mode at 16 and at 4
layers. Steady-state times are medians over round-robin repeats after warm-up.

**`--mode throughput`** measures, on whatever device JAX uses:

1. *Training step.* The library's `pdeformer.training.train_step` (forward + backward and
   an AdamW update, the step `train` runs) of a `Classifier` in discrete mode on random
   `(batch, seq)` token batches, once per compute dtype of `compute_dtypes`
   (`Field(compute_dtype=...)`; `float32` means no mixed precision), interleaved after
   warm-up: median step time, tokens per second, model FLOPs per step and the model FLOP
   utilisation (MFU). *Model FLOPs* are counted analytically (`model_flops`: the forward
   pass's matmuls, times 3 for forward + backward; checked against XLA's cost analysis in
   the tests). *MFU against the measured matmul rate*: square `peak_n` matmuls in the
   compute dtype, timed in the same run (on NVIDIA GPUs from Ampere on, `float32` matmuls
   under JAX's default precision run in TF32, here and in the step alike). *MFU against the
   nominal peak*: the vendor's dense 16-bit figure (`NOMINAL_PEAK_FLOPS`), 16-bit dtypes only.
2. *TF32 and an adaptive solve.* One forward solve of a float32 `Field` by
   `pf.Continuous(Dopri5(), PIDController(rtol, atol=rtol / 10))` for each
   `matmul_precision` of `precisions`: steps, rejected steps, NFE, time, and the error
   against a `"highest"`-precision solve `reference_factor` times tighter. On a CPU the
   precisions do not differ (XLA's CPU backend has no TF32).

**`--mode build`** times building `Field`s of several widths in fresh processes (nothing
compiled yet, as when a user starts), with the library's initialiser (each module's dense
matrices from one batched random-number program) against drawing each matrix on its own
(what the library did before; the same numbers, which the run checks): median seconds over
interleaved fresh processes, and their ratio.

Usage:

    python experiments/bench/overhead.py                                  # quick (CPU sizes)
    python experiments/bench/overhead.py --preset smoke                   # seconds (tests)
    python experiments/bench/overhead.py --mode throughput                # CPU sizes
    python experiments/bench/overhead.py --preset full --mode throughput  # GPU: seq 4096
    python experiments/bench/overhead.py --mode build                     # model building

Writes `results.json` and `results.md` into `--out` (default `runs/bench/overhead`);
progress goes to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: report, _cli

import _cli  # noqa: E402
import report  # noqa: E402
from _reference import field_weights  # noqa: E402
from _timing import interleaved  # noqa: E402

_log = report.logger("bench overhead")

TARGETS = {
    "discrete_vs_reference": 1.10,
    "continuous_euler_vs_discrete": 1.30,
    "compile_16_vs_4_layers": 1.5,
}


@dataclasses.dataclass(frozen=True)
class IntegratorsConfig:
    """Settings of the integrators comparison.

    **Arguments:**

    - `batch`, `seq`, `dim`, `heads`, `layers`, `hidden`: model and input sizes.
    - `compile_layers_small`, `compile_layers_large`: depths compared for compile time.
    - `repeats`: timed forward+backward calls per variant (median reported).
    - `warmup`: untimed calls per variant after compilation.
    - `compile_repeats`: fresh lower+compile measurements per depth (median reported).
    - `masked`: pass a key-padding mask (last quarter of each sequence padded) instead of `None`.
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
    dtype: Literal["float32", "float64"] = "float32"
    seed: int = 0


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


def _field(config: IntegratorsConfig, num_layers: int):
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


def _inputs(config: IntegratorsConfig):
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


def _compile_seconds(config: IntegratorsConfig, num_layers: int, u0, mask) -> dict[str, float]:
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
# Mode `integrators`.
# ---------------------------------------------------------------------------------------


def run_integrators(config: IntegratorsConfig) -> dict[str, Any]:
    """The integrators comparison.

    **Returns:**

    A JSON-serialisable dict with `ratios`, `targets`, `passed_targets`, raw `times_ms`,
    `compile_s` and the numerical agreement checks.
    """
    import diffrax
    import jax

    import pdeformer as pf

    if config.dtype == "float64":
        jax.config.update("jax_enable_x64", True)

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
    }


def _grads_as_dict(grads) -> dict:
    """A Field-shaped gradient pytree as the reference's dict of stacked arrays."""
    return field_weights(grads)


def integrators_table(result: dict[str, Any], cfg: dict[str, Any]) -> str:
    """The integrators comparison as a fixed-width table (a Markdown code block)."""
    lines: list[str] = []
    print = lines.append  # noqa: A001 (the table's lines, in order)
    print(
        f"pdeformer overhead, forward+backward, batch {cfg['batch']} seq {cfg['seq']} "
        f"dim {cfg['dim']} heads {cfg['heads']} layers {cfg['layers']} hidden {cfg['hidden']}, "
        f"{cfg['dtype']}, median of {cfg['repeats']}"
    )
    print("")
    print(f"{'variant':<20}{'median ms':>12}{'min ms':>12}{'first call s':>14}")
    for name, t in result["times_ms"].items():
        print(
            f"{name:<20}{t:>12.1f}{result['times_ms_min'][name]:>12.1f}"
            f"{result['first_call_s'][name]:>14.2f}"
        )
    print("")
    print(f"{'compile (discrete)':<20}{'lower s':>12}{'compile s':>12}{'total s':>14}")
    for name, c in result["compile_s"].items():
        print(f"{name:<20}{c['lower']:>12.2f}{c['compile']:>12.2f}{c['total']:>14.2f}")
    print("")
    print(f"{'ratio':<32}{'value':>8}{'target':>8}  ok")
    for name, v in result["ratios"].items():
        ok = "yes" if result["passed_targets"][name] else "NO"
        print(f"{name:<32}{v:>8.3f}{result['targets'][name]:>8.2f}  {ok}")
    print("")
    for name, a in result["agreement_with_reference"].items():
        print(
            f"{name} vs reference: |loss diff| {a['loss_abs_diff']:.2e}, "
            f"max |grad diff| {a['grad_max_abs_diff']:.2e}"
        )
    return "\n".join(["```", *lines, "```"])


# ---------------------------------------------------------------------------------------
# Mode `throughput`.
# ---------------------------------------------------------------------------------------

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
class ThroughputConfig:
    """Settings of the throughput mode.

    **Arguments:**

    - `batch`, `seq`, `dim`, `heads`, `layers`, `hidden`, `vocab`, `classes`: the training
      step's model and batch sizes.
    - `compute_dtypes`: comma-separated compute dtypes of the training step.
    - `repeats`, `warmup`: timed and untimed steps per dtype.
    - `peak_n`: size of the square matmul that measures the device's matmul rate.
    - `tf32_batch`, `tf32_seq`, `tf32_dim`, `tf32_heads`, `tf32_layers`: the TF32 solve's
      sizes (float32 field, FFN `4 * dim`).
    - `rtol`: its tolerance (atol = rtol / 10); `reference_factor`: how much tighter the
      reference's.
    - `precisions`: comma-separated `matmul_precision` values compared.
    - `tf32_repeats`: timed solves per precision.
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
    reference_factor: float = 1e-2
    precisions: str = "highest,tensorfloat32,default"
    tf32_repeats: int = 3
    seed: int = 0


# The GPU run the performance issue asks for: a discrete-mode training step at seq 4096,
# dim 512 in bfloat16 (float32 after it: its XLA attention keeps every layer's
# (batch, heads, seq, seq) float32 weights for the backward pass, 2 GiB per layer and per
# array kept at batch 4, so a batch of 8 may not fit an 80 GB card), and the TF32 solve at
# a size where matmuls dominate.
THROUGHPUT_GPU = {
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
}
THROUGHPUT_SMOKE = {
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


def _names(text: str, what: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"{what} must name one or more distinct values; got {text!r}.")
    return names


def check_throughput(config: ThroughputConfig) -> None:
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
    if not (config.rtol > 0 and 0 < config.reference_factor < 1):
        raise ValueError(
            f"rtol must be > 0 and reference_factor in (0, 1); got {config.rtol}, "
            f"{config.reference_factor}."
        )


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


def _training_steps(config: ThroughputConfig, dtypes: list[str]) -> dict[str, Any]:
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


def _tf32_solves(config: ThroughputConfig, precisions: list[str]) -> dict[str, Any]:
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
    atol = config.rtol / 10
    _log(f"reference solve (highest, rtol {config.rtol * f:g}, atol {atol * f:g})")
    reference = jax.block_until_ready(solver(config.rtol * f, atol * f, "highest")(field, u0))
    if not bool(reference.stats.success):
        _log(
            f"warning: the reference solve did not finish within {MAX_STEPS} steps (float32 "
            "roundoff at its tolerance?); the errors are against where it stopped. Pass a "
            "larger --reference-factor."
        )
    rows: dict[str, dict[str, Any]] = {}
    fns = {}
    for p in precisions:
        fns[p] = solver(config.rtol, atol, p)
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


def run_throughput(config: ThroughputConfig) -> dict[str, Any]:
    """The throughput mode.

    **Returns:**

    A JSON-serialisable dict: `training` (per compute dtype: step time, tokens/s, model
    FLOP/s, MFU against the measured matmul rate and the nominal peak), `matmul_flops_per_s`
    (measured, per dtype), `model_flops`, `tf32` (per precision: NFE, steps, rejected
    steps, error against the reference, time).
    """
    check_throughput(config)
    dtypes = _names(config.compute_dtypes, "compute_dtypes")
    precisions = _names(config.precisions, "precisions")
    import jax

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
        "wall_s": time.perf_counter() - t_start,
    }


def throughput_table(result: dict[str, Any], c: dict[str, Any]) -> str:
    """The throughput mode as a fixed-width table (a Markdown code block)."""
    lines = [
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
        f"adaptive solve (Dopri5, rtol {c['rtol']:g} atol {c['rtol'] / 10:g}), "
        f"batch {c['tf32_batch']} "
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
    return "\n".join(["```", *lines, "```"])


# ---------------------------------------------------------------------------------------
# Building a model: the batched initialiser against one random-number program per matrix.
# ---------------------------------------------------------------------------------------

BUILD_TARGET = 0.95  # a performance change stays only if it gains at least 5%


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Settings of the build mode.

    **Arguments:**

    - `dims`: comma-separated widths; one `Field(dim, heads, layers, hidden=4 * dim)` each,
      all built in one process.
    - `heads`, `layers`: their heads and depth.
    - `repeats`: fresh processes per variant, interleaved (median reported).
    """

    dims: str = "8,16,32,64,128"
    heads: int = 2
    layers: int = 2
    repeats: int = 3


# Run in a fresh process: `python -c _BUILD variant dims heads layers`; prints JSON.
_BUILD = """
import hashlib, json, math, sys, time
import jax, jax.random as jr, numpy as np
import pdeformer as pf
variant, dims, heads, layers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if variant == "per_matrix":
    from pdeformer.operators import attention, reaction

    def per_matrix(key, weights, dtype):
        keys = jr.split(key, len(weights))
        return [jr.uniform(k, shape, dtype, -1 / math.sqrt(f), 1 / math.sqrt(f))
                for k, (f, shape) in zip(keys, weights)]

    attention._dense_init = reaction._dense_init = per_matrix
dims = [int(d) for d in dims.split(",")]
start = time.perf_counter()
fields = [pf.Field(d, heads, layers, key=jr.PRNGKey(i), hidden=4 * d) for i, d in enumerate(dims)]
jax.block_until_ready(fields)
seconds = time.perf_counter() - start
digest = hashlib.sha256()
for leaf in jax.tree.leaves(fields):
    if isinstance(leaf, jax.Array):
        digest.update(np.asarray(leaf).tobytes())
print(json.dumps({"seconds": seconds, "weights_sha256": digest.hexdigest()}))
"""

BUILD_VARIANTS = ("batched", "per_matrix")


def _build_once(variant: str, config: BuildConfig) -> dict[str, Any]:
    argv = [sys.executable, "-c", _BUILD, variant, config.dims, str(config.heads)]
    done = subprocess.run([*argv, str(config.layers)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building the {variant} fields failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_build(config: BuildConfig) -> dict[str, Any]:
    """The build mode: seconds to build the fields in a fresh process, per variant.

    **Returns:**

    A JSON-serialisable dict: `seconds` (per variant, every process), `median_s`,
    `ratios` (`build_batched_vs_per_matrix`), `passed_targets`, and `same_weights`
    (whether both variants built bit-identical weights).
    """
    dims = [int(d) for d in _names(config.dims, "dims")]
    if any(d % config.heads for d in dims) or min(config.heads, config.layers, config.repeats) < 1:
        raise ValueError(
            f"every dim must be a multiple of heads, and heads, layers, repeats >= 1; got "
            f"dims {config.dims!r}, heads {config.heads}, layers {config.layers}, "
            f"repeats {config.repeats}."
        )
    seconds = {v: [] for v in BUILD_VARIANTS}
    digests = {v: set() for v in BUILD_VARIANTS}
    for r in range(config.repeats):
        for variant in BUILD_VARIANTS:
            out = _build_once(variant, config)
            seconds[variant].append(out["seconds"])
            digests[variant].add(out["weights_sha256"])
            _log(f"build {r + 1}/{config.repeats}, {variant}: {out['seconds']:.2f} s")
    median = {v: statistics.median(t) for v, t in seconds.items()}
    ratio = median["batched"] / median["per_matrix"]
    return {
        "seconds": seconds,
        "median_s": median,
        "ratios": {"build_batched_vs_per_matrix": ratio},
        "passed_targets": {"build_batched_vs_per_matrix": ratio <= BUILD_TARGET},
        "same_weights": len(digests["batched"]) == 1
        and digests["batched"] == digests["per_matrix"],
    }


def build_table(result: dict[str, Any], c: dict[str, Any]) -> str:
    """The build mode as a Markdown table."""
    m = result["median_s"]
    ratio = result["ratios"]["build_batched_vs_per_matrix"]
    verdict = "met" if result["passed_targets"]["build_batched_vs_per_matrix"] else "**not met**"
    return "\n".join(
        [
            f"Fields of widths {c['dims']} ({c['heads']} heads, {c['layers']} layers, FFN "
            f"4 x dim) built in a fresh process; median of {c['repeats']} interleaved "
            f"processes per variant. Same weights: {result['same_weights']}.",
            "",
            "| variant | seconds |",
            "|---|---:|",
            f"| batched (the library) | {m['batched']:.2f} |",
            f"| one program per matrix | {m['per_matrix']:.2f} |",
            f"| `build_batched_vs_per_matrix` (target <= {BUILD_TARGET}) | {ratio:.3f} "
            f"({verdict}) |",
        ]
    )


# ---------------------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """The benchmark: which mode, its settings, the device and the output.

    **Arguments:**

    - `mode`: `integrators` (the library's integrators against a hand-written
      Transformer), `throughput` (tokens/s and MFU of a training step; TF32) or `build`
      (the time to build a model).
    - `integrators`, `throughput`, `build`: the settings of each mode.
    - `platform`: JAX platform (`cpu`, `gpu`, ...); `None`: JAX's default.
    - `out`: the output directory (`None`: print only).
    """

    mode: Literal["integrators", "throughput", "build"] = "integrators"
    integrators: IntegratorsConfig = IntegratorsConfig()
    throughput: ThroughputConfig = ThroughputConfig()
    build: BuildConfig = BuildConfig()
    platform: str | None = None
    out: Path | None = Path("runs/bench/overhead")


INTEGRATORS_SMOKE = {"seq": 128, "repeats": 3, "warmup": 1, "compile_repeats": 1}
PRESETS = {
    "smoke": lambda: Config(
        integrators=IntegratorsConfig(**INTEGRATORS_SMOKE),
        throughput=ThroughputConfig(**THROUGHPUT_SMOKE),
        build=BuildConfig(dims="8,16", repeats=1),
    ),
    "quick": Config,
    "full": lambda: Config(throughput=ThroughputConfig(**THROUGHPUT_GPU)),
}
MODES = {"integrators": run_integrators, "throughput": run_throughput, "build": run_build}
TABLES = {"integrators": integrators_table, "throughput": throughput_table, "build": build_table}
TITLES = {
    "integrators": "Overhead of the depth integrators against a hand-written JAX Transformer",
    "throughput": "Throughput and model FLOP utilisation of a training step; TF32",
    "build": "Time to build a model: one batched random-number program or one per matrix",
}


def main(config: Config) -> dict[str, Any]:
    """Run the chosen mode; write `results.json` and `results.md` into `config.out`.

    **Returns:**

    The mode's figures and `meta` (command, date, machine, settings, wall time).
    """
    if config.platform is not None:
        import jax

        jax.config.update("jax_platforms", config.platform)
    return report.run_mode(config, MODES, TABLES, TITLES, log=_log)


if __name__ == "__main__":
    _cli.run(PRESETS, main, description=__doc__.splitlines()[0])
