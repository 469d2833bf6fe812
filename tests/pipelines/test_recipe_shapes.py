"""The pipeline shapes of the siglip, daa and sphinx recipes (no runs), and that they combine with the benchmark
environments (the resolved model and stages are valid configs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlalign.errors import ConfigError
from vlalign.models import get_model_config
from vlalign.train import StageConfig
from vlalign_pipelines.pipelines.merge.pipeline import create_pipeline as create_merge_pipeline
from vlalign_pipelines.pipelines.merge.pipeline import soup_pipeline
from vlalign_pipelines.pipelines.training.pipeline import create_pipeline as create_training_pipeline
from vlalign_pipelines.recipes import RecipePlan, StagePlan, plan, resolve_model, resolve_stages
from vlalign_pipelines.settings import CONFIG_LOADER_ARGS, RunConfigLoader

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def in_repo(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("KEDRO_ENV", raising=False)
    return monkeypatch


def _shape(monkeypatch: pytest.MonkeyPatch, recipe: str):
    monkeypatch.setenv("VLALIGN_RECIPE", recipe)
    return create_training_pipeline(), create_merge_pipeline()


def test_siglip_and_daa_are_two_stage_recipes_with_their_objectives(in_repo) -> None:
    for recipe in ("siglip", "daa", "daa_source"):
        training, merge = _shape(in_repo, recipe)
        assert {n.name for n in training.nodes} == {"write_training_shards", "stage1.train", "stage2.train"}
        assert {n.name for n in merge.nodes} == {"merge_stage_checkpoints"}


def test_daa_ships_a_wider_weight_temperature_and_keeps_the_sources_as_daa_source() -> None:
    params = RunConfigLoader(str(REPO / "conf"), "base", **CONFIG_LOADER_ARGS)["parameters"]
    for recipe, temperature in (("daa", 1.0), ("daa_source", 0.05)):
        stages = resolve_stages(params["training"], recipe)
        assert [(s["objective"], s["objective_options"]) for s in stages] == [("daa", {"temperature": temperature})] * 2
    assert "below 10x chance" in params["training"]["recipes"]["daa_source"]["description"]


def test_sphinx_wires_the_synthetic_data_the_fine_tunes_and_the_soups(in_repo) -> None:
    training, merge = _shape(in_repo, "sphinx")
    nodes = {n.name: n for n in training.nodes}
    assert set(nodes) == {"write_training_shards", "write_synthetic_shards", "real.train", "synthetic.train",
                          "synthetic_b.train", "real_ft.train"}
    assert nodes["write_synthetic_shards"].inputs == ["clean_manifest", "probe_source", "params:training"]
    assert "synthetic_shards" in nodes["synthetic.train"].inputs and "train_shards" in nodes["real_ft.train"].inputs
    assert "real.final_checkpoint" in nodes["synthetic_b.train"].inputs
    assert not [i for i in nodes["real.train"].inputs if i.endswith("final_checkpoint")]
    merges = {n.name: n for n in merge.nodes}
    assert merges["merge_stage_checkpoints"].inputs[:2] == ["real.final_checkpoint", "synthetic.final_checkpoint"]
    assert merges["make_soups"].inputs[3:] == [f"{s}.final_checkpoint" for s in ("synthetic", "synthetic_b", "real_ft")]
    assert merges["merge_plot"].inputs == ["merge_sweep", "soup_report"]
    assert not {i for i in (training + merge).inputs() if i.endswith("final_checkpoint")}  # every stage is trained


def test_a_soup_section_must_name_stages_of_the_recipe() -> None:
    recipe = RecipePlan("r", [StagePlan("a"), StagePlan("b", init="a")], ("b", "a"), {"soup": {"stages": ["a", "c"]}})
    with pytest.raises(ConfigError, match=r"training.recipes.r.soup.stages=\['a', 'c'\]: expected stages of the recipe"):
        soup_pipeline(recipe)


@pytest.mark.parametrize("env,recipe", [("coco_cn", "daa"), ("coco_cn", "siglip"), ("demo_highres", "sphinx"),
                                        ("demo_highres", "siglip"), ("flickr30k", "sphinx"), ("test", "sphinx")])
def test_recipes_combine_with_the_environments(env: str, recipe: str) -> None:
    params = RunConfigLoader(str(REPO / "conf"), env, **CONFIG_LOADER_ARGS)["parameters"]
    model = resolve_model(params["model"], params["training"], recipe)
    cfg = get_model_config(model["name"], **model.get("overrides", {}))
    if env == "coco_cn":
        assert cfg.name == "tiny-vit-bert-zh"
    if env == "demo_highres":  # the environment's sub-images and the recipe's model changes merge
        assert cfg.image.sub_images == 2 and cfg.image.image_size == 128
    if recipe == "sphinx":
        assert [b.name for b in cfg.image.extra_backbones] == ["convnet"]
    if recipe == "siglip":
        assert cfg.init_logit_bias == -10.0
    for stage in resolve_stages(params["training"], recipe):
        StageConfig.from_dict({**stage, "caption_langs": ["en"]})
    assert plan(params["training"], recipe).name == recipe


def test_stage_data_is_a_dataset_a_list_or_weights() -> None:
    training = {"recipes": {"r": {"stages": [{"name": "a"}, {"name": "b", "data": ["train_shards", "extra"]},
                                             {"name": "c", "data": {"train_shards": 2}}]}}}
    stages = plan(training, "r").stages
    assert [(s.data, s.mixture) for s in stages] == [("train_shards", ()), ("b.mixed_shards", (("train_shards", 1), ("extra", 1))),
                                                      ("c.mixed_shards", (("train_shards", 2),))]
    training["recipes"]["r"]["stages"][1]["data"] = {"train_shards": 0}
    with pytest.raises(ConfigError, match=r"training.recipes.r.stages\[1\].data=.*integer weights >= 1"):
        plan(training, "r")
