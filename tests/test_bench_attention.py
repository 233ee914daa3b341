"""`experiments/bench_attention.py` runs end to end on tiny sizes: every arm agrees with the
einsum path, and the profile attributes the blockwise program's time to its kinds."""

import importlib.util

import numpy as np
import pytest


# A benchmark script end to end: slow (see docs/architecture.md, *Test configuration*).
@pytest.mark.slow
def test_bench_attention_quick(experiments):
    module = experiments("bench_attention")
    config = module.AttentionConfig(**{**module.QUICK, "profile": True, "products": True})
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
    assert set(module.PRODUCTS) <= set(result["products"])


def test_products_are_the_seven_of_one_call(experiments):
    # The three shapes, times their counts per call, are the seven products of a forward and
    # backward pass, each `2 pairs seq^2 head_dim` FLOP, and each library's sum per call
    # weighs its timings by those counts.
    module = experiments("bench_attention")
    c = module.AttentionConfig(batch=2, seq=24, heads=3, head_dim=4, repeats=1, inner=1)
    out = module._time_products(c, np.random.default_rng(0), 1)
    pairs = c.batch * c.heads
    assert out["per_call"] == pairs // out["group_pairs"] * -(-c.seq // out["block_rows"])
    total = sum(out[n]["per_call"] * out[n]["gflop"] for n in module.PRODUCTS)
    assert total == pytest.approx(7 * 2 * pairs * c.seq**2 * c.head_dim / 1e9)
    libraries = ["xla"] + (["torch"] if importlib.util.find_spec("torch") else [])
    for lib in libraries:
        assert out[f"{lib}_seven_products_ms_per_call"] == pytest.approx(
            sum(out[n]["per_call"] * out[n][lib]["median_ms"] for n in module.PRODUCTS)
        )
        assert all(out[n][lib]["min_ms"] > 0 for n in module.PRODUCTS)


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
