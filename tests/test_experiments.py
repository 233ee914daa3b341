"""The studies of `experiments/studies/` run end to end on their smoke preset, through
their command line; the shared command line (`_cli`) and report module (`report`) do what
they say.

The scripts run in this process, one after another, with the same tiny ListOps setup, so
the jitted training and evaluation steps they share compile once.
"""

import dataclasses
import json
import math
import sys
from pathlib import Path

import jax
import pytest

pytestmark = pytest.mark.integration

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _run(module, out: Path, monkeypatch, *extra: str) -> dict:
    """The script's `__main__` line, `_cli.run(PRESETS, main)`, on `--preset smoke`."""
    argv = ["--preset", "smoke", "--out", str(out), *extra]
    script = Path(module.__file__)
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    results = module._cli.run(module.PRESETS, module.main, description="")
    assert (out / "results.md").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert saved["meta"]["machine"]["cpu"]
    assert saved["meta"]["machine"]["jax"] == jax.__version__
    rel = script.relative_to(ROOT)
    assert saved["meta"]["command"] == f"python {rel} --preset smoke --out {out}" + "".join(
        f" {a}" for a in extra
    )
    assert _finite(saved["meta"]["wall_s"])
    assert json.loads(json.dumps(results, default=str))  # the returned results serialise
    md = (out / "results.md").read_text()
    assert f"- command: `{saved['meta']['command']}`" in md
    return saved


def _gate_shown(saved: dict, md: str) -> None:
    """The learning gate was computed, recorded and shown at the top of the page."""
    assert isinstance(saved["gate_passed"], bool)
    assert saved["verdict"]["passed"] == saved["gate_passed"]
    header = md.split("\n\n## ", 1)[0]  # everything before the first section
    assert "Learning gate (discrete baseline" in header
    assert "**Learning gate: " in md and "| majority class |" in md
    if not saved["gate_passed"]:
        assert "they support no conclusion" in header


def test_compare_solvers_smoke(experiments, tmp_path, monkeypatch):
    module = experiments("studies/compare_solvers")
    saved = _run(module, tmp_path, monkeypatch)
    md = (tmp_path / "results.md").read_text()
    assert saved["meta"]["config"]["name"] == "smoke"
    assert (tmp_path / "accuracy_vs_nfe.png").is_file()
    _gate_shown(saved, md)
    # Three smoke steps learn nothing: the gate fails and the page draws no conclusion.
    assert not saved["gate_passed"]
    assert "this run shows nothing about the integrators" in md
    base, smooth = saved["models"]
    assert base["gate"]["best_rule"] == "majority class"
    for m in (base, smooth):
        assert _finite(m["training"]["final_loss"])
        assert sum(r["as_trained"] for r in m["evaluation"]) == 1
        assert sum(r["tightest"] for r in m["evaluation"]) == 1
        for r in m["evaluation"]:
            for k in ("accuracy", "mean_nfe", "block_evaluations", "max_logit_error"):
                assert _finite(r[k]), (k, r)
            assert 0.0 <= r["agreement_with_tightest"] <= 1.0
        tight = next(r for r in m["evaluation"] if r["tightest"])
        assert tight["max_logit_error"] == 0.0 and tight["agreement_with_tightest"] == 1.0
        adaptive = [r for r in m["evaluation"] if r["kind"] == "adaptive"]
        assert adaptive and all(r["atol"] == pytest.approx(r["rtol"] / 10) for r in adaptive)
    rows = {(r["method"], r["controller"]): r for r in base["evaluation"]}
    # One sequential layer: two half-layer pieces, each evaluation half a block. Euler in
    # 2 steps is the discrete model; 1 step cannot cover two pieces and is not run.
    assert rows[("discrete", "Discrete()")]["mean_nfe"] == 2
    assert rows[("discrete", "Discrete()")]["block_evaluations"] == 1.0
    assert rows[("Euler", "2 steps")]["block_evaluations"] == 1.0
    assert rows[("Euler", "2 steps")]["max_logit_error"] == pytest.approx(
        rows[("discrete", "Discrete()")]["max_logit_error"], abs=1e-5
    )
    assert ("Euler", "1 step") not in rows
    # The smooth field is one piece of depth 1, each evaluation a whole (parallel) block.
    srows = {(r["method"], r["controller"]): r for r in smooth["evaluation"]}
    assert srows[("Euler", "1 step")]["block_evaluations"] == 1.0
    assert srows[("Euler", "2 steps")]["block_evaluations"] == 2.0
    for r in smooth["evaluation"]:
        assert r["block_evaluations"] == r["mean_nfe"]


