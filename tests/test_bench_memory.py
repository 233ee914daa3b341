"""`experiments/bench_memory.py` runs end to end on tiny sizes and reports sane figures."""

import importlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_memory_smoke(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    module = importlib.import_module("bench_memory")
    module._cli(["--smoke", "--json"])
    result = json.loads(capsys.readouterr().out)
    rows = result["layers_sweep"]
    assert {r["variant"] for r in rows} == {"Discrete", "Euler 1/2, RecursiveCheckpoint"}
    for r in rows:
        # Two sub-steps per layer, one evaluation each: the same count in both modes.
        assert r["nfe"] == 2 * r["layers"]
        assert r["temp_mib"] > 0 and r["time_ms"] > 0 and r["compile_s"] > 0
    (step,) = result["max_steps_sweep"]
    assert step["max_steps"] == 16 and step["nfe"] > 0 and step["temp_mib"] > 0
    (taken,) = result["steps_taken_sweep"]
    # One layer, steps no longer than 1/4: at least four of them.
    assert taken["dtmax"] == 0.25 and taken["steps"] >= 4 and taken["temp_mib"] > 0
    assert result["growth"] and result["machine"]["cpu"]
    assert result["command"] == "python experiments/bench_memory.py --smoke --json"
