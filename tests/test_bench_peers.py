"""`experiments/bench/peers.py`: pdeformer against torchdiffeq and PyTorch. Its device
and precision choices, and (with the `peers` extra) a run end to end on tiny sizes; the
timing helper's page-fault counters."""

import json
import math
import re

import jax
import pytest

from helpers import dot_precisions

pytestmark = pytest.mark.integration


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def test_bench_peers_device_and_targets(experiments):
    # PyTorch goes where JAX runs when it can; a forced CUDA without CUDA is refused; the
    # targets hold only for a like-for-like pair of devices.
    module = experiments("bench/peers")
    resolve = module.resolve_torch_device
    assert resolve("auto", "cpu", True) == "cpu"
    assert resolve("auto", "gpu", True) == "cuda"
    assert resolve("auto", "gpu", False) == "cpu"
    assert resolve("cpu", "gpu", True) == "cpu"
    assert resolve("cuda", "gpu", True) == "cuda"
    with pytest.raises(RuntimeError, match="no CUDA"):
        resolve("cuda", "cpu", False)
    with pytest.raises(ValueError, match="torch_device"):
        resolve("mps", "cpu", False)
    assert module.targets_for("cpu", "cpu") == module.TARGETS
    assert (
        module.targets_for("gpu", "cuda") == module.TARGETS_GPU == {"pdeformer_vs_torchdiffeq": 0.5}
    )
    assert module.targets_for("gpu", "cpu") == {}
    assert module.targets_for("cpu", "cuda") == {}
    config = module._cli.parse(module.PRESETS, ["--torch-device", "cpu"], description="")
    assert config.torch_device == "cpu" and config == module.BenchConfig(torch_device="cpu")
    with pytest.raises(SystemExit):
        module._cli.parse(module.PRESETS, ["--torch-device", "mps"], description="")
    # PyTorch's float32 matmuls as JAX's: TF32 only with both libraries on a GPU and JAX
    # not asking for full float32.
    match = module.torch_matmul_precision
    assert match("highest", "gpu", "cuda") == match("float32", "gpu", "cuda") == "highest"
    assert match(None, "gpu", "cuda") == match("tensorfloat32", "gpu", "cuda") == "high"
    assert match(None, "cpu", "cpu") == match("highest", "cpu", "cpu") == "highest"
    assert match(None, "cpu", "cuda") == match(None, "gpu", "cpu") == "highest"


def _matmul_precisions(fn, *args) -> list[str]:
    """The precision of every `dot_general` of `fn` and of its gradient, as lowered."""
    grad = jax.grad(lambda *a: jax.numpy.sum(fn(*a)))
    return dot_precisions(jax.jit(fn).lower(*args).as_text() + jax.jit(grad).lower(*args).as_text())


def test_bench_peers_pins_the_matmuls_it_says(experiments):
    # The field-alone figures run at `Continuous`'s precision and the discrete output check
    # in full float32, forward and backward, whatever JAX's default: on a GPU, TF32 would
    # otherwise enter both (a CPU computes the same numbers either way, so the program is
    # what is checked).
    import equinox as eqx
    import jax.numpy as jnp

    import pdeformer as pf

    module = experiments("bench/peers")
    field = module._field(16, 2, 1, 32, 0)
    params, static = eqx.partition(field, eqx.is_array)
    u = jnp.ones((2, 8, 16))
    t = jnp.asarray(0.25, jnp.float32)
    pinned = _matmul_precisions(module.field_rate(static, "highest"), params, t, u)
    assert len(pinned) >= 4 and set(pinned) == {"HIGHEST"}
    assert "DEFAULT" in _matmul_precisions(module.field_rate(static, None), params, t, u)
    checked = _matmul_precisions(module.full_float32_output(pf.Discrete(), static), params, u)
    assert len(checked) >= 4 and set(checked) == {"HIGHEST"}


def test_bench_peers_restores_torch_precision(experiments):
    torch = pytest.importorskip("torch")
    module = experiments("bench/peers")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with module._torch_precision(torch, "high"):
                assert torch.get_float32_matmul_precision() == "high"
                raise RuntimeError("inside")
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)


