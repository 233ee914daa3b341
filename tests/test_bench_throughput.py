"""`experiments/bench_throughput.py`: its analytic FLOP count agrees with XLA's cost
analysis, its nominal peaks are looked up as documented, and it runs end to end on tiny
sizes."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import pdeformer as pf


@pytest.mark.parametrize(
    "batch, seq, dim, heads, hidden",
    [(2, 128, 128, 4, 512), (2, 256, 64, 4, 256)],  # projections dominate / attention does
)
def test_model_flops_match_xla_cost_analysis(experiments, batch, seq, dim, heads, hidden):
    # One layer: XLA's cost analysis counts a loop's body once, and the layers are a scan.
    # XLA also counts the elementwise work (norms, softmax, GELU) that the model count
    # leaves out, so its figure may exceed the analytic one by a few percent, never fall short.
    module = experiments("bench_throughput")
    model = pf.Classifier(
        256, dim, heads, 1, 10, key=jr.PRNGKey(0), hidden=hidden, attention_implementation="xla"
    )
    params, static = eqx.partition(model, eqx.is_array)
    tokens = jnp.zeros((batch, seq), jnp.int32)
    mask = jnp.ones((batch, seq), bool)

    def forward(p, t, m):
        return eqx.combine(p, static)(t, m, depth=pf.Discrete())[0]

    cost = jax.jit(forward).lower(params, tokens, mask).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    counted = module.model_flops(batch, seq, dim, hidden, 1, 10)
    assert counted["train_step"] == 3 * counted["forward"]
    assert 1.0 <= cost["flops"] / counted["forward"] <= 1.1


def test_nominal_peak(experiments):
    module = experiments("bench_throughput")
    assert module.nominal_peak("NVIDIA H200", "bfloat16") == 989.4e12
    assert module.nominal_peak("NVIDIA H100 PCIe", "float16") == 756.0e12
    assert module.nominal_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12
    assert module.nominal_peak("NVIDIA A100-SXM4-80GB", "bfloat16") == 312.0e12
    assert module.nominal_peak("NVIDIA H100 80GB HBM3", "float32") is None
    assert module.nominal_peak("cpu", "bfloat16") is None


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


def test_bench_throughput_refuses_bad_dtype(experiments):
    module = experiments("bench_throughput")
    config, _ = module._parse(["--quick", "--compute-dtypes", "float64"])
    with pytest.raises(ValueError, match="compute dtypes"):
        module.main(config)
