"""The stabilizer ablation: residual connections and LayerNorm, on and off.

Paper B (Zhang & Zhou, arXiv 2408.09523) reads the Transformer as a PDE whose residual
connections and LayerNorm are stabilizers, and claims that without the residual the
representations drift catastrophically and that without LayerNorm training is explosive.
This script tests both claims on one small model trained on a task whose baseline passes
the learning gate (the quick preset: the 8x8 digits), in four arms:

- `residual + norm`: the standard pre-LN Transformer, `Discrete()`;
- `no residual`: each sub-step replaces the state, `u <- A(N u)`, `u <- R(N' u)`
  (`NoResidual()` of `experiments/studies/ablations.py`);
- `no norm`: every norm of the field and the final norm are `Identity`;
- `neither`: both.

Each arm is trained at every learning rate of a sweep (the quick preset: eight rates from
1e-4 to 0.3) from the same seeds, which turns the claims into measured thresholds: the
largest stable learning rate per arm, under criteria written at the top of this script
before the committed sweep ran (`MAX_STABLE_SPIKES`, `DRIFT_COS_DROP`, ...).
For each run it logs the loss and the gradient's global norm (before
clipping) at every step, the activation norms on a fixed probe batch every few steps,
non-finite events (a non-finite loss or gradient stops that run and is recorded; the
experiment goes on) and loss spikes; and, at initialisation and after training, per-layer
statistics of the token states `u_l` (l = 0 the embedding): cosine similarity to the input
`u_0`, relative distance `||u_l - u_0|| / ||u_0||`, RMS, the largest token norm, and token
uniformity (mean pairwise cosine between the tokens of a sequence: 1 means rank collapse).

    python experiments/studies/stabilizers.py                 # quick: ~25 min on 2 cores
    python experiments/studies/stabilizers.py --preset full   # deeper, longer: a GPU
    python experiments/studies/stabilizers.py --preset smoke  # seconds, for tests

Writes `results.md`, `results.json` (with the `thresholds` per arm and the `replication`
entries of the site's table) and `loss.png`, `grad_norm.png`, `activations.png`,
`drift.png`, `lr_sweep.png` into `--out` (default `runs/stabilizers`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/: report, _cli

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import _cli  # noqa: E402
import _stats as stats  # noqa: E402
import report  # noqa: E402
from _common import (  # noqa: E402
    ListOpsSetup,
    TaskSetup,
    data_summary,
    gate_of,
    gate_record,
    gate_section,
    gate_verdict,
)
from ablations import NoResidual  # noqa: E402
from pdeformer import Discrete, Identity  # noqa: E402
from pdeformer.data import iterate_batches, iterate_forever  # noqa: E402
from pdeformer.training import evaluate, make_optimizer, train_step  # noqa: E402
from report import fmt  # noqa: E402

_log = report.logger("stabilizers")


LAYER_STATS = ("cos_to_input", "rel_distance", "rms", "max_token_norm", "token_uniformity")
"""The per-layer statistics of the token states."""

# ---------------------------------------------------------------------------------------
# The criteria (paper B gives none). Version 2, written after the first sweep (seeds 0-2)
# and before the second (seeds 3-5), whose results are the committed ones. Version 1 called a
# run unstable unless its final loss was below 0.9x its initial loss: slow learning at the
# smallest rate and a collapse to chance at a large rate both failed it, a collapse from a
# high initial loss passed it, and "every smaller rate stable" then left the baseline
# without a largest stable rate. Version 2 separates divergence from not learning.
# ---------------------------------------------------------------------------------------

SPIKE_FACTOR = 2.0
"""A *loss spike* is a step whose training loss exceeds `SPIKE_FACTOR` times the median of
the previous `SPIKE_WINDOW` losses."""

SPIKE_WINDOW = 20
"""The window of the loss-spike median, in steps."""

MAX_STABLE_SPIKES = 3
"""A run *diverges* when it has more loss spikes than this, or meets a non-finite loss,
gradient or activation (which stops it)."""

# A run *trains stably* when it does not diverge and passes the learning gate (the shared
# gate of `_common.py`: test accuracy at least 5 points above the best trivial rule, final
# training loss at least 0.2 nats below that rule's conditional entropy). A rate is stable
# for an arm when every seed's run at it trains stably; the arm's *largest stable learning
# rate* is the largest such rate of the sweep (`None` when there is none), and its *first
# failing rate* the smallest rate above it. Too small a rate fails by not learning, which
# says nothing about stability, so a stable rate above a failing one counts.

DRIFT_COS_DROP = 0.3
"""Drift at initialisation: the arm's last-layer cosine of the token states to the input
lies at least this far below the baseline's (paired by seed; the claim holds when the 95%
interval of the difference lies below `-DRIFT_COS_DROP`)."""

DRIFT_ACCURACY_DROP = 0.05
"""Catastrophic drift after training: at its best learning rate, the arm's test accuracy
lies at least this far (5 points) below the baseline's at the baseline's best rate (paired
by seed; holds when the 95% interval lies below `-DRIFT_ACCURACY_DROP`)."""

EXPLOSION_FACTOR = 10.0
"""Explosion at one learning rate: a non-finite event, or the run's largest gradient norm
or activation RMS at least this multiple of the baseline's at the same rate."""

PARTLY_FACTOR = 3.0
"""Partly explosive at one learning rate: that multiple at least `PARTLY_FACTOR`, or more
loss spikes than the baseline."""

# The explosion claim as a threshold: it holds when the arm's largest stable learning rate
# is below the baseline's (or it has none) and the arm diverges at its first failing rate;
# it does not hold when that rate is at least the baseline's; it is not resolved when the
# baseline has no stable rate, when both are stable at the largest rate of the sweep, or
# when the arm fails below the baseline's threshold only by not learning.


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm of the ablation.

    **Arguments:**

    - `name`: its label.
    - `residual`: keep the residual connection (`Discrete()`; without it `NoResidual()`,
      whose half-layers replace the state).
    - `norm`: keep the norms; without them every norm of the field and the encoder's final
      norm are `Identity`.
    """

    name: str
    residual: bool
    norm: bool

    def depth(self) -> Discrete | NoResidual:
        """The integrator in depth of this arm."""
        return Discrete() if self.residual else NoResidual()

    def encoder_kwargs(self) -> dict[str, Any]:
        """The model's norm constructors for this arm."""
        return {} if self.norm else {"norm": Identity, "final_norm": Identity}