def test_tolerance_tradeoff_smoke(experiments, tmp_path, monkeypatch):
    module = experiments("studies/tolerance_tradeoff")
    saved = _run(module, tmp_path, monkeypatch)
    md = (tmp_path / "results.md").read_text()
    assert saved["meta"]["config"]["name"] == "smoke"
    assert (tmp_path / "accuracy_vs_nfe.png").is_file()
    _gate_shown(saved, md)
    assert "**Not assessed: the discrete baseline failed the learning gate.**" in md
    for key in (
        "seeds",
        "nfe_reduction_from_regularisation",
        "accuracy_change_from_regularisation",
        "depth_compression",
        "control",
    ):
        assert key in saved, key
    assert saved["seeds"] == [0]
    models = saved["models"]
    assert set(models) == {"discrete baseline", "smooth", "smooth, regularised"}
    assert _finite(saved["nfe_reduction_from_regularisation"])
    assert _finite(saved["accuracy_change_from_regularisation"])
    assert set(models["discrete baseline"]["gates"]) == {"seed 0"}
    config = saved["meta"]["config"]
    for m in models.values():
        rows = m["aggregate"]
        assert sum(r["as_trained"] for r in rows) == 1
        assert sum(r["tightest"] for r in rows) == 1
        swept = sorted(r["rtol"] for r in rows if r["kind"] == "adaptive")
        assert swept == sorted(config["sweep"]["rtols"])
        for r in rows:
            assert _finite(r["accuracy"]) and r["accuracy_se"] == 0.0  # one seed
    # Block evaluations: the baseline's sequential half steps count one half each, the
    # smooth models' parallel evaluations one each.
    base = {r["controller"]: r for r in models["discrete baseline"]["aggregate"]}
    assert base["Discrete()"]["block_evaluations"] == 1.0
    assert base["Discrete()"]["mean_nfe"] == 2.0
    for name in ("smooth", "smooth, regularised"):
        for r in models[name]["aggregate"]:
            assert r["block_evaluations"] == r["mean_nfe"]
    ratio = (
        models["smooth"]["aggregate"][1]["mean_nfe"]
        / models["smooth, regularised"]["aggregate"][1]["mean_nfe"]
    )
    assert saved["nfe_reduction_from_regularisation"] == pytest.approx(ratio)


def test_tolerance_tradeoff_refuses_a_training_tolerance_outside_the_sweep(experiments):
    module = experiments("studies/tolerance_tradeoff")
    with pytest.raises(ValueError, match=r"train_rtol=0.05 must be one of the sweep's rtols"):
        dataclasses.replace(module.TradeoffConfig.smoke(), train_rtol=0.05)


def test_steps_and_block_evaluations(experiments):
    """Fixed steps over the whole depth respect the field's pieces; a sequential half step
    is half a block, a parallel evaluation a whole one."""
    import diffrax

    common = experiments("studies/_common")
    setup = common.TaskSetup.digits()
    task = setup.load()
    base = setup.model(task)
    smooth = setup.model(task, **common.SmoothField().encoder_kwargs())
    assert common.blocks_per_evaluation(base) == 0.5
    assert common.blocks_per_evaluation(smooth) == 1.0
    assert common.fixed_steps(base, diffrax.Euler(), 4) is None  # 8 half-layer pieces
    assert common.fixed_steps(base, diffrax.Euler(), 8).dt0 == 0.5
    assert common.fixed_steps(smooth, diffrax.Heun(), 1).dt0 == 4.0  # one smooth piece


def test_cheapest_within(experiments):
    common = experiments("studies/_common")
    row = lambda acc, blocks, tight=False, ok=1.0: {
        "accuracy": acc,
        "block_evaluations": blocks,
        "tightest": tight,
        "success": ok,
    }
    rows = [row(0.80, 1), row(0.905, 2, ok=0.0), row(0.902, 3), row(0.91, 40, tight=True)]
    assert common.cheapest_within(rows, 1.0)["block_evaluations"] == 3
    assert common.cheapest_within(rows, 1.0, floor=0.95) is None
    assert common.cheapest_within(rows, 20.0)["block_evaluations"] == 1


