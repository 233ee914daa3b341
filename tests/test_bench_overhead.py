"""`experiments/bench_overhead.py` runs end to end on tiny sizes: the library's discrete and
Euler paths compute the plain JAX reference's loss and gradients, and the figures are sane."""

import pytest

pytestmark = pytest.mark.integration

TINY = [
    "--quick",
    "--batch", "2",
    "--seq", "16",
    "--dim", "16",
    "--heads", "2",
    "--hidden", "32",
    "--layers", "2",
    "--compile-layers-small", "1",
    "--compile-layers-large", "2",
    "--repeats", "2",
    "--warmup", "0",
]  # fmt: skip


# A benchmark script end to end: slow (see docs/architecture.md, *Test configuration*).
@pytest.mark.slow
def test_bench_overhead_smoke(experiments):
    module = experiments("bench_overhead")
    config, as_json = module._parse(TINY)
    assert not as_json and config.seq == 16 and config.compile_repeats == 1  # --quick's value
    result = module.main(config)
    assert set(result["ratios"]) == set(module.TARGETS) == set(result["passed_targets"])
    assert all(v > 0 for v in result["ratios"].values())
    times = result["times_ms"]
    assert result["ratios"]["discrete_vs_reference"] == times["discrete"] / times["reference"]
    for name in ("discrete", "continuous_euler"):
        agreement = result["agreement_with_reference"][name]
        assert agreement["loss_abs_diff"] <= 1e-5 and agreement["grad_max_abs_diff"] <= 1e-5
    assert set(result["compile_s"]) == {"1_layers", "2_layers"}
    assert result["machine"]["cpu"] and result["machine"]["backend"] == "cpu"
    assert result["config"]["layers"] == 2
