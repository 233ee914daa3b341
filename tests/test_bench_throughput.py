"""`experiments/bench_throughput.py`: its analytic FLOP count agrees with XLA's cost
analysis, its nominal peaks are looked up as documented, and it runs end to end on tiny
sizes."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import pdeformer as pf

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "batch, seq, dim, heads, hidden, most",
    # Projections and FFN dominate / attention's products are 40% of the count (where the
    # softmax adds more elementwise work). Measured with jax 0.10.2: 1.031 and 1.071 for the
    # forward, 1.031 and 1.075 for the gradient. Dropping the output projection from the
    # count would give 1.110 and 1.127.
    [(2, 128, 128, 4, 512, 1.05), (2, 256, 64, 4, 256, 1.09)],
)
def test_model_flops_match_xla_cost_analysis(experiments, batch, seq, dim, heads, hidden, most):
    # One layer: XLA's cost analysis counts a loop's body once, and the layers are a scan.
    # XLA also counts the elementwise work (norms, softmax, GELU) that the model count
    # leaves out, so its figure may exceed the analytic one by a few percent, never fall
    # short. The gradient (the training step without the optimiser) is checked against the
    # count's 3 forward passes.
    module = experiments("bench_throughput")
    model = pf.Classifier(
        256, dim, heads, 1, 10, key=jr.PRNGKey(0), hidden=hidden, attention_implementation="xla"
    )
    params, static = eqx.partition(model, eqx.is_array)
    tokens = jnp.zeros((batch, seq), jnp.int32)
    mask = jnp.ones((batch, seq), bool)

    def forward(p, t, m):
        return eqx.combine(p, static)(t, m, depth=pf.Discrete())[0]

    def xla_flops(fn):
        cost = jax.jit(fn).lower(params, tokens, mask).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    counted = module.model_flops(batch, seq, dim, hidden, 1, 10)
    assert 1.0 <= xla_flops(forward) / counted["forward"] <= most
    grad = jax.grad(lambda p, t, m: jnp.sum(forward(p, t, m)))
    assert 1.0 <= xla_flops(grad) / counted["train_step"] <= most


def test_nominal_peak(experiments):
    module = experiments("bench_throughput")
    assert module.nominal_peak("NVIDIA H200", "bfloat16") == 989.4e12
    assert module.nominal_peak("NVIDIA H100 PCIe", "float16") == 756.0e12
    assert module.nominal_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12
    assert module.nominal_peak("NVIDIA A100-SXM4-80GB", "bfloat16") == 312.0e12
    assert module.nominal_peak("NVIDIA H100 NVL", "bfloat16") == 835.5e12
    assert module.nominal_peak("NVIDIA H200 NVL", "bfloat16") == 835.5e12
    assert module.nominal_peak("NVIDIA H100 80GB HBM3", "float32") is None
    assert module.nominal_peak("cpu", "bfloat16") is None


# A benchmark script end to end: slow (see docs/architecture.md, *Test configuration*).
@pytest.mark.slow
def test_bench_throughput_smoke(experiments):
    module = experiments("bench_throughput")
    config, as_json = module._parse(["--quick", "--precisions", "highest,default"])
    assert not as_json and config.seq == 32 and config.platform == "cpu"
    result = module.main(config)
    assert set(result["training"]) == {"float32", "bfloat16"}
    tokens = config.batch * config.seq
    flops = module.model_flops(
        config.batch, config.seq, config.dim, config.hidden, config.layers, config.classes
    )
    for name, row in result["training"].items():
        step_s = row["step_ms"] / 1e3
        assert row["tokens_per_s"] == pytest.approx(tokens / step_s)
        assert row["model_flops_per_s"] == pytest.approx(flops["train_step"] / step_s)
        rate = result["matmul_flops_per_s"][name]
        assert row["mfu_vs_matmul"] == pytest.approx(row["model_flops_per_s"] / rate)
        assert row["mfu_vs_nominal"] is None  # a CPU has no nominal peak here
        assert jnp.isfinite(row["first_loss"])
    assert result["training"]["float32"]["attention_implementation"] == "blockwise"
    assert result["tf32"]["reference"]["success"]
    solves = result["tf32"]["solves"]
    assert set(solves) == {"highest", "default"}
    for row in solves.values():
        assert row["success"] and row["nfe"] > 0 and row["steps"] > 0 and row["time_s"] > 0
        # At rtol 1e-4 the solve is within a few tolerances of the 100x tighter reference.
        assert row["max_abs_error"] <= 1e-3 * result["tf32"]["scale"]
    # XLA's CPU backend has no TF32: the precisions take the same steps.
    assert solves["highest"]["nfe"] == solves["default"]["nfe"]
    assert result["machine"]["backend"] == "cpu"


def test_bench_throughput_gpu_preset(experiments):
    # The GPU run cannot be made here; its settings and the kernels it would get can be
    # checked: the bfloat16 step reaches cuDNN's fused attention, float32 runs after it.
    from pdeformer.operators.attention import choose_implementation

    module = experiments("bench_throughput")
    config, as_json = module._parse(["--gpu", "--json"])
    assert as_json and config.platform == "gpu" and (config.seq, config.dim) == (4096, 512)
    assert module._names(config.compute_dtypes, "") == ["bfloat16", "float32"]
    head_dim = config.dim // config.heads
    assert choose_implementation("gpu", jnp.bfloat16, config.seq, head_dim, True) == "cudnn"
    assert choose_implementation("gpu", jnp.float32, config.seq, head_dim, True) == "xla"
    module._check(config)


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--compute-dtypes", "float64"], "compute dtypes"),
        (["--compute-dtypes", "float32,float32"], "distinct"),
        (["--precisions", " , "], "distinct"),
        (["--precisions", "fast"], "matmul_precision"),
        (["--dim", "30", "--heads", "4"], "multiple of heads"),
        (["--repeats", "0"], "repeats must be >= 1"),
        (["--reference-factor", "2"], "reference_factor"),
    ],
)
def test_bench_throughput_refuses_bad_settings(experiments, flags, match):
    module = experiments("bench_throughput")
    config, _ = module._parse(["--quick", *flags])
    with pytest.raises(ValueError, match=match):
        module.main(config)
