"""The `albef` and `blip` recipes run end to end (validation -> training stages [-> CapFilt] -> merge -> evaluation
-> registration) on the built-in dataset at tiny size (environment `test`), one KedroSession each."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from vlalign.errors import ConfigError
from vlalign.train import load_checkpoint
from vlalign_pipelines.recipes import RecipePlan, StagePlan

from conftest import REPO, run_dir


def test_blip_pipeline_runs_capfilt_between_the_stages_and_albef_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    from vlalign_pipelines.pipelines.capfilt.pipeline import for_plan
    from vlalign_pipelines.pipelines.training.pipeline import create_pipeline

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("VLALIGN_RECIPE", "blip")
    nodes = {node.name: node for node in create_pipeline().nodes}
    order = [node.name for node in create_pipeline().nodes]  # topological
    assert order.index("stage2.train") < order.index("capfilt") < order.index("stage3.train")
    assert nodes["capfilt"].inputs == ["stage2.final_checkpoint", "clean_manifest", "params:training"]
    assert "capfilt_shards" in nodes["stage3.train"].inputs and "train_shards" in nodes["stage2.train"].inputs
    monkeypatch.setenv("VLALIGN_RECIPE", "albef")
    assert "capfilt" not in {node.name for node in create_pipeline().nodes}
    bad = RecipePlan("r", [StagePlan("a"), StagePlan("b", init="a")], ("b", "a"), {"capfilt": {"after": "c"}})
    with pytest.raises(ConfigError, match=r"capfilt.after='c': expected one of the recipe's stages \['a', 'b'\]"):
        for_plan(bad)


def test_recipes_combine_with_an_environment_and_a_model_name() -> None:
    """`kedro run --env coco_cn --params training.recipe=albef`: the environment's model (Chinese vocabulary) becomes
    arch fusion; another model name on the command line does too."""
    from vlalign.models import get_model_config
    from vlalign_pipelines.recipes import resolve_model, resolve_stages
    from vlalign_pipelines.settings import CONFIG_LOADER_ARGS, RunConfigLoader

    params = RunConfigLoader(str(REPO / "conf"), "coco_cn", None, **CONFIG_LOADER_ARGS)["parameters"]
    for recipe, options in (("albef", {"decoder_layers": 0}), ("blip", {"mlm_head": False})):
        model = resolve_model(params["model"], params["training"], recipe)
        cfg = get_model_config(model["name"], **model["overrides"])
        assert (cfg.name, cfg.arch, cfg.arch_options) == ("tiny-vit-bert-zh", "fusion", options)
        assert cfg.text.vocab.endswith("cn_clip/clip/vocab.txt")
        assert [s["objective"] for s in resolve_stages(params["training"], recipe)][0] == recipe
    big = resolve_model({**params["model"], "name": "vit-b16-bert-base-fusion"}, params["training"], "albef")
    cfg = get_model_config(big["name"], **big["overrides"])
    assert cfg.arch_options == {"fusion_layers": 6, "decoder_layers": 0, "mlm_head": True, "mlp_ratio": 4, "dropout": 0.0}


def test_shipped_albef_and_blip_recipes_keep_the_conventions_they_were_measured_with() -> None:
    """The objectives' defaults are the papers' pre-training conventions (docs/conventions.md); the shipped recipes
    set the values their results were measured with until a measurement says otherwise."""
    from vlalign.objectives.registry import objective_options
    from vlalign_pipelines.recipes import resolve_stages
    from vlalign_pipelines.settings import CONFIG_LOADER_ARGS, RunConfigLoader

    params = RunConfigLoader(str(REPO / "conf"), "local", None, **CONFIG_LOADER_ARGS)["parameters"]
    measured = {"itm_negatives": "student", "negative_weight_floor": 0.0, "mask_same_image": True,
                "mlm_mask_sep": False, "alpha_ramp_epochs": 1.0, "queue_init": "empty", "itm_same_text_positive": True}
    for recipe in ("albef", "blip"):
        for stage in resolve_stages(params["training"], recipe):
            options = objective_options(stage["objective"], stage["objective_options"])
            matters = {"itm_negatives": options.itm_weight > 0, "negative_weight_floor": options.itm_weight > 0,
                       "mask_same_image": options.itc_weight > 0, "mlm_mask_sep": options.mlm_weight > 0,
                       "alpha_ramp_epochs": options.distill, "queue_init": options.queue_size > 0,
                       "itm_same_text_positive": options.itm_weight > 0}
            got = {name: getattr(options, name) for name in measured if matters[name]}
            assert got == {name: value for name, value in measured.items() if matters[name]}, (recipe, stage["name"])
            assert options.itc_weight > 0 and options.queue_size > 0


def run_recipe(project: Path, monkeypatch: pytest.MonkeyPatch, recipe: str) -> Path:
    monkeypatch.setenv("VLALIGN_RECIPE", recipe)  # what `kedro run --params training.recipe=<recipe>` sets
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env="test", runtime_params={"training": {"recipe": recipe}}) as session:
        session.run()
    return run_dir(project, "test", recipe)


def _rerank_block(data: Path) -> dict:
    metrics = json.loads((data / "08_reporting" / "metrics.json").read_text())
    block = metrics["itm_rerank"]
    assert block["k_test"] == 128 and set(block["metrics"]) == set(block["itc_metrics"]) == set(metrics["retrieval"]["metrics"])
    # ITC-only = the retrieval block, exactly: rerank_inputs and embed_images/embed_texts run the same ops on the same
    # shapes here (all captions in one batch of evaluation.batch_size 256, one chunk of 1024 queries), so the same
    # kernels give the same bits on any CPU. With more captions their batches differ, the cosines may differ in the
    # last bit, and only a near-tie-tolerant comparison holds (tests/vlalign/eval/test_rerank.py).
    assert block["score"] == "itm+itc" and block["itm_weight"] in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
    assert block["itm_weight_from"].startswith("validation") and set(block["itm_weight_scores"]) == {
        "0.0", "0.25", "0.5", "1.0", "2.0", "4.0"}
    assert block["n_captions"] <= 256
    assert block["itc_metrics"] == pytest.approx(metrics["retrieval"]["metrics"])
    assert "itm_rerank" not in metrics["evaluation_data"]["blocks"]  # same evaluation data as a dual encoder's
    report = (data / "08_reporting" / "report" / "report.md").read_text(encoding="utf-8")
    assert "retrieval with ITM re-ranking" in report and "(ITC only)" in report
    return block


@pytest.mark.slow
def test_albef_recipe_end_to_end(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = run_recipe(project, monkeypatch, "albef")
    assert data == project / "data" / "runs" / "test" / "albef"
    stage1 = load_checkpoint(data / "06_models" / "stage1" / "final.pt")
    stage2 = load_checkpoint(data / "06_models" / "stage2" / "final.pt")
    assert stage2["model_config"]["arch"] == "fusion" and stage2["model_config"]["arch_options"]["decoder_layers"] == 0
    assert stage1["stage_config"]["objective_options"]["itm_weight"] == 0.0
    assert {"itc", "itm", "itm_accuracy", "mlm", "alpha"} <= set(stage2["history"][-1])
    assert any(k.startswith("teacher.") for k in stage2["objective"]) and int(stage2["objective"]["queue_filled"]) > 0
    _rerank_block(data)
    registered = json.loads((data / "08_reporting" / "registered_model.json").read_text())
    assert registered["version"]


@pytest.mark.slow
def test_blip_recipe_end_to_end_with_capfilt(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = run_recipe(project, monkeypatch, "blip")
    stage3 = json.loads((data / "06_models" / "stage3" / "spec.json").read_text())
    assert stage3["data"].endswith("05_model_input/shards/capfilt") and stage3["init"].endswith("stage2/final.pt")
    assert {"itc", "itm", "lm"} <= set(load_checkpoint(data / "06_models" / "stage3" / "final.pt")["history"][-1])
    kept = pd.read_parquet(data / "05_model_input" / "capfilt_manifest.parquet")
    report = json.loads((data / "08_reporting" / "capfilt" / "capfilt_report.json").read_text())
    assert report["config"]["drop_quantile"] == 0.3  # the test environment's uncalibrated 4-step filter
    assert set(kept["capfilt_origin"]) == {"original", "synthetic"}
    below = kept[kept["itm_score"] < report["threshold"]]  # kept only as their image's best caption
    assert len(below) == report["images_rescued"] and below["image_id"].is_unique
    assert report["images_without_caption"] == 0 and kept["image_id"].nunique() == report["n_images"]
    shards = json.loads((data / "05_model_input" / "shards" / "capfilt" / "shards.json").read_text())
    assert shards["n_samples"] == kept["image_id"].nunique()
    clean = pd.read_parquet(data / "03_primary" / "clean_manifest.parquet")
    train = clean[clean["split"] == "train"]
    original = report["per_origin"]["original"]
    assert original["pairs"] == len(train) and original["kept"] + original["dropped"] == len(train)
    assert report["per_origin"]["synthetic"]["pairs"] <= train["image_id"].nunique()
    assert report["pairs_kept"] == len(kept)
    page = (data / "08_reporting" / "capfilt" / "capfilt_report.html").read_text(encoding="utf-8")
    assert page.count('<tr class="kept">') >= 1 and page.count('<tr class="dropped">') >= 1  # both kinds shown
    assert len(re.findall(r'src="data:image/png;base64,', page)) >= 2  # with thumbnails
    _rerank_block(data)
