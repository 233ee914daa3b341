"""`experiments/bench/profiling.py`. Mode `solve`: trace events attributed to the HLO
instructions of both passes. Mode `attention`: every arm agrees with the einsum path, the
profile attributes the blockwise program's time to its kinds, and the products it times
alone are those of the blockwise path."""

import collections
import importlib
import importlib.util
import json
import math

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from pdeformer.operators.attention import attention

pytestmark = pytest.mark.integration


def test_solve_mode_smoke(experiments, tmp_path):
    """The profile at tiny sizes: trace events attributed to HLO instructions of both
    passes, the matmuls among them found; `--solve.unrolled` takes the same steps."""
    module = experiments("bench/profiling")
    args = ["--preset", "smoke", "--out", str(tmp_path)]
    config = module._cli.parse(module.PRESETS, args, description="")
    assert config.mode == "solve"
    result = json.loads(json.dumps(module.main(config)))
    assert result["nfe"] > 0 and math.isfinite(result["wall_ms_per_call"])
    assert {"forward matmul", "backward matmul", "backward other"} <= set(result["self_ms"])
    assert all(v >= 0 for v in result["self_ms"].values())
    assert len(result["top"]) == 5 and result["instructions_profiled"] >= 5
    assert {row["pass"] for row in result["top"]} <= {"forward", "backward"}
    assert set(result["fields"]) == {"default", "smooth", "default_stage_loop"}
    for f in result["fields"].values():
        assert set(f["phase_ms"]) == set(module.PHASES)
        assert f["phase_ms"]["forward"] > 0 and f["phase_ms"]["backward: VJP"] > 0
        for part, by_category in f["breakdown_ms"].items():
            assert set(by_category) == set(module.CATEGORIES)
            assert sum(by_category.values()) == pytest.approx(f["phase_ms"][part])
    # diffrax's stage loop recomputes the stages inside the backward pass of each step;
    # unrolled (the default), they are not.
    phases = {k: f["phase_ms"] for k, f in result["fields"].items()}
    assert phases["default_stage_loop"]["backward: stages recomputed"] > 0
    # (a few bookkeeping instructions of the solve's loops may still be attributed there.)
    stages = "backward: stages recomputed"
    assert phases["default"][stages] < 0.1 * phases["default_stage_loop"][stages]
    assert "self ms per call" in (tmp_path / "results.md").read_text()
    config = module._cli.parse(module.PRESETS, [*args, "--solve.unrolled"], description="")
    unrolled = module.main(config)
    assert unrolled["meta"]["config"]["solve"]["unrolled"] and unrolled["nfe"] == result["nfe"]


def test_attention_mode_smoke(experiments, tmp_path):
    module = experiments("bench/profiling")
    args = ["--preset", "smoke", "--mode", "attention", "--out", str(tmp_path)]
    args += ["--attention.profile", "--attention.products"]
    top = module._cli.parse(module.PRESETS, args, description="")
    config = top.attention
    assert config.profile and config.products and config.seq == 32
    result = module.main(top)
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
    assert result["meta"]["machine"]["backend"] == "cpu"
    assert set(module.PRODUCTS) <= set(result["products"])
    assert "self time by kind" in (tmp_path / "results.md").read_text()


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
        dict(batch=8, seq=256, heads=4, head_dim=16),  # the quick preset
        dict(batch=8, seq=512, heads=4, head_dim=32),  # the full preset
    ],
    ids=["tiny", "seq256", "seq512"],
)
def test_products_are_those_of_the_blockwise_path(experiments, sizes):
    # The products timed alone are the matmuls of the blockwise forward and backward, shape
    # for shape and count for count (each written once in the loop bodies), at the sizes
    # the results were measured at too (where the blocking's memory bound sets the group).
    module = experiments("bench/profiling")
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
    module = experiments("bench/profiling")
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


def test_phases_and_categories_of_a_checkpointed_solve(experiments):
    # Op names as XLA reports them for Continuous(Dopri5()) under the default adjoint
    # (abridged at the front), and for Unrolled(Dopri5()).
    module = experiments("bench/profiling")
    phase = module.phase
    top = "jit(loss)/jvp(jit(diffeqsolve))/outer-loop"
    inner = "checkpointed-bwd/while/body/cond/branch_1_fun/transpose(jvp(checkpointed-bwd))"
    fwd = f"{top}/checkpointed-fwd/while/body/checkpointed-no-vjp/while/body/cond/dot_general"
    step = f"{top}/checkpointed-bwd/while/body/jvp(checkpointed-fwd)/while/body/cond/dot_general"
    stages = f"{inner}/while/body/jvp()/cond/branch_0_fun/dot_general"
    vjp = f"{inner}/while/body/cond/branch_1_fun/transpose(jvp())/cond/branch_1_fun/dot_general"
    unrolled_step = f"{top}/checkpointed-bwd/while/body/jvp()/cond/branch_0_fun/dot_general"
    unrolled_vjp = f"{top}/checkpointed-bwd/while/body/transpose(jvp())/cond/dot_general"
    assert phase(fwd) == "forward"
    assert phase(step) == phase(unrolled_step) == "backward: step recomputed"
    assert phase(stages) == "backward: stages recomputed"
    assert phase(vjp) == phase(unrolled_vjp) == "backward: VJP"
    assert phase("jit(loss)/transpose(jvp(jit(diffeqsolve)))") == "backward: VJP"
    category = lambda name, shape, ops, matmul=False: module.category(
        {"op_name": name, "shape": shape, "ops": ops, "matmul": matmul}
    )
    attention = f"{vjp}/while/body/closed_call/exp"
    assert category(attention, "f32[16,256,256]{2,1,0}", ["exponential"]) == module.CATEGORIES[0]
    assert category(vjp, "f32[2048,256]{1,0}", ["dot"], True) == module.CATEGORIES[1]
    assert category(f"{fwd}/checkpoint/mul", "f32[2048,256]", ["multiply"]) == module.CATEGORIES[2]
    assert category(vjp, "f32[7,8,256,64]{3,2,1,0}", ["add", "copy"]) == module.CATEGORIES[3]
    assert category(vjp, "f32[16,8,256,64]{3,2,1,0}", ["broadcast"]) == module.CATEGORIES[3]
    weights = ["bitcast", "constant", "dynamic-update-slice", "parameter"]
    assert category(vjp, "f32[4,64,256]{2,1,0}", weights) == module.CATEGORIES[4]
    assert category(vjp, "f32[2048,64]{1,0}", ["broadcast", "parameter"]) == module.CATEGORIES[5]
    assert category(vjp, "f32[2048,64]{1,0}", ["copy", "transpose"]) == module.CATEGORIES[6]
    assert category(vjp, "f32[2048,64]{1,0}", ["add", "multiply"]) == module.CATEGORIES[7]


def test_kinds_of_instructions(experiments):
    module = experiments("bench/profiling")
    kind = lambda shape, ops, matmul: module._kind(
        {"shape": shape, "ops": ops, "matmul": matmul}, (256, 256)
    )
    assert kind("f32[16,256,256]{2,1,0}", ["dot"], True) == "matmul_rows_by_keys"
    assert kind("f32[16,16,256]{2,1,0}", ["dot"], True) == "matmul_head_width"
    assert kind("f32[16,256,16]{2,1,0}", ["dot", "multiply"], True) == "matmul_head_width"
    assert kind("f32[16,256,256]{2,1,0}", ["exponential", "subtract"], False) == "exp"
    assert kind("f32[16,256]{1,0}", ["reduce"], False) == "reduce"
    assert kind("f32[2,16,16,256]{3,2,0,1}", ["transpose"], False) == "other"
