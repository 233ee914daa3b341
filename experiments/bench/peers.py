"""pdeformer against its peers: torchdiffeq for the continuous model, PyTorch for the discrete.

Two side-by-side comparisons in one run, forward + backward, float32, equal weights:

1. **`pdeformer_vs_torchdiffeq`**: the library's default field (`PerLayer` weights,
   `SequentialBlock`: attention on `[l, l + 1/2)` with rate `2 A_l`, the FFN on
   `[l + 1/2, l + 1)` with rate `2 R_l`) integrated over `[0, L]` with Dopri5 at equal
   tolerances by `pf.Continuous(diffrax.Dopri5(), diffrax.PIDController(rtol, atol))` and by
   torchdiffeq's `odeint(..., method="dopri5")` with plain autograd through the solver. The
   field is piecewise in depth with jumps at every `t = k/2`; both libraries are told them
   (pdeformer passes them to `diffrax.ClipStepSizeController(jump_ts=...)` itself,
   torchdiffeq gets `options=dict(jump_t=...)`), so both integrate the same smooth pieces and
   neither pays for stepping over a discontinuity. torchdiffeq is also given
   `step_t=[T]`: by default it steps past the end and interpolates back, which at the smoke
   size gave a 500x larger error (1.2e-2 against 2.2e-5) than ending the last step on `T`
   as diffrax does. The PyTorch field is written by hand from
   the pdeformer weights (copied; biases and norm parameters are perturbed away from their
   initial zeros and ones so that the copy is really checked) and its rate at `t = 0` and
   `t = 1/2` is checked against pdeformer's before anything is timed. Loss: the sum of the
   final state; gradients with respect to every weight. Each float32 solution's error is
   measured against a float64 reference (torchdiffeq's `dopri8` at rtol 1e-10, atol 1e-12,
   same jumps), so that a faster solve cannot come from a less accurate one. torchdiffeq's
   `odeint_adjoint` (continuous adjoint, its backward solve also told the jumps) is timed
   too, as a second PyTorch arm. One more pdeformer arm takes the same steps:
   `pf.Unrolled(diffrax.Dopri5())` (stages unrolled). NFE: pdeformer's
   exact `stats.nfe`; torchdiffeq: calls of the field's `forward` counted in the module.
2. **`discrete_vs_pytorch`**: `pf.Discrete()` against `torch.nn.TransformerEncoder`
   (`norm_first=True`, dropout 0, the tanh-approximated GELU of `jax.nn.gelu`'s default,
   the same weights copied in), outputs checked equal before timing.

The breakdown of the continuous comparison (`breakdown`) gives, for each library, the
steps (accepted, rejected), NFE, forward-only time, forward+backward time, and the cost
per NFE of the forward and of the backward, plus one evaluation of the field alone
(forward, forward+backward). Repeats of the two libraries are interleaved and medians
reported; PyTorch is given as many threads as XLA's CPU backend uses (`torch_threads`).

Where JAX runs on an NVIDIA GPU, PyTorch runs on CUDA too (`--torch-device`, default
`auto`), each timed call waiting for its GPU work to finish, and PyTorch's float32 matmuls
follow each pdeformer arm's: full float32 in the continuous comparison (`Continuous` pins
`"highest"`), TF32 in the discrete one (`Discrete()` keeps JAX's default), whose outputs
are compared in full float32 before timing. That setting does not reach PyTorch's
`scaled_dot_product_attention`, which picks its own kernel and arithmetic (in float32 on
Ampere and newer GPUs, PyTorch's source has its memory-efficient kernel multiply in a
three-pass TF32 mode, close to float32), so on a GPU the attention products of the two
libraries are not pinned alike: in the continuous comparison this favours PyTorch
(tensor cores against JAX's full float32). The hand-written PyTorch field reads `t` on
the host to pick its layer, one device-to-host wait per evaluation on a GPU, more than
torchdiffeq's own step control makes (it reads back once or twice a step): this slows
PyTorch. The GPU target
(`pdeformer_vs_torchdiffeq <= 0.5`) applies only with both on the GPU, the CPU targets
only with both on the CPU.

Both comparisons run at atol = rtol / 10 (the library's rule).

3. **`backward_per_nfe_over_forward`** (pdeformer alone; runs without PyTorch): what one
   evaluation of the field costs in the backward pass of a continuous solve, as a multiple
   of one in the forward solve. Per arm (a field and an adjoint, at the continuous
   comparison's sizes, Dopri5 at `rtol`), interleaved and jitted:
   - forward: the time of the forward solve alone (`jit` of the solve), over its NFE
     (`stats.nfe`);
   - backward: the time of `jax.value_and_grad` of the loss (the sum of the final state)
     less that of the forward solve, over the backward pass's vector-Jacobian products of
     the rate (`pdeformer.diagnostics.evaluation_counts(...).backward_vjp`: the forward NFE
     under `RecursiveCheckpointAdjoint`, the backward solve's evaluations under
     `BacksolveAdjoint`). What the backward pass recomputes (`backward_recomputed`) is in
     that time and reported beside it, not counted as evaluations;
   - the figure: backward ms per VJP over forward ms per NFE, from the medians of the
     interleaved repeats (`per_round_median`: the median of the figure computed within each
     round, less sensitive to a load that drifts).
   Fields: `default` (`PerLayer` weights, `SequentialBlock`: as in comparison 1) and
   `smooth` (`Polynomial(3)` weights, `ParallelBlock`: one smooth piece); adjoints:
   `Continuous`'s default `RecursiveCheckpointAdjoint` and `diffrax.BacksolveAdjoint()`;
   and the default field under the default adjoint with diffrax's own stage loop
   (`unroll_stages=False`, `recursive_checkpoint_stage_loop`).
   The headline (`ratios["backward_per_nfe_over_forward"]`, target <= 3 on a CPU) is the
   default field under the default adjoint. Without PyTorch only this part runs.

Usage:

    python experiments/bench/peers.py                  # quick: the recorded sizes
    python experiments/bench/peers.py --preset full    # also odeint_adjoint
    python experiments/bench/peers.py --preset smoke   # tiny sizes, seconds (the test)
    python experiments/bench/peers.py --no-peers       # the backward-per-NFE figure alone

Writes `results.json` and `results.md` into `--out` (default `runs/bench/peers`).

Comparisons 1 and 2 need the `peers` extra: `pip install -e ".[peers]"` (torch and
torchdiffeq); without it they are skipped (said in the log and in `peers_skipped`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: report, _cli

import _cli  # noqa: E402
import report  # noqa: E402
from _reference import field_weights  # noqa: E402
from _timing import counter_medians, interleaved  # noqa: E402

TARGETS = {"pdeformer_vs_torchdiffeq": 1.0, "discrete_vs_pytorch": 1.0}
# On a GPU only the continuous comparison has a target.
# pdeformer alone: the backward-per-NFE figure's target holds where JAX runs on the CPU.
BACKWARD_TARGETS = {"backward_per_nfe_over_forward": 3.0}
TARGETS_GPU = {"pdeformer_vs_torchdiffeq": 0.5}
TORCH_DEVICES = ("auto", "cpu", "cuda")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Benchmark settings.

    **Arguments:**

    - `ode_batch`, `ode_seq`, `ode_dim`, `ode_heads`, `ode_layers`, `ode_hidden`: sizes of the
      continuous comparison.
    - `rtol`: the tolerance of the headline figure (both libraries; atol = rtol / 10).
    - `rtol2`: a second, tighter tolerance (reported, not a target); `None` skips it.
    - `disc_batch`, `disc_seq`, `disc_dim`, `disc_heads`, `disc_layers`, `disc_hidden`: sizes
      of the discrete comparison.
    - `repeats`: timed calls per variant (median reported); `warmup`: untimed calls.
    - `adjoint_repeats`: timed calls of torchdiffeq's `odeint_adjoint` (0 skips it, as the
      quick preset does: one call took minutes on a shared 2-core CPU; the smoke and full
      presets time one).
    - `torch_threads`: PyTorch intra-op threads (`None`: the CPU count, as XLA uses).
    - `torch_device`: where PyTorch runs. `"auto"` puts it on CUDA when JAX's default
      backend is a GPU and PyTorch sees CUDA, on the CPU otherwise; `"cpu"` and `"cuda"`
      force it (`"cuda"` without CUDA in PyTorch is an error). The targets apply only when
      both libraries run on the same kind of device.
    - `seed`: PRNG seed for weights and inputs.
    - `peers`: run the comparisons with PyTorch and torchdiffeq (1 and 2); they are skipped
      anyway when those are not installed.
    - `backward_repeats`: interleaved rounds of the backward-per-NFE figure (3); 0 skips it.
    - `backward_backsolve`: also measure it under `diffrax.BacksolveAdjoint()`.
    - `backward_stage_loop`: also measure the default field under the default adjoint with
      diffrax's own stage loop (`Continuous(..., unroll_stages=False)`, the default before
      issue 28), side by side.
    - `out`: the output directory (`None`: print only).
    """

    ode_batch: int = 8
    ode_seq: int = 256
    ode_dim: int = 64
    ode_heads: int = 4
    ode_layers: int = 4
    ode_hidden: int = 256
    rtol: float = 1e-3
    rtol2: float | None = 1e-5
    disc_batch: int = 8
    disc_seq: int = 512
    disc_dim: int = 128
    disc_heads: int = 4
    disc_layers: int = 4
    disc_hidden: int = 512
    repeats: int = 7
    warmup: int = 1
    adjoint_repeats: int = 0
    torch_threads: int | None = None
    torch_device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    peers: bool = True
    backward_repeats: int = 7
    backward_backsolve: bool = True
    backward_stage_loop: bool = True
    out: Path | None = Path("runs/bench/peers")