def test_bench_peers_smoke(experiments, monkeypatch, tmp_path):
    """pdeformer against torchdiffeq and torch.nn.TransformerEncoder at tiny sizes: the
    hand-written PyTorch field and the encoder agree with pdeformer, both solutions are
    accurate against the float64 reference, and the JSON carries targets and breakdown."""
    pytest.importorskip("torch")
    pytest.importorskip("torchdiffeq")
    module = experiments("bench/peers")
    config = module._cli.parse(
        module.PRESETS, ["--preset", "smoke", "--out", str(tmp_path)], description=""
    )
    assert config.ode_seq == 16 and config.rtol2 is None
    # Every timed PyTorch call waits for its device (a no-op on a CPU) at least once.
    syncs = []
    init = module._Torch.__init__

    def counting_init(self, torch, device):
        init(self, torch, device)
        wait = self.sync
        self.sync = lambda: (syncs.append(1), wait())

    timed = module.interleaved
    unsynced = []

    def checked(fns, *args, **kwargs):
        def wrap(name, fn):
            def call():
                before = len(syncs)
                out = fn()
                if len(syncs) == before:
                    unsynced.append(name)
                return out

            return call if "torch" in name else fn

        return timed({n: wrap(n, f) for n, f in fns.items()}, *args, **kwargs)

    monkeypatch.setattr(module._Torch, "__init__", counting_init)
    monkeypatch.setattr(module, "interleaved", checked)
    result = json.loads(json.dumps(module.main(config)))
    assert set(result["passed_targets"]) >= {"pdeformer_vs_torchdiffeq", "discrete_vs_pytorch"}
    ode = result["pdeformer_vs_torchdiffeq"]
    assert max(ode["rate_check_max_abs_diff"].values()) < 1e-5
    (run,) = ode["tolerances"]
    errors = run["max_abs_error_vs_float64_reference"]
    assert errors["pdeformer"] < 1e-2 and errors["torchdiffeq"] < 1e-2
    assert run["counts"]["pdeformer"]["nfe"] > 0 and run["counts"]["torchdiffeq"]["nfe"] > 0
    assert run["grad_max_rel_diff"] < 1e-2
    assert run["torchdiffeq_odeint_adjoint"]["tried"]
    for lib in ("pdeformer", "pdeformer_unrolled", "torchdiffeq"):
        assert _finite(ode["breakdown"][lib]["bwd_ms_per_nfe"])
    # Unrolled(Dopri5()) is the same method: the same steps, solution and gradients.
    unrolled = run["unrolled"]
    assert unrolled["nfe"] == run["counts"]["pdeformer"]["nfe"]
    assert unrolled["state_max_abs_diff_vs_dopri5"] < 1e-5
    assert unrolled["grad_max_rel_diff_vs_dopri5"] < 1e-4
    assert "kept" not in run and "pdeformer_kept_vs_torchdiffeq" not in result["ratios"]
    assert result["discrete_vs_pytorch"]["output_max_abs_diff"] < 1e-4
    assert all(_finite(v) for v in result["ratios"].values())
    assert result["threads"]["torch_intra_op"] >= 1
    # On this CPU both libraries run on the CPU, in full float32, under the CPU targets.
    assert result["devices"] == {"jax": "cpu", "torch": "cpu"}
    assert ode["matmul_precision"] == {"jax": "highest", "torch": "highest"}
    assert result["discrete_vs_pytorch"]["matmul_precision"]["torch"] == "highest"
    assert syncs and not unsynced
    assert result["targets"] == {**module.TARGETS, **module.BACKWARD_TARGETS}
    assert set(result["backward_per_nfe"]["arms"]) == {
        "default/recursive_checkpoint",
        "default/backsolve",
        "smooth/recursive_checkpoint",
        "smooth/backsolve",
    }
    assert set(run["memory_faults_fwd_bwd"]) == {
        "pdeformer",
        "pdeformer_unrolled",
        "torchdiffeq",
    }
    assert set(result["discrete_vs_pytorch"]["memory_faults"]) == {"pdeformer", "pytorch"}
    for faults in (run["memory_faults_fwd_bwd"], result["discrete_vs_pytorch"]["memory_faults"]):
        for f in faults.values():
            assert f["minor_faults_per_call"] >= 0 and f["system_cpu_ms_per_call"] >= 0
    machine = result["meta"]["machine"]
    assert isinstance(machine["malloc_env"], dict) and machine["torch_threads"] >= 1
    # Both libraries at the one tolerance rule.
    assert run["atol"] == pytest.approx(run["rtol"] / 10)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["ratios"] == result["ratios"]
    assert "pdeformer against its peers" in (tmp_path / "results.md").read_text()


