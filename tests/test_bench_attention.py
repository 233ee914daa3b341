"""`experiments/bench_attention.py` runs end to end on tiny sizes: every arm agrees with the
einsum path, and the profile attributes the blockwise program's time to its kinds."""

import importlib.util

import pytest


# A benchmark script end to end: slow (see docs/architecture.md, *Test configuration*).
@pytest.mark.slow
def test_bench_attention_quick(experiments):
    module = experiments("bench_attention")
    config = module.AttentionConfig(**{**module.QUICK, "profile": True})
    result = module.run(config)
    with_torch = importlib.util.find_spec("torch") is not None
    arms = set(module.IMPLEMENTATIONS) | ({"torch"} if with_torch else set())
    assert set(result["agreement_max_abs_diff"]) == arms
    for agreement in result["agreement_max_abs_diff"].values():
        assert agreement["out"] <= 1e-4 and agreement["grad"] <= 1e-3
    assert set(result["ms"]) == {f"{a}_{p}" for a in arms for p in ("fwd", "fwd_bwd")}
    assert all(t["min"] > 0 and t["median"] >= t["min"] for t in result["ms"].values())
    if with_torch:
        assert result["ratios"]["blockwise_vs_torch_fwd_bwd"] == pytest.approx(
            result["ms"]["blockwise_fwd_bwd"]["median"] / result["ms"]["torch_fwd_bwd"]["median"]
        )
    profile = result["profile_blockwise_fwd_bwd"]
    # Seven matmuls per block: two (rows, keys)-shaped kinds and head-width ones both ran.
    assert {"matmul_rows_by_keys", "matmul_head_width", "exp"} <= set(profile["self_ms_by_kind"])
    assert profile["self_ms_total"] == pytest.approx(sum(profile["self_ms_by_kind"].values()))
    assert result["machine"]["backend"] == "cpu"


def test_kinds_of_instructions(experiments):
    module = experiments("bench_attention")
    kind = lambda shape, ops, matmul: module._kind(
        {"shape": shape, "ops": ops, "matmul": matmul}, (256, 256)
    )
    assert kind("f32[16,256,256]{2,1,0}", ["dot"], True) == "matmul_rows_by_keys"
    assert kind("f32[16,16,256]{2,1,0}", ["dot"], True) == "matmul_head_width"
    assert kind("f32[16,256,16]{2,1,0}", ["dot", "multiply"], True) == "matmul_head_width"
    assert kind("f32[16,256,256]{2,1,0}", ["exponential", "subtract"], False) == "exp"
    assert kind("f32[16,256]{1,0}", ["reduce"], False) == "reduce"
    assert kind("f32[2,16,16,256]{3,2,0,1}", ["transpose"], False) == "other"
