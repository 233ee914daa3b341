"""`experiments/bench/overhead.py`. Mode `integrators`: end to end on tiny sizes, the
library's discrete and Euler paths compute the plain JAX reference's loss and gradients,
and the figures are sane. Mode `throughput`: its analytic FLOP count agrees with XLA's cost
analysis, its nominal peaks are looked up as documented, it runs end to end on tiny sizes,
and its full preset is the GPU run."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import pdeformer as pf

pytestmark = pytest.mark.integration

TINY = [
    "--preset", "smoke",
    "--integrators.batch", "2",
    "--integrators.seq", "16",
    "--integrators.dim", "16",
    "--integrators.heads", "2",
    "--integrators.hidden", "32",
    "--integrators.layers", "2",
    "--integrators.compile-layers-small", "1",
    "--integrators.compile-layers-large", "2",
    "--integrators.repeats", "2",
    "--integrators.warmup", "0",
]  # fmt: skip


def test_integrators_mode_smoke(experiments, tmp_path):
    module = experiments("bench/overhead")
    top = module._cli.parse(module.PRESETS, [*TINY, "--out", str(tmp_path)], description="")
    config = top.integrators
    assert top.mode == "integrators"
    assert config.seq == 16 and config.compile_repeats == 1  # the smoke preset's value
    result = module.main(top)
    assert set(result["ratios"]) == set(module.TARGETS) == set(result["passed_targets"])
    assert all(v > 0 for v in result["ratios"].values())
    times = result["times_ms"]
    assert result["ratios"]["discrete_vs_reference"] == times["discrete"] / times["reference"]
    for name in ("discrete", "continuous_euler"):
        agreement = result["agreement_with_reference"][name]
        assert agreement["loss_abs_diff"] <= 1e-5 and agreement["grad_max_abs_diff"] <= 1e-5
    assert set(result["compile_s"]) == {"1_layers", "2_layers"}
    machine = result["meta"]["machine"]
    assert machine["cpu"] and machine["backend"] == "cpu"
    assert result["meta"]["config"]["integrators"]["layers"] == 2
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# Overhead") and "discrete_vs_reference" in md


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
    module = experiments("bench/overhead")
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
    module = experiments("bench/overhead")
    assert module.nominal_peak("NVIDIA H200", "bfloat16") == 989.4e12
    assert module.nominal_peak("NVIDIA H100 PCIe", "float16") == 756.0e12
    assert module.nominal_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12
    assert module.nominal_peak("NVIDIA A100-SXM4-80GB", "bfloat16") == 312.0e12
    assert module.nominal_peak("NVIDIA H100 NVL", "bfloat16") == 835.5e12
    assert module.nominal_peak("NVIDIA H200 NVL", "bfloat16") == 835.5e12
    assert module.nominal_peak("NVIDIA H100 80GB HBM3", "float32") is None
    assert module.nominal_peak("cpu", "bfloat16") is None


def test_throughput_mode_smoke(experiments, tmp_path):
    module = experiments("bench/overhead")
    args = ["--preset", "smoke", "--mode", "throughput", "--throughput.precisions"]
    top = module._cli.parse(
        module.PRESETS, [*args, "highest,default", "--out", str(tmp_path)], description=""
    )
    config = top.throughput
    assert top.mode == "throughput" and config.seq == 32
    result = module.main(top)
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
    assert result["meta"]["machine"]["backend"] == "cpu"
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# Throughput") and "tokens/s" in md


def test_throughput_full_preset_is_the_gpu_run(experiments):
    # The GPU run cannot be made here; its settings and the kernels it would get can be
    # checked: the bfloat16 step reaches cuDNN's fused attention, float32 runs after it.
    from pdeformer.operators.attention import choose_implementation

    module = experiments("bench/overhead")
    top = module._cli.parse(
        module.PRESETS, ["--preset", "full", "--mode", "throughput"], description=""
    )
    config = top.throughput
    assert top.platform is None  # JAX's default: the GPU where there is one
    assert (config.seq, config.dim) == (4096, 512)
    assert module._names(config.compute_dtypes, "") == ["bfloat16", "float32"]
    head_dim = config.dim // config.heads
    assert choose_implementation("gpu", jnp.bfloat16, config.seq, head_dim, True) == "cudnn"
    assert choose_implementation("gpu", jnp.float32, config.seq, head_dim, True) == "xla"
    module.check_throughput(config)


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
def test_throughput_mode_refuses_bad_settings(experiments, flags, match):
    module = experiments("bench/overhead")
    flags = [f"--throughput.{f[2:]}" if f.startswith("--") else f for f in flags]
    args = ["--preset", "smoke", "--mode", "throughput", *flags]
    config = module._cli.parse(module.PRESETS, args, description="")
    with pytest.raises(ValueError, match=match):
        module.main(config)


def test_build_mode_smoke(experiments, tmp_path):
    # Fresh processes build the same fields both ways: the same weights, a positive ratio.
    module = experiments("bench/overhead")
    argv = ["--preset", "smoke", "--mode", "build", "--build.dims", "4", "--out", str(tmp_path)]
    top = module._cli.parse(module.PRESETS, argv, description="")
    assert top.build.repeats == 1  # the smoke preset's value
    result = module.main(top)
    assert result["same_weights"] is True
    ratio = result["ratios"]["build_batched_vs_per_matrix"]
    assert ratio == result["median_s"]["batched"] / result["median_s"]["per_matrix"] > 0
    assert "build_batched_vs_per_matrix" in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match="multiple of heads"):
        module.run_build(module.BuildConfig(dims="5", heads=2))
