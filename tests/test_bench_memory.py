"""`experiments/bench/memory.py` runs end to end on tiny sizes and reports sane figures."""

import dataclasses
import json

import pytest

pytestmark = pytest.mark.integration


def test_bench_memory_smoke(experiments, tmp_path):
    module = experiments("bench/memory")
    args = ["--preset", "smoke", "--out", str(tmp_path)]
    module.main(module._cli.parse(module.PRESETS, args, description=""))
    result = json.loads((tmp_path / "results.json").read_text())
    rows = result["layers_sweep"]
    assert {r["variant"] for r in rows} == {"Discrete", "Euler 1/2, RecursiveCheckpoint"}
    for r in rows:
        # Two sub-steps per layer, one evaluation each: the same count in both modes.
        assert r["nfe"] == 2 * r["layers"]
        assert r["temp_mib"] > 0 and r["time_ms"] > 0 and r["compile_s"] > 0
    steps = {r["variant"]: r for r in result["max_steps_sweep"]}
    assert set(steps) == {"RecursiveCheckpoint (16, default)", "Direct (bounded loop)"}
    for step in steps.values():
        assert step["max_steps"] == 16 and step["nfe"] > 0 and step["temp_mib"] > 0
    # The same solve however it is differentiated.
    assert len({step["nfe"] for step in steps.values()}) == 1
    taken = {r["variant"]: r for r in result["steps_taken_sweep"]}
    unrolled, bounded = module.UNROLLED, module.BOUNDED
    assert set(taken) == set(steps) | {unrolled, bounded}
    # Three stage loops of one method: the same solve, the same steps and evaluations.
    default = taken[module.DEFAULT]
    for other in (unrolled, bounded):
        assert (taken[other]["steps"], taken[other]["nfe"]) == (default["steps"], default["nfe"])
    ratios = result["unrolled_ratios"]["0.25"]
    assert ratios["vs_tsit5"] == pytest.approx(taken[unrolled]["time_ms"] / default["time_ms"])
    assert ratios["vs_tsit5_bounded"] == pytest.approx(
        taken[unrolled]["time_ms"] / taken[bounded]["time_ms"]
    )
    row = f"| 0.25 | {ratios['vs_tsit5']:.2f} | {ratios['vs_tsit5_bounded']:.2f} |"
    assert row in (tmp_path / "results.md").read_text()
    for row in taken.values():
        # One layer, steps no longer than 1/4: at least four of them.
        assert row["dtmax"] == 0.25 and row["steps"] >= 4 and row["temp_mib"] > 0
    assert taken["RecursiveCheckpoint (16, default)"]["max_steps"] == 4096
    # DirectAdjoint's budget: twice the four steps a layer needs at dtmax 1/4.
    direct = taken["Direct (bounded loop)"]
    assert (
        direct["max_steps"] == 8
        and direct["steps"] == taken["RecursiveCheckpoint (16, default)"]["steps"]
    )
    assert result["growth"] and result["meta"]["machine"]["cpu"]
    assert "| Discrete | 1 |" in (tmp_path / "results.md").read_text()


def test_direct_adjoint_is_not_run_above_its_budget(experiments):
    module = experiments("bench/memory")
    make = module.step_variants(module.SMOKE)["Direct (bounded loop)"]
    assert make(module.DIRECT_MAX_STEPS).max_steps == module.DIRECT_MAX_STEPS
    assert make(2 * module.DIRECT_MAX_STEPS) is None
    table = module.markdown(
        {
            "layers_sweep": [],
            "max_steps_sweep": [],
            "steps_taken_sweep": [
                {
                    "variant": "Direct (bounded loop)",
                    "dtmax": 0.5,
                    "max_steps": 16,
                    "steps": 8,
                    "temp_mib": 487.5,
                    "time_ms": 538.0,
                    "time_ms_min": 459.0,
                }
            ],
        }
    )
    assert "| Direct (bounded loop) | 0.5 | 16 | 8 | 487.5 | 538 (min 459) |" in table


def test_euler_backsolve_arm_is_gone(experiments):
    """A fixed-step solve with BacksolveAdjoint is refused by the library: not an arm."""
    module = experiments("bench/memory")
    assert "Euler 1/2, Backsolve" not in module.layer_variants(module.SMOKE)
    for make in module.layer_variants(module.SMOKE).values():
        make()  # every arm constructs


def test_variants_flag(experiments):
    module = experiments("bench/memory")
    args = ["--preset", "smoke", "--variants", "Discrete", "Backsolve"]
    config = module._cli.parse(module.PRESETS, args, description="")
    assert config.variants == ("Discrete", "Backsolve") and config.layers == (1,)
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['no such variant'\]"):
        module.main(dataclasses.replace(config, variants=("no such variant",), out=None))
