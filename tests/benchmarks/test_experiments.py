"""The recipe experiments (benchmarks/experiments): their statistics, the per-run cache that makes them resumable,
the shipped recipes at a budget, and every script end to end on a tiny corpus (so none rots between the runs whose
results docs/recipes/ shows)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "benchmarks" / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import common  # noqa: E402

TINY_DEMO = ["n_train=40", "n_val=12", "n_test=12", "zero_shot_per_class=1", "captions_en=2", "captions_zh=1"]


def test_interval_is_the_students_t_95_interval() -> None:
    cell = common.interval([1.0, 2.0, 3.0])
    assert cell["mean"] == 2.0 and cell["n"] == 3 and cell["values"] == [1.0, 2.0, 3.0]
    assert cell["ci95"] == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-6)  # t(0.975, 2) * s / sqrt(n)
    assert common.interval([0.5])["ci95"] == 0.0
    assert common.fmt(cell) == "2.000 ± 2.484"


def test_roc_auc_counts_pairs_and_ties() -> None:
    assert common.roc_auc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert common.roc_auc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert common.roc_auc([0.5, 0.5], [True, False]) == 0.5
    scores, labels = [0.3, 0.7, 0.5, 0.6, 0.2], [False, True, False, True, True]
    by_pairs = sum((p > n) + 0.5 * (p == n) for p, lp in zip(scores, labels) if lp
                   for n, ln in zip(scores, labels) if not ln) / (3 * 2)
    assert common.roc_auc(scores, labels) == pytest.approx(by_pairs)
    curve = common.roc_curve(scores, labels)
    assert curve[0] == (0.0, 0.0) and curve[-1] == (1.0, 1.0)
    assert all(a <= c and b <= d for (a, b), (c, d) in zip(curve, curve[1:]))  # monotone


def test_runs_are_cached_per_config_and_written_atomically(tmp_path) -> None:
    calls = []

    def work(spec):
        calls.append(spec["seed"])
        return {"metrics": {"mean_recall": 0.1 * spec["seed"]}}

    runs = common.Runs(tmp_path, {"steps": 10})
    runs.run("a/seed=1", {"seed": 1}, work)
    runs.run("a/seed=2", {"seed": 2}, work)
    assert calls == [1, 2] and sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["a_seed_1.json", "a_seed_2.json"]
    again = common.Runs(tmp_path, {"steps": 10})  # a restart: both runs are reused, nothing recomputed
    assert again.run("a/seed=2", {"seed": 2}, work)["metrics"]["mean_recall"] == pytest.approx(0.2) and calls == [1, 2]
    other = common.Runs(tmp_path, {"steps": 20})  # another budget: the cached runs are not its runs
    assert other.done == {}
    other.run("a/seed=2", {"seed": 2}, work)
    assert calls == [1, 2, 2] and not list((tmp_path / "runs").glob("*.tmp"))


def test_recipe_stages_change_only_the_budget() -> None:
    budget = common.Budget(steps=100, frozen_steps=7, batch_size=16, seed=3, lang="zh", options={"queue_size": 64})
    cfg, stages, sections = common.recipe_stages("blip", budget)
    assert cfg.arch == "fusion"
    (s1, w1), (s2, w2), (s3, w3) = stages
    assert (s1.max_steps, s2.max_steps, s3.max_steps) == (7, 50, 50)  # stages 2 and 3 have 5 epochs each
    assert s1.trainable == ["image_proj", "text_proj", "logit_scale"] and s2.trainable == ["all"]
    assert all(s.batch_size == 16 and s.caption_langs == ["zh"] and s.seed == 3 for s in (s1, s2, s3))
    assert s2.objective == "blip" and s2.objective_options["itm_same_text_positive"] is True  # the recipe's options
    assert s2.objective_options["queue_size"] == 64  # the experiment's option on top (recipe: 1024)
    assert (w1["init"], w2["init"], w3["init"]) == (None, "stage1", "stage2") and w3["data"] == "capfilt_shards"
    assert sections["capfilt"]["after"] == "stage2"
    _, clip, _ = common.recipe_stages("clip", common.Budget(steps=100, frozen_steps=7))
    assert [s.max_steps for s, _ in clip] == [7, 100]


@pytest.mark.parametrize("script, args", [
    ("noise", ["--noise", "0.25", "--recipes", "clip", "blip", "--steps", "2", "--frozen-steps", "1",
               "--batch-size", "8", "--k-test", "2"]),
    ("collapse", ["--langs", "zh", "--temperatures", "0.05", "inf", "--steps", "2", "--frozen-steps", "1",
                  "--batch-size", "8", "--group-size", "2"]),
    ("batch_size", ["--batch-sizes", "4", "8", "--examples", "16", "--frozen-examples", "8"]),
    ("budget", ["--budgets", "2", "--recipes", "albef", "--frozen-steps", "1", "--batch-size", "8", "--k-test", "2"]),
])
def test_experiment_script_end_to_end(script, args, tmp_path, capsys) -> None:
    module = __import__(script)
    out = tmp_path / script
    argv = ["--out", str(out), "--data-root", str(tmp_path / "data"), "--seeds", "0", "--demo", *TINY_DEMO, *args]
    assert module.main(argv) == 0
    summary = json.loads((out / f"{script}.json").read_text())
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    assert summary["n_runs"] == len(runs) > 0 and (out / f"{script}.png").stat().st_size > 1000
    assert summary["config"]["demo"]["n_train"] == 40 and summary["summary"]["rows"]
    for run in runs:
        assert 0.0 <= run["metrics"]["mean_recall"] <= 1.0 and run["metrics"]["x_chance"] >= 0 and run["wall_s"] > 0
    if script == "noise":
        (blip,) = [r for r in runs if r["spec"]["recipe"] == "blip"]
        cf = blip["capfilt"]
        truth = json.loads(next((tmp_path / "data").glob("noise-0.25*/flickr_demo/ground_truth.json")).read_text())
        noisy_en = sum(r["noisy"] for r in truth["noise"]["captions"] if r["lang"] == "en")
        assert cf["noisy_pairs"] == noisy_en > 0 and cf["pairs_original"] == 40 * 2
        assert cf["images_without_caption"] == 0 and 0.0 <= cf["roc_auc"] <= 1.0
        assert "rerank_mean_recall" in blip["metrics"]
    if script == "collapse":
        (daa,) = [r for r in runs if r["spec"]["temperature"] == 0.05]
        assert daa["recipe"] == "daa" and daa["effective_batch"]["stage2"]
        assert all(1.0 <= v <= 8.0 for _, v in daa["effective_batch"]["stage2"])
        (clip,) = [r for r in runs if r["spec"]["temperature"] == "inf"]
        assert clip["recipe"] == "clip"
    mtime = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert module.main(argv) == 0  # resumed: every run is cached, none is trained again
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == mtime
    assert "|" in capsys.readouterr().out  # the markdown table


def test_recipe_guide_is_generated_from_the_committed_results() -> None:
    """docs/recipes/guide.md is exactly what guide.py writes from the result files beside it: no number in it is
    typed by hand, and none is stale."""
    import guide

    assert guide.GUIDE.exists(), "docs/recipes/guide.md is missing: run benchmarks/experiments/guide.py"
    assert guide.main(["--check"]) == 0, "docs/recipes/guide.md is stale: run benchmarks/experiments/guide.py"


def test_verdicts_follow_the_interval() -> None:
    import guide

    assert guide.verdict(common.interval([0.10, 0.12, 0.11]), "ahead", "behind") == "ahead"
    assert guide.verdict(common.interval([-0.10, -0.12, -0.11]), "ahead", "behind") == "behind"
    assert guide.verdict(common.interval([-0.1, 0.1, 0.02]), "ahead", "behind") == "not resolved at 95 %"
    assert guide.verdict(common.interval([0.3]), "ahead", "behind") == "one seed: not resolved"
    a = {"seeds": [2, 0, 1], "mean_recall": {"values": [0.7, 0.5, 0.6]}}  # rows list seeds in run order
    b = {"seeds": [0, 1, 2], "mean_recall": {"values": [0.4, 0.4, 0.35]}}
    assert guide.paired_rows(a, b)["values"] == pytest.approx([0.1, 0.2, 0.35])  # paired by seed, not position
    assert guide.paired_rows(a, b, ratio=True)["values"] == pytest.approx([1.25, 1.5, 2.0])
    assert guide.paired_rows(a, {"seeds": [5], "mean_recall": {"values": [0.1]}}) is None