ARMS = (
    Arm("residual + norm", residual=True, norm=True),
    Arm("no residual", residual=False, norm=True),
    Arm("no norm", residual=True, norm=False),
    Arm("neither", residual=False, norm=False),
)
"""The four arms; the first is the baseline the others are compared with."""


@dataclasses.dataclass(frozen=True)
class StabilizerConfig:
    """Everything the ablation depends on.

    **Arguments:**

    - `name`: a label for the outputs (`quick`, `full`, `smoke`).
    - `setup`: the task, the model sizes and the training (`_common.TaskSetup`); every
      arm uses the same. Its `model_seed` and `train.seed` are replaced by each seed.
    - `lrs`: peak learning rates; each replaces `setup.train.lr` (one run per arm, rate and
      seed).
    - `seeds`: one run per seed, arm and rate (initialisation and data order).
    - `arms`: the arms; the first is the baseline.
    - `probe_size`: validation examples whose states are measured (one batch).
    - `probe_every`: measure the activation norms every this many steps.
    - `eval_batch_size`: batch size of the test-split evaluation.
    - `spike_factor`, `spike_window`: a loss spike is a step whose loss exceeds
      `spike_factor` times the median of the previous `spike_window` losses.
    - `out`: the output directory.
    - `run_s`: measured seconds of one run on two cores, for the time estimate (`None`:
      unknown).
    """

    name: str
    setup: TaskSetup
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    arms: tuple[Arm, ...] = ARMS
    probe_size: int = 64
    probe_every: int = 10
    eval_batch_size: int = 128
    spike_factor: float = SPIKE_FACTOR
    spike_window: int = SPIKE_WINDOW
    out: Path = Path("runs/stabilizers")
    run_s: float | None = None

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("seeds must be non-empty; pass e.g. seeds=(0, 1).")
        if not self.lrs or min(self.lrs) <= 0:
            raise ValueError(f"lrs must be positive and non-empty; got {self.lrs}.")
        if not self.arms:
            raise ValueError("arms must be non-empty; pass e.g. arms=ARMS.")
        if self.probe_size < 2 or self.probe_every < 1:
            raise ValueError(
                f"need probe_size >= 2 and probe_every >= 1; got probe_size={self.probe_size}, "
                f"probe_every={self.probe_every}."
            )

    @classmethod
    def quick(cls) -> StabilizerConfig:
        """The learning-rate sweep on a task that passes the learning gate: the 8x8 digits
        (`TaskSetup.digits`: 4 layers, width 32), 400 steps (warm-up 40), 8 peak learning
        rates from 1e-4 to 0.3 (a factor of about 3 apart), the four arms, 3 seeds (3 to 5:
        seeds 0 to 2 ran under the criteria's first version): 96 runs (the script prints
        its time estimate)."""
        digits = TaskSetup.digits(400)
        return cls(
            name="quick",
            setup=dataclasses.replace(
                digits, train=dataclasses.replace(digits.train, warmup_steps=40)
            ),
            lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
            seeds=(3, 4, 5),
            probe_size=64,
            probe_every=20,
            eval_batch_size=269,
            run_s=13.0,
        )

    @classmethod
    def full(cls) -> StabilizerConfig:
        """An 8-layer width-128 model on longer ListOps, 3000 steps, 3 seeds, 8 learning
        rates from 1e-4 to 0.3: for a GPU."""
        base = ListOpsSetup.full()
        return cls(
            name="full",
            setup=TaskSetup(
                task="listops",
                dim=base.dim,
                num_heads=base.num_heads,
                num_layers=8,
                listops=base.listops,
                train=dataclasses.replace(
                    base.train,
                    lr=3e-3,
                    total_steps=3000,
                    warmup_steps=200,
                    checkpoint_every=0,
                    eval_every=0,
                    progress=False,
                ),
            ),
            lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
            seeds=(0, 1, 2),
            probe_size=128,
            probe_every=50,
            eval_batch_size=250,
        )

    @classmethod
    def smoke(cls) -> StabilizerConfig:
        """Seconds: the tiny digits setup, 3 steps, one seed, two learning rates, the
        baseline and `neither` (for tests; `neither` goes through both ablated code paths,
        and each arm and rate is a new compilation)."""
        return cls(
            name="smoke",
            setup=TaskSetup.smoke(),
            lrs=(3e-3, 3e-1),
            seeds=(0,),
            arms=(ARMS[0], ARMS[3]),
            probe_size=8,
            probe_every=2,
            eval_batch_size=16,
            spike_window=2,
            run_s=1.0,
        )


# ---------------------------------------------------------------------------------------
# Per-layer statistics of the token states
# ---------------------------------------------------------------------------------------


