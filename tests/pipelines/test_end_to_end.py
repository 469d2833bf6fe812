"""One real ``KedroSession`` run of the whole default pipeline on a tiny generated dataset.

The project (pyproject.toml + conf/) is copied into a temporary folder so the run writes its data
layers, checkpoints and MLflow store there, never into the working tree.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from mlflow.tracking import MlflowClient

from vlalign.train import load_checkpoint

from conftest import run_dir


def run_session(project: Path, pipeline: str | None = None) -> None:
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env="test") as session:
        session.run(pipeline_name=pipeline)


@pytest.mark.slow
def test_default_pipeline_end_to_end(project: Path) -> None:
    run_session(project)

    data = run_dir(project, "test")
    assert data == project / "data" / "runs" / "test" / "default"
    # Validation: every raw row is either clean or quarantined, and Data Docs were written.
    report = json.loads((data / "08_reporting" / "validation_report.json").read_text())
    clean = pd.read_parquet(data / "03_primary" / "clean_manifest.parquet")
    quarantine = pd.read_csv(data / "04_quarantine" / "quarantine.csv")
    assert len(clean) + len(quarantine) == report["n_rows"]
    assert len(quarantine) == 0
    assert list((data / "08_reporting" / "data_docs").rglob("index.html"))

    # Training: the training rows as shards, one stage folder each (spec, final checkpoint written once), stage 2
    # started from stage 1.
    shards = json.loads((data / "05_model_input" / "shards" / "train" / "shards.json").read_text())
    assert shards["n_samples"] == clean[clean["split"] == "train"]["image_id"].nunique()
    for stage in ("stage1", "stage2"):
        assert (data / "06_models" / stage / "final.pt").exists()
        spec = json.loads((data / "06_models" / stage / "spec.json").read_text())
        assert spec["data"].endswith("05_model_input/shards/train") and spec["stage"]["caption_langs"] == ["en", "zh"]
    assert json.loads((data / "06_models" / "stage2" / "spec.json").read_text())["init"].endswith("stage1/final.pt")

    # Merge: the sweep tried every beta and kept the best one.
    sweep = json.loads((data / "08_reporting" / "merge_sweep.json").read_text())
    assert [row["beta"] for row in sweep["scores"]] == [0.0, 0.5, 1.0]
    assert sweep["best_score"] == max(row["score"] for row in sweep["scores"])

    # Evaluation: every metric has its chance level beside it.
    metrics = json.loads((data / "08_reporting" / "metrics.json").read_text())
    retrieval = metrics["retrieval"]
    for k in (1, 5, 10):
        for direction in ("image_retrieval_recall", "text_retrieval_recall"):
            name = f"{direction}@{k}"
            assert 0.0 <= retrieval["metrics"][name] <= 1.0
            assert 0.0 < retrieval["chance"][name] <= 1.0
    assert retrieval["n_images"] == 16 and retrieval["n_captions"] == 16 * 5
    assert set(metrics["zero_shot"]["metrics"]) >= {"acc1", "acc5", "mean_per_class_recall"}
    # Chinese retrieval on the same test images (COCO-CN protocol: 2 captions per image).
    retrieval_zh = metrics["retrieval_zh"]
    assert retrieval_zh["language"] == "zh"
    assert retrieval_zh["n_images"] == 16 and retrieval_zh["n_captions"] == 16 * 2
    assert set(retrieval_zh["metrics"]) == set(retrieval["metrics"])
    # Compositional probe: one pair per test image, chance 0.5 for every metric.
    compositional = metrics["compositional"]
    assert compositional["n_pairs"] == 16
    assert {"compositional_accuracy", "compositional_accuracy/colour", "compositional_accuracy/shape",
            "compositional_accuracy/position"} <= set(compositional["metrics"])
    assert all(0.0 <= v <= 1.0 for v in compositional["metrics"].values())
    assert set(compositional["chance"].values()) == {0.5}
    report_md = (data / "08_reporting" / "report" / "report.md").read_text(encoding="utf-8")
    assert "retrieval (zh, test)" in report_md and "compositional probe" in report_md
    # CLIP_benchmark result files, one per task and language.
    bench = data / "08_reporting" / "clip_benchmark"
    assert sorted(p.name for p in bench.glob("*.json")) == [
        "demo-flickr_image_caption_selection_en.json", "demo-flickr_zeroshot_retrieval_en.json",
        "demo-flickr_zeroshot_retrieval_zh.json", "demo-imagenet_zeroshot_classification_en.json",
    ]
    record = json.loads((bench / "demo-flickr_zeroshot_retrieval_zh.json").read_text())
    assert set(record) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert record["task"] == "zeroshot_retrieval" and record["language"] == "zh"
    assert record["metrics"] == retrieval_zh["metrics"]

    # MLflow: one parent run with a nested run per stage, and a registered model version that embeds.
    client = MlflowClient()
    experiment = client.get_experiment_by_name("vlalign")
    runs = client.search_runs([experiment.experiment_id])
    stage_runs = [r for r in runs if r.data.tags.get("vlalign.stage") in ("stage1", "stage2")]
    assert len(stage_runs) == 2
    parents = {r.data.tags.get("mlflow.parentRunId") for r in stage_runs}
    assert len(parents) == 1 and None not in parents
    assert client.get_metric_history(stage_runs[0].info.run_id, "loss")
    registered = json.loads((data / "08_reporting" / "registered_model.json").read_text())
    assert registered["name"] == "vlalign-tiny-vit-bert-demo-flickr_demo-imagenet"  # model family + evaluated datasets
    version = client.get_model_version(registered["name"], registered["version"])
    lineage = registered["lineage"]
    assert version.tags["training_manifest_sha256"] == lineage["training_data"]["manifest_sha256"]
    # Lineage of the default run: DVC hashes of the inputs, every output checkpoint, the evaluated data.
    assert version.tags["eval.data_sha256"] == metrics["evaluation_data"]["sha256"] == lineage["evaluation_data"]["sha256"]
    assert set(metrics["evaluation_data"]["blocks"]) == {"retrieval", "retrieval_zh", "zero_shot", "compositional"}
    assert lineage["inputs"]["raw_data"]["md5"].endswith(".dir") and lineage["inputs"]["clean_manifest"]["md5"]
    assert version.tags["input.clean_manifest.md5"] == lineage["inputs"]["clean_manifest"]["md5"]
    assert set(lineage["outputs"]) == {"stage1", "stage2", "merged", "registered"}
    assert lineage["outputs"]["merged"]["weights_sha256"] == lineage["outputs"]["registered"]["weights_sha256"]
    assert lineage["seeds"]["training.stages.stage1.seed"] == 0 and lineage["training_data"]["images_outside_inputs"] == 0
    # The gate: the first version becomes champion and challenger, the decision is saved and tagged.
    decision = json.loads((data / "08_reporting" / "gate_decision.json").read_text())
    assert decision["outcome"] == "promote" and decision["champion"] == int(registered["version"])
    assert {k: int(v) for k, v in client.get_registered_model(registered["name"]).aliases.items()} == \
        {"champion": int(registered["version"]), "challenger": int(registered["version"])}
    assert version.tags["gate.outcome"] == "promote"

    model = mlflow.pyfunc.load_model(registered["model_uri"])
    image_path = clean[clean["split"] == "test"]["image_path"].iloc[0]
    frame = pd.DataFrame({"text": ["a red circle", None], "image": [None, Path(image_path).read_bytes()]})
    embeddings = model.predict(frame)
    assert embeddings.shape == (2, registered["embedding_dim"])
    assert abs(float((embeddings[0] ** 2).sum()) - 1.0) < 1e-4


@pytest.mark.slow
def test_rerun_resumes_and_reuses_finished_stages(project: Path) -> None:
    """Running training again with the same inputs reuses each stage's completed checkpoint, untouched."""
    run_session(project, "validation")
    run_session(project, "training")
    models = run_dir(project, "test") / "06_models"
    stored = {s: models / s / "final.pt" for s in ("stage1", "stage2")}
    written = {s: path.stat().st_mtime_ns for s, path in stored.items()}
    first = load_checkpoint(models / "stage2" / "final.pt")
    run_session(project, "training")
    assert {s: path.stat().st_mtime_ns for s, path in stored.items()} == written  # no stage trained again
    second = load_checkpoint(models / "stage2" / "final.pt")
    assert all(torch.equal(first["model"][k], second["model"][k]) for k in first["model"])
