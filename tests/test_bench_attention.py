"""`experiments/bench_attention.py` runs end to end on tiny sizes: every arm agrees with the
einsum path, the profile attributes the blockwise program's time to its kinds, and the
products it times alone are those of the blockwise path."""

import collections
import importlib
import importlib.util

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from pdeformer.operators.attention import attention

pytestmark = pytest.mark.integration


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


def _dot_operand_shapes(jaxpr):
    """The operand shapes of every `dot_general` in a jaxpr and the jaxprs inside it."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield tuple(tuple(v.aval.shape) for v in eqn.invars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _dot_operand_shapes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _dot_operand_shapes(sub)


@pytest.mark.parametrize(
    "sizes",
    [
        dict(batch=2, seq=24, heads=3, head_dim=4, block_size=8),  # blocks shorter than seq
        dict(batch=8, seq=256, heads=4, head_dim=16),  # the script's defaults
        dict(batch=8, seq=512, heads=4, head_dim=32),  # --seq 512 --head-dim 32
    ],
    ids=["tiny", "seq256", "seq512"],
)
def test_products_are_those_of_the_blockwise_path(experiments, sizes):
    # The products timed alone are the matmuls of the blockwise forward and backward, shape
    # for shape and count for count (each written once in the loop bodies), at the sizes
    # the results were measured at too (where the blocking's memory bound sets the group).
    module = experiments("bench_attention")
    sizes = dict(sizes)
    block_size = sizes.pop("block_size", module.attention_module.DEFAULT_BLOCK_SIZE)
    c = module.AttentionConfig(**sizes)
    shape = jax.ShapeDtypeStruct((c.batch, c.seq, c.heads, c.head_dim), jnp.float32)
    attend = lambda q, k, v: attention(q, k, v, implementation="blockwise", block_size=block_size)
    grad = jax.grad(lambda *x: jnp.sum(attend(*x)), argnums=(0, 1, 2))
    found = collections.Counter(
        _dot_operand_shapes(jax.make_jaxpr(grad)(shape, shape, shape).jaxpr)
    )
    dims = module.product_dims(c, block_size)
    assert dims["b"] == min(block_size, c.seq) and dims["s"] == c.seq
    want = collections.Counter()
    for spec, count in module.PRODUCTS.values():
        want[tuple(module.product_operands(spec, dims))] += count
    assert found == want


def test_products_timing_adds_up(experiments):
    # Each product is `2 g b s h` FLOP, run once per (group, query block); the seven of a
    # call are `7 x 2 pairs seq^2 head_dim`; each library's sum weighs its medians by count.
    module = experiments("bench_attention")
    c = module.AttentionConfig(batch=2, seq=24, heads=3, head_dim=4, repeats=1, inner=1)
    torch = importlib.util.find_spec("torch") and importlib.import_module("torch")
    threads = torch.get_num_threads() if torch else 1
    out = module._time_products(c, np.random.default_rng(0), threads, block_size=8)
    pairs = c.batch * c.heads
    assert out["block_rows"] == 8 and out["per_call"] == pairs // out["group_pairs"] * 3
    total = sum(out[n]["per_call"] * out[n]["gflop"] for n in module.PRODUCTS)
    assert total == pytest.approx(7 * 2 * pairs * c.seq**2 * c.head_dim / 1e9)
    for lib in ["xla"] + (["torch"] if torch else []):
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