def layer_statistics(us: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Per-layer statistics of saved token states.

    **Arguments:**

    - `us`: states at depths `0, 1, ..., L`, shape `(L + 1, batch, seq, dim)`; `us[0]` is
      the embedding (the input of the first layer).
    - `mask`: `(batch, seq)`, `True` on valid tokens.

    **Returns:**

    A dict of `(L + 1,)` arrays over valid tokens: `cos_to_input` (mean cosine of each
    token's state to its input state), `rel_distance` (`||u_l - u_0|| / ||u_0||` over a
    sequence's valid tokens, averaged over sequences), `rms` (root mean square of the
    entries), `max_token_norm`, and `token_uniformity` (mean cosine between the states of
    two distinct valid tokens of a sequence, averaged over sequences).
    """
    eps = jnp.asarray(1e-12, us.dtype)
    w = mask.astype(us.dtype)  # (batch, seq)
    num_tokens = jnp.sum(w)
    norms = jnp.sqrt(jnp.sum(us * us, axis=-1))  # (L+1, batch, seq)
    u0 = us[0]
    cos = jnp.sum(us * u0, axis=-1) / (norms * norms[0] + eps)
    cos_to_input = jnp.sum(cos * w, axis=(1, 2)) / num_tokens
    diff = jnp.sum(jnp.sum((us - u0) ** 2, axis=-1) * w, axis=-1)  # (L+1, batch)
    base = jnp.sum(jnp.sum(u0 * u0, axis=-1) * w, axis=-1)  # (batch,)
    rel_distance = jnp.mean(jnp.sqrt(diff / (base + eps)), axis=1)
    rms = jnp.sqrt(jnp.sum(norms**2 * w, axis=(1, 2)) / (num_tokens * us.shape[-1]))
    max_token_norm = jnp.max(jnp.where(mask, norms, 0.0), axis=(1, 2))
    unit = us / (norms[..., None] + eps)
    gram = jnp.einsum("lbsd,lbtd->lbst", unit, unit)
    pairs = w[:, :, None] * w[:, None, :] * (1.0 - jnp.eye(mask.shape[-1], dtype=us.dtype))
    num_pairs = jnp.sum(pairs, axis=(1, 2))  # (batch,)
    per_sequence = jnp.sum(gram * pairs, axis=(2, 3)) / jnp.maximum(num_pairs, 1.0)
    has_pairs = (num_pairs > 0).astype(us.dtype)
    token_uniformity = jnp.sum(per_sequence * has_pairs, axis=1) / jnp.maximum(
        jnp.sum(has_pairs), 1.0
    )
    return {
        "cos_to_input": cos_to_input,
        "rel_distance": rel_distance,
        "rms": rms,
        "max_token_norm": max_token_norm,
        "token_uniformity": token_uniformity,
    }


@eqx.filter_jit
def _probe(model, tokens, mask, depth):
    # The encoder's own pieces: embedding, then the depth integrator on its field, saving
    # the states at every layer boundary (Classifier.__call__ does not take save_at).
    encoder = model.encoder
    u0, m = encoder.embed(tokens, mask)
    num_layers = encoder.field.num_layers
    sol = depth(encoder.field, u0, m, save_at=tuple(range(num_layers + 1)))
    return layer_statistics(sol.us, m)


def _probe_numpy(model, probe, depth) -> dict[str, list[float]]:
    stats = jax.device_get(_probe(model, probe.tokens, probe.mask, depth))
    return {k: [float(x) for x in np.asarray(v)] for k, v in stats.items()}


# ---------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------


def count_spikes(losses: list[float], factor: float, window: int) -> int:
    """Steps whose loss exceeds `factor` times the median of the previous `window` losses."""
    count = 0
    for i in range(window, len(losses)):
        if losses[i] > factor * float(np.median(losses[i - window : i])):
            count += 1
    return count


def divergence(losses: list[float], non_finite: bool, spikes: int) -> str | None:
    """Why a run diverges under the criteria above (`MAX_STABLE_SPIKES`), or `None` if it
    does not.

    **Arguments:**

    - `losses`: the training losses of its completed steps.
    - `non_finite`: whether it met a non-finite loss, gradient or activation.
    - `spikes`: its number of loss spikes.
    """
    if non_finite:
        return "non-finite loss, gradient or activation"
    if not losses:
        return "no step completed"
    if spikes > MAX_STABLE_SPIKES:
        return f"{spikes} loss spikes (more than {MAX_STABLE_SPIKES})"
    return None


def largest_stable(stable_by_lr: dict[float, bool]) -> tuple[float | None, float | None]:
    """`(largest stable rate, first failing rate)` of a sweep: the largest rate at which
    every seed trains stably (`None` if there is none), and the smallest rate above it
    (above every rate when there is none stable; `None` if it is the largest of the
    sweep)."""
    stable = [lr for lr, ok in stable_by_lr.items() if ok]
    best = max(stable) if stable else None
    above = [lr for lr in stable_by_lr if best is None or lr > best]
    return best, (min(above) if above else None)


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _max(values: list[float]) -> float:
    # A non-finite value anywhere makes the maximum infinite (written as null in the JSON).
    return max(values) if all(map(_finite, values)) else math.inf


def _run(arm: Arm, lr: float, seed: int, task, probe, config: StabilizerConfig) -> dict[str, Any]:
    setup = config.setup
    train_config = dataclasses.replace(setup.train, lr=lr, seed=seed)
    model = setup.model(task, seed=seed, **arm.encoder_kwargs())
    depth = arm.depth()
    optimizer = make_optimizer(train_config)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    layers_init = _probe_numpy(model, probe, depth)
    history: dict[str, list] = {"step": [], "loss": [], "accuracy": [], "grad_norm": []}
    activations: dict[str, list] = {"step": [], "max_rms": [], "max_token_norm": []}

    def record_activations(step: int, model) -> None:
        stats = _probe_numpy(model, probe, depth)
        activations["step"].append(step)
        activations["max_rms"].append(_max(stats["rms"]))
        activations["max_token_norm"].append(_max(stats["max_token_norm"]))

    non_finite = None
    total = train_config.total_steps
    every = max(1, total // 4)
    t0 = time.perf_counter()
    data = iterate_forever(
        task.train,
        train_config.batch_size,
        seed=seed,
        pad_to=int(task.train.tokens.shape[1]),
    )
    for step, batch in data:
        if step >= total:
            break
        if step % config.probe_every == 0:
            record_activations(step, model)
        new_model, new_opt_state, metrics = train_step(model, opt_state, batch, depth, optimizer)
        metrics = jax.device_get(metrics)
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            # Recorded, not raised: this run stops here (its update is discarded), the
            # experiment goes on with the next run.
            non_finite = {"step": step, "loss": loss, "grad_norm": grad_norm}
            _log(
                f"  {arm.name}, lr {lr:g}, seed {seed}: non-finite loss or gradient at step "
                f"{step}; this run stops"
            )
            break
        model, opt_state = new_model, new_opt_state
        history["step"].append(step)
        history["loss"].append(loss)
        history["accuracy"].append(float(metrics["accuracy"]))
        history["grad_norm"].append(grad_norm)
        if (step + 1) % every == 0:
            _log(f"  {arm.name}, lr {lr:g}, seed {seed}: step {step + 1}/{total}, loss {loss:.3f}")
    record_activations(len(history["step"]), model)
    wall = time.perf_counter() - t0
    layers_trained = _probe_numpy(model, probe, depth)
    ev = evaluate(model, task.test, depth, config.eval_batch_size)
    grad = [g for g in history["grad_norm"] if _finite(g)]
    act = [a for a in activations["max_rms"] if _finite(a)]
    act_finite = len(act) == len(activations["max_rms"])
    gate = (
        gate_of(task, ev.accuracy, [{"loss": x} for x in history["loss"]])
        if history["loss"]
        else None
    )
    spikes = count_spikes(history["loss"], config.spike_factor, config.spike_window)
    diverged = divergence(history["loss"], non_finite is not None or not act_finite, spikes)
    if diverged is not None:
        unstable = f"diverged: {diverged}"
    elif gate is None or not gate.passed:
        unstable = "did not learn (learning gate failed)"
    else:
        unstable = None
    rms = activations["max_rms"]
    growth = _max(rms) / rms[0] if rms and _finite(rms[0]) and rms[0] > 0 and act_finite else None
    return {
        "seed": seed,
        "lr": lr,
        "stable": unstable is None,
        "diverged": diverged is not None,
        "unstable_reason": unstable,
        "initial_loss": float(np.mean(history["loss"][:10])) if history["loss"] else None,
        "activation_growth": growth,
        "gate": gate,
        "steps_completed": len(history["step"]),
        "non_finite": non_finite,
        "non_finite_activations": not act_finite,
        "loss_spikes": spikes,
        "final_loss": float(np.mean(history["loss"][-10:])) if history["loss"] else None,
        "max_loss": max(history["loss"]) if history["loss"] else None,
        "test_accuracy": ev.accuracy,
        "max_grad_norm": max(grad) if grad else None,
        "median_grad_norm": float(np.median(grad)) if grad else None,
        "max_activation_rms": max(act) if act else None,
        "max_activation_token_norm": max(
            (a for a in activations["max_token_norm"] if _finite(a)), default=None
        ),
        "wall_s": wall,
        "history": history,
        "activations": activations,
        "layers_init": layers_init,
        "layers_trained": layers_trained,
    }


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def layer_mean(which: str) -> dict[str, list[float | None]]:
        return {
            k: [_mean(col) for col in zip(*(r[which][k] for r in runs), strict=True)]
            for k in LAYER_STATS
        }

    return {
        "runs": len(runs),
        "non_finite_events": sum(r["non_finite"] is not None for r in runs),
        "non_finite_activation_runs": sum(r["non_finite_activations"] for r in runs),
        "loss_spikes": sum(r["loss_spikes"] for r in runs),
        "final_loss": _mean(r["final_loss"] for r in runs),
        "max_loss": max((r["max_loss"] or 0.0) for r in runs),
        "test_accuracy": _mean(r["test_accuracy"] for r in runs),
        "max_grad_norm": max((r["max_grad_norm"] or 0.0) for r in runs),
        "median_grad_norm": _mean(r["median_grad_norm"] for r in runs),
        "max_activation_rms": max((r["max_activation_rms"] or 0.0) for r in runs),
        "max_activation_token_norm": max((r["max_activation_token_norm"] or 0.0) for r in runs),
        "layers_init": layer_mean("layers_init"),
        "layers_trained": layer_mean("layers_trained"),
    }


# ---------------------------------------------------------------------------------------
# The claims
# ---------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


_VERDICTS = ("not held", "partly", "held")


def assess_claims(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """Compare each ablated arm with the baseline (the first arm) at the same learning rate.

    - Drift (paper B: without the residual, "catastrophic representational drift"): two
      tests. At initialisation, the arm's last-layer cosine to the input is at least 0.3
      below the baseline's (the states have lost their input); after training, its test
      accuracy is at least 5 points below the baseline's (the drift is catastrophic).
      "held" if both, "partly" if one, "not held" if neither.
    - Explosion (without LayerNorm, "unstable, explosive training dynamics"): "held" if a
      run met a non-finite loss, gradient or activation, or the largest gradient norm or
      activation RMS during training is at least 10 times the baseline's; "partly" at 3
      times, or with more loss spikes than the baseline; "not held" otherwise.

    **Arguments:**

    - `groups`: one entry per arm and learning rate, with `name`, `lr` and `summary`.

    **Returns:**

    `{"baseline", "by_lr": [{"lr", "drift": {arm: ...}, "explosion": {arm: ...}}],
    "drift_claim": {lr: verdict}, "explosion_claim": {lr: verdict}}` (the last two for the
    arms `no residual` and `no norm`).
    """
    baseline = groups[0]["name"]
    by_lr = []
    for lr in dict.fromkeys(g["lr"] for g in groups):
        at_lr = [g for g in groups if g["lr"] == lr]
        base = next(g["summary"] for g in at_lr if g["name"] == baseline)
        entry: dict[str, Any] = {"lr": lr, "drift": {}, "explosion": {}}
        for g in at_lr:
            if g["name"] == baseline:
                continue
            s = g["summary"]
            cos = s["layers_init"]["cos_to_input"][-1]
            cos0 = base["layers_init"]["cos_to_input"][-1]
            acc, acc0 = s["test_accuracy"], base["test_accuracy"]
            lost_input = cos is not None and cos0 is not None and cos <= cos0 - DRIFT_COS_DROP
            failed = acc is not None and acc0 is not None and acc <= acc0 - DRIFT_ACCURACY_DROP
            entry["drift"][g["name"]] = {
                "verdict": _VERDICTS[int(lost_input) + int(failed)],
                "init_cos_to_input_last": cos,
                "baseline_init_cos_to_input_last": cos0,
                "init_token_uniformity_last": s["layers_init"]["token_uniformity"][-1],
                "baseline_init_token_uniformity_last": base["layers_init"]["token_uniformity"][-1],
                "trained_cos_to_input_last": s["layers_trained"]["cos_to_input"][-1],
                "baseline_trained_cos_to_input_last": base["layers_trained"]["cos_to_input"][-1],
                "test_accuracy": acc,
                "baseline_test_accuracy": acc0,
            }
            grad_ratio = _ratio(s["max_grad_norm"], base["max_grad_norm"])
            act_ratio = _ratio(s["max_activation_rms"], base["max_activation_rms"])
            events = s["non_finite_events"] + s["non_finite_activation_runs"]
            ratios = [r for r in (grad_ratio, act_ratio) if r is not None]
            if events or any(r >= EXPLOSION_FACTOR for r in ratios):
                verdict = "held"
            elif any(r >= PARTLY_FACTOR for r in ratios) or s["loss_spikes"] > base["loss_spikes"]:
                verdict = "partly"
            else:
                verdict = "not held"
            entry["explosion"][g["name"]] = {
                "verdict": verdict,
                "non_finite_events": events,
                "baseline_non_finite_events": base["non_finite_events"]
                + base["non_finite_activation_runs"],
                "max_grad_norm_ratio": grad_ratio,
                "max_activation_rms_ratio": act_ratio,
                "max_loss": s["max_loss"],
                "baseline_max_loss": base["max_loss"],
                "loss_spikes": s["loss_spikes"],
                "baseline_loss_spikes": base["loss_spikes"],
            }
        by_lr.append(entry)

    def verdicts(kind: str, arm: str) -> dict[str, str]:
        return {f"{e['lr']:g}": e[kind][arm]["verdict"] for e in by_lr if arm in e[kind]}

    return {
        "baseline": baseline,
        "by_lr": by_lr,
        "drift_claim": verdicts("drift", "no residual"),
        "explosion_claim": verdicts("explosion", "no norm"),
    }


def thresholds(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm, over the learning-rate sweep: which rates are stable (every seed's run
    trains stably), the largest stable rate and the first failing one (`largest_stable`), the
    best rate (highest mean test accuracy) with its per-seed accuracies, the drift at
    initialisation (last layer, per seed), and the explosion metrics at every rate."""
    out: dict[str, Any] = {}
    for name in dict.fromkeys(g["name"] for g in groups):
        at = {g["lr"]: g for g in groups if g["name"] == name}
        stable = {lr: all(r["stable"] for r in g["runs"]) for lr, g in at.items()}
        largest, first_failing = largest_stable(stable)
        mean_acc = {lr: g["summary"]["test_accuracy"] for lr, g in at.items()}
        scored = {lr: a for lr, a in mean_acc.items() if a is not None}
        best = max(scored, key=scored.get) if scored else None
        first = at[min(at)]
        out[name] = {
            "stable_by_lr": {f"{lr:g}": v for lr, v in stable.items()},
            "largest_stable_lr": largest,
            "first_failing_lr": first_failing,
            "best_lr": best,
            "best_accuracy": [r["test_accuracy"] for r in at[best]["runs"]] if best else [],
            "init_cos_to_input_last": [r["layers_init"]["cos_to_input"][-1] for r in first["runs"]],
            "init_token_uniformity_last": [
                r["layers_init"]["token_uniformity"][-1] for r in first["runs"]
            ],
            "init_rel_distance_last": [r["layers_init"]["rel_distance"][-1] for r in first["runs"]],
            "by_lr": {
                f"{lr:g}": {
                    "stable": stable[lr],
                    "diverged": any(r["diverged"] for r in g["runs"]),
                    "unstable_reasons": [r["unstable_reason"] for r in g["runs"]],
                    "test_accuracy": g["summary"]["test_accuracy"],
                    "max_grad_norm": g["summary"]["max_grad_norm"],
                    "max_activation_rms": g["summary"]["max_activation_rms"],
                    "max_activation_growth": max(
                        (
                            r["activation_growth"]
                            for r in g["runs"]
                            if _finite(r["activation_growth"])
                        ),
                        default=None,
                    ),
                    "loss_spikes": g["summary"]["loss_spikes"],
                    "non_finite_events": g["summary"]["non_finite_events"]
                    + g["summary"]["non_finite_activation_runs"],
                }
                for lr, g in at.items()
            },
        }
    return out


def _paired_or_none(a: list[float | None], b: list[float | None]) -> stats.Paired | None:
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if _finite(x) and _finite(y)]
    return stats.paired([x - y for x, y in pairs]) if pairs else None