def test_stabilizers_smoke(experiments, tmp_path, monkeypatch):
    module = experiments("studies/stabilizers")
    saved = _run(module, tmp_path, monkeypatch)
    assert saved["meta"]["config"]["name"] == "smoke"
    for name in ("loss.png", "grad_norm.png", "activations.png", "drift.png"):
        assert (tmp_path / name).is_file()
    arms = {a["name"]: a for a in saved["arms"]}
    assert set(arms) == {"residual + norm", "neither"}
    # The ablated arms replace the state: the experiment's own NoResidual, not the library's.
    assert [type(arm.depth()).__name__ for arm in module.ARMS] == [
        "Discrete",
        "NoResidual",
        "Discrete",
        "NoResidual",
    ]
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
    md = (tmp_path / "results.md").read_text()
    assert "## Did the paper's claims hold in our runs?" in md
    # The learning gate of the baseline, per rate and seed, at the top; three steps learn
    # nothing, so no claim is assessed.
    assert saved["gate_passed"] is False
    assert saved["gate_passed_by_lr"] == {"0.003": False, "0.3": False}
    assert "Learning gate (baseline 'residual + norm')" in md.split("\n\n## ", 1)[0]
    assert "not assessed: the baseline failed the learning gate" in md
    # The digits: the majority class is the one trivial rule.
    rules = {r["name"] for r in base["runs"][0]["gate"]["rules"]}
    assert rules == {"majority class"}
    # The sweep's thresholds, for every arm including the baseline: three steps end no
    # better than they started, so no rate is stable.
    assert (tmp_path / "lr_sweep.png").is_file() and "## Stability thresholds" in md
    for name in ("residual + norm", "neither"):
        t = saved["thresholds"][name]
        assert set(t["stable_by_lr"]) == {"0.003", "0.3"}
        assert t["largest_stable_lr"] is None and t["first_failing_lr"] == 0.003
        assert len(t["init_cos_to_input_last"]) == 1
        for run in arms[name]["runs"]:
            assert run["stable"] is False and run["unstable_reason"]
    assert saved["replication"] == []  # no arm removes one stabilizer alone


def test_layer_statistics(experiments):
    """The drift statistics on states whose answers are known; pads are ignored."""
    import jax.numpy as jnp
    import numpy as np

    layer_statistics = experiments("studies/stabilizers").layer_statistics
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
    count_spikes = experiments("studies/stabilizers").count_spikes
    assert count_spikes([1.0, 1.0, 1.0, 3.0, 1.0, 2.0], factor=2.0, window=3) == 1
    assert count_spikes([1.0, 1.0], factor=2.0, window=3) == 0


def test_lra_placement_smoke(experiments, tmp_path, monkeypatch):
    """The placement study on a tiny dual-input task and a tiny control task: baseline plus
    three arms (one token-adaptive), two paired seeds, learning curves."""
    module = experiments("studies/lra_placement")
    results = _run(module, tmp_path, monkeypatch)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "placement.png").is_file() and (tmp_path / "curves.png").is_file()
    assert saved["arms"] == [
        "baseline",
        "after_embedding (multi)",
        "after_embedding (adaptive)",
        "between_layers (multi)",
    ]
    assert list(saved["tasks"]) == ["retrieval", "flat"]
    task, flat = saved["tasks"]["retrieval"], saved["tasks"]["flat"]
    assert flat["control"] and not task["control"] and flat["loader"] == "listops"
    for arm in saved["arms"]:
        accs = task["arms"][arm]["accuracy"]
        assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs)
        # Validation after each of the two steps: one curve per seed.
        assert task["arms"][arm]["curve_steps"] == [1, 2]
        assert [len(c) for c in task["arms"][arm]["curves"]] == [2, 2]
    # Same total coefficient for every variant at initialisation (0.1), split over scales.
    for arm in saved["arms"][1:]:
        init = task["arms"][arm]["alphas_init"]
        assert sum(sum(r) if isinstance(r, list) else r for r in init) == pytest.approx(
            0.1 * (1 if arm.startswith("after_embedding") else len(init)), rel=1e-5
        )
        assert len(task["arms"][arm]["alphas"]) == 2
    # Paired changes with intervals and Holm p-values, final and over the curve.
    for arm in saved["arms"][1:]:
        for key in ("final", "curve"):
            p = task["paired"][arm][key]
            assert p["n"] == 2 and p["low"] <= p["mean"] <= p["high"]
            assert p["p"] <= p["p_holm"] <= 1.0
    rough = task["baseline_diagnostics"]["roughness"]
    assert set(rough) == set(module.pf.INSERTION_POINTS)
    assert _finite(task["baseline_diagnostics"]["commutator_layer0"])
    assert set(results["summary"]["delta_points_vs_baseline"]) == set(saved["arms"][1:])
    md = (tmp_path / "results.md").read_text()
    assert "| baseline |" in md and "## The papers' claims in this run" in md
    assert "| *majority class (rule)* |" in md and "| *outermost operator (rule)* |" in md
    assert "## Does the baseline learn each task?" in md and "## Learning curves" in md
    assert "## Paired changes from the baseline, per task" in md
    # The learning gate of the baseline: computed per seed, recorded, shown at the top.
    assert isinstance(saved["gate_passed"], bool) and set(task["gate"]) == {"seed 0", "seed 1"}
    assert "## Learning gate: " in md
    assert "Learning gate (baseline, every seed)" in md.split("\n\n## ", 1)[0]
    # Two smoke steps learn nothing: every measured claim is not resolved.
    assert [e["id"] for e in saved["replication"]] == ["A4"]
    assert all(e["verdict"] == "not resolved" for e in saved["replication"])


