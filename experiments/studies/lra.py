"""The LRA vanilla-Transformer configurations per task, and what a run of them costs.

`TASKS` holds, for ListOps, Text, Retrieval, Image and Pathfinder32, the settings of the
LRA repository's `configs/*/transformer_base.py` (on top of `base_*_config.py`), as
collected in the reference notes (`lra.md` §4): layers, width, heads, FFN ("mlp") width,
dropout and attention dropout, pooling, positions, batch, learning rate and schedule,
warm-up, steps, weight decay, maximum length. `LraTask.model` builds the library's model
of a configuration and `LraTask.train_config` its `TrainConfig` (Adam with (0.9, 0.98),
epsilon 1e-9).

`dry_run(tasks, arms)` prices runs before they are made: per task and arm the
configuration, the parameter count (of the model built abstractly with
`equinox.filter_eval_shape`: no weights are drawn), the FLOPs of one training step
(`flops_per_step`), the total FLOPs and the GPU hours at a stated fraction of a stated
peak. The defaults, MFU 0.3 of an NVIDIA H100 SXM's 989 TFLOP/s dense bf16, are
assumptions, not measurements: the library trains in float32 by default (TF32 matmuls on
that GPU, peak 494 TFLOP/s), and attention dropout materialises the attention weights
(see `pdeformer.Dropout`), so pass `mfu` and `peak_tflops` that match the run.

Where the library's model differs from the LRA code (recorded in `DEVIATIONS`): the
attention's query/key/value width is the model width (LRA's Image and Pathfinder configs
use a narrower `qkv_dim`, listed here but not built); the projections have biases; weight
decay applies to matrices only; the padding mask is the data's lengths, not `inputs > 0`;
the CLS token starts as `0.02 * normal`, not zeros; and inputs are padded to the longest
training sequence (at most `max_length`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import pdeformer as pf
from pdeformer.training import TrainConfig

H100_MEMORY_GB = 80.0
"""The memory of one NVIDIA H100 SXM, GB."""

H100_BF16_DENSE_TFLOPS = 989.0
"""Peak dense bf16 tensor-core throughput of one NVIDIA H100 SXM, TFLOP/s (its TF32 peak,
what float32 matmuls run at by default, is half of it)."""

DEFAULT_MFU = 0.3
"""The model-FLOPs utilisation `dry_run` assumes: an assumption, not a measurement."""

SCALES = {"single": (1,), "multi": (1, 2, 4, 8)}
"""The diffusion layer's variants of the placement study, name -> dilations."""

DEVIATIONS = (
    "qkv width = model width (LRA's Image/Pathfinder qkv_dim is narrower; listed, not built)",
    "attention projections have biases (LRA: use_bias=False)",
    "weight decay on matrices only (flax's Adam decays every parameter)",
    "padding mask from the data's lengths (LRA: inputs > 0, which masks black pixels)",
    "CLS token initialised 0.02 * normal (LRA: zeros)",
    "sequences padded to the longest training sequence, at most max_length",
)
"""How the library's model and training differ from the LRA reference code."""


