"""Each benchmark environment runs the full ``evaluate`` pipeline on a fixture in its published format.

A fixture is written where the environment's README says the real files go (``data/01_raw/<name>/``) in a
copied project; the model is a tiny untrained checkpoint: the test checks that every format flows through
validation, retrieval / zero-shot evaluation, the report and the CLIP_benchmark records.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
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


@pytest.mark.slow
def test_flickr30k_karpathy_fixture(project: Path) -> None:
    fixture = make_flickr30k_fixture(project / "data" / "01_raw" / "flickr30k")
    metrics = run_env(project, "flickr30k", str(tiny_checkpoint(project / "tiny.pt")))
    retrieval = metrics["retrieval"]
    assert retrieval["dataset"] == "flickr30k" and retrieval["language"] == "en"
    assert retrieval["n_images"] == fixture["splits"]["test"]
    assert retrieval["n_captions"] == fixture["splits"]["test"] * 5
    assert "retrieval_zh" not in metrics
    records = sorted(p.name for p in (run_dir(project, "flickr30k") / "08_reporting/evaluate/clip_benchmark").glob("*.json"))
    assert "flickr30k_zeroshot_retrieval_en.json" in records


@pytest.mark.slow
def test_coco_cn_fixture_with_chinese_imagenet(project: Path) -> None:
    fixture = make_coco_cn_fixture(project / "data" / "01_raw" / "coco_cn")
    make_imagenet_fixture(project / "data" / "01_raw" / "imagenet", layout="folder")
    metrics = run_env(project, "coco_cn", str(tiny_checkpoint(project / "tiny.pt")))
    retrieval = metrics["retrieval"]
    assert retrieval["dataset"] == "coco-cn" and retrieval["language"] == "zh"
    test_ids = fixture["splits"]["test"]
    assert retrieval["n_images"] == len(test_ids)
    assert retrieval["n_captions"] == sum(fixture["n_captions"][i] for i in test_ids)
    zero_shot = metrics["zero_shot"]
    assert zero_shot["language"] == "zh" and zero_shot["n_classes"] == 1000 and zero_shot["n_templates"] == 80


@pytest.mark.slow
def test_imagenet_folder_fixture(project: Path) -> None:
    fixture = make_imagenet_fixture(project / "data" / "01_raw" / "imagenet", layout="folder")
    metrics = run_env(project, "imagenet", str(tiny_checkpoint(project / "tiny.pt")))
    zero_shot = metrics["zero_shot"]
    assert zero_shot["dataset"] == "imagenet-1k" and zero_shot["n_images"] == len(fixture["labels"])
    assert zero_shot["n_classes"] == 1000
    assert zero_shot["chance"]["acc1"] == pytest.approx(1 / 1000)
