"""Several processes, as on several hosts: `jax.distributed` on one machine's CPU.

Two processes of `multihost_worker.py`, each with two virtual CPU devices, join through
`jax.distributed.initialize` (a coordinator on a free localhost port, JAX's gloo CPU
collectives) into one four-device mesh and train with `DataParallel()`, resuming half-way
from the checkpoint that process 0 wrote to the shared directory; a third process trains the
same model on one device without `DataParallel`. float64: the runs must agree to rounding.
"""

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import cpu_devices_env

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("multihost_worker.py")
MARK = "multihost-result: "  # as in the worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(process_id: int, num_processes: int, port: int, out: Path, devices: int, *extra):
    env = cpu_devices_env(devices)
    args = [sys.executable, str(WORKER), str(process_id), str(num_processes), str(port), str(out)]
    args += list(extra)
    pipe = subprocess.PIPE
    return subprocess.Popen(args, stdout=pipe, stderr=pipe, text=True, env=env)


def _result(proc) -> dict:
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    if proc.returncode != 0:
        pytest.fail(f"{WORKER.name} failed (exit {proc.returncode}):\n{err[-6000:]}")
    # gloo writes lines of its own to stdout; the worker marks its result.
    (line,) = [s for s in out.splitlines() if s.startswith(MARK)]
    return json.loads(line[len(MARK) :])


def _results(procs) -> list[dict]:
    try:
        return [_result(p) for p in procs]
    finally:
        for p in procs:  # a failed worker leaves the others waiting for it
            if p.poll() is None:
                p.kill()
                p.communicate()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("multihost")
    port = _free_port()
    procs = [_start(i, 2, port, out, 2) for i in range(2)]
    procs.append(_start(0, 1, port, out / "unused", 1))  # the one-device reference
    *together, reference = _results(procs)
    return together, reference, out


def test_two_processes_form_one_mesh(runs):
    (p0, p1), _, _ = runs
    assert [p0["process_index"], p1["process_index"]] == [0, 1]
    for p in (p0, p1):
        assert p["process_count"] == 2 and p["devices"] == 4 and p["local_devices"] == 2
        assert p["param_replicated"]
        assert p["process_local_rows_equal"]


def test_training_over_processes_matches_one_device(runs):
    (p0, p1), one, _ = runs
    for p in (p0, p1):
        np.testing.assert_allclose(p["early_loss"], one["loss"][:2], rtol=1e-12, atol=0)
        np.testing.assert_allclose(p["loss"], one["loss"], rtol=1e-12, atol=0)
        diff = max(
            float(np.max(np.abs(np.subtract(a, b))))
            for a, b in zip(p["params"], one["params"], strict=True)
        )
        assert diff < 1e-12
    # The processes hold the same replicated model.
    assert p0["params"] == p1["params"]


def test_adaptive_evaluation_over_processes_matches_one_device(runs):
    (p0, p1), one, _ = runs
    for p in (p0, p1):
        # The adaptive solver's error norm is all-reduced over the processes: the same steps.
        assert p["eval_nfe"] == one["eval_nfe"]
        np.testing.assert_allclose(p["eval_logits"], one["eval_logits"], rtol=0, atol=1e-10)


def test_process_zero_writes_the_shared_directory(runs):
    _, _, out = runs
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    # Steps 0, 1 from the first call, step 2 after the resume; written once, by process 0.
    assert [r["step"] for r in lines] == [0, 1, 2]
    assert (out / "checkpoint.json").is_file() and list(out.glob("ckpt-*.eqx"))


@pytest.mark.slow  # about 20 s more of the suite; the same paths as `runs`, through the CLI
def test_command_line_distributed(tmp_path):
    # `pdeformer train --distributed --coordinator-address ... --process-id I` on each
    # "host": both join, train over the four devices, and process 0 writes the run.
    port = _free_port()
    out = tmp_path / "run"
    p0, p1 = _results([_start(i, 2, port, out, 2, "cli") for i in range(2)])
    assert p0 == p1 == {"rc": 0, "process_count": 2}
    recorded = json.loads((out / "checkpoint.json").read_text())
    assert recorded["devices"] == 4  # the mesh spans both processes' devices
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
