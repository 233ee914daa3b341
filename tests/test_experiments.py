"""Every experiment script runs end to end in its smoke mode, through its command line.

The scripts run in this process, one after another, with the same tiny ListOps setup, so
the jitted training and evaluation steps they share compile once.
"""

import json
import math
import re
from pathlib import Path

import jax
import pytest

from helpers import dot_precisions

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _run(module, out: Path) -> dict:
    results = module.cli(["--smoke", "--out", str(out)])
    assert (out / "results.md").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert saved["meta"]["machine"]["cpu"]
    assert saved["meta"]["machine"]["jax"] == jax.__version__
    assert saved["meta"]["command"].endswith(f".py --smoke --out {out}")
    assert _finite(saved["meta"]["wall_s"])
    assert saved["meta"]["config"]["name"] == "smoke"
    assert 0.0 < saved["data"]["test_majority_fraction"] <= 1.0
    assert json.loads(json.dumps(results, default=str))  # the returned results serialise
    md = (out / "results.md").read_text()
    assert f"- command: `{saved['meta']['command']}`" in md
    return saved


def test_compare_solvers_smoke(experiments, tmp_path, capsys):
    module = experiments("compare_solvers")
    saved = _run(module, tmp_path)
    assert (tmp_path / "pareto.png").is_file()
    rows = {(r["method"], r["rtol"]): r for r in saved["evaluation"]}
    # Euler with step 1/2 is the discrete model.
    assert rows[("Euler", None)]["max_abs_logit_diff"] < 1e-5
    assert rows[("Euler", None)]["mean_nfe"] == rows[("discrete", None)]["mean_nfe"]
    for r in saved["evaluation"]:
        assert all(_finite(r[k]) for k in ("accuracy", "mean_nfe", "time_per_batch_s"))
    assert [r["method"] for r in saved["training_cost"]] == ["discrete"]
    assert _finite(saved["training"]["final_loss"])
    assert re.search(r"\| Tsit5 \| PID rtol=0.01 \|", capsys.readouterr().out)


def test_tolerance_tradeoff_smoke(experiments, tmp_path):
    module = experiments("tolerance_tradeoff")
    saved = _run(module, tmp_path)
    for name in ("accuracy_vs_rtol.png", "nfe_vs_rtol.png", "logit_error_vs_rtol.png"):
        assert (tmp_path / name).is_file()
    models = {m["name"]: m for m in saved["models"]}
    assert set(models) == {"discrete-trained", "continuous-trained"}
    config = saved["meta"]["config"]
    for m in models.values():
        assert _finite(m["training"]["final_loss"])
        rows = m["evaluation"]
        assert sum(r["as_trained"] for r in rows) == 1
        swept = sorted(r["rtol"] for r in rows if r["rtol"] is not None)
        assert swept == sorted(config["rtols"] * len(config["solvers"]))
        for r in rows:
            for k in ("accuracy", "mean_nfe", "time_per_batch_s", "max_abs_logit_diff"):
                assert _finite(r[k]), (k, r)
            assert 0.0 <= r["agreement_with_as_trained"] <= 1.0
        assert next(r for r in rows if r["as_trained"])["max_abs_logit_diff"] == 0.0
    # Smoke mode trains the continuous model with Euler at step 1/2: the discrete model.
    cont = {r["controller"]: r for r in models["continuous-trained"]["evaluation"]}
    assert cont["constant h=0.5 (as trained)"]["max_abs_logit_diff"] == 0.0
    assert cont["Transformer (pre-LN)"]["max_abs_logit_diff"] < 1e-5


def test_stabilizers_smoke(experiments, tmp_path):
    module = experiments("stabilizers")
    saved = _run(module, tmp_path)
    for name in ("loss.png", "grad_norm.png", "activations.png", "drift.png"):
        assert (tmp_path / name).is_file()
    arms = {a["name"]: a for a in saved["arms"]}
    assert set(arms) == {"residual + norm", "neither"}
    num_layers = saved["meta"]["config"]["setup"]["num_layers"]
    for arm in arms.values():
        s = arm["summary"]
        assert s["runs"] == len(saved["meta"]["config"]["seeds"])
        for run in arm["runs"]:
            assert set(run["history"]) == {"step", "loss", "accuracy", "grad_norm"}
            assert run["activations"]["step"]
            for which in ("layers_init", "layers_trained"):
                for key in module.LAYER_STATS:
                    assert len(run[which][key]) == num_layers + 1
    # The baseline's numbers are finite; the input layer is the input.
    base = arms["residual + norm"]
    assert base["summary"]["non_finite_events"] == 0
    for run in base["runs"]:
        assert all(_finite(x) for x in run["history"]["loss"] + run["history"]["grad_norm"])
        assert all(_finite(x) for x in run["activations"]["max_rms"])
        for which in ("layers_init", "layers_trained"):
            stats = run[which]
            assert all(_finite(x) for key in module.LAYER_STATS for x in stats[key])
            assert stats["cos_to_input"][0] == pytest.approx(1.0, abs=1e-5)
            assert stats["rel_distance"][0] == pytest.approx(0.0, abs=1e-6)
    claims = saved["claims"]
    assert claims["baseline"] == "residual + norm"
    assert [e["lr"] for e in claims["by_lr"]] == saved["meta"]["config"]["lrs"]
    for e in claims["by_lr"]:
        assert set(e["drift"]) == set(e["explosion"]) == {"neither"}
        for kind in ("drift", "explosion"):
            assert e[kind]["neither"]["verdict"] in ("held", "partly", "not held")
    assert "## Did the paper's claims hold in our runs?" in (tmp_path / "results.md").read_text()


