"""`experiments/bench_memory.py` runs end to end on tiny sizes and reports sane figures."""

import json

import pytest

pytestmark = pytest.mark.integration


# A benchmark script end to end: slow (see docs/architecture.md, *Test configuration*).
@pytest.mark.slow
def test_bench_memory_smoke(experiments, capsys):
    module = experiments("bench_memory")
    module._cli(["--smoke", "--json"])
    result = json.loads(capsys.readouterr().out)
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
    unrolled = "Unrolled stages, RecursiveCheckpoint (16, default)"
    kept = "KeepResiduals (slots = 2x steps)"
    both = "Unrolled stages, KeepResiduals (slots = 2x steps)"
    assert set(taken) == set(steps) | {unrolled, kept, both}
    # Unrolled stages, residuals kept: the same solve, the same steps and evaluations.
    default = taken["RecursiveCheckpoint (16, default)"]
    for other in (unrolled, kept, both):
        assert (taken[other]["steps"], taken[other]["nfe"]) == (default["steps"], default["nfe"])
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
    assert result["growth"] and result["machine"]["cpu"]
    assert result["command"] == "python experiments/bench_memory.py --smoke --json"


def test_direct_adjoint_is_not_run_above_its_budget(experiments):
    module = experiments("bench_memory")
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


def test_variant_flag(experiments, capsys):
    module = experiments("bench_memory")
    with pytest.raises(SystemExit) as exit:
        module._cli(["--smoke", "--variant", "no such variant"])
    assert exit.value.code == 2 and "unknown variant" in capsys.readouterr().err