@dataclasses.dataclass(frozen=True)
class LraTask:
    """One task's LRA vanilla-Transformer configuration (`lra.md` §4).

    **Arguments:**

    - `task`: the name `pdeformer.data.load_task` takes.
    - `num_layers`, `dim`, `qkv_dim`, `mlp_dim`, `num_heads`: sizes; `mlp_dim` is the FFN
      width and the classifier head's hidden width; `qkv_dim` is recorded only (the
      library's attention is `dim` wide).
    - `dropout`, `attention_dropout`: the rates of `pdeformer.Dropout`.
    - `pooling`: `"cls"` or `"mean"`; `positions`: `"sinusoidal"` or `"learned"`.
    - `batch_size`, `lr`, `schedule`, `warmup_steps`, `total_steps`, `weight_decay`: the
      optimisation (`lr` is the rsqrt schedule's base factor, or the cosine's peak).
    - `clip_norm`: gradient clipping (`None`: none, as in LRA except Path-X).
    - `max_length`: the longest input (per document for Retrieval); longer ones are cut.
    - `vocab_size`, `num_classes`, `num_test`: of the official data (the test split's size
      prices the final evaluation).
    - `dual`: two documents per example (Retrieval): a `DualClassifier`.
    """

    task: str
    num_layers: int
    dim: int
    qkv_dim: int
    mlp_dim: int
    num_heads: int
    dropout: float
    attention_dropout: float
    pooling: Literal["cls", "mean"]
    positions: Literal["sinusoidal", "learned"]
    batch_size: int
    lr: float
    schedule: Literal["cosine", "rsqrt"]
    warmup_steps: int
    total_steps: int
    weight_decay: float
    max_length: int
    vocab_size: int
    num_classes: int
    num_test: int
    clip_norm: float | None = None
    dual: bool = False

    @property
    def seq_len(self) -> int:
        """Tokens per sequence the model integrates: `max_length`, plus the CLS token."""
        return self.max_length + (1 if self.pooling == "cls" else 0)

    def data_options(self) -> dict[str, Any]:
        """`load_task` options of the official reader: the maximum length where it takes one."""
        return (
            {"max_length": self.max_length} if self.task in ("listops", "text", "retrieval") else {}
        )

    def train_config(self, steps: int | None = None, seed: int = 0) -> TrainConfig:
        """The `TrainConfig` of this task, with Adam's (0.9, 0.98, 1e-9).

        **Arguments:**

        - `steps`: the number of steps (`None`: LRA's `total_steps`). The rsqrt schedule
          keeps LRA's warm-up whatever the steps; the cosine one shortens it to below
          `steps` (it decays after the warm-up).
        - `seed`: the data order's seed.

        **Returns:**

        A `TrainConfig` (no validation during training; no progress bar).
        """
        total = self.total_steps if steps is None else steps
        warmup = (
            self.warmup_steps if self.schedule == "rsqrt" else min(self.warmup_steps, total - 1)
        )
        return TrainConfig(
            lr=self.lr,
            warmup_steps=warmup,
            total_steps=total,
            schedule=self.schedule,
            b1=0.9,
            b2=0.98,
            eps=1e-9,
            weight_decay=self.weight_decay,
            # No clipping: a norm no gradient reaches.
            clip_norm=1e9 if self.clip_norm is None else self.clip_norm,
            batch_size=self.batch_size,
            seed=seed,
            progress=False,
        )

    def model(
        self,
        *,
        key,
        vocab_size: int | None = None,
        num_classes: int | None = None,
        max_len: int | None = None,
        diffusion_at: tuple[str, ...] = (),
        dilations: tuple[int, ...] = (1,),
    ) -> pf.Classifier | pf.DualClassifier:
        """The library's model of this configuration: pre-LN blocks with GELU, dropout,
        the pooling and positions named, LRA's MLP head (`Classifier(head="mlp")`, or the
        `DualClassifier`'s matching head), optional diffusion layers.

        **Arguments:**

        - `key`: the initialisation key (the diffusion layers' keys are folded from it, so
          adding one leaves the other weights as they were).
        - `vocab_size`, `num_classes`: of the data (`None`: the official data's).
        - `max_len`: the longest sequence a learned position table covers (`None`:
          `max_length`).
        - `diffusion_at`, `dilations`: the diffusion layer's insertion points and reaches.

        **Returns:**

        A `Classifier` or, for Retrieval, a `DualClassifier`.
        """
        kc, kp = jr.split(jr.fold_in(key, 1))
        options: dict[str, Any] = dict(
            hidden=self.mlp_dim,
            dropout=pf.Dropout(self.dropout, self.attention_dropout),
            mlp_dim=self.mlp_dim,
            diffusion_at=tuple(diffusion_at),
            diffusion_layer=functools.partial(pf.DiffusionLayer, dilations=tuple(dilations)),
        )
        if self.pooling == "cls":
            options["pooling"] = pf.ClsPooling(self.dim, key=kc)
        if self.positions == "learned":
            length = self.max_length if max_len is None else max_len
            options["positions"] = pf.LearnedPositions(length, self.dim, key=kp)
        if not self.dual:
            options["head"] = "mlp"
        cls = pf.DualClassifier if self.dual else pf.Classifier
        return cls(
            self.vocab_size if vocab_size is None else vocab_size,
            self.dim,
            self.num_heads,
            self.num_layers,
            self.num_classes if num_classes is None else num_classes,
            key=key,
            **options,
        )


_LRA_RSQRT = dict(lr=0.05, schedule="rsqrt", weight_decay=0.1, positions="sinusoidal")

