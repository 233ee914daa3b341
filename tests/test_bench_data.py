"""`experiments/bench_data.py` runs end to end on tiny sizes and reports consistent figures."""

import json

import pytest

pytestmark = pytest.mark.integration

ARGS = [
    "--listops-examples", "8",
    "--listops-min-length", "20",
    "--listops-max-length", "40",
    "--pathfinder-examples", "16",
    "--batch-size", "4",
    "--batching-repeats", "2",
    "--train-length", "32",
]  # fmt: skip


def test_bench_data_smoke(experiments, capsys):
    module = experiments("bench_data")
    module._cli(["--json", *ARGS])
    result = json.loads(capsys.readouterr().out)
    rates = [
        "listops_examples_per_second",
        "listops_batching_examples_per_second",
        "pathfinder_examples_per_second",
        "pathfinder_batching_examples_per_second",
        "train_steps_per_second",
    ]
    assert all(result[k] > 0 for k in rates)
    # Examples consumed by training: steps per second times the batch size.
    assert abs(result["train_examples_per_second"] - 4 * result["train_steps_per_second"]) < 1e-9
    slowest_generator = min(
        result["listops_examples_per_second"], result["pathfinder_examples_per_second"]
    )
    assert result["generation_vs_training"] * result["train_examples_per_second"] == pytest.approx(
        slowest_generator
    )
    meta = result["meta"]
    assert meta["command"] == "python experiments/bench_data.py --json " + " ".join(ARGS)
    assert meta["config"]["train_length"] == 32 and meta["config"]["batch_size"] == 4
    assert meta["machine"]["cpu"] and meta["date"].endswith("UTC")
    assert meta["wall_s"] > 0


def test_bench_data_readable_summary(experiments, capsys):
    module = experiments("bench_data")
    result = module._cli(ARGS)
    out = capsys.readouterr().out
    assert "train_steps_per_second:" in out and "meta" not in out
    assert set(result) > {"train_steps_per_second", "meta"}
