"""Each benchmark environment runs on a fixture in its published format, written where the environment's README
says the real files go (``data/01_raw/<name>/``) in a copied project.

Flickr30k and COCO-CN run the **whole default pipeline** (validation, shards, both training stages, the beta sweep,
evaluation, registration and the gate) at tiny size: the copied environment gets a few-step ``stage_defaults``, so
the documented commands (``kedro run --env flickr30k``, ``kedro run --env coco_cn``) cannot break unseen. COCO-CN's
captions are Chinese only: training, the merge sweep and evaluation follow the corpus's language. ImageNet is an
evaluation-only environment: it runs the ``evaluate`` pipeline on a tiny untrained checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import yaml
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from vlalign.data.fixtures import make_coco_cn_fixture, make_flickr30k_fixture, make_imagenet_fixture

from conftest import make_project, run_dir
from test_evaluate_pipeline import tiny_checkpoint


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    project = make_project(tmp_path)
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("KEDRO_ENV", raising=False)
    yield project
    mlflow.set_tracking_uri(None)


def run_env(project: Path, env: str, model_uri: str) -> dict:
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env=env, runtime_params={"model_uri": model_uri}) as session:
        session.run(pipeline_name="evaluate")
    out = run_dir(project, env) / "08_reporting" / "evaluate"
    assert (out / "report" / "report.html").exists()
    return json.loads((out / "metrics.json").read_text())


#: A few training steps per stage for the copied environment (the stage lists of the default recipe stay).
TINY_TRAINING = {"training": {"stage_defaults": {"max_steps": 2, "batch_size": 2, "warmup_steps": 1,
                                                 "checkpoint_every": 1, "log_every": 1}}}


def run_default(project: Path, env: str) -> Path:
    """The whole default pipeline in ``env`` (with tiny training); returns the run folder."""
    (project / "conf" / env / "parameters_zz_tiny_training.yml").write_text(yaml.safe_dump(TINY_TRAINING))
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env=env) as session:
        session.run()
    return run_dir(project, env)


@pytest.mark.slow
def test_flickr30k_karpathy_fixture_runs_the_default_pipeline(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEDRO_ENV", "flickr30k")
    fixture = make_flickr30k_fixture(project / "data" / "01_raw" / "flickr30k")
    out = run_default(project, "flickr30k")
    spec = json.loads((out / "06_models" / "stage2" / "spec.json").read_text())
    assert spec["stage"]["caption_langs"] == ["en"] and spec["stage"]["max_steps"] == 2
    assert (out / "06_models" / "merged" / "merged.pt").exists()
    assert json.loads((out / "08_reporting" / "merge_sweep.json").read_text())["lang"] == "en"
    metrics = json.loads((out / "08_reporting" / "metrics.json").read_text())
    retrieval = metrics["retrieval"]
    assert retrieval["dataset"] == "flickr30k" and retrieval["language"] == "en"
    assert retrieval["n_images"] == fixture["splits"]["test"]
    assert retrieval["n_captions"] == fixture["splits"]["test"] * 5
    assert "retrieval_zh" not in metrics
    records = sorted(p.name for p in (out / "08_reporting" / "clip_benchmark").glob("*.json"))
    assert "flickr30k_zeroshot_retrieval_en.json" in records
    registered = json.loads((out / "08_reporting" / "registered_model.json").read_text())
    assert registered["version"] == "1" and "flickr30k" in registered["name"]
    # the default run's outputs are untouched (there are none): the environment wrote under its own folder
    assert not (project / "data" / "06_models").exists()


@pytest.mark.slow
def test_coco_cn_fixture_runs_the_default_pipeline_in_chinese(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's COCO-CN command: Chinese training, merge sweep on Chinese validation captions, Chinese
    retrieval, ImageNet zero-shot with the Chinese class names and templates, registration."""
    monkeypatch.setenv("KEDRO_ENV", "coco_cn")
    fixture = make_coco_cn_fixture(project / "data" / "01_raw" / "coco_cn")
    make_imagenet_fixture(project / "data" / "01_raw" / "imagenet", layout="folder")
    out = run_default(project, "coco_cn")
    spec = json.loads((out / "06_models" / "stage1" / "spec.json").read_text())
    assert spec["stage"]["caption_langs"] == ["zh"] and spec["model"]["name"] == "tiny-vit-bert-zh"
    assert json.loads((out / "08_reporting" / "merge_sweep.json").read_text())["lang"] == "zh"
    metrics = json.loads((out / "08_reporting" / "metrics.json").read_text())
    retrieval = metrics["retrieval"]
    assert retrieval["dataset"] == "coco-cn" and retrieval["language"] == "zh"
    test_ids = fixture["splits"]["test"]
    assert retrieval["n_images"] == len(test_ids)
    assert retrieval["n_captions"] == sum(fixture["n_captions"][i] for i in test_ids)
    zero_shot = metrics["zero_shot"]
    assert zero_shot["language"] == "zh" and zero_shot["n_classes"] == 1000 and zero_shot["n_templates"] == 80
    assert json.loads((out / "08_reporting" / "registered_model.json").read_text())["version"] == "1"


@pytest.mark.slow
def test_imagenet_folder_fixture(project: Path) -> None:
    fixture = make_imagenet_fixture(project / "data" / "01_raw" / "imagenet", layout="folder")
    metrics = run_env(project, "imagenet", str(tiny_checkpoint(project / "tiny.pt")))
    zero_shot = metrics["zero_shot"]
    assert zero_shot["dataset"] == "imagenet-1k" and zero_shot["n_images"] == len(fixture["labels"])
    assert zero_shot["n_classes"] == 1000
    assert zero_shot["chance"]["acc1"] == pytest.approx(1 / 1000)