def replication(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Paper B's claims as measured by the sweep, for the site's replication table
    (`docs/hooks/replication.py`), by the criteria at the top of this script:

    - `B1` drift at initialisation: the paired difference of the last-layer cosine to the
      input (no residual − baseline), below `-DRIFT_COS_DROP`;
    - `B1` drift after training: the paired difference of test accuracy, each arm at its
      best rate, below `-DRIFT_ACCURACY_DROP` (needs the baseline to pass the learning gate
      at its best rate);
    - `B2` explosion: the no-norm arm's largest stable rate below the baseline's.
    """
    th = results["thresholds"]
    names = list(th)
    base = names[0]
    seeds = len(th[base]["init_cos_to_input_last"])
    basis = f"{results['data']['name']}; {seeds} seeds per arm and rate; CPU scale"
    out: list[dict[str, Any]] = []

    def add(claim, measured, verdict, p=None):
        out.append(
            {
                "id": claim,
                "measured": measured,
                "mean": None if p is None else p.mean,
                "low": None if p is None else p.low,
                "high": None if p is None else p.high,
                "verdict": verdict,
                "basis": basis,
                "scale": "cpu",
            }
        )

    if "no residual" in th:
        nr, b = th["no residual"], th[base]
        p = _paired_or_none(nr["init_cos_to_input_last"], b["init_cos_to_input_last"])
        if p is None:
            add("B1", "last-layer cosine to the input not measured", "not resolved")
        else:
            add(
                "B1",
                f"last-layer cosine to the input at initialisation {p.mean:+.2f} [{p.low:+.2f}, "
                f"{p.high:+.2f}] vs the baseline (criterion below {-DRIFT_COS_DROP:g})",
                report.claim_verdict(p.low, p.high, -DRIFT_COS_DROP, "below"),
                p,
            )
        gate_ok = b["best_lr"] is not None and results["gate_passed_by_lr"].get(
            f"{b['best_lr']:g}", False
        )
        p = _paired_or_none(nr["best_accuracy"], b["best_accuracy"])
        if p is None or not gate_ok:
            add(
                "B1", "test accuracy at the best rate: the baseline failed the gate", "not resolved"
            )
        else:
            p = p.scaled(100.0)
            add(
                "B1",
                f"test accuracy at each arm's best rate {p.mean:+.1f} points [{p.low:+.1f}, "
                f"{p.high:+.1f}] vs the baseline (criterion below "
                f"{-100 * DRIFT_ACCURACY_DROP:g})",
                report.claim_verdict(p.low, p.high, -100 * DRIFT_ACCURACY_DROP, "below"),
                p,
            )
    if "no norm" in th:
        nn, b = th["no norm"], th[base]
        text = (
            f"largest stable learning rate {fmt(nn['largest_stable_lr'])} (baseline "
            f"{fmt(b['largest_stable_lr'])}); first failing {fmt(nn['first_failing_lr'])} "
            f"(baseline {fmt(b['first_failing_lr'])})"
        )
        first = nn["first_failing_lr"]
        diverges = first is not None and nn["by_lr"][f"{first:g}"]["diverged"]
        text += "; at its first failing rate the no-norm arm " + (
            "diverges" if diverges else "does not learn but does not diverge"
        )
        if b["largest_stable_lr"] is None:
            verdict = "not resolved"
        elif nn["largest_stable_lr"] is None or nn["largest_stable_lr"] < b["largest_stable_lr"]:
            # Below the baseline's threshold, and failing there by divergence: explosive.
            verdict = "holds" if diverges else "not resolved"
        elif b["first_failing_lr"] is None and nn["first_failing_lr"] is None:
            verdict = "not resolved"
        else:
            verdict = "does not hold"
        add("B2", text, verdict)
    return out


# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------


def _layer_table(groups, which: str, num_layers: int, with_lr: bool) -> list[str]:
    lr_col = "lr | " if with_lr else ""
    lines = [
        f"| arm | {lr_col}statistic | "
        + " | ".join(f"l={i}" for i in range(num_layers + 1))
        + " |",
        "|---|" + ("---:|" if with_lr else "") + "---|" + "---:|" * (num_layers + 1),
    ]
    for g in groups:
        lr_val = f"{g['lr']:g} | " if with_lr else ""
        for key in LAYER_STATS:
            values = " | ".join(fmt(v) for v in g["summary"][which][key])
            lines.append(f"| {g['name']} | {lr_val}{key} | {values} |")
    return lines


def _threshold_lines(results: dict[str, Any]) -> list[str]:
    """The sweep's stability thresholds per arm, the explosion metrics at every rate, and
    paper B's claims as the thresholds decide them."""
    th = results["thresholds"]
    lrs = list(next(iter(th.values()))["by_lr"])
    lines = [
        "",
        "## Stability thresholds (learning-rate sweep)",
        "",
        f"A run *diverges* when it meets a non-finite loss, gradient or activation or has "
        f"more than {MAX_STABLE_SPIKES} loss spikes (a step whose loss exceeds "
        f"{SPIKE_FACTOR:g}x the median of the previous {SPIKE_WINDOW}); it *trains stably* "
        "when it does not diverge and passes the learning gate. A rate is stable for an arm "
        "when every seed's run trains stably; the *largest stable rate* is the largest such "
        "rate, the *first failing rate* the next rate above it. These criteria (version 2) "
        "are constants of `experiments/studies/stabilizers.py`, written after a first sweep "
        "on other seeds showed that version 1 (final loss below 0.9x the initial) mixed slow "
        "learning with instability, and before this sweep ran.",
        "",
        "| arm | largest stable lr | first failing lr | best lr | test accuracy at best lr "
        "| init cosine to input (last layer) | init token uniformity (last layer) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in th.items():
        acc = [a for a in t["best_accuracy"] if _finite(a)]
        cos = [c for c in t["init_cos_to_input_last"] if _finite(c)]
        uni = [c for c in t["init_token_uniformity_last"] if _finite(c)]
        lines.append(
            f"| {name} | {fmt(t['largest_stable_lr'])} | {fmt(t['first_failing_lr'])} | "
            f"{fmt(t['best_lr'])} | "
            + (
                f"{100 * np.mean(acc):.1f}% ({100 * min(acc):.1f} to {100 * max(acc):.1f})"
                if acc
                else "-"
            )
            + f" | {fmt(_mean(cos))} | {fmt(_mean(uni))} |"
        )
    lines += [
        "",
        "Per rate (✓ every seed trains stably, ✗ some seed diverges, ○ none diverges but "
        "some seed does not learn; test accuracy, mean over seeds; largest activation "
        "growth: activation RMS during training over its value at initialisation):",
        "",
        "| arm | " + " | ".join(lrs) + " |",
        "|---|" + "---|" * len(lrs),
    ]
    for name, t in th.items():
        cells = []
        for lr in lrs:
            r = t["by_lr"][lr]
            acc = r["test_accuracy"]
            cells.append(
                ("✓ " if r["stable"] else "✗ " if r["diverged"] else "○ ")
                + ("-" if acc is None else f"{100 * acc:.0f}%")
                + f", growth {fmt(r['max_activation_growth'], 2)}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "![test accuracy against the learning rate](lr_sweep.png)", ""]
    lines += ["**Paper B's claims at the thresholds:**", ""]
    labels = {
        "B1": "without residual connections, representations drift catastrophically",
        "B2": "without LayerNorm, training is explosive",
    }
    for e in results["replication"]:
        lines.append(f"- {labels[e['id']]}: **{e['verdict']}**; {e['measured']}.")
    if not results["replication"]:
        lines.append("- none measured: the claims need the arms `no residual` and `no norm`.")
    return lines


def _markdown(results: dict[str, Any]) -> str:
    config = results["meta"]["config"]
    setup = config["setup"]
    tr = setup["train"]
    groups = results["arms"]
    lrs = list(dict.fromkeys(g["lr"] for g in groups))
    lines = [
        f"- data: {results['data']['description']}; {results['data']['num_train']} train / "
        f"{results['data']['num_test']} test examples; always predicting the most frequent "
        f"class scores {results['data']['test_majority_fraction']:.3f} on the test split, and "
        f"a uniform prediction has loss ln(10) = {math.log(10):.3f}",
        f"- model: dim {setup['dim']}, {setup['num_heads']} heads, {setup['num_layers']} "
        'layers, pre-LN, sinusoidal positions, mean pooling; "no norm" replaces every norm of '
        'the field and the final norm by the identity; "no residual" is '
        "`NoResidual()` of `experiments/studies/ablations.py` (each half-layer replaces the state)",
        f"- training: AdamW, peak learning rates {', '.join(f'{lr:g}' for lr in lrs)} (one set "
        f"of runs each), linear warm-up {tr['warmup_steps']} steps, cosine decay to 0, "
        f"{tr['total_steps']} steps, batch {tr['batch_size']}, weight decay "
        f"{tr['weight_decay']:g}, gradients clipped to global norm {tr['clip_norm']:g} (the "
        f"gradient norms below are before clipping); seeds {config['seeds']} (initialisation "
        "and data order); a non-finite loss or gradient stops that run and is counted",
        f"- probes: per-layer statistics on {results['probe_size']} validation sequences at "
        f"initialisation and after training; activation norms every {config['probe_every']} "
        f"steps; a loss spike is a step whose loss exceeds {config['spike_factor']:g}x the "
        f"median of the previous {config['spike_window']}",
        "",
        "Wall times are indicative only: the machine is shared with other jobs.",
        "",
        "## Training (summed or worst over seeds; losses and accuracies are means)",
        "",
        "| arm | lr | runs | non-finite events | loss spikes | max loss | final loss "
        "| test accuracy | median grad norm | max grad norm | max activation RMS "
        "| max token norm |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g in groups:
        s = g["summary"]
        events = s["non_finite_events"] + s["non_finite_activation_runs"]
        lines.append(
            f"| {g['name']} | {g['lr']:g} | {s['runs']} | {events} | {s['loss_spikes']} "
            f"| {fmt(s['max_loss'])} | {fmt(s['final_loss'])} | {fmt(s['test_accuracy'])} "
            f"| {fmt(s['median_grad_norm'])} | {fmt(s['max_grad_norm'])} "
            f"| {fmt(s['max_activation_rms'])} | {fmt(s['max_activation_token_norm'])} |"
        )
    lines += _threshold_lines(results)
    num_layers = setup["num_layers"]
    first_lr = [g for g in groups if g["lr"] == lrs[0]]
    lines += [
        "",
        "## Per-layer token states at initialisation (mean over seeds; layer 0 = embedding)",
        "",
        *_layer_table(first_lr, "layers_init", num_layers, with_lr=False),
        "",
        "## Per-layer token states after training (mean over seeds)",
        "",
        *_layer_table(groups, "layers_trained", num_layers, with_lr=True),
        "",
        "## Did the paper's claims hold in our runs?",
        "",
        "Criteria (ours; paper B gives neither metrics, tasks nor sizes; `assess_claims` in "
        "`experiments/studies/stabilizers.py`): **drift** — at initialisation the arm's last-layer "
        "cosine to the input is at least 0.3 below the baseline's, and after training its test "
        "accuracy is at least 5 points below (held: both; partly: one). **Explosion** — a "
        "non-finite event, or max gradient norm or activation RMS at least 10x the baseline's "
        "at the same learning rate (partly: 3x, or more loss spikes).",
        "",
    ]
    for e in results["claims"]["by_lr"]:
        if not results["gate_passed_by_lr"][f"{e['lr']:g}"]:
            lines.append(
                f"- lr {e['lr']:g}: **not assessed: the baseline failed the learning gate at "
                "this learning rate** (the numbers are in the tables above)."
            )
            continue
        d = e["drift"].get("no residual")
        if d is not None:
            lines.append(
                f"- lr {e['lr']:g}, **without the residual, representations drift**: "
                f"**{d['verdict']}**. Last-layer cosine to the input at initialisation "
                f"{fmt(d['init_cos_to_input_last'])} (baseline "
                f"{fmt(d['baseline_init_cos_to_input_last'])}), token uniformity "
                f"{fmt(d['init_token_uniformity_last'])} (baseline "
                f"{fmt(d['baseline_init_token_uniformity_last'])}); after training cosine "
                f"{fmt(d['trained_cos_to_input_last'])} (baseline "
                f"{fmt(d['baseline_trained_cos_to_input_last'])}), test accuracy "
                f"{fmt(d['test_accuracy'])} (baseline {fmt(d['baseline_test_accuracy'])})."
            )
        x = e["explosion"].get("no norm")
        if x is not None:
            lines.append(
                f"- lr {e['lr']:g}, **without LayerNorm, training is explosive**: "
                f"**{x['verdict']}**. {x['non_finite_events']} non-finite events (baseline "
                f"{x['baseline_non_finite_events']}); max gradient norm "
                f"{fmt(x['max_grad_norm_ratio'])}x and max activation RMS "
                f"{fmt(x['max_activation_rms_ratio'])}x the baseline's; max loss "
                f"{fmt(x['max_loss'])} (baseline {fmt(x['baseline_max_loss'])}); loss spikes "
                f"{x['loss_spikes']} (baseline {x['baseline_loss_spikes']})."
            )
        dn, xn = e["drift"].get("neither"), e["explosion"].get("neither")
        if dn is not None and xn is not None:
            lines.append(
                f"- lr {e['lr']:g}, neither stabilizer: drift **{dn['verdict']}** (cosine at "
                f"initialisation {fmt(dn['init_cos_to_input_last'])}, test accuracy "
                f"{fmt(dn['test_accuracy'])}), explosion **{xn['verdict']}** "
                f"({xn['non_finite_events']} non-finite events, max gradient norm "
                f"{fmt(xn['max_grad_norm_ratio'])}x, max activation RMS "
                f"{fmt(xn['max_activation_rms_ratio'])}x the baseline's)."
            )
    lines += [
        "",
        "## Plots",
        "",
        "![loss per arm](loss.png)",
        "",
        "![gradient norm per arm](grad_norm.png)",
        "",
        "![activation norm during training](activations.png)",
        "",
        "![per-layer drift](drift.png)",
        "",
    ]
    return "\n".join(lines)


def _plots(results: dict[str, Any], out: Path) -> None:
    plt = report.pyplot(_log)
    if plt is None:
        return
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups = results["arms"]
    names = list(dict.fromkeys(g["name"] for g in groups))
    lrs = list(dict.fromkeys(g["lr"] for g in groups))
    color = {name: colors[i % len(colors)] for i, name in enumerate(names)}

    def per_run(key: str, series: str, path: str, ylabel: str, title: str, log: bool) -> None:
        ncols = min(4, len(lrs))
        nrows = -(-len(lrs) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.8 * nrows), squeeze=False)
        for ax in axes.flat[len(lrs) :]:
            ax.set_visible(False)
        for ax, lr in zip(axes.flat, lrs, strict=False):
            positive = False
            for g in (g for g in groups if g["lr"] == lr):
                for j, run in enumerate(g["runs"]):
                    h = run[series]
                    positive |= any(v is not None and v > 0 for v in h[key])
                    ax.plot(
                        h["step"],
                        [np.nan if v is None else v for v in h[key]],
                        color=color[g["name"]],
                        lw=1.0,
                        alpha=0.8,
                        label=g["name"] if j == 0 else None,
                    )
                    if run["non_finite"] is not None:
                        ax.axvline(run["non_finite"]["step"], color=color[g["name"]], ls=":")
            if log and positive:
                ax.set_yscale("log")
            ax.set_xlabel("training step")
            ax.set_ylabel(ylabel)
            ax.set_title(f"peak lr {lr:g}")
            ax.legend(fontsize=8)
        fig.suptitle(title)
        report.save_figure(fig, out / path, _log)

    per_run("loss", "history", "loss.png", "training loss", "Loss (one line per seed)", True)
    per_run(
        "grad_norm",
        "history",
        "grad_norm.png",
        "gradient global norm (before clipping)",
        "Gradient norm (one line per seed)",
        True,
    )
    per_run(
        "max_rms",
        "activations",
        "activations.png",
        "max over layers of activation RMS",
        "Activation norm during training (probe batch, one line per seed)",
        True,
    )

    panels = (
        ("cos_to_input", "cosine to input u_0", False),
        ("rel_distance", "||u_l - u_0|| / ||u_0||", True),
        ("rms", "activation RMS", True),
        ("token_uniformity", "token uniformity", False),
    )
    # At most four rates, spread over the sweep: one column each.
    shown = [
        lrs[i]
        for i in sorted(set(np.linspace(0, len(lrs) - 1, min(4, len(lrs))).round().astype(int)))
    ]
    fig, axes = plt.subplots(
        len(panels), len(shown), figsize=(5 * len(shown), 3.2 * len(panels)), squeeze=False
    )
    for col, lr in enumerate(shown):
        for row, (key, label, log) in enumerate(panels):
            ax = axes[row][col]
            for g in (g for g in groups if g["lr"] == lr):
                for which, style in (("layers_init", "--"), ("layers_trained", "-")):
                    # Missing (non-finite) values, and on a log axis zeros (the distance of
                    # the input to itself), are not drawn.
                    values = [
                        np.nan if v is None or (log and v <= 0) else v
                        for v in g["summary"][which][key]
                    ]
                    ax.plot(
                        range(len(values)),
                        values,
                        ls=style,
                        marker="o",
                        ms=3,
                        color=color[g["name"]],
                        label=f"{g['name']} ({'init' if which == 'layers_init' else 'trained'})",
                    )
            if log:
                ax.set_yscale("log")
            ax.set_xlabel("layer l")
            ax.set_xticks(range(len(values)))
            ax.set_ylabel(label)
            ax.set_title(f"peak lr {lr:g}", fontsize=9)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("Per-layer token states, mean over seeds (dashed: init, solid: trained)")
    report.save_figure(fig, out / "drift.png", _log)

    # The sweep: test accuracy of every run against its peak rate; unstable runs hollow.
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in names:
        at = [g for g in groups if g["name"] == name]
        xs = [g["lr"] for g in at]
        ax.plot(
            xs,
            [
                np.nan if g["summary"]["test_accuracy"] is None else g["summary"]["test_accuracy"]
                for g in at
            ],
            color=color[name],
            label=name,
        )
        for g in at:
            for run in g["runs"]:
                acc = run["test_accuracy"]
                ax.plot(
                    g["lr"],
                    np.nan if acc is None else acc,
                    "o",
                    ms=4,
                    color=color[name],
                    mfc=color[name] if run["stable"] else "none",
                )
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("test accuracy (line: mean over seeds)")
    ax.set_title("Learning-rate sweep (hollow: unstable run)")
    ax.legend(fontsize=8)
    report.save_figure(fig, out / "lr_sweep.png", _log)


def main(config: StabilizerConfig) -> dict[str, Any]:
    """Run the ablation and write `results.md`, `results.json` and the plots into
    `config.out`.

    **Returns:**

    The results as written to `results.json`.
    """
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    info = report.meta(config)
    _log(f"loading {config.setup.task} ({config.name})")
    task = config.setup.load()
    runs_total = len(config.lrs) * len(config.arms) * len(config.seeds)
    estimate = None if config.run_s is None else runs_total * config.run_s
    _log(
        f"{runs_total} runs ({len(config.lrs)} rates x {len(config.arms)} arms x "
        f"{len(config.seeds)} seeds); estimated "
        + (
            f"{estimate / 60:.0f} min on two cores plus compilation"
            if estimate is not None
            else "time unknown"
        )
    )
    probe_size = min(config.probe_size, len(task.val))
    probe = next(iterate_batches(task.val, probe_size, shuffle=False, drop_remainder=True))
    groups = []
    gates: dict[str, Any] = {}
    steps = config.setup.train.total_steps
    for lr in config.lrs:
        for arm in config.arms:
            runs = []
            for seed in config.seeds:
                _log(f"arm {arm.name!r}, lr {lr:g}, seed {seed}: training {steps} steps")
                runs.append(_run(arm, lr, seed, task, probe, config))
                if arm == config.arms[0]:
                    # The learning gate of the baseline (the first arm), per rate and seed;
                    # a run stopped before its first step has none and fails.
                    gates[f"lr {lr:g}, seed {seed}"] = runs[-1]["gate"]
            for r in runs:
                r["gate"] = None if r["gate"] is None else gate_record(r["gate"])
            groups.append(
                {
                    "name": arm.name,
                    "residual": arm.residual,
                    "norm": arm.norm,
                    "lr": lr,
                    "summary": _summary(runs),
                    "runs": runs,
                }
            )
    passed_by_lr = {
        f"{lr:g}": all(
            gates[f"lr {lr:g}, seed {s}"] is not None and gates[f"lr {lr:g}, seed {s}"].passed
            for s in config.seeds
        )
        for lr in config.lrs
    }
    results = {
        "meta": info,
        "data": data_summary(task),
        "gate_passed": any(passed_by_lr.values()),
        "gate_passed_by_lr": passed_by_lr,
        "probe_size": probe_size,
        "arms": groups,
        "claims": assess_claims(groups),
    }
    results["thresholds"] = thresholds(groups)
    results["replication"] = replication(results)
    results["meta"]["wall_s"] = time.perf_counter() - start
    _plots(results, out)
    title = f"Stabilizer ablation: residual connection and LayerNorm ({task.name})"
    ran = {k: g for k, g in gates.items() if g is not None}
    if ran:
        verdict = gate_verdict(ran, f"baseline '{config.arms[0].name}'")
        if not verdict.passed and results["gate_passed"]:
            # Some rates passed: the claims are assessed at those only.
            ok = [lr for lr, p in passed_by_lr.items() if p]
            verdict = dataclasses.replace(
                verdict,
                passed=True,
                reason=f"passed at lr {', '.join(ok)} only (claims assessed there); "
                + verdict.reason,
            )
        gate_md = gate_section(ran)
    else:
        verdict = report.Verdict("Learning gate", False, "no baseline run completed a step.")
        gate_md = ""
    report.write(
        out, results, title, gate_md + "\n\n" + _markdown(results), verdict=verdict, log=_log
    )
    return results


PRESETS = {
    "smoke": StabilizerConfig.smoke,
    "quick": StabilizerConfig.quick,
    "full": StabilizerConfig.full,
}

if __name__ == "__main__":
    _cli.run(PRESETS, main, description=__doc__.split("\n\n")[0])