def test_layer_statistics(experiments):
    """The drift statistics on states whose answers are known; pads are ignored."""
    import jax.numpy as jnp
    import numpy as np

    layer_statistics = experiments("stabilizers").layer_statistics
    rng = np.random.default_rng(0)
    u0 = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    mask = jnp.asarray([[True] * 5, [True, True, True, False, False]])
    same = jnp.broadcast_to(u0[:, :1], u0.shape)  # every token equal: rank collapse
    us = jnp.stack([u0, -u0, 2 * u0, same])
    # A pad of garbage must not change anything.
    us = us.at[:, 1, 4].set(1e6)
    stats = {k: np.asarray(v) for k, v in layer_statistics(us, mask).items()}
    np.testing.assert_allclose(stats["cos_to_input"][:3], [1.0, -1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(stats["rel_distance"][:3], [0.0, 2.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(stats["rms"][2], 2 * stats["rms"][0], rtol=1e-6)
    np.testing.assert_allclose(stats["token_uniformity"][3], 1.0, atol=1e-6)
    assert abs(stats["token_uniformity"][0]) < 0.5
    valid = np.asarray(u0)[np.asarray(mask)]
    np.testing.assert_allclose(
        stats["max_token_norm"][0], np.max(np.linalg.norm(valid, axis=-1)), rtol=1e-6
    )


def test_count_spikes(experiments):
    count_spikes = experiments("stabilizers").count_spikes
    assert count_spikes([1.0, 1.0, 1.0, 3.0, 1.0, 2.0], factor=2.0, window=3) == 1
    assert count_spikes([1.0, 1.0], factor=2.0, window=3) == 0


def test_lra_placement_smoke(experiments, tmp_path):
    """The placement study on a tiny dual-input task: baseline plus three points."""
    module = experiments("lra_placement")
    results = module.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "placement.png").is_file()
    assert saved["meta"]["command"].endswith(f"lra_placement.py --smoke --out {tmp_path}")
    assert saved["arms"] == [
        "baseline",
        "after_embedding (multi)",
        "after_attention (multi)",
        "between_layers (multi)",
    ]
    (task,) = saved["tasks"].values()
    for arm in saved["arms"]:
        accs = task["arms"][arm]["accuracy"]
        assert len(accs) == 1 and 0.0 <= accs[0] <= 1.0
    rough = task["baseline_diagnostics"]["roughness"]
    assert set(rough) == set(module.pf.INSERTION_POINTS)
    assert _finite(task["baseline_diagnostics"]["commutator_layer0"])
    assert set(results["summary"]["delta_points_vs_baseline"]) == set(saved["arms"][1:])
    md = (tmp_path / "results.md").read_text()
    assert "| baseline |" in md and "after_embedding helps most" in md
    assert "| *majority class* |" in md and "## Does the baseline learn each task?" in md
    assert set(results["summary"]["delta_standard_error_points"]) == set(saved["arms"][1:])


def test_lra_placement_baseline_only(experiments, tmp_path):
    """`--baseline-only` trains the baseline arm alone and reports whether it learnt."""
    module = experiments("lra_placement")
    results = module.main(["--smoke", "--baseline-only", "--out", str(tmp_path)])
    assert results["arms"] == ["baseline"]
    assert results["summary"]["delta_points_vs_baseline"] == {}
    md = (tmp_path / "results.md").read_text()
    assert "## Does the baseline learn each task?" in md and "papers' claims" not in md
    assert md.startswith("# Placement study budget")
    assert not (tmp_path / "placement.png").exists()


def _placement_results(module, accuracies, majority, num_test):
    """A results dict as `run` builds it: `accuracies[task][arm]` lists one accuracy per
    seed."""
    tasks = {}
    for t, arms in accuracies.items():
        tasks[t] = {
            "data": {"test_majority_fraction": majority[t], "num_test": num_test},
            "arms": {
                a: {"accuracy": accs, "mean": float(sum(accs) / len(accs))}
                for a, accs in arms.items()
            },
        }
    return {"tasks": tasks, "arms": list(next(iter(accuracies.values())))}


def test_lra_placement_paired_deltas_and_informative_tasks(experiments):
    """The change from the baseline is paired seed by seed (its standard error ignores the
    seeds' common offset), and a task whose baseline sits at the majority class is not
    informative."""
    module = experiments("lra_placement")
    config = module.dataclasses.replace(
        module.Config.smoke(), points=("after_embedding",), scales=(("single", (1,)),)
    )
    arm = "after_embedding (single)"
    accuracies = {
        # Seeds differ by 20 points, the arm is +2 points on every seed: SE 0.
        "a": {"baseline": [0.50, 0.70], arm: [0.52, 0.72]},
        # At chance (majority 0.5, 1000 test examples: 3 SE = 4.7 points).
        "b": {"baseline": [0.51, 0.52], arm: [0.51, 0.50]},
    }
    results = _placement_results(module, accuracies, {"a": 0.1, "b": 0.5}, 1000)
    summary = module._summary(results, config)
    assert summary["informative_tasks"] == ["a"]
    # (2 + 0) / 2 on seed 0 and (2 - 2) / 2 on seed 1: mean 0.5, SE 0.5.
    assert abs(summary["delta_points_vs_baseline"][arm] - 0.5) < 1e-9
    assert abs(summary["delta_standard_error_points"][arm] - 0.5) < 1e-9
    assert abs(summary["delta_points_on_informative_tasks"][arm] - 2.0) < 1e-9


def test_lra_placement_arms_share_the_baseline_weights(experiments):
    """Every arm of a seed is the baseline plus one diffusion layer: the same Transformer
    weights, and the baseline is the plain classifier of that key."""
    import equinox as eqx
    import jax.numpy as jnp
    import jax.random as jr

    module = experiments("lra_placement")
    config = module.Config.smoke()
    task = module.load_task("listops", **config.options["listops"], seed=0)
    base = module._model(task, config, 0, (), None)
    plain = module.pf.Classifier(
        task.vocab_size,
        config.dim,
        config.num_heads,
        config.num_layers,
        task.num_classes,
        key=jr.PRNGKey(0),
    )
    leaves = lambda m: jax.tree.leaves(eqx.filter(m, eqx.is_array))
    assert all(jnp.array_equal(a, b) for a, b in zip(leaves(base), leaves(plain), strict=True))
    for point in ("after_embedding", "after_attention", "between_layers", "before_head"):
        arm = module._model(task, config, 0, (1, 2), point)
        assert arm.encoder.diffusion_at == (point,)
        assert module._coefficient_sum(arm, point) > 0
        # Remove the one layer: what is left is the baseline, weight for weight.
        layer = module._layer(arm, point)
        rest = [x for x in leaves(arm) if not any(x is y for y in leaves(layer))]
        assert len(rest) == len(leaves(base))
        assert all(jnp.array_equal(a, b) for a, b in zip(rest, leaves(base), strict=True))


def test_bench_peers_device_and_targets(experiments):
    # PyTorch goes where JAX runs when it can; a forced CUDA without CUDA is refused; the
    # targets hold only for a like-for-like pair of devices.
    module = experiments("bench_peers")
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
    config, _ = module._parse(["--torch-device", "cpu"])
    assert config.torch_device == "cpu"
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

    module = experiments("bench_peers")
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
    module = experiments("bench_peers")
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


# A benchmark script end to end: slow (see docs/architecture.md, *Test configuration*).
@pytest.mark.slow
def test_bench_peers_smoke(experiments, monkeypatch):
    """pdeformer against torchdiffeq and torch.nn.TransformerEncoder at tiny sizes: the
    hand-written PyTorch field and the encoder agree with pdeformer, both solutions are
    accurate against the float64 reference, and the JSON carries targets and breakdown."""
    pytest.importorskip("torch")
    pytest.importorskip("torchdiffeq")
    module = experiments("bench_peers")
    config, as_json = module._parse(["--smoke", "--json"])
    assert as_json and config.ode_seq == 16
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
    for lib in ("pdeformer", "pdeformer_unrolled", "pdeformer_kept", "torchdiffeq"):
        assert _finite(ode["breakdown"][lib]["bwd_ms_per_nfe"])
    # Unrolled(Dopri5()) is the same method: the same steps, solution and gradients.
    unrolled = run["unrolled"]
    assert unrolled["nfe"] == run["counts"]["pdeformer"]["nfe"]
    assert unrolled["state_max_abs_diff_vs_dopri5"] < 1e-5
    assert unrolled["grad_max_rel_diff_vs_dopri5"] < 1e-4
    # KeepResidualsAdjoint differentiates the same solve: the same gradients to rounding.
    kept = run["kept"]
    assert kept["nfe"] == run["counts"]["pdeformer"]["nfe"]
    assert kept["grad_max_rel_diff_vs_dopri5"] < 1e-5
    assert result["discrete_vs_pytorch"]["output_max_abs_diff"] < 1e-4
    assert all(_finite(v) for v in result["ratios"].values())
    assert result["threads"]["torch_intra_op"] >= 1
    # On this CPU both libraries run on the CPU, in full float32, under the CPU targets.
    assert result["devices"] == {"jax": "cpu", "torch": "cpu"}
    assert ode["matmul_precision"] == {"jax": "highest", "torch": "highest"}
    assert result["discrete_vs_pytorch"]["matmul_precision"]["torch"] == "highest"
    assert syncs and not unsynced
    assert result["targets"] == module.TARGETS
    assert set(run["memory_faults_fwd_bwd"]) == {
        "pdeformer",
        "pdeformer_unrolled",
        "pdeformer_kept",
        "torchdiffeq",
    }
    assert set(result["discrete_vs_pytorch"]["memory_faults"]) == {"pdeformer", "pytorch"}
    for faults in (run["memory_faults_fwd_bwd"], result["discrete_vs_pytorch"]["memory_faults"]):
        for f in faults.values():
            assert f["minor_faults_per_call"] >= 0 and f["system_cpu_ms_per_call"] >= 0
    assert isinstance(result["machine"]["malloc_env"], dict)
    assert result["machine"]["cpu_allocator_tuned"] is False  # not asked for, not set


def test_interleaved_counts_page_faults(experiments):
    """The timing helper's counters see the page faults of memory touched for the first
    time (a fresh 64 MiB buffer: 16384 pages of 4 KiB, fewer with huge pages) and not
    those of a call that touches nothing new."""
    import numpy as np

    timing = experiments("_timing")
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


def test_bench_peers_names_the_extra_without_torch(experiments, monkeypatch):
    import sys

    module = experiments("bench_peers")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(SystemExit, match=re.escape('pip install -e ".[peers]"')):
        module._import_peers()


# A benchmark script end to end: slow (see docs/architecture.md, *Test configuration*).
@pytest.mark.slow
def test_bench_layout_smoke(experiments):
    """The layout benchmark at tiny sizes: both variants and the default blocking timed,
    and the forced blockings restored afterwards."""
    from pdeformer.operators import attention

    module = experiments("bench_layout")
    budget = attention._BLOCK_BYTES
    result = json.loads(json.dumps(module.main(["--quick", "--json", "--repeats", "1"])))
    assert attention._BLOCK_BYTES == budget
    layout = result["vmapped_vs_batched"]
    assert set(layout["times_ms"]) == {"vmapped", "batched"} and _finite(layout["ratio"])
    assert [b["seq"] for b in result["blocking"]] == [64, 32]
    for b in result["blocking"]:
        assert b["default"] in b["times_ms"]
        assert all(_finite(t) for t in b["times_ms"].values())


# A benchmark script end to end: slow (see docs/architecture.md, *Test configuration*).
@pytest.mark.slow
def test_profile_solve_smoke(experiments):
    """The profile at tiny sizes: trace events attributed to HLO instructions of both
    passes, the matmuls among them found."""
    module = experiments("profile_solve")
    result = json.loads(json.dumps(module.main(["--quick", "--json"])))
    assert result["nfe"] > 0 and _finite(result["wall_ms_per_call"])
    assert {"forward matmul", "backward matmul", "backward other"} <= set(result["self_ms"])
    assert all(v >= 0 for v in result["self_ms"].values())
    assert len(result["top"]) == 5 and result["instructions_profiled"] >= 5
    assert {row["pass"] for row in result["top"]} <= {"forward", "backward"}
    unrolled = module.main(["--quick", "--json", "--unrolled"])
    assert unrolled["config"]["unrolled"] and unrolled["nfe"] == result["nfe"]


# A benchmark script end to end: slow (see docs/architecture.md, *Test configuration*).
@pytest.mark.slow
def test_bench_parallel_smoke():
    """The data-parallel benchmark at tiny sizes, in a process of its own (it sets the
    virtual device count before JAX starts): both steps timed, equal gradients, and no
    collective that gathers the batch onto every device."""
    import subprocess
    import sys

    script = ROOT / "experiments" / "bench_parallel.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 2 and result["machine"]["devices"] == ["cpu:0", "cpu:1"]
    assert set(result["times_ms"]) == {"one_device", "sharded"}
    assert _finite(result["sharded_vs_one_device"])
    assert result["gathering_collectives"] == 0
    assert result["grad_max_diff"] < 1e-5