def test_lra_placement_baseline_only(experiments, tmp_path, monkeypatch):
    """`--baseline-only` trains the baseline arm alone and reports whether it learnt;
    `--steps` sets every arm's training steps."""
    module = experiments("studies/lra_placement")
    results = _run(module, tmp_path, monkeypatch, "--baseline-only", "--steps", "3")
    assert results["arms"] == ["baseline"]
    assert results["meta"]["config"]["baseline_only"] and results["meta"]["config"]["steps"] == 3
    assert results["summary"]["delta_points_vs_baseline"] == {}
    md = (tmp_path / "results.md").read_text()
    assert "## Does the baseline learn each task?" in md and "papers' claims" not in md
    assert md.startswith("# Placement study budget")
    assert not (tmp_path / "placement.png").exists()


def _placement_results(module, accuracies, passed, num_test):
    """A results dict as `run` builds it: `accuracies[task][arm]` lists one accuracy per
    seed; `passed[task]`: whether its baseline passed the learning gate."""
    tasks = {}
    for t, arms in accuracies.items():
        tasks[t] = {
            "gate_passed": passed[t],
            "data": {"num_test": num_test},
            "arms": {
                a: {"accuracy": accs, "mean": float(sum(accs) / len(accs))}
                for a, accs in arms.items()
            },
        }
    return {"tasks": tasks, "arms": list(next(iter(accuracies.values())))}


def test_lra_placement_paired_deltas_and_informative_tasks(experiments):
    """The change from the baseline is paired seed by seed (its standard error ignores the
    seeds' common offset), and a task whose baseline failed the learning gate is not
    informative."""
    module = experiments("studies/lra_placement")
    config = module.dataclasses.replace(
        module.Config.smoke(), points=("after_embedding",), scales=(("single", (1,)),)
    )
    arm = "after_embedding (single)"
    accuracies = {
        # Seeds differ by 20 points, the arm is +2 points on every seed: SE 0.
        "a": {"baseline": [0.50, 0.70], arm: [0.52, 0.72]},
        # Its baseline failed the gate.
        "b": {"baseline": [0.51, 0.52], arm: [0.51, 0.50]},
    }
    results = _placement_results(module, accuracies, {"a": True, "b": False}, 1000)
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

    module = experiments("studies/lra_placement")
    config = module.Config.smoke()
    plan = config.plan("flat")
    task = module.load_task("listops", **plan.options, seed=0)
    base = module._model(task, plan, 0, None)
    plain = module.pf.Classifier(
        task.vocab_size,
        plan.dim,
        plan.num_heads,
        plan.num_layers,
        task.num_classes,
        key=jr.PRNGKey(0),
    )
    leaves = lambda m: jax.tree.leaves(eqx.filter(m, eqx.is_array))
    assert all(jnp.array_equal(a, b) for a, b in zip(leaves(base), leaves(plain), strict=True))
    for point in ("after_embedding", "after_attention", "between_layers", "before_head"):
        for arm in (
            module.Arm(point, "multi", (1, 2)),
            module.Arm(point, "adaptive", (1,), module.pf.AdaptiveDiffusionLayer),
        ):
            model = module._model(task, plan, 0, arm)
            assert model.encoder.diffusion_at == (point,)
            # Every variant starts from the same total coefficient, 0.1.
            assert module._coefficient_sum(model, point) == pytest.approx(0.1, rel=1e-5)
            # Remove the one layer: what is left is the baseline, weight for weight.
            layer = module._layer(model, point)
            rest = [x for x in leaves(model) if not any(x is y for y in leaves(layer))]
            assert len(rest) == len(leaves(base))
            assert all(jnp.array_equal(a, b) for a, b in zip(rest, leaves(base), strict=True))