TASKS: dict[str, LraTask] = {
    "listops": LraTask(
        task="listops",
        num_layers=4,
        dim=512,
        qkv_dim=512,
        mlp_dim=1024,
        num_heads=8,
        dropout=0.1,
        attention_dropout=0.1,
        pooling="cls",
        batch_size=32,
        warmup_steps=1000,
        total_steps=5000,
        max_length=2000,
        vocab_size=16,
        num_classes=10,
        num_test=2000,
        **_LRA_RSQRT,
    ),
    "text": LraTask(
        task="text",
        num_layers=4,
        dim=256,
        qkv_dim=256,
        mlp_dim=1024,
        num_heads=4,
        dropout=0.1,
        attention_dropout=0.1,
        pooling="cls",
        batch_size=32,
        warmup_steps=8000,
        total_steps=20_000,
        max_length=1000,
        vocab_size=257,
        num_classes=2,
        num_test=25_000,
        **_LRA_RSQRT,
    ),
    "retrieval": LraTask(
        task="retrieval",
        num_layers=4,
        dim=128,
        qkv_dim=128,
        mlp_dim=512,
        num_heads=4,
        dropout=0.1,
        attention_dropout=0.1,
        pooling="cls",
        batch_size=32,
        warmup_steps=8000,
        total_steps=5000,
        max_length=4000,
        vocab_size=257,
        num_classes=2,
        num_test=17_437,
        dual=True,
        **_LRA_RSQRT,
    ),
    "image": LraTask(
        task="image",
        num_layers=1,
        dim=128,
        qkv_dim=64,
        mlp_dim=128,
        num_heads=8,
        dropout=0.3,
        attention_dropout=0.2,
        pooling="cls",
        positions="learned",
        batch_size=256,
        lr=5e-4,
        schedule="cosine",
        warmup_steps=175,
        total_steps=35_000,
        weight_decay=0.0,
        max_length=1024,
        vocab_size=256,
        num_classes=10,
        num_test=10_000,
    ),
    "pathfinder": LraTask(
        task="pathfinder",
        num_layers=4,
        dim=32,
        qkv_dim=16,
        mlp_dim=32,
        num_heads=4,
        dropout=0.2,
        attention_dropout=0.1,
        pooling="mean",
        positions="sinusoidal",
        batch_size=512,
        lr=1e-3,
        schedule="cosine",
        warmup_steps=312,
        total_steps=62_400,
        weight_decay=0.0,
        max_length=1024,
        vocab_size=256,
        num_classes=2,
        num_test=20_000,
    ),
}
"""The LRA Transformer's configuration per task (`lra.md` §4; Pathfinder is pathfinder32
"hard"). ListOps: peak learning rate 0.05 / sqrt(1000) = 1.6e-3; Retrieval's warm-up (8,000)
is longer than its run (5,000 steps) in LRA's own config, and is kept."""


# ---------------------------------------------------------------------------------------
# Arms, parameters and FLOPs
# ---------------------------------------------------------------------------------------

Arm = tuple[str, str | None, tuple[int, ...]]


def parse_arm(arm: str | Arm) -> Arm:
    """`(name, point, dilations)` of an arm: `"baseline"`, `"<point> (<scale>)"` (a scale of
    `SCALES`), a bare insertion point (single scale), or such a tuple already."""
    if not isinstance(arm, str):
        return arm
    if arm == "baseline":
        return ("baseline", None, ())
    point, _, scale = arm.partition(" (")
    scale = scale.rstrip(")") or "single"
    if point not in pf.INSERTION_POINTS or scale not in SCALES:
        raise ValueError(
            f"unknown arm {arm!r}: pass 'baseline' or '<point> (<scale>)' with a point of "
            f"{pf.INSERTION_POINTS} and a scale of {tuple(SCALES)}."
        )
    return (f"{point} ({scale})", point, SCALES[scale])


def abstract_model(config: LraTask, arm: str | Arm = "baseline") -> eqx.Module:
    """The model of `config` (and `arm`) built by `equinox.filter_eval_shape`: its arrays
    are `jax.ShapeDtypeStruct`s, nothing is drawn or allocated."""
    _, point, dilations = parse_arm(arm)
    build = lambda: config.model(
        key=jr.PRNGKey(0),
        diffusion_at=() if point is None else (point,),
        dilations=dilations or (1,),
    )
    return eqx.filter_eval_shape(build)


