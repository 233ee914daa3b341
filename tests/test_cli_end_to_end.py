"""`pdeformer train` and `pdeformer evaluate` as a user runs them: separate processes."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

TINY = [
    *("--task-option", "max_depth=3", "--task-option", "min_length=5"),
    *("--task-option", "max_length=20", "--task-option", "num_train=24"),
    *("--task-option", "num_val=8", "--task-option", "num_test=8"),
    *("--dim", "16", "--heads", "2", "--layers", "1", "--batch-size", "8"),
]


def _run(*argv):
    return subprocess.run(
        [sys.executable, "-m", "pdeformer.cli", *argv], capture_output=True, text=True, timeout=300
    )


def test_train_resume_evaluate_and_errors(tmp_path):
    out = tmp_path / "run"
    train = _run("train", *TINY, "--steps", "3", "--checkpoint-every", "2", "--out", str(out))
    assert train.returncode == 0, train.stderr
    assert json.loads(train.stdout)["steps"] == 3
    assert "train" in train.stderr  # tqdm's bar
    again = _run("train", *TINY, "--steps", "3", "--out", str(out), "--resume", "--no-progress")
    assert again.returncode == 0, again.stderr
    evaluate = _run("evaluate", str(out), "--batch-size", "8")
    assert evaluate.returncode == 0, evaluate.stderr
    result = json.loads(evaluate.stdout)
    assert result["checkpoint_step"] == 3 and result["success"] == 1.0
    # A usage error: one line on stderr, status 2, no traceback; with --debug, the traceback.
    bad = _run("train", *TINY, "--steps", "3", "--out", str(out), "--resume", "--dim", "32")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"pdeformer: error: cannot resume {out}: the command differs from the run's run.json "
        "in settings that change the trajectory (--dim: 16 -> 32). Pass the original "
        "settings, or drop --resume to start afresh (replacing the run)."
    ]
    debug = _run("train", "--out", str(tmp_path / "other"), "--lr", "-1", "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    # A solve out of steps: one line naming the fix, status 1.
    failed = _run(
        "evaluate",
        str(out),
        "--batch-size",
        "8",
        "--depth",
        "continuous",
        "--solver",
        "heun",
        "--rtol",
        "1e-9",
        "--max-steps",
        "2",
    )
    assert failed.returncode == 1
    (line,) = failed.stderr.strip().splitlines()
    assert "raise --max-steps" in line and "loosen --rtol" in line