def test_lra_placement_refuses_unknown_tasks(experiments):
    module = experiments("studies/lra_placement")
    with pytest.raises(ValueError, match=r"unknown tasks \['lisops'\]; pass some of"):
        dataclasses.replace(module.Config.smoke(), tasks=("lisops",))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        dataclasses.replace(module.Config.smoke(), steps=0)


# ---------------------------------------------------------------------------------------
# The shared command line and the report module.
# ---------------------------------------------------------------------------------------


def test_presets_and_overrides(experiments):
    """`--preset` picks the config, every other flag overrides one field (nested ones too),
    fields tyro cannot parse keep the preset's value; the default preset is `quick`."""
    module = experiments("studies/compare_solvers")
    parse = module._cli.parse
    quick = parse(module.PRESETS, [], description="")
    assert quick == module.CompareConfig.quick()
    config = parse(
        module.PRESETS,
        [
            "--preset",
            "smoke",
            "--setup.train.total-steps",
            "7",
            "--sweep.rtols",
            "0.1",
            "--out",
            "x",
        ],
        description="",
    )
    smoke = module.CompareConfig.smoke()
    assert config.setup.train.total_steps == 7 and config.sweep.rtols == (0.1,)
    assert config.out == Path("x") and config.name == "smoke"
    # Not a flag: the preset's.
    assert config.sweep.adaptive_solvers == smoke.sweep.adaptive_solvers
    with pytest.raises(SystemExit):
        parse(module.PRESETS, ["--preset", "huge"], description="")
    with pytest.raises(ValueError, match="presets must be exactly"):
        parse({"quick": module.CompareConfig.quick}, [], description="")


def test_every_script_has_the_three_presets(experiments):
    """Every study and benchmark offers `smoke`, `quick` and `full`, each a frozen config
    with an output directory, and a `main(config)`."""
    # A script is a file that runs as `__main__`; `studies/ablations.py` is a module the
    # stabilizer study imports.
    names = [
        f"{folder}/{p.stem}"
        for folder in ("studies", "bench")
        for p in sorted((ROOT / "experiments" / folder).glob("[!_]*.py"))
        if 'if __name__ == "__main__":' in p.read_text()
    ]
    assert len(names) == 4 + 6 and "studies/ablations" not in names
    for name in names:
        module = experiments(name)
        assert set(module.PRESETS) == {"smoke", "quick", "full"}, name
        for make in module.PRESETS.values():
            config = make()
            assert dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen
            assert hasattr(config, "out"), name
        assert list(module.main.__code__.co_varnames[: module.main.__code__.co_argcount]) == [
            "config"
        ], name


def test_report_page_with_a_verdict(experiments, tmp_path, capsys):
    """The verdict of a gate stands at the top of the page, before the tables, and in the
    JSON; non-finite numbers become null."""
    report = experiments("report")
    meta = {
        "command": "python experiments/studies/x.py",
        "date": "2026-12-07 04:00 UTC",
        "machine": {"cpu": "CPU", "cpu_count": 2, "devices": ["cpu:0"], "jax": "0", "python": "3"},
        "config": {},
        "wall_s": 3.0,
    }
    failed = report.Verdict("learning gate", False, "accuracy 0.35 against 0.36 for a rule")
    md = report.write(
        tmp_path, {"meta": meta, "x": float("nan")}, "Title", "| a |\n|---|", verdict=failed
    )
    assert capsys.readouterr().out.strip() == md.strip()
    assert md.startswith("# Title\n\n- command: `python experiments/studies/x.py`")
    assert md.index("**learning gate: FAILED.**") < md.index("| a |")
    assert "support no conclusion" in md
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["x"] is None and saved["verdict"]["passed"] is False
    passed = report.page("T", meta, "body", report.Verdict("learning gate", True, "ok"))
    assert "> learning gate: passed. ok" in passed and "FAILED" not in passed
    assert "learning gate" not in report.page("T", meta, "body")


def test_report_describes_configs(experiments):
    import diffrax

    import pdeformer as pf

    report = experiments("report")
    depth = pf.Continuous(diffrax.Tsit5(), diffrax.PIDController(rtol=1e-2, atol=1e-3))
    assert report.describe(depth) == "Tsit5, PID rtol=0.01 atol=0.001"
    assert report.describe(pf.Discrete()) == "Discrete"
    assert report.describe((diffrax.Euler(), Path("a/b"), 1e-3)) == ["Euler", "a/b", 1e-3]