def parameter_count(model: eqx.Module) -> int:
    """The number of floating-point parameters of a model (or of `abstract_model`'s)."""
    leaves = jax.tree.leaves(eqx.filter(model, _is_float))
    return int(sum(math.prod(x.shape) for x in leaves))


def _is_float(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def _size(x) -> int:
    return 0 if x is None else int(math.prod(x.shape))


def flops_per_step(
    config: LraTask, model: eqx.Module, dilations: int = 0, applications: int = 0
) -> dict[str, float]:
    """The FLOPs of one training step of `model` (built from `config`), counted as:

    - forward, per sequence of `S = config.seq_len` tokens (CLS included):
      `2 * P_tok * S` for the matmuls applied to every token (`P_tok`: the entries of
      the attention's query/key/value and output projections and the FFN's two matrices,
      all layers, read off the built model) plus `4 * S**2 * d` per layer for attention
      (`Q K^T` and the weights times `V`, `d` the model width); plus `2 * P_head` per
      example for the head's matrices; plus `6 * S * d` per dilation per application of a
      diffusion layer (a 3-tap stencil; negligible);
    - an example of Retrieval is two sequences;
    - backward = 2 * forward, so a step is `3 * forward * batch_size`.

    Norms, softmax, activations, dropout masks and the embedding lookup are not counted.

    **Arguments:**

    - `config`: the task's configuration.
    - `model`: its model (e.g. `abstract_model(config, arm)`).
    - `dilations`, `applications`: the diffusion layer's number of dilations and how often
      it is applied in one forward pass (0: none).

    **Returns:**

    `{"forward_per_example", "step", "matmul_params_per_token", "head_params"}`.
    """
    encoder = model.encoder
    blocks = encoder.field.blocks
    per_token = sum(
        _size(x)
        for x in (
            blocks.attention.qkv_weight,
            blocks.attention.out_weight,
            blocks.reaction.w1,
            blocks.reaction.w2,
        )
    )
    head = _size(model.mlp_weight) + _size(model.head_weight)
    s, d = config.seq_len, config.dim
    sequences = 2 if config.dual else 1
    per_sequence = 2 * per_token * s + config.num_layers * 4 * s**2 * d
    per_sequence += applications * dilations * 6 * s * d
    forward = sequences * per_sequence + 2 * head
    return {
        "forward_per_example": float(forward),
        "step": float(3 * forward * config.batch_size),
        "matmul_params_per_token": per_token,
        "head_params": head,
    }


def _applications(point: str | None, num_layers: int) -> int:
    if point is None:
        return 0
    if point in ("after_embedding", "before_head"):
        return 1
    if point == "between_layers":
        return num_layers - 1
    return num_layers


def attention_gigabytes(config: LraTask) -> float:
    """A rough size of the attention weights a training step keeps for its backward pass
    with attention dropout (the einsum path): `batch * heads * S**2` entries per layer,
    three such float32 arrays per layer (logits, weights, mask), every layer; GB."""
    entries = config.batch_size * (2 if config.dual else 1) * config.num_heads * config.seq_len**2
    return 3 * 4 * entries * config.num_layers / 1e9


def estimate(
    config: LraTask,
    arm: str | Arm = "baseline",
    *,
    steps: int | None = None,
    seeds: int = 1,
    mfu: float = DEFAULT_MFU,
    peak_tflops: float = H100_BF16_DENSE_TFLOPS,
    device_gb: float = H100_MEMORY_GB,
) -> dict[str, Any]:
    """The price of training `config` (one arm) for `steps` and evaluating its test split.

    **Arguments:**

    - `config`, `arm`: the task's configuration and the arm (see `parse_arm`).
    - `steps`: training steps (`None`: LRA's).
    - `seeds`: how many seeds (the totals are for all of them).
    - `mfu`, `peak_tflops`: the assumed utilisation and peak (per GPU).
    - `device_gb`: the GPU's memory, against which `attention_gb` is compared.

    **Returns:**

    A JSON-ready dict: `config` (the dataclass's fields), `arm`, `steps`, `parameters`,
    `flops_per_step`, `train_flops`, `eval_flops` (one forward pass over the test split),
    `total_flops` (all seeds), `gpu_hours` and `minutes` at `mfu * peak_tflops`,
    `attention_gb` (see `attention_gigabytes`) and `attention_fits` (whether it is below
    `device_gb`: where it is not, the run needs a smaller batch per device, several
    devices, or no attention dropout), and the assumptions.
    """
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must lie in (0, 1]; got {mfu}.")
    if not peak_tflops > 0:
        raise ValueError(f"peak_tflops must be > 0; got {peak_tflops}.")
    name, point, dilations = parse_arm(arm)
    model = abstract_model(config, (name, point, dilations))
    counts = flops_per_step(config, model, len(dilations), _applications(point, config.num_layers))
    steps = config.total_steps if steps is None else steps
    train_flops = counts["step"] * steps
    eval_flops = counts["forward_per_example"] * config.num_test
    total = seeds * (train_flops + eval_flops)
    seconds = total / (mfu * peak_tflops * 1e12)
    return {
        "config": dataclasses.asdict(config),
        "arm": name,
        "steps": steps,
        "seeds": seeds,
        "parameters": parameter_count(model),
        "flops_per_step": counts["step"],
        "matmul_params_per_token": counts["matmul_params_per_token"],
        "train_flops": train_flops,
        "eval_flops": eval_flops,
        "total_flops": total,
        "gpu_hours": seconds / 3600,
        "minutes": seconds / 60,
        "attention_gb": attention_gigabytes(config),
        "attention_fits": attention_gigabytes(config) < device_gb,
        "mfu": mfu,
        "peak_tflops": peak_tflops,
    }


def dry_run(
    tasks: Sequence[str],
    arms: Sequence[str | Arm] = ("baseline",),
    *,
    steps: int | None = None,
    seeds: int = 1,
    mfu: float = DEFAULT_MFU,
    peak_tflops: float = H100_BF16_DENSE_TFLOPS,
    device_gb: float = H100_MEMORY_GB,
    configs: dict[str, LraTask] | None = None,
) -> dict[str, Any]:
    """Price a set of runs without training: per task and arm, `estimate`'s record.

    **Arguments:**

    - `tasks`: names of `TASKS` (or of `configs`).
    - `arms`: arms (see `parse_arm`), e.g. `("baseline", "after_embedding (multi)")`.
    - `steps`, `seeds`, `mfu`, `peak_tflops`, `device_gb`: as for `estimate`.
    - `configs`: the configurations (`None`: `TASKS`).

    **Returns:**

    A JSON-ready dict: `assumptions` (the FLOPs formula, MFU, peak, deviations from LRA),
    `runs` (`{task: {arm: estimate}}`) and `total` (FLOPs, GPU hours, minutes).

    **Raises:**

    `ValueError` for an unknown task or arm.
    """
    configs = TASKS if configs is None else configs
    unknown = [t for t in tasks if t not in configs]
    if unknown:
        raise ValueError(f"no LRA configuration for {unknown}; pass some of {tuple(configs)}.")
    runs = {
        t: {
            parse_arm(a)[0]: estimate(
                configs[t],
                a,
                steps=steps,
                seeds=seeds,
                mfu=mfu,
                peak_tflops=peak_tflops,
                device_gb=device_gb,
            )
            for a in arms
        }
        for t in tasks
    }
    records = [r for per_task in runs.values() for r in per_task.values()]
    total = float(sum(r["total_flops"] for r in records))
    return {
        "assumptions": {
            "flops": "step = 3 * forward * batch; forward per sequence = 2 * P_tok * S + "
            "layers * 4 * S^2 * d (+ 2 * P_head per example, + 6 * S * d per dilation per "
            "diffusion-layer application); backward = 2 * forward; evaluation = one forward "
            "pass over the test split",
            "mfu": mfu,
            "peak_tflops": peak_tflops,
            "peak_note": "default peak: NVIDIA H100 SXM dense bf16; float32 training runs "
            "TF32 matmuls (half that peak) and attention dropout materialises the weights",
            "deviations_from_lra": list(DEVIATIONS),
        },
        "runs": runs,
        "total": {
            "flops": total,
            "gpu_hours": float(sum(r["gpu_hours"] for r in records)),
            "minutes": float(sum(r["minutes"] for r in records)),
        },
    }
