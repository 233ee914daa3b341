"""The statistics of the studies (paired t-intervals, Holm), the claim verdicts, and the
placement study's paired tables and replication entries on hand-made results: no training,
default tier."""

import math

import numpy as np
import pytest
import scipy.stats


def test_student_t_against_scipy(experiments):
    stats = experiments("studies/_stats")
    for df in (1, 2, 3, 7, 30, 200):
        for t in (-12.0, -3.0, -0.5, 0.0, 0.7, 2.5, 40.0):
            assert stats.t_sf(t, df) == pytest.approx(scipy.stats.t.sf(t, df), rel=1e-9, abs=1e-15)
        for p in (0.6, 0.975, 0.995):
            assert stats.t_quantile(p, df) == pytest.approx(scipy.stats.t.ppf(p, df), rel=1e-9)
        assert stats.t_quantile(0.025, df) == pytest.approx(-stats.t_quantile(0.975, df))


def test_paired_matches_the_one_sample_t_test(experiments):
    stats = experiments("studies/_stats")
    rng = np.random.default_rng(0)
    for n in (2, 3, 8):
        d = rng.normal(0.5, 1.0, size=n)
        p = stats.paired(d)
        ref = scipy.stats.ttest_1samp(d, 0.0)
        ci = ref.confidence_interval(0.95)
        assert p.n == n and p.mean == pytest.approx(np.mean(d))
        assert p.p == pytest.approx(ref.pvalue, rel=1e-9)
        assert (p.low, p.high) == pytest.approx((ci.low, ci.high), rel=1e-9)
        scaled = stats.paired(d).scaled(-100.0)
        assert scaled.mean == pytest.approx(-100 * p.mean) and scaled.low <= scaled.high
    # Degenerate cases: one pair, equal differences.
    assert stats.paired([0.3]) == stats.Paired(1, 0.3, 0.0, 0.3, 0.3, 1.0)
    assert stats.paired([2.0, 2.0, 2.0]).p == 0.0 and stats.paired([0.0, 0.0]).p == 1.0
    with pytest.raises(ValueError, match="at least one difference"):
        stats.paired([])
    with pytest.raises(ValueError, match="must be finite"):
        stats.paired([1.0, math.nan])


def test_holm(experiments):
    stats = experiments("studies/_stats")
    # Sorted 0.01, 0.03, 0.04: times 3, 2, 1 = 0.03, 0.06, 0.04 -> monotone 0.03, 0.06, 0.06.
    assert stats.holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx(
        {"a": 0.03, "b": 0.06, "c": 0.06}
    )
    assert stats.holm({"a": 0.6, "b": 0.9}) == {"a": 1.0, "b": 1.0}
    assert stats.holm({}) == {}


def test_claim_verdict(experiments):
    report = experiments("report")
    v = report.claim_verdict
    assert v(0.5, 2.0, 0.0, "above") == "holds"
    assert v(-2.0, -0.5, 0.0, "above") == "does not hold"
    assert v(-0.5, 2.0, 0.0, "above") == "not resolved"
    assert v(-2.0, -0.5, 0.0, "below") == "holds"
    assert v(-0.9, -0.4, -0.3, "below") == "holds"
    assert v(-0.2, 0.1, -0.3, "below") == "does not hold"
    # A corrected p-value above alpha leaves it unresolved whatever the interval.
    assert v(0.5, 2.0, 0.0, "above", p=0.2) == "not resolved"
    assert v(0.5, 2.0, 0.0, "above", p=0.01) == "holds"
    with pytest.raises(ValueError, match="direction must be 'above' or 'below'"):
        v(0.0, 1.0, 0.0, "up")


def _task(arms: dict[str, list[float]], *, passed=True, control=False, curves=None):
    """A task entry as the placement study records it."""
    return {
        "gate_passed": passed,
        "control": control,
        "data": {"num_test": 1000},
        "arms": {
            a: {
                "accuracy": accs,
                "mean": float(np.mean(accs)),
                "curves": (curves or {}).get(a, [[] for _ in accs]),
            }
            for a, accs in arms.items()
        },
    }


