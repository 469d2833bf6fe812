"""Each recipe of issue 12 runs end to end at tiny size (the `test` environment): one real ``KedroSession`` run of the
whole default pipeline per recipe, selected as `kedro run --params training.recipe=<name>` does ($VLALIGN_RECIPE)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from vlalign.train import load_checkpoint

from conftest import run_dir

pytestmark = pytest.mark.slow


def run_recipe(project: Path, recipe: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VLALIGN_RECIPE", recipe)
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env="test", runtime_params={"training": {"recipe": recipe}}) as session:
        session.run()
    data = run_dir(project, "test", recipe)
    assert data == project / "data" / "runs" / "test" / recipe
    return data


def _history_terms(ckpt: dict) -> set[str]:
    return set(ckpt["history"][-1])


def test_siglip_recipe(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = run_recipe(project, "siglip", monkeypatch)
    for stage in ("stage1", "stage2"):
        ckpt = load_checkpoint(data / "06_models" / stage / "final.pt")
        assert ckpt["stage_config"]["objective"] == "siglip" and "sigmoid" in _history_terms(ckpt)
        assert ckpt["model_config"]["init_logit_bias"] == -10.0 and ckpt["model_config"]["init_temperature"] == 0.1
        assert "logit_bias" in ckpt["model"] and "logit_bias" in _history_terms(ckpt)
    stage1 = load_checkpoint(data / "06_models" / "stage1" / "final.pt")
    assert stage1["history"][0]["logit_bias"] != -10.0  # the bias is trained (stage 1 trains it with the projections)
    metrics = json.loads((data / "08_reporting" / "metrics.json").read_text())
    assert metrics["zero_shot"]["calibration"]["probabilities"] == "sigmoid"
    assert 0.0 <= metrics["zero_shot"]["calibration"]["ece"] <= 1.0
    assert "Class probabilities (for the ECE): sigmoid" in (data / "08_reporting" / "report" / "report.md").read_text()


def test_daa_recipe(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = run_recipe(project, "daa", monkeypatch)
    for stage in ("stage1", "stage2"):
        ckpt = load_checkpoint(data / "06_models" / stage / "final.pt")
        assert ckpt["stage_config"]["objective"] == "daa"
        assert ckpt["stage_config"]["objective_options"] == {"temperature": 1.0}  # the shipped T_w (not the source's)
        last = ckpt["history"][-1]
        assert {"weighted_infonce", "daa_effective_batch", "daa_max_weight"} <= set(last)
        assert 1.0 <= last["daa_effective_batch"] <= ckpt["stage_config"]["batch_size"] + 1e-6
    metrics = json.loads((data / "08_reporting" / "metrics.json").read_text())
    assert metrics["zero_shot"]["calibration"]["probabilities"] == "softmax"
    assert json.loads((data / "08_reporting" / "registered_model.json").read_text())["version"]


def test_sphinx_recipe(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = run_recipe(project, "sphinx", monkeypatch)
    models = data / "06_models"
    # the second shard set: the same images with the template captioner's captions
    synthetic = json.loads((data / "05_model_input" / "shards" / "synthetic" / "shards.json").read_text())
    train = json.loads((data / "05_model_input" / "shards" / "train" / "shards.json").read_text())
    assert synthetic["n_samples"] == train["n_samples"]
    first = Path(data / "05_model_input" / "shards" / "synthetic" / synthetic["shards"][0]["name"])
    with tarfile.open(first) as tar:
        meta = json.loads(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".json"))).read())
    assert all(c.startswith("a photo of") for c in meta["captions"]["en"]) and len(meta["captions"]["en"]) == 2
    # stages name their data and init: real from fresh weights, three fine-tunes of it
    specs = {s: json.loads((models / s / "spec.json").read_text()) for s in ("real", "synthetic", "synthetic_b", "real_ft")}
    assert specs["real"]["init"] is None and specs["real"]["data"].endswith("shards/train")
    assert specs["synthetic"]["data"].endswith("shards/synthetic") and specs["synthetic_b"]["data"].endswith("shards/synthetic")
    assert specs["real_ft"]["data"].endswith("shards/train")
    assert all(specs[s]["init"].endswith("real/final.pt") for s in ("synthetic", "synthetic_b", "real_ft"))
    real = load_checkpoint(models / "real" / "final.pt")
    assert any(k.startswith("image_tower.backbones.convnet.") for k in real["model"])  # mixed encoders
    # the merge pair (real, synthetic), beta on validation; the soups of the three fine-tunes; the plot
    sweep = json.loads((data / "08_reporting" / "merge_sweep.json").read_text())
    assert (sweep["theta1"], sweep["theta2"]) == ("real", "synthetic")
    merged = load_checkpoint(models / "merged" / "merged.pt")
    assert merged["merge"]["sources"] == ["real", "synthetic"] and merged["merge"]["beta"] == sweep["best_beta"]
    report = json.loads((data / "08_reporting" / "soup_report.json").read_text())
    assert [i["name"] for i in report["ingredients"]] == ["synthetic", "synthetic_b", "real_ft"]
    kinds = {s["kind"]: s for s in report["soups"]}
    assert kinds["uniform"]["ingredients"] == ["synthetic", "synthetic_b", "real_ft"]
    assert kinds["greedy"]["score"] >= max(i["score"] for i in report["ingredients"])
    for kind in ("uniform", "greedy"):
        soup = load_checkpoint(models / "soups" / f"{kind}.pt")
        assert soup["merge"]["soup"] == kind and soup["merge"]["sources"] == kinds[kind]["ingredients"]
    assert (data / "08_reporting" / "merge_plot.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((data / "08_reporting" / "metrics.json").read_text())["model"]["merge_beta"] == sweep["best_beta"]


def test_a_stage_trains_on_a_weighted_mixture_of_shard_sets(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`data: {train_shards: 1, synthetic_shards: 2}`: the stage's mixture is written once as its own shard set."""
    import yaml

    conf = project / "conf" / "test" / "parameters_training.yml"
    params = yaml.safe_load(conf.read_text())
    params["training"]["recipes"]["mixture"] = {
        "synthetic": {"captioner": "template", "options": {"captions_per_image": 1}},
        "stages": [{"name": "real"}, {"name": "mixed", "data": {"train_shards": 1, "synthetic_shards": 2}}],
    }
    conf.write_text(yaml.safe_dump(params))
    data = run_recipe(project, "mixture", monkeypatch)
    shards = data / "05_model_input" / "shards"
    index = {name: json.loads((shards / name / "shards.json").read_text()) for name in ("train", "synthetic", "mixed_mixture")}
    assert index["mixed_mixture"]["n_samples"] == index["train"]["n_samples"] + 2 * index["synthetic"]["n_samples"]
    captions = []
    for shard in index["mixed_mixture"]["shards"]:
        with tarfile.open(shards / "mixed_mixture" / shard["name"]) as tar:
            captions += [c for m in tar.getmembers() if m.name.endswith(".json")
                         for c in json.loads(tar.extractfile(m).read())["captions"]["en"]]
    synthetic = [c for c in captions if c.startswith("a photo of")]
    assert len(synthetic) == 2 * index["synthetic"]["n_samples"] and len(captions) > len(synthetic)
    spec = json.loads((data / "06_models" / "mixed" / "spec.json").read_text())
    assert spec["data"].endswith("shards/mixed_mixture") and spec["init"].endswith("real/final.pt")
    assert load_checkpoint(data / "06_models" / "mixed" / "final.pt")["completed"]
