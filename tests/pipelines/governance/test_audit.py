"""`vlalign audit` on a version registered by a real default run: it passes untouched (the retrain reproduces every
weight hash bit for bit), and each tampering (the data, the code, the commit, the registered weights) fails the
check it concerns, with a reason that says what differs."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from mlflow.utils.file_utils import local_file_uri_to_path
from PIL import Image

from vlalign.cli import main as vlalign_main
from vlalign.tracking.audit import AuditConfig, AuditError, audit, run_audit
from vlalign.train import load_checkpoint, save_checkpoint
from vlalign_pipelines.pipelines.audit.nodes import audit_model_version, enforce_audit

from conftest import git, run_pipeline

pytestmark = pytest.mark.slow


def statuses(report) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


def check(report, name: str):
    return next(c for c in report.checks if c.name == name)


@contextmanager
def restored(path: Path):
    """Put the file's bytes back afterwards."""
    original = path.read_bytes()
    try:
        yield path
    finally:
        path.write_bytes(original)


def stored_checkpoint(name: str, version: str) -> Path:
    """The checkpoint file the registry stores for a version (inside the logged model's artifacts)."""
    source = MlflowClient().get_model_version(name, version).source
    logged = mlflow.get_logged_model(source.rsplit("/", 1)[-1])
    found = list(Path(local_file_uri_to_path(logged.artifact_location)).rglob("model.pt"))
    assert len(found) == 1, found
    return found[0]


def test_untouched_version_passes_with_retrain_and_is_logged(governed: dict, tmp_path: Path) -> None:
    report = run_audit(AuditConfig(governed["uri"], repo=str(governed["project"]), retrain=True), out_dir=tmp_path)
    assert report.passed, "\n".join(report.lines())
    assert statuses(report) == {
        "commit": "pass", "code": "pass", "data:raw_data": "pass", "data:clean_manifest": "pass",
        "data:training_shards": "pass", "data:model.text.vocab": "pass", "weights": "pass", "evaluation_data": "pass",
        "metrics": "pass", "retrain:stage1": "pass", "retrain:stage2": "pass", "retrain:merged": "pass"}
    metrics = check(report, "metrics")
    assert metrics.details["max_abs_diff"] <= 1e-6 and metrics.details["n_metrics"] >= 20
    lineage = governed["registered"]["lineage"]
    for stage in ("stage1", "stage2"):
        assert check(report, f"retrain:{stage}").details["actual"] == lineage["outputs"][stage]["weights_sha256"]
    # The report: Markdown + JSON here, and logged to the version (tags + artifacts of its run).
    assert json.loads((tmp_path / "audit.json").read_text())["passed"] is True
    assert "| `retrain:merged` | PASS |" in (tmp_path / "audit.md").read_text()
    client = MlflowClient()
    version = client.get_model_version(report.name, str(report.version))
    assert version.tags["audit.passed"] == "true" and version.tags["audit.failed"] == "none"
    folder = version.tags["audit.report"].split("/", 2)[-1]
    assert sorted(a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(report.run_id, folder)) == ["audit.json", "audit.md"]


def test_audit_pipeline_and_command_line(governed: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_pipeline(governed["project"], "audit", params={"audit": {"model_uri": governed["uri"], "log_to_registry": False}})
    stored = json.loads((governed["data"] / "08_reporting" / "audit" / "audit.json").read_text())
    assert stored["passed"] and stored["checks"][-1] == {"name": "retrain", "status": "skip", "details": {},
                                                         "reason": stored["checks"][-1]["reason"]}
    assert "| `metrics` | PASS |" in (governed["data"] / "08_reporting" / "audit" / "audit.md").read_text()
    assert vlalign_main(["audit", governed["uri"], "--repo", str(governed["project"]), "--no-log", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "PASS metrics" in printed and "audit PASSED" in printed


def test_tampered_data_fails_naming_the_file(governed: dict, tmp_path: Path) -> None:
    manifest = pd.read_parquet(governed["data"] / "03_primary" / "clean_manifest.parquet")
    image = Path(manifest[manifest["split"] == "test"]["image_path"].iloc[0])
    with restored(image):
        picture = Image.open(image).convert("RGB")
        picture.putpixel((0, 0), (255, 0, 255))
        picture.save(image)
        report = audit(AuditConfig(governed["uri"], repo=str(governed["project"]), log_to_registry=False))
        assert vlalign_main(["audit", governed["uri"], "--repo", str(governed["project"]), "--no-log"]) == 2
        # The Kedro audit pipeline's last node fails the run with the same reasons.
        record, _ = audit_model_version({"model_uri": governed["uri"], "repo": str(governed["project"]),
                                         "log_to_registry": False})
        with pytest.raises(AuditError, match=r"data:raw_data: .*changed 1: flickr_demo/images/"):
            enforce_audit(record)
    assert not report.passed and [c.name for c in report.failed] == ["data:raw_data"]
    reason = check(report, "data:raw_data").reason
    assert "changed 1: flickr_demo/images/" + image.name in reason and "no DVC repository" in reason
    assert statuses(report)["evaluation_data"] == "skip" and statuses(report)["metrics"] == "skip"


def test_tampered_code_and_missing_commit_fail(governed: dict, tmp_path: Path) -> None:
    source = governed["project"] / "src" / "vlalign" / "eval" / "retrieval.py"
    with restored(source):
        source.write_text(source.read_text() + "# tampered after registration\n")
        report = audit(AuditConfig(governed["uri"], repo=str(governed["project"]), log_to_registry=False))
    assert [c.name for c in report.failed] == ["code"]
    assert "src/vlalign/eval/retrieval.py (+1 -0 lines against the commit, unchanged at registration)" in check(report, "code").reason
    # A new untracked file in conf/ is code too.
    extra = governed["project"] / "conf" / "test" / "parameters_extra.yml"
    extra.write_text("extra: 1\n")
    try:
        report = audit(AuditConfig(governed["uri"], repo=str(governed["project"]), log_to_registry=False))
    finally:
        extra.unlink()
    assert "conf/test/parameters_extra.yml (+1 -0" in check(report, "code").reason
    # A repository without the recorded commit.
    other = tmp_path / "other"
    other.mkdir()
    git(other, "init", "-q")
    git(other, "commit", "-q", "--allow-empty", "-m", "unrelated")
    commit = governed["registered"]["lineage"]["git"]["commit"]
    report = audit(AuditConfig(governed["uri"], repo=str(other), log_to_registry=False))
    assert check(report, "commit").status == "fail"
    assert f"commit {commit[:12]} (branch master) is not in the repository at {other}" in check(report, "commit").reason
    assert check(report, "code").status == "skip"


def test_tampered_weights_fail(governed: dict) -> None:
    name, version = governed["registered"]["name"], governed["registered"]["version"]
    stored = stored_checkpoint(name, version)
    with restored(stored):
        ckpt = load_checkpoint(stored)
        key = next(k for k in ckpt["model"] if k.startswith("text_proj") and k.endswith("weight"))
        ckpt["model"][key] = torch.zeros_like(ckpt["model"][key])  # every text embeds the same: retrieval collapses
        save_checkpoint(ckpt, stored)
        report = audit(AuditConfig(governed["uri"], repo=str(governed["project"]), log_to_registry=False))
    assert [c.name for c in report.failed] == ["weights", "metrics"]
    recorded = governed["registered"]["lineage"]["outputs"]["registered"]["weights_sha256"]
    weights = check(report, "weights").reason
    assert f"lineage outputs.registered = {recorded[:12]}" in weights and "the file's md5 is" in weights
    assert "metrics differ by more than 1e-06: retrieval." in check(report, "metrics").reason