def test_placement_paired_table_and_replication(experiments):
    """Paired changes with intervals and Holm p-values per task; the replication entries
    come from the learnt, non-control tasks only."""
    module = experiments("studies/lra_placement")
    arms = module.QUICK_ARMS
    config = module.dataclasses.replace(module.Config.smoke(), arms=arms, seeds=tuple(range(8)))
    names = ["baseline", *(a.name for a in arms)]
    base = [0.80, 0.82, 0.78, 0.81, 0.79, 0.83, 0.80, 0.82]
    offset = {
        "after_embedding (single)": 0.03,  # clearly better on every seed
        "after_embedding (multi)": 0.05,
        "after_embedding (adaptive)": 0.0,
        "before_norm (single)": 0.0,
        "after_attention (single)": -0.04,
        "after_attention (multi)": -0.04,
    }
    jitter = np.array([0.002, -0.002, 0.001, -0.001, 0.003, -0.003, 0.0, 0.0])
    accs = {"baseline": base}
    for arm, off in offset.items():
        accs[arm] = list(np.add(base, off) + (jitter if off else 0.0))
    curves = {a: [[x - 0.1, x] for x in v] for a, v in accs.items()}
    results = {
        "arms": names,
        "tasks": {
            "learnt": _task(accs, curves=curves),
            # A control and a task that failed the gate: they move no claim.
            "control": _task({a: [0.5] * 8 for a in names}, control=True),
            "failed": _task({a: list(np.add(base, -0.2)) for a in names}, passed=False),
        },
    }
    for entry in results["tasks"].values():
        entry["paired"] = module._paired_task(entry)
    paired = results["tasks"]["learnt"]["paired"]
    assert set(paired) == set(names[1:])
    single = paired["after_embedding (single)"]["final"]
    assert single["mean"] == pytest.approx(3.0) and single["low"] > 0 and single["resolved"]
    assert paired["after_embedding (single)"]["curve"]["mean"] == pytest.approx(3.0)
    # Holm across the six arms: the adjusted p-value is never below the raw one.
    assert all(r["final"]["p_holm"] >= r["final"]["p"] for r in paired.values())
    assert not paired["before_norm (single)"]["final"]["resolved"]
    results["summary"] = module._summary(results, config)
    assert results["summary"]["informative_tasks"] == ["learnt"]
    entries = module._replication(results, config)
    by_id = {}
    for e in entries:
        by_id.setdefault(e["id"], []).append(e)
    assert set(by_id) == {"A1", "A2", "A3", "A4"}
    assert by_id["A1"][0]["verdict"] == "holds" and by_id["A1"][0]["mean"] == pytest.approx(3.0)
    # +3.0 points with a narrow interval: the paper's +4.1 is outside it, and the entry says so.
    assert "the paper's +4.1 lies outside the interval" in by_id["A1"][0]["measured"]
    assert by_id["A2"][0]["verdict"] == "holds"  # after_attention lowers accuracy here
    # Multi − single: +2 points at after_embedding, 0 at after_attention.
    a3 = {e["measured"].split("at ")[-1]: e for e in by_id["A3"]}
    assert a3["after_embedding"]["verdict"] == "holds"
    assert a3["after_attention"]["verdict"] == "not resolved"
    assert by_id["A4"][0]["verdict"] == "holds"
    assert all(e["scale"] == "cpu" and "learnt; 8 paired seeds" in e["basis"] for e in entries)
    # Without a learnt task every claim is unresolved.
    results["tasks"]["learnt"]["gate_passed"] = False
    results["summary"] = module._summary(results, config)
    assert {e["verdict"] for e in module._replication(results, config)} == {"not resolved"}


def _stab_group(name, lr, accs, *, stable, cos=0.9, uniformity=0.3, diverged=True):
    runs = [
        {
            "seed": i,
            "stable": ok,
            "diverged": not ok and diverged,
            "unstable_reason": None if ok else "diverged: non-finite loss, gradient or activation",
            "test_accuracy": a,
            "activation_growth": 2.0,
            "layers_init": {
                "cos_to_input": [1.0, cos],
                "token_uniformity": [0.1, uniformity],
                "rel_distance": [0.0, 0.5],
            },
        }
        for i, (a, ok) in enumerate(zip(accs, stable, strict=True))
    ]
    summary = {
        "test_accuracy": float(np.mean(accs)),
        "max_grad_norm": 1.0,
        "max_activation_rms": 1.0,
        "loss_spikes": 0,
        "non_finite_events": sum(not ok for ok in stable),
        "non_finite_activation_runs": 0,
    }
    return {"name": name, "lr": lr, "runs": runs, "summary": summary}


