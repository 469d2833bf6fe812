"""The ``evaluate`` pipeline through a real ``KedroSession``: a checkpoint path, then a registered model version.

The project (pyproject.toml + conf/) is copied into a temporary folder, as in the end-to-end test; the
model is a freshly initialised tiny model (no training): the test checks wiring and output shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from vlalign.models import build_model, get_model_config
from vlalign.tracking.mlflow import load_checkpoint_from_uri, png_bytes, register_model
from vlalign.train import StageConfig, save_checkpoint
from vlalign.train.checkpoint import FORMAT
from vlalign_pipelines.pipeline_registry import register_pipelines

from conftest import run_dir

REPO = Path(__file__).resolve().parents[3]
RECORDS = [
    "demo-flickr_image_caption_selection_en.json",
    "demo-flickr_zeroshot_retrieval_en.json",
    "demo-flickr_zeroshot_retrieval_zh.json",
    "demo-imagenet_zeroshot_classification_en.json",
]


def run_evaluate(project: Path, model_uri: str | None) -> None:
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env="test", runtime_params={"model_uri": model_uri}) as session:
        session.run(pipeline_name="evaluate")


def tiny_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    cfg = get_model_config("tiny-vit-bert")
    model = build_model(cfg, load_pretrained=False)
    ckpt = {"format": FORMAT, "model_config": cfg.to_dict(), "stage_config": StageConfig(name="tiny").to_dict(),
            "model": model.state_dict(), "step": 0, "completed": True}
    return save_checkpoint(ckpt, path)


def check_outputs(project: Path, source: str) -> dict:
    out = run_dir(project, "test") / "08_reporting" / "evaluate"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["source"] == source and metrics["model"]["name"] == "tiny-vit-bert"
    assert {"retrieval", "retrieval_zh", "zero_shot", "compositional"} <= set(metrics)
    assert metrics["retrieval_zh"]["language"] == "zh" and metrics["retrieval_zh"]["n_captions"] == 16 * 2
    assert set(metrics["compositional"]["chance"].values()) == {0.5}
    assert (out / "report" / "report.md").exists() and (out / "report" / "report.html").exists()
    assert sorted(p.name for p in (out / "clip_benchmark").glob("*.json")) == RECORDS
    for name in RECORDS:
        record = json.loads((out / "clip_benchmark" / name).read_text())
        assert set(record) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
        assert name == f"{record['dataset']}_{record['task']}_{record['language']}.json"
        assert record["model"] == "tiny-vit-bert" and record["pretrained"] == source
        assert all(isinstance(v, float) for v in record["metrics"].values())
    # the default pipeline's outputs are untouched
    assert not (run_dir(project, "test") / "08_reporting" / "metrics.json").exists()
    assert not (run_dir(project, "test") / "08_reporting" / "clip_benchmark").exists()
    return metrics


def test_evaluate_is_not_part_of_the_default_pipeline() -> None:
    bootstrap_project(REPO)
    pipelines = register_pipelines()
    assert "evaluate" in pipelines
    default_nodes = {n.name for n in pipelines["__default__"].nodes}
    assert not {n.name for n in pipelines["evaluate"].nodes if n.name.startswith("evaluate.")} & default_nodes


@pytest.mark.slow
def test_evaluate_a_checkpoint_path_then_a_registered_version(project: Path, tmp_path: Path) -> None:
    ckpt_path = tiny_checkpoint(tmp_path / "tiny.pt")

    run_evaluate(project, str(ckpt_path))
    by_path = check_outputs(project, str(ckpt_path))

    image = next((project / "data" / "01_raw" / "demo_test" / "flickr_demo" / "images").glob("*.png"))
    record = register_model(ckpt_path, "vlalign-clip", png_bytes(image, [image.parent]))
    assert record["model_uri"] == "models:/vlalign-clip/1"
    loaded = load_checkpoint_from_uri("models:/vlalign-clip/1")
    original = torch.load(ckpt_path, weights_only=True)
    assert all(torch.equal(loaded["model"][k], original["model"][k]) for k in original["model"])

    run_evaluate(project, "models:/vlalign-clip/1")
    by_uri = check_outputs(project, "models:/vlalign-clip/1")
    # the same weights give the same numbers, whichever way they were named
    for block in ("retrieval", "retrieval_zh", "zero_shot", "compositional"):
        assert by_uri[block]["metrics"] == pytest.approx(by_path[block]["metrics"])


@pytest.mark.slow
def test_evaluate_without_a_model_uri_says_how_to_give_one(project: Path) -> None:
    with pytest.raises(Exception, match="model_uri"):
        run_evaluate(project, None)