def test_interleaved_counts_page_faults(experiments):
    """The timing helper's counters see the page faults of memory touched for the first
    time (a fresh 64 MiB buffer: 16384 pages of 4 KiB, fewer with huge pages) and not
    those of a call that touches nothing new."""
    import numpy as np

    timing = experiments("bench/_timing")
    counters = {}
    samples = timing.interleaved(
        {"fresh": lambda: np.ones(2**24, np.float32).sum(), "none": lambda: None},
        3,
        "faults",
        lambda s: None,
        counters,
    )
    assert [len(v) for v in samples.values()] == [3, 3]
    assert min(counters["fresh"]["minor_faults"]) >= 16
    assert max(counters["none"]["minor_faults"]) < min(counters["fresh"]["minor_faults"])
    medians = timing.counter_medians(counters)
    assert set(medians["fresh"]) == {"minor_faults_per_call", "system_cpu_ms_per_call"}


def test_bench_peers_backward_figure_without_torch(experiments, monkeypatch, tmp_path):
    """Without PyTorch the comparisons are skipped and the backward-per-NFE figure runs
    alone; each arm's figure is the stated quotient of its own times and counts."""
    module = experiments("bench/peers")
    config = module._cli.parse(
        module.PRESETS,
        [
            "--preset",
            "smoke",
            "--out",
            str(tmp_path),
            "--no-backward-backsolve",
            "--backward-stage-loop",
        ],
        description="",
    )

    def missing():
        raise SystemExit(f"{module.PEERS_MESSAGE} (No module named 'torch')")

    monkeypatch.setattr(module, "_import_peers", missing)
    result = json.loads(json.dumps(module.main(config)))
    assert "pdeformer_vs_torchdiffeq" not in result and "discrete_vs_pytorch" not in result
    assert 'pip install -e ".[peers]"' in result["peers_skipped"]
    assert result["targets"] == module.BACKWARD_TARGETS
    arms = result["backward_per_nfe"]["arms"]
    assert set(arms) == {
        "default/recursive_checkpoint",
        "smooth/recursive_checkpoint",
        "default/recursive_checkpoint_stage_loop",
    }
    for arm in arms.values():
        ev = arm["evaluations"]
        # The default adjoint differentiates every forward evaluation once, after
        # recomputing it once (the step; the smoke solves take fewer steps than the
        # adjoint's checkpoints), and diffrax's stage loop once more.
        assert ev["forward"] == ev["backward_vjp"] == arm["nfe"] > 0
        assert ev["backward_recomputed"] == (1 if arm["unroll_stages"] else 2) * arm["nfe"]
        want = (arm["bwd_ms"] / ev["backward_vjp"]) / (arm["fwd_ms"] / arm["nfe"])
        assert arm["backward_per_nfe_over_forward"] == pytest.approx(want)
        assert arm["bwd_ms"] == pytest.approx(arm["fwd_bwd_ms"] - arm["fwd_ms"])
        assert _finite(arm["per_round_median"]) and arm["compile_s"] > 0
    headline = arms["default/recursive_checkpoint"]["backward_per_nfe_over_forward"]
    assert result["ratios"]["backward_per_nfe_over_forward"] == headline
    assert set(result["passed_targets"]) == {"backward_per_nfe_over_forward"}
    page = (tmp_path / "results.md").read_text()
    assert "PyTorch comparisons skipped" in page and "default/recursive_checkpoint" in page


def test_bench_peers_names_the_extra_without_torch(experiments, monkeypatch):
    import sys

    module = experiments("bench/peers")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(SystemExit, match=re.escape('pip install -e ".[peers]"')):
        module._import_peers()