def test_stabilizer_criteria_thresholds_and_claims(experiments):
    """A run's stability by the written criteria, the largest stable rate of a sweep, and
    paper B's claims decided from them."""
    module = experiments("studies/stabilizers")
    # Divergence only: a run that learns slowly or not at all does not diverge (the
    # learning gate decides whether it learnt).
    assert module.divergence([2.3] * 60, False, 0) is None
    assert module.divergence([2.3] * 10 + [1.0] * 50, False, 3) is None
    assert module.divergence([2.3] * 10 + [1.0] * 50, False, 4).startswith("4 loss spikes")
    assert module.divergence([2.3], True, 0).startswith("non-finite")
    assert module.largest_stable({1e-3: True, 1e-2: True, 1e-1: False}) == (1e-2, 1e-1)
    # Too small a rate fails by not learning: a stable rate above a failing one counts.
    assert module.largest_stable({1e-3: True, 1e-2: False, 1e-1: True}) == (1e-1, None)
    assert module.largest_stable({1e-3: False, 1e-2: True, 1e-1: False}) == (1e-2, 1e-1)
    assert module.largest_stable({1e-3: False}) == (None, 1e-3)
    assert module.largest_stable({1e-3: True}) == (1e-3, None)

    ok = [True] * 3
    groups = []
    for lr, base_ok, nn_ok in (
        (1e-3, ok, ok),
        (1e-2, ok, [True, False, True]),
        (1e-1, [False] * 3, [False] * 3),
    ):
        groups += [
            _stab_group("residual + norm", lr, [0.90, 0.92, 0.91], stable=base_ok),
            _stab_group("no residual", lr, [0.50, 0.55, 0.52], stable=ok, cos=0.1, uniformity=0.99),
            _stab_group("no norm", lr, [0.88, 0.90, 0.89], stable=nn_ok),
        ]
    th = module.thresholds(groups)
    assert th["residual + norm"]["largest_stable_lr"] == 1e-2
    assert th["no norm"]["largest_stable_lr"] == 1e-3
    assert th["no norm"]["first_failing_lr"] == 1e-2
    assert th["no residual"]["init_cos_to_input_last"] == [0.1] * 3
    results = {
        "thresholds": th,
        "data": {"name": "digits"},
        "gate_passed_by_lr": {"0.001": True, "0.01": True, "0.1": False},
    }
    entries = module.replication(results)
    assert [e["id"] for e in entries] == ["B1", "B1", "B2"]
    cos, acc, explosion = entries
    assert cos["verdict"] == "holds" and cos["mean"] == pytest.approx(-0.8)
    assert acc["verdict"] == "holds" and acc["mean"] == pytest.approx(-38.667, abs=1e-2)
    assert (
        explosion["verdict"] == "holds"
        and "largest stable learning rate 0.001" in explosion["measured"]
        and "no-norm arm diverges" in explosion["measured"]
    )
    # Failing at a lower rate than the baseline by not learning, without diverging, is not
    # explosive training: not resolved.
    quiet = [
        _stab_group(
            g["name"], g["lr"], [0.88, 0.90, 0.89], stable=[True, False, True], diverged=False
        )
        if g["name"] == "no norm" and g["lr"] == 1e-2
        else g
        for g in groups
    ]
    results["thresholds"] = module.thresholds(quiet)
    assert module.replication(results)[2]["verdict"] == "not resolved"
    # The no-norm arm as stable as the baseline: the explosion claim does not hold; the
    # baseline's gate failed at its best rate: the accuracy claim is not resolved.
    for g in groups:
        if g["name"] == "no norm":
            g["runs"] = [dict(r, stable=g["lr"] < 0.1) for r in g["runs"]]
    results["thresholds"] = module.thresholds(groups)
    results["gate_passed_by_lr"] = dict.fromkeys(results["gate_passed_by_lr"], False)
    cos, acc, explosion = module.replication(results)
    assert explosion["verdict"] == "does not hold" and acc["verdict"] == "not resolved"
