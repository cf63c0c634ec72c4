"""`python -m xai_lib.bench --quick`: one run writes every method's cost and quality, the
detector and data throughput, as JSON and as the three markdown tables the README includes."""
from __future__ import annotations

import json

import pytest

from xai_lib.explanation.methods import METHODS
from xai_lib.bench import METHOD_KEYS, QUALITY_KEYS, check_goals, main, results_markdown, timing_stats


def _ordered(stats: dict) -> bool:
    return stats["n"] >= 1 and stats["min"] <= stats["median"] <= stats["max"] and len(stats["runs"]) == stats["n"]


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = main(["--quick", "--out", str(out), "--no-progress"])
    assert code == 0
    return out, json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def test_every_method_has_every_metric_with_timing_stats(quick_bench):
    _, res, _ = quick_bench
    assert list(res["methods"]) == list(METHODS)  # the quick run trains a Stage-2 model: importance included
    for name, r in res["methods"].items():
        assert set(METHOD_KEYS) <= set(r), name
        for key in ("ms_per_utt", "cost_vs_forward"):
            assert _ordered(r[key]), (name, key, r[key])
        assert r["cost_vs_forward"]["median"] > 0, name
        assert r["ms_per_utt"]["median"] > 0, name
        # quality metrics are numbers in [0, 1] (partially spoofed items: all of them are defined)
        for key in QUALITY_KEYS:
            assert 0.0 <= r[key] <= 1.0, (name, key, r[key])
    fwd = res["methods_setup"]["forward_ms_per_utt"]
    assert _ordered(fwd) and fwd["median"] > 0
    # the ratio is the method's time over the forward time of the same repetition
    imp = res["methods"]["importance"]
    expected = imp["ms_per_utt"]["runs"][0] / fwd["runs"][0]
    assert imp["cost_vs_forward"]["runs"][0] == pytest.approx(expected)


def test_detector_data_machine_and_goals_are_recorded(quick_bench):
    _, res, _ = quick_bench
    rows = {(r["config"], r["measurement"]): r for r in res["detector"]}
    assert set(rows) == {("demo", "training throughput"), ("demo", "inference real-time factor")}
    for r in rows.values():
        assert not r["skipped"], r
        assert _ordered(r["value"]) and r["value"]["median"] > 0
        assert r["peak_rss_mb"] > 0 and r["peak_above_baseline_mb"] is not None
    data = {r["measurement"]: r for r in res["data"]}
    assert {"corpus generation", "decode + crop"} <= set(data)
    assert all(_ordered(r["value"]) for r in data.values())
    m = res["machine"]
    for key in ("cpu_model", "logical_cores", "torch", "torch_threads", "date"):
        assert key in m
    goals = {g["goal"]: g for g in res["goals"]}
    assert {g["kind"] for g in goals.values()} == {"speed", "quality"}
    for name, g in goals.items():
        assert g["status"] in ("PASS", "FAIL"), g
    explained = res["methods_setup"]["explained_verdict_vs_verdict"]
    assert _ordered(explained) and explained["median"] > 0  # a ratio of two timings: no bound asserted
    assert goals["explained verdict (verdict + importance) <= 1.6 x the verdict alone"]["value"] == explained["median"]
    # every speed goal is a ratio measured in this run
    imp = res["methods"]["importance"]["cost_vs_forward"]["median"]
    assert goals["importance cost <= 1.0 x one forward pass"]["value"] == pytest.approx(imp)
    assert goals["importance >= 50 x cheaper than Integrated Gradients"]["value"] == pytest.approx(
        res["methods_setup"]["ig_over_importance"]["median"])
    assert any("XLS-R" in n for n in res["notes"])  # skipped in --quick, and said so


def test_markdown_has_the_three_tables_and_the_goal_check(quick_bench):
    out, res, md = quick_bench
    for title in ("### Speed goals", "### Attribution methods", "### Detector throughput", "### Data", "### Goal check"):
        assert title in md
    assert md.count("|---|") >= 3
    for name in METHODS:
        assert f"| {name} |" in md
    assert "training throughput" in md and "inference real-time factor" in md and "corpus generation" in md
    # on the CPU the explanation costs are ratios only; absolute times go to the GPU section
    assert "ms / utt" not in md and "ms/utt" not in md and "### GPU" not in md
    gpu = dict(res, machine=dict(res["machine"], device="cuda:0", cuda_device="Some GPU"))
    gpu_md = results_markdown(gpu)
    assert "### GPU: absolute times (Some GPU)" in gpu_md and "| method | ms / utt |" in gpu_md
    assert gpu_md.count("ms / utt") == 1  # the methods table itself stays in ratios


def test_goal_check_is_honest_about_missing_methods():
    stats = timing_stats([2.0, 1.0, 3.0])
    assert (stats["median"], stats["min"], stats["max"], stats["n"]) == (2.0, 1.0, 3.0, 3)
    # goals: importance <= 1.0 x forward, <= 0.7 x (stretch), >= 50 x cheaper than IG,
    # verdict + importance <= 1.6 x verdict, deletion AUC, localisation AUC
    ig = {"deletion_auc": 0.4, "loc_auc": 0.6, "cost_vs_forward": timing_stats([100.0])}
    goals = check_goals({"integrated_gradients": ig}, {})
    assert [g["status"] for g in goals] == ["N/A"] * 6
    assert [g["kind"] for g in goals] == ["speed"] * 4 + ["quality"] * 2
    imp = {"deletion_auc": 0.3, "loc_auc": 0.7, "cost_vs_forward": timing_stats([0.6, 0.5, 0.65])}
    goals = check_goals({"importance": imp, "integrated_gradients": ig}, {"ig_over_importance": timing_stats([80.0])})
    assert [g["status"] for g in goals] == ["PASS", "PASS", "PASS", "N/A", "PASS", "PASS"]  # explain not timed: N/A
    goals = check_goals({"importance": imp, "integrated_gradients": ig},
                        {"ig_over_importance": timing_stats([80.0]), "explained_verdict_vs_verdict": timing_stats([1.3])})
    assert goals[3]["status"] == "PASS" and goals[3]["value"] == 1.3
    imp["cost_vs_forward"] = timing_stats([0.9])  # the goal, not the stretch
    goals = check_goals({"importance": imp, "integrated_gradients": ig}, {"ig_over_importance": timing_stats([80.0])})
    assert [g["status"] for g in goals][:2] == ["PASS", "FAIL"]
    imp["cost_vs_forward"] = timing_stats([2.0])
    imp["loc_auc"] = 0.5
    goals = check_goals({"importance": imp, "integrated_gradients": ig},
                        {"ig_over_importance": timing_stats([20.0]), "explained_verdict_vs_verdict": timing_stats([2.0])})
    assert [g["status"] for g in goals] == ["FAIL", "FAIL", "FAIL", "FAIL", "PASS", "FAIL"]


def test_detector_measurement_runs_alone_in_a_child_process():
    """The full bench measures each detector configuration in a fresh process, so its peak
    memory is that measurement's own (model + activations), not the bench's history."""
    import os

    from xai_lib.bench import _measure, _quick_model_dict

    spec = {"what": "infer", "model": _quick_model_dict(), "batch": 2, "samples": 8000, "warmup": 1, "repeats": 2,
            "device": "cpu", "threads": 1}
    res = _measure(spec, isolate=True)
    assert "error" not in res, res
    assert len(res["seconds"]) == 2 and all(s > 0 for s in res["seconds"])
    assert res["parameters"] > 0
    assert res["peak_rss_mb"] >= res["baseline_rss_mb"] > 0
    assert res.get("pid") != os.getpid()