SMOKE = {
    "ode_batch": 2,
    "ode_seq": 16,
    "ode_dim": 16,
    "ode_heads": 2,
    "ode_layers": 2,
    "ode_hidden": 32,
    "disc_batch": 2,
    "disc_seq": 16,
    "disc_dim": 16,
    "disc_heads": 2,
    "disc_layers": 2,
    "disc_hidden": 32,
    "repeats": 2,
    "warmup": 0,
    "adjoint_repeats": 1,
    "rtol2": None,
    "backward_repeats": 2,
    "backward_stage_loop": False,
}
PRESETS = {
    "smoke": lambda: BenchConfig(**SMOKE),
    "quick": BenchConfig,
    "full": lambda: BenchConfig(adjoint_repeats=1),
}

PEERS_MESSAGE = (
    "bench/peers.py compares pdeformer with PyTorch and torchdiffeq, which are not installed. "
    'Install the optional extra: pip install -e ".[peers]"'
)


def _log(msg: str) -> None:
    print(f"[bench peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def resolve_torch_device(requested: str, jax_backend: str, cuda_available: bool) -> str:
    """PyTorch's device, `"cpu"` or `"cuda"`, for `BenchConfig.torch_device`.

    **Raises:**

    `ValueError` for a device not in `TORCH_DEVICES`; `RuntimeError` for `"cuda"` when
    PyTorch has no CUDA.
    """
    if requested not in TORCH_DEVICES:
        raise ValueError(f"torch_device must be one of {TORCH_DEVICES}, not {requested!r}.")
    if requested == "auto":
        return "cuda" if jax_backend == "gpu" and cuda_available else "cpu"
    if requested == "cuda" and not cuda_available:
        raise RuntimeError(
            "torch_device='cuda', but this PyTorch has no CUDA device (a CPU-only build, or "
            "no GPU visible); install a CUDA build of torch or pass --torch-device cpu."
        )
    return requested


def targets_for(jax_backend: str, torch_device: str) -> dict[str, float]:
    """The targets that apply: the CPU ones when both libraries run on the CPU, the GPU
    one when both run on a GPU, none when they run on different kinds of device."""
    if jax_backend == "cpu" and torch_device == "cpu":
        return dict(TARGETS)
    if jax_backend == "gpu" and torch_device == "cuda":
        return dict(TARGETS_GPU)
    return {}


def torch_matmul_precision(jax_precision: str | None, jax_backend: str, torch_device: str) -> str:
    """PyTorch's float32 matmul precision (`torch.set_float32_matmul_precision`) that
    matches JAX's `jax_precision` (`None`: JAX's default) on `jax_backend`.

    On a CPU JAX multiplies float32 exactly, and so does PyTorch at `"highest"`, its
    default. On an NVIDIA GPU, JAX's default and its reduced precisions let float32
    matmuls run in TF32 (`"high"`); only `"highest"` (`"float32"`) keeps them full
    float32. TF32 is chosen only when both libraries run on a GPU.
    """
    both_on_gpu = jax_backend == "gpu" and torch_device == "cuda"
    if not both_on_gpu or jax_precision in ("highest", "float32"):
        return "highest"
    return "high"


@contextlib.contextmanager
def _torch_precision(torch, precision: str):
    """PyTorch's float32 matmul precision set to `precision`, restored on the way out."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _jax_precision(precision: str | None):
    import jax

    return (
        contextlib.nullcontext() if precision is None else jax.default_matmul_precision(precision)
    )


def field_rate(static, precision: str | None):
    """One evaluation of the field from its parameters, `(p, t, u) -> du/dt`, with its
    matmuls at `precision` (`Continuous`'s, for the comparison's field-alone figures)."""
    import equinox as eqx

    def rate(p, t, u):
        with _jax_precision(precision):
            return eqx.combine(p, static)(t, u)

    return rate


def full_float32_output(depth, static):
    """The discrete model's output `(p, u) -> u(L)` with every matmul in full float32:
    the output check, whatever precision the timed steps use."""
    import equinox as eqx
    import jax

    def forward(p, u):
        with jax.default_matmul_precision("highest"):
            return depth(eqx.combine(p, static), u).u

    return forward


class _Torch:
    """PyTorch's device for this run, and the means to wait for it."""

    def __init__(self, torch, device: str):
        self.torch = torch
        self.device = torch.device(device)
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def tensor(self, a, **kwargs):
        return self.torch.tensor(a, device=self.device, **kwargs)


def _import_peers():
    try:
        import torch
        import torchdiffeq
    except ImportError as e:
        raise SystemExit(f"{PEERS_MESSAGE} ({e})") from None
    return torch, torchdiffeq


# ---------------------------------------------------------------------------------------
# The pdeformer field, with its parameters moved off their initial values.
# ---------------------------------------------------------------------------------------


def _field(dim: int, heads: int, layers: int, hidden: int, seed: int):
    import equinox as eqx
    import jax.random as jr

    import pdeformer as pf

    field = pf.Field(dim, heads, layers, key=jr.PRNGKey(seed), hidden=hidden)
    b = field.blocks
    # Biases start at 0 and norm scales at 1: perturb them, so that copying them is checked.
    get = lambda blk: (
        blk.attention_norm.weight,
        blk.attention_norm.bias,
        blk.attention.qkv_bias,
        blk.attention.out_bias,
        blk.reaction_norm.weight,
        blk.reaction_norm.bias,
        blk.reaction.b1,
        blk.reaction.b2,
    )
    keys = jr.split(jr.PRNGKey(seed + 100), 8)
    new = tuple(x + 0.1 * jr.normal(k, x.shape, x.dtype) for x, k in zip(get(b), keys, strict=True))
    return eqx.tree_at(lambda f: f.blocks, field, eqx.tree_at(get, b, new))


def _numpy_weights(field) -> list[dict[str, Any]]:
    """Per layer, the weights as numpy arrays in pdeformer's layout (`x @ W + b`)."""
    import numpy as np

    arrays = field_weights(field)
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    return [{k: v[i] for k, v in arrays.items()} for i in range(field.num_layers)]


# ---------------------------------------------------------------------------------------
# The same field written by hand in PyTorch.
# ---------------------------------------------------------------------------------------


def _torch_field_class(torch):
    nn = torch.nn
    F = torch.nn.functional

    class TorchLayer(nn.Module):
        def __init__(self, w: dict, heads: int, dtype):
            super().__init__()
            p = lambda a: nn.Parameter(torch.tensor(a, dtype=dtype))
            self.ln1_w, self.ln1_b = p(w["ln1_w"]), p(w["ln1_b"])
            self.qkv_w, self.qkv_b = p(w["qkv_w"]), p(w["qkv_b"])
            self.out_w, self.out_b = p(w["out_w"]), p(w["out_b"])
            self.ln2_w, self.ln2_b = p(w["ln2_w"]), p(w["ln2_b"])
            self.w1, self.b1 = p(w["w1"]), p(w["b1"])
            self.w2, self.b2 = p(w["w2"]), p(w["b2"])
            self.heads = heads

        def attend(self, u):
            batch, seq, dim = u.shape
            h = F.layer_norm(u, (dim,), self.ln1_w, self.ln1_b, eps=1e-5)
            qkv = (h @ self.qkv_w + self.qkv_b).reshape(batch, seq, 3, self.heads, -1)
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
            a = F.scaled_dot_product_attention(q, k, v)
            return a.transpose(1, 2).reshape(batch, seq, dim) @ self.out_w + self.out_b

        def react(self, u):
            h = F.layer_norm(u, (u.shape[-1],), self.ln2_w, self.ln2_b, eps=1e-5)
            return F.gelu(h @ self.w1 + self.b1, approximate="tanh") @ self.w2 + self.b2

    class TorchField(nn.Module):
        """`du/dt = 2 A_l(N u)` on `[l, l + 1/2)`, `2 R_l(N' u)` on `[l + 1/2, l + 1)`."""

        def __init__(self, weights: list[dict], heads: int, dtype):
            super().__init__()
            self.layers = nn.ModuleList(TorchLayer(w, heads, dtype) for w in weights)
            self.nfe = 0
            self.steps = 0
            self.accepted = 0
            self.rejected = 0

        def reset(self):
            self.nfe = self.steps = self.accepted = self.rejected = 0

        def forward(self, t, u):
            self.nfe += 1
            t = float(t.detach())  # torchdiffeq perturbs t off a jump (nextafter)
            index = min(max(int(t // 1.0), 0), len(self.layers) - 1)
            layer = self.layers[index]
            if t - index < 0.5:
                return 2 * layer.attend(u)
            return 2 * layer.react(u)

        # torchdiffeq calls these once per attempted step, and per accepted/rejected one.
        def callback_step(self, t0, y0, dt):
            self.steps += 1

        def callback_accept_step(self, t0, y0, dt):
            self.accepted += 1

        def callback_reject_step(self, t0, y0, dt):
            self.rejected += 1

    return TorchField


# ---------------------------------------------------------------------------------------
# Timing helpers.
# ---------------------------------------------------------------------------------------


def _interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, label: str, counters: dict | None = None
) -> dict[str, list]:
    return interleaved(fns, repeats, label, _log, counters)


def _max_rel_diff(pairs) -> float:
    """The largest `max |a - b| / max |b|` over `(a, b)` pairs of arrays."""
    import numpy as np

    return max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / (np.max(np.abs(b)) + 1e-30))
        for a, b in pairs
    )


def _median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


# ---------------------------------------------------------------------------------------
# 1. pdeformer vs torchdiffeq.
# ---------------------------------------------------------------------------------------


def _continuous(
    config: BenchConfig, torch, torchdiffeq, dev: _Torch, precision: str | None
) -> dict[str, Any]:
    import diffrax
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np

    import pdeformer as pf

    c = config
    field = _field(c.ode_dim, c.ode_heads, c.ode_layers, c.ode_hidden, c.seed)
    weights = _numpy_weights(field)
    TorchField = _torch_field_class(torch)
    tfield = TorchField(weights, c.ode_heads, torch.float32).to(dev.device)
    jump_ts = list(field.jump_times())
    t1 = float(field.t1)

    u0 = jr.normal(jr.PRNGKey(c.seed + 1), (c.ode_batch, c.ode_seq, c.ode_dim), jnp.float32)
    u0_torch = dev.tensor(np.asarray(u0))

    # The field's matmuls at `Continuous`'s `precision` (full float32 by default) in both
    # libraries: in the solves, and in every evaluation of the field alone below.
    # The two fields agree (float32) on both halves of a layer before anything is timed.
    rate_check = {}
    with _jax_precision(precision):
        for t in (0.0, 0.5, t1 - 0.25):
            r_jax = jax.vmap(lambda v, t=t: field(jnp.asarray(t, jnp.float32), v))(u0)
            with torch.no_grad():
                r_torch = tfield(dev.tensor(t, dtype=torch.float64), u0_torch).cpu().numpy()
            rate_check[f"t={t:g}"] = float(np.max(np.abs(np.asarray(r_jax) - r_torch)))
        scale = float(np.max(np.abs(np.asarray(jax.vmap(lambda v: field(jnp.float32(0), v))(u0)))))
    worst = max(rate_check.values())
    if worst > 1e-4 * max(1.0, scale):
        raise RuntimeError(f"the PyTorch field differs from pdeformer's: {rate_check}")
    _log(f"rates agree: max |diff| {worst:.1e} (rate scale {scale:.2f})")

    # The float64 reference: torchdiffeq's dopri8 at a tight tolerance, same jumps.
    tfield64 = TorchField(weights, c.ode_heads, torch.float64).to(dev.device)
    t_span = dev.tensor([0.0, t1], dtype=torch.float64)
    _log("float64 reference (dopri8, rtol 1e-10)")
    t0_ref = time.perf_counter()
    with torch.no_grad():
        ref = (
            torchdiffeq.odeint(
                tfield64,
                u0_torch.double(),
                t_span,
                method="dopri8",
                rtol=1e-10,
                atol=1e-12,
                options=dict(
                    jump_t=dev.tensor(jump_ts, dtype=torch.float64),
                    step_t=dev.tensor([t1], dtype=torch.float64),
                ),
            )[-1]
            .cpu()
            .numpy()
        )
    reference = {
        "method": "torchdiffeq dopri8, float64, rtol 1e-10, atol 1e-12, jump_t, step_t=[T]",
        "nfe": tfield64.nfe,
        "wall_s": time.perf_counter() - t0_ref,
        "state_max_abs": float(np.max(np.abs(ref))),
    }

    params, static = eqx.partition(field, eqx.is_array)
    tparams = list(tfield.parameters())
    sizes = {
        "batch": c.ode_batch,
        "seq": c.ode_seq,
        "dim": c.ode_dim,
        "heads": c.ode_heads,
        "layers": c.ode_layers,
        "hidden": c.ode_hidden,
    }

    def jitted(solver, rtol: float, atol: float):
        """The pdeformer forward solve and its value-and-gradient, jitted."""
        depth = pf.Continuous(solver, diffrax.PIDController(rtol=rtol, atol=atol))

        def solve(p, u):
            return depth(eqx.combine(p, static), u)

        def loss(p, u):
            sol = solve(p, u)
            return jnp.sum(sol.u), sol

        return jax.jit(solve), jax.jit(jax.value_and_grad(loss, has_aux=True))

    def one_tolerance(rtol: float, repeats: int, adjoint_repeats: int):
        atol = rtol / 10
        fwd, grad = jitted(diffrax.Dopri5(), rtol, atol)
        # The same method with its stages unrolled (`pf.Unrolled`): reverse mode keeps each
        # stage's intermediates instead of recomputing them. This arm is the benchmark's only
        # use of `pf.Unrolled`: where the library drops it, drop it here (and its ratios in
        # `main`).
        fwd_u, grad_u = jitted(pf.Unrolled(diffrax.Dopri5()), rtol, atol)
        options = dict(
            jump_t=dev.tensor(jump_ts, dtype=torch.float64),
            step_t=dev.tensor([t1], dtype=torch.float64),
        )

        def torch_solve(u):
            return torchdiffeq.odeint(
                tfield, u, t_span, method="dopri5", rtol=rtol, atol=atol, options=options
            )[-1]

        def torch_grad():
            for p in tparams:
                p.grad = None
            tfield.reset()
            out = torch_solve(u0_torch)
            out.sum().backward()
            dev.sync()
            return out

        def torch_fwd():
            tfield.reset()
            with torch.no_grad():
                out = torch_solve(u0_torch)
            dev.sync()
            return out

        def torch_adjoint():
            for p in tparams:
                p.grad = None
            tfield.reset()
            out = torchdiffeq.odeint_adjoint(
                tfield,
                u0_torch,
                t_span,
                method="dopri5",
                rtol=rtol,
                atol=atol,
                options=options,
                adjoint_options=options,
                adjoint_params=tparams,
            )[-1]
            out.sum().backward()
            dev.sync()
            return out

        _log(f"rtol {rtol:g}: compiling pdeformer")
        t0 = time.perf_counter()
        (value, sol), grads = jax.block_until_ready(grad(params, u0))
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(fwd(params, u0))
        _log(f"rtol {rtol:g}: compiling pdeformer with Unrolled(Dopri5())")
        t0 = time.perf_counter()
        (value_u, sol_u), grads_u = jax.block_until_ready(grad_u(params, u0))
        compile_unrolled_s = time.perf_counter() - t0
        jax.block_until_ready(fwd_u(params, u0))
        for _ in range(c.warmup):
            jax.block_until_ready(grad(params, u0))
            jax.block_until_ready(grad_u(params, u0))
            torch_grad()

        # Counts: pdeformer's exact statistics; torchdiffeq's from the module's counters.
        out_torch = torch_fwd()
        torch_fwd_counts = {
            "nfe": tfield.nfe,
            "steps": tfield.steps,
            "accepted": tfield.accepted,
            "rejected": tfield.rejected,
        }
        out_torch_grad = torch_grad()
        torch_nfe_fwd_bwd = tfield.nfe
        tgrads = {
            n: p.grad.cpu().numpy().copy()
            for n, p in zip(_torch_names(tfield), tparams, strict=True)
        }

        counters: dict = {}
        samples = _interleaved(
            {
                "pdeformer": lambda: jax.block_until_ready(grad(params, u0)),
                "pdeformer_unrolled": lambda: jax.block_until_ready(grad_u(params, u0)),
                "torchdiffeq": torch_grad,
            },
            repeats,
            f"rtol {rtol:g} fwd+bwd",
            counters,
        )
        fwd_samples = _interleaved(
            {
                "pdeformer": lambda: jax.block_until_ready(fwd(params, u0)),
                "pdeformer_unrolled": lambda: jax.block_until_ready(fwd_u(params, u0)),
                "torchdiffeq": torch_fwd,
            },
            max(1, repeats // 2 + 1),
            f"rtol {rtol:g} fwd",
        )
        adjoint = None
        if adjoint_repeats > 0:
            torch_adjoint()
            s = _interleaved({"torchdiffeq_adjoint": torch_adjoint}, adjoint_repeats, "adjoint")
            adjoint = {
                "tried": True,
                "fwd_bwd_ms": _median_ms(s["torchdiffeq_adjoint"]),
                "nfe_fwd_bwd": tfield.nfe,
            }
        st = sol.stats
        u_jax = np.asarray(sol.u)
        u_torch = out_torch.cpu().numpy()
        jax_grads = _grads_as_torch_names(grads)
        grad_rel = _max_rel_diff((jax_grads[n], tgrads[n]) for n in tgrads)
        names = ("pdeformer", "pdeformer_unrolled", "torchdiffeq")
        times = {f"{n}_fwd_bwd_ms": _median_ms(samples[n]) for n in names}
        times.update({f"{n}_fwd_ms": _median_ms(fwd_samples[n]) for n in names})
        times_min = {f"{n}_fwd_bwd_ms": 1e3 * min(samples[n]) for n in names}
        times_min.update({f"{n}_fwd_ms": 1e3 * min(fwd_samples[n]) for n in names})
        counts = {
            "pdeformer": {
                "nfe": int(st.nfe),
                "steps": int(st.num_steps),
                "accepted": int(st.num_accepted_steps),
                "rejected": int(st.num_rejected_steps),
            },
            "torchdiffeq": torch_fwd_counts,
        }
        return {
            "rtol": rtol,
            "atol": atol,
            "ratio": times["pdeformer_fwd_bwd_ms"] / times["torchdiffeq_fwd_bwd_ms"],
            "ratio_unrolled": times["pdeformer_unrolled_fwd_bwd_ms"]
            / times["torchdiffeq_fwd_bwd_ms"],
            "times_ms": times,
            "ratio_of_min_times": times_min["pdeformer_fwd_bwd_ms"]
            / times_min["torchdiffeq_fwd_bwd_ms"],
            "ratio_unrolled_of_min_times": times_min["pdeformer_unrolled_fwd_bwd_ms"]
            / times_min["torchdiffeq_fwd_bwd_ms"],
            "unrolled": {
                "nfe": int(sol_u.stats.nfe),
                "steps": int(sol_u.stats.num_steps),
                "state_max_abs_diff_vs_dopri5": float(np.max(np.abs(np.asarray(sol_u.u) - u_jax))),
                "loss": float(value_u),
                "grad_max_rel_diff_vs_dopri5": _max_rel_diff(
                    zip(jax.tree.leaves(grads_u), jax.tree.leaves(grads), strict=True)
                ),
                "compile_s": compile_unrolled_s,
            },
            "times_ms_min": times_min,
            "memory_faults_fwd_bwd": counter_medians(counters),
            "counts": counts,
            "torchdiffeq_nfe_fwd_bwd": torch_nfe_fwd_bwd,
            "max_abs_error_vs_float64_reference": {
                "pdeformer": float(np.max(np.abs(u_jax - ref))),
                "torchdiffeq": float(np.max(np.abs(u_torch - ref))),
            },
            "pdeformer_vs_torchdiffeq_state_max_abs_diff": float(np.max(np.abs(u_jax - u_torch))),
            "loss": {
                "pdeformer": float(value),
                "torchdiffeq": float(out_torch_grad.detach().sum()),
            },
            "grad_max_rel_diff": grad_rel,
            "pdeformer_compile_s": compile_s,
            "torchdiffeq_odeint_adjoint": adjoint
            or {
                "tried": False,
                "note": "not timed (adjoint_repeats=0); the smoke and full presets time it",
            },
        }

    runs = [one_tolerance(c.rtol, c.repeats, c.adjoint_repeats)]
    if c.rtol2 is not None:
        runs.append(one_tolerance(c.rtol2, max(2, c.repeats // 2), 0))

    # One evaluation of the field alone: forward, and forward+backward (vjp of the sum).
    # As in the solver, the batch goes to the field itself (no vmap), and t is an argument:
    # the composition's branch is a traced lax.cond.
    rate = field_rate(static, precision)
    rate_fwd = jax.jit(rate)
    rate_grad = jax.jit(jax.grad(lambda p, t, u: jnp.sum(rate(p, t, u))))
    t_attn = jnp.asarray(0.25, jnp.float32)
    jax.block_until_ready(rate_fwd(params, t_attn, u0))
    jax.block_until_ready(rate_grad(params, t_attn, u0))
    t_q = dev.tensor(0.25, dtype=torch.float64)

    def torch_rate_grad():
        for p in tparams:
            p.grad = None
        tfield(t_q, u0_torch).sum().backward()
        dev.sync()

    def torch_rate_fwd():
        with torch.no_grad():
            tfield(t_q, u0_torch)
        dev.sync()

    n_inner = 5
    field_samples = _interleaved(
        {
            "pdeformer_fwd": lambda: [
                jax.block_until_ready(rate_fwd(params, t_attn, u0)) for _ in range(n_inner)
            ],
            "torch_fwd": lambda: [torch_rate_fwd() for _ in range(n_inner)],
            "pdeformer_fwd_bwd": lambda: [
                jax.block_until_ready(rate_grad(params, t_attn, u0)) for _ in range(n_inner)
            ],
            "torch_fwd_bwd": lambda: [torch_rate_grad() for _ in range(n_inner)],
        },
        max(2, c.repeats // 2),
        "attention rate alone",
    )

    head = runs[0]
    breakdown = {}
    arms = (
        ("pdeformer", "pdeformer"),
        ("pdeformer_unrolled", "pdeformer"),  # the same method: the same counts
        ("torchdiffeq", "torchdiffeq"),
    )
    for key, lib in arms:
        nfe = head["counts"][lib]["nfe"]
        f = head["times_ms_min"][f"{key}_fwd_ms"]
        fb = head["times_ms_min"][f"{key}_fwd_bwd_ms"]
        breakdown[key] = {
            **head["counts"][lib],
            "fwd_ms": f,
            "fwd_bwd_ms": fb,
            "bwd_ms": fb - f,
            "fwd_ms_per_nfe": f / nfe,
            "bwd_ms_per_nfe": (fb - f) / nfe,
            "bwd_over_fwd": (fb - f) / f,
            # False when load hit every forward-only repeat (the difference is then noise).
            "consistent": bool(fb > f),
        }
    breakdown["note"] = (
        "from the fastest repeat of each (contention on a shared CPU only adds time, and "
        "PyTorch's threads slowed by up to 40x when other jobs ran; medians are in "
        "tolerances[0].times_ms)"
    )
    field_ms = {k: 1e3 * min(v) / n_inner for k, v in field_samples.items()}
    breakdown["one_attention_evaluation_ms"] = {
        "pdeformer_fwd": field_ms["pdeformer_fwd"],
        "pdeformer_fwd_bwd": field_ms["pdeformer_fwd_bwd"],
        "torch_fwd": field_ms["torch_fwd"],
        "torch_fwd_bwd": field_ms["torch_fwd_bwd"],
    }
    return {
        "matmul_precision": {
            "jax": precision,
            "torch": torch.get_float32_matmul_precision(),
        },
        "field": "pf.Field defaults: PerLayer weights, SequentialBlock (jumps at t = k/2, told "
        "to both solvers: ClipStepSizeController(jump_ts) / options=dict(jump_t=..., "
        "step_t=[T]))",
        "sizes": sizes,
        "jump_ts": jump_ts,
        "solver": "Dopri5 / dopri5; pdeformer: pf.Continuous(diffrax.Dopri5(), "
        "diffrax.PIDController(rtol, atol)) with its defaults; torchdiffeq: odeint with "
        "autograd through the solver",
        "loss": "sum of the final state",
        "rate_check_max_abs_diff": rate_check,
        "reference": reference,
        "tolerances": runs,
        "breakdown": breakdown,
    }


def _torch_names(tfield) -> list[str]:
    return [n for n, _ in tfield.named_parameters()]


def _grads_as_torch_names(grads) -> dict[str, Any]:
    """pdeformer's stacked gradients keyed like the PyTorch field's parameters."""
    import numpy as np

    out = {}
    for i, w in enumerate(_numpy_weights(grads)):
        for k, v in w.items():
            out[f"layers.{i}.{k}"] = np.asarray(v)
    return out


# ---------------------------------------------------------------------------------------
# 3. The backward pass per evaluation, as a multiple of the forward's (pdeformer alone).
# ---------------------------------------------------------------------------------------

BACKWARD_FIELDS = {
    "default": "PerLayer weights, SequentialBlock (jumps at t = k/2)",
    "smooth": "Polynomial(3) weights, ParallelBlock (one smooth piece)",
}


def _backward_field(name: str, c: BenchConfig):
    import jax.random as jr

    import pdeformer as pf

    if name == "default":
        return _field(c.ode_dim, c.ode_heads, c.ode_layers, c.ode_hidden, c.seed)
    return pf.Field(
        c.ode_dim,
        c.ode_heads,
        c.ode_layers,
        key=jr.PRNGKey(c.seed),
        hidden=c.ode_hidden,
        schedule=pf.Polynomial(3),
        composition=pf.ParallelBlock(),
    )


def backward_per_nfe(config: BenchConfig) -> dict[str, Any]:
    """`backward_per_nfe_over_forward` for each field and adjoint (see the module's
    docstring, comparison 3): times, counts and the figure per arm."""
    import diffrax
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr

    import pdeformer as pf
    from pdeformer.diagnostics import evaluation_counts

    c = config
    u0 = jr.normal(jr.PRNGKey(c.seed + 1), (c.ode_batch, c.ode_seq, c.ode_dim), jnp.float32)
    controller = diffrax.PIDController(rtol=c.rtol, atol=c.rtol / 10)
    # (adjoint, unroll_stages) by name; the stage loop for the default field only.
    adjoints = {"recursive_checkpoint": (None, True)}
    if c.backward_backsolve:
        adjoints["backsolve"] = (diffrax.BacksolveAdjoint(), True)
    if c.backward_stage_loop:
        adjoints["recursive_checkpoint_stage_loop"] = (None, False)
    arms, fns = {}, {}
    for field_name in BACKWARD_FIELDS:
        field = _backward_field(field_name, c)
        params, static = eqx.partition(field, eqx.is_array)
        for adjoint_name, (adjoint, unroll) in adjoints.items():
            if field_name != "default" and not unroll:
                continue
            name = f"{field_name}/{adjoint_name}"
            depth = pf.Continuous(diffrax.Dopri5(), controller, adjoint, unroll_stages=unroll)

            def solve(p, u, depth=depth, static=static):
                return depth(eqx.combine(p, static), u)

            def loss(p, u, solve=solve):
                return jnp.sum(solve(p, u).u)

            _log(f"backward per NFE: compiling {name}")
            t0 = time.perf_counter()
            fwd = jax.jit(solve).lower(params, u0).compile()
            grad = jax.jit(jax.value_and_grad(loss)).lower(params, u0).compile()
            compile_s = time.perf_counter() - t0
            sol = jax.block_until_ready(fwd(params, u0))
            jax.block_until_ready(grad(params, u0))
            counts = evaluation_counts(lambda f, u, depth=depth: jnp.sum(depth(f, u).u), field, u0)
            arms[name] = {
                "field": BACKWARD_FIELDS[field_name],
                "adjoint": report.describe(depth.adjoint),
                "unroll_stages": unroll,
                "nfe": int(sol.stats.nfe),
                "steps": int(sol.stats.num_steps),
                "evaluations": {
                    "forward": counts.forward,
                    "backward_recomputed": counts.backward_recomputed,
                    "backward_vjp": counts.backward_vjp,
                },
                "compile_s": compile_s,
            }
            fns[f"{name} fwd"] = lambda f=fwd, p=params: jax.block_until_ready(f(p, u0))
            fns[f"{name} fwd+bwd"] = lambda f=grad, p=params: jax.block_until_ready(f(p, u0))
    samples = _interleaved(fns, c.backward_repeats, "backward per NFE")
    for name, arm in arms.items():
        f, fb = samples[f"{name} fwd"], samples[f"{name} fwd+bwd"]
        vjps = arm["evaluations"]["backward_vjp"]

        def figure(f_s: float, fb_s: float, arm=arm, vjps=vjps) -> float:
            return ((fb_s - f_s) / vjps) / (f_s / arm["nfe"])

        fwd_ms, fwd_bwd_ms = _median_ms(f), _median_ms(fb)
        arm.update(
            {
                "fwd_ms": fwd_ms,
                "fwd_bwd_ms": fwd_bwd_ms,
                "bwd_ms": fwd_bwd_ms - fwd_ms,
                "fwd_ms_per_nfe": fwd_ms / arm["nfe"],
                "bwd_ms_per_vjp": (fwd_bwd_ms - fwd_ms) / vjps,
                "backward_per_nfe_over_forward": figure(fwd_ms, fwd_bwd_ms),
                "per_round_median": statistics.median(
                    figure(a, b) for a, b in zip(f, fb, strict=True)
                ),
            }
        )
    return {
        "how": "forward: median time of the jitted forward solve / its stats.nfe; backward: "
        "median time of jax.value_and_grad of sum(u_T) less the forward's, / the backward "
        "pass's VJPs of the rate (diagnostics.evaluation_counts().backward_vjp); figure: "
        "backward per VJP / forward per NFE",
        "solver": f"Dopri5, PIDController(rtol={c.rtol:g}, atol={c.rtol / 10:g})",
        "sizes": {
            "batch": c.ode_batch,
            "seq": c.ode_seq,
            "dim": c.ode_dim,
            "heads": c.ode_heads,
            "layers": c.ode_layers,
            "hidden": c.ode_hidden,
        },
        "repeats": c.backward_repeats,
        "arms": arms,
    }


# ---------------------------------------------------------------------------------------
# 2. Discrete mode vs torch.nn.TransformerEncoder.
# ---------------------------------------------------------------------------------------


def _discrete(config: BenchConfig, torch, dev: _Torch) -> dict[str, Any]:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np

    import pdeformer as pf

    c = config
    field = _field(c.disc_dim, c.disc_heads, c.disc_layers, c.disc_hidden, c.seed)
    weights = _numpy_weights(field)
    gelu_tanh = functools.partial(torch.nn.functional.gelu, approximate="tanh")
    layer = torch.nn.TransformerEncoderLayer(
        c.disc_dim,
        c.disc_heads,
        dim_feedforward=c.disc_hidden,
        dropout=0.0,
        activation=gelu_tanh,
        layer_norm_eps=1e-5,
        batch_first=True,
        norm_first=True,
    )
    encoder = torch.nn.TransformerEncoder(layer, c.disc_layers, enable_nested_tensor=False).float()
    with torch.no_grad():
        for mod, w in zip(encoder.layers, weights, strict=True):
            t = lambda a: torch.tensor(np.ascontiguousarray(a))
            mod.norm1.weight.copy_(t(w["ln1_w"]))
            mod.norm1.bias.copy_(t(w["ln1_b"]))
            mod.self_attn.in_proj_weight.copy_(t(w["qkv_w"].T))
            mod.self_attn.in_proj_bias.copy_(t(w["qkv_b"]))
            mod.self_attn.out_proj.weight.copy_(t(w["out_w"].T))
            mod.self_attn.out_proj.bias.copy_(t(w["out_b"]))
            mod.norm2.weight.copy_(t(w["ln2_w"]))
            mod.norm2.bias.copy_(t(w["ln2_b"]))
            mod.linear1.weight.copy_(t(w["w1"].T))
            mod.linear1.bias.copy_(t(w["b1"]))
            mod.linear2.weight.copy_(t(w["w2"].T))
            mod.linear2.bias.copy_(t(w["b2"]))
    encoder.to(dev.device).train()  # training mode: the autograd path (dropout is 0)

    u0 = jr.normal(jr.PRNGKey(c.seed + 2), (c.disc_batch, c.disc_seq, c.disc_dim), jnp.float32)
    u0_torch = dev.tensor(np.asarray(u0))
    params, static = eqx.partition(field, eqx.is_array)
    depth = pf.Discrete()

    def loss(p, u):
        return jnp.sum(depth(eqx.combine(p, static), u).u)

    grad = jax.jit(jax.value_and_grad(loss))

    # The outputs are compared in full float32 on both sides (an NVIDIA GPU would
    # otherwise round both in TF32, perhaps differently); the timed steps keep JAX's
    # default precision and PyTorch's match of it (set by the caller).
    fwd = jax.jit(full_float32_output(depth, static))
    tparams = list(encoder.parameters())

    def torch_grad():
        for p in tparams:
            p.grad = None
        encoder(u0_torch).sum().backward()
        dev.sync()

    out_jax = np.asarray(fwd(params, u0))
    with torch.no_grad(), _torch_precision(torch, "highest"):
        out_torch = encoder(u0_torch).cpu().numpy()
    diff = float(np.max(np.abs(out_jax - out_torch)))
    out_scale = float(np.max(np.abs(out_torch)))
    if diff > 1e-4 * max(1.0, out_scale):
        raise RuntimeError(f"nn.TransformerEncoder differs from pf.Discrete: max |diff| {diff}")
    _log(f"discrete outputs agree: max |diff| {diff:.1e} (scale {out_scale:.1f})")
    t0 = time.perf_counter()
    jax.block_until_ready(grad(params, u0))
    compile_s = time.perf_counter() - t0
    for _ in range(c.warmup):
        jax.block_until_ready(grad(params, u0))
        torch_grad()
    counters: dict = {}
    samples = _interleaved(
        {"pdeformer": lambda: jax.block_until_ready(grad(params, u0)), "pytorch": torch_grad},
        c.repeats,
        "discrete fwd+bwd",
        counters,
    )
    times = {k: _median_ms(v) for k, v in samples.items()}
    return {
        "reference": "torch.nn.TransformerEncoder(TransformerEncoderLayer(norm_first=True, "
        "dropout=0, activation=gelu(approximate='tanh'), batch_first=True))",
        "activation_note": "pdeformer's Reaction uses jax.nn.gelu, whose default is the tanh "
        "approximation; PyTorch's 'gelu' is exact, so the tanh form is passed explicitly",
        "sizes": {
            "batch": c.disc_batch,
            "seq": c.disc_seq,
            "dim": c.disc_dim,
            "heads": c.disc_heads,
            "layers": c.disc_layers,
            "hidden": c.disc_hidden,
        },
        "loss": "sum of the output",
        "output_max_abs_diff": diff,
        "output_check": "both in full float32 (highest); the timed steps at matmul_precision",
        "matmul_precision": {
            "jax": jax.config.jax_default_matmul_precision,
            "torch": torch.get_float32_matmul_precision(),
        },
        "ratio": times["pdeformer"] / times["pytorch"],
        "times_ms": times,
        "times_ms_min": {k: 1e3 * min(v) for k, v in samples.items()},
        "memory_faults": counter_medians(counters),
        "pdeformer_compile_s": compile_s,
    }


# ---------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------


def _machine(torch, torchdiffeq, torch_device: str) -> dict[str, Any]:
    """`report.machine()` and PyTorch's version, threads and device."""
    return dict(
        report.machine(),
        **{
            "torch": torch.__version__,
            "torchdiffeq": getattr(torchdiffeq, "__version__", "unknown"),
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "torch_cuda_device": (torch.cuda.get_device_name() if torch_device == "cuda" else None),
        },
    )


def _try_import_peers():
    """`(torch, torchdiffeq)`, or `None` (said in the log) when they are not installed."""
    try:
        return _import_peers()
    except SystemExit as e:
        _log(f"{e}; running the backward-per-NFE figure alone")
        return None


def main(config: BenchConfig) -> dict[str, Any]:
    """Run the comparisons; write `results.json` and `results.md` into `config.out`.

    **Returns:**

    A JSON-serialisable dict with `ratios`, `targets`, `passed_targets`,
    `backward_per_nfe` (comparison 3: times, counts and figure per field and adjoint),
    and, with PyTorch and torchdiffeq, `pdeformer_vs_torchdiffeq` (times, NFE, steps,
    errors against the float64 reference, the breakdown, `matmul_precision` of both
    libraries), `discrete_vs_pytorch` (the same for the discrete comparison), `threads`
    and `devices` (where JAX and PyTorch ran); without them `peers_skipped` says why.
    `meta` holds the command, date, machine (with PyTorch's versions and threads when it
    ran), settings and wall time.
    """
    import jax

    peers = _try_import_peers() if config.peers else None
    backend = jax.default_backend()
    meta = report.meta(config)
    t_start = time.perf_counter()
    result: dict[str, Any] = {"ratios": {}, "targets": {}}
    if peers is not None:
        result.update(_peers(config, *peers, backend))
    else:
        result["peers_skipped"] = PEERS_MESSAGE if config.peers else "peers=False"
    if config.backward_repeats > 0:
        bwd = backward_per_nfe(config)
        result["backward_per_nfe"] = bwd
        headline = bwd["arms"]["default/recursive_checkpoint"]["backward_per_nfe_over_forward"]
        result["ratios"]["backward_per_nfe_over_forward"] = headline
        for name, arm in bwd["arms"].items():
            result["ratios"][f"backward_per_nfe_over_forward[{name}]"] = arm[
                "backward_per_nfe_over_forward"
            ]
        if backend == "cpu":
            result["targets"].update(BACKWARD_TARGETS)
    result["passed_targets"] = {
        k: bool(result["ratios"][k] <= v) for k, v in result["targets"].items()
    }
    result["meta"] = meta
    meta["machine"] = (
        _machine(*peers, result["devices"]["torch"]) if peers is not None else report.machine()
    )
    meta["wall_s"] = time.perf_counter() - t_start
    title = "pdeformer against its peers: torchdiffeq and PyTorch"
    report.write(config.out, result, title, summary(result), log=_log)
    return result


def _peers(config: BenchConfig, torch, torchdiffeq, backend: str) -> dict[str, Any]:
    """Comparisons 1 and 2: their results, ratios and targets."""
    import jax

    threads = config.torch_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process (e.g. the test suite's second run)
        pass
    device = resolve_torch_device(config.torch_device, backend, torch.cuda.is_available())
    if backend != ("gpu" if device == "cuda" else "cpu"):
        _log(f"JAX runs on {backend}, PyTorch on {device}: no target applies to this run")
    dev = _Torch(torch, device)
    # PyTorch's float32 matmuls as each pdeformer arm's: `Continuous` pins "highest" (no
    # TF32); `Discrete()` keeps JAX's default, TF32 on an NVIDIA GPU. Restored afterwards.
    import diffrax

    import pdeformer as pf

    continuous_precision = pf.Continuous(diffrax.Dopri5()).matmul_precision
    discrete_precision = jax.config.jax_default_matmul_precision
    with _torch_precision(torch, torch_matmul_precision(continuous_precision, backend, device)):
        ode = _continuous(config, torch, torchdiffeq, dev, continuous_precision)
    with _torch_precision(torch, torch_matmul_precision(discrete_precision, backend, device)):
        disc = _discrete(config, torch, dev)
    ratios = {
        "pdeformer_vs_torchdiffeq": ode["tolerances"][0]["ratio"],
        "pdeformer_unrolled_vs_torchdiffeq": ode["tolerances"][0]["ratio_unrolled"],
        "discrete_vs_pytorch": disc["ratio"],
    }
    ratios_min = {
        "pdeformer_vs_torchdiffeq": ode["tolerances"][0]["ratio_of_min_times"],
        "pdeformer_unrolled_vs_torchdiffeq": ode["tolerances"][0]["ratio_unrolled_of_min_times"],
        "discrete_vs_pytorch": disc["times_ms_min"]["pdeformer"] / disc["times_ms_min"]["pytorch"],
    }
    return {
        "ratios": ratios,
        "targets": targets_for(backend, device),
        "ratios_of_min_times": ratios_min,
        "pdeformer_vs_torchdiffeq": ode,
        "discrete_vs_pytorch": disc,
        "threads": {
            "torch_intra_op": torch.get_num_threads(),
            "xla_cpu": os.cpu_count(),
            "note": "XLA's CPU backend uses every core; PyTorch is given as many threads",
        },
        "devices": {"jax": backend, "torch": device},
    }


def summary(result: dict[str, Any]) -> str:
    """The headline figures as a fixed-width text (a Markdown code block)."""
    lines: list[str] = []
    print = lines.append  # noqa: A001 (the summary's lines, in order)
    m = result["meta"]["machine"]
    if "peers_skipped" in result:
        print(f"jax {m['jax']}; PyTorch comparisons skipped: {result['peers_skipped']}")
    else:
        ode, disc = result["pdeformer_vs_torchdiffeq"], result["discrete_vs_pytorch"]
        print(f"jax {m['jax']}, torch {m['torch']}, {m['torch_threads']} PyTorch threads")
        print(f"devices: JAX {result['devices']['jax']}, PyTorch {result['devices']['torch']}")
        for run in ode["tolerances"]:
            t, n, e = run["times_ms"], run["counts"], run["max_abs_error_vs_float64_reference"]
            print(
                f"dopri5 rtol {run['rtol']:g} atol {run['atol']:g}: pdeformer "
                f"{t['pdeformer_fwd_bwd_ms']:.0f} ms (NFE {n['pdeformer']['nfe']}, error "
                f"{e['pdeformer']:.1e}), torchdiffeq {t['torchdiffeq_fwd_bwd_ms']:.0f} ms (NFE "
                f"{n['torchdiffeq']['nfe']}, error {e['torchdiffeq']:.1e}), ratio "
                f"{run['ratio']:.2f}; Unrolled(Dopri5()) {t['pdeformer_unrolled_fwd_bwd_ms']:.0f} "
                f"ms, ratio {run['ratio_unrolled']:.2f}"
            )
        print(
            f"discrete: pdeformer {disc['times_ms']['pdeformer']:.0f} ms, PyTorch "
            f"{disc['times_ms']['pytorch']:.0f} ms, ratio {disc['ratio']:.2f}"
        )
        print(json.dumps(ode["breakdown"], indent=1))
    bwd = result.get("backward_per_nfe")
    if bwd is not None:
        print(f"backward per VJP over forward per NFE ({bwd['solver']}; {bwd['how']}):")
        for name, arm in bwd["arms"].items():
            ev = arm["evaluations"]
            print(
                f"  {name}: {arm['backward_per_nfe_over_forward']:.2f} (per round "
                f"{arm['per_round_median']:.2f}); fwd {arm['fwd_ms']:.0f} ms / {arm['nfe']} NFE, "
                f"bwd {arm['bwd_ms']:.0f} ms / {ev['backward_vjp']} VJPs "
                f"({ev['backward_recomputed']} recomputed)"
            )
    for k, v in result["ratios"].items():
        if k not in result["targets"]:
            print(f"{k}: {v:.3f}")
            continue
        ok = "yes" if result["passed_targets"][k] else "NO"
        print(f"{k}: {v:.3f} (target <= {result['targets'][k]}) {ok}")
    return "\n".join(["```", *lines, "```"])


if __name__ == "__main__":
    _cli.run(PRESETS, main, description=__doc__.splitlines()[0])
