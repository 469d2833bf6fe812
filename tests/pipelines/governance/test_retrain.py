"""The retrain pipeline after a real default run: nothing changed -> nothing trained, nothing registered, and it
says so; a changed configuration -> trained (from the champion), registered, and a failed gate leaves the champion
in place and says why; the same change again -> not trained twice; the retrained version passes `vlalign audit
--retrain` (its first stage started from the champion's checkpoint, a recorded input)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vlalign.tracking.audit import AuditConfig, audit
from vlalign.tracking.hashing import dvc_hash

from conftest import run_pipeline

pytestmark = pytest.mark.slow

#: A change of configuration (every stage's seed) and a gate no challenger can pass.
CHANGED = {"training": {"stage_defaults": {"seed": 1}}, "retrain": {"init": "champion"},
           "registration": {"gate": {"primary": [{"metric": "retrieval.mean_recall", "min_improvement": 1.0}]}}}


def versions(name: str) -> list[int]:
    return sorted(int(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'"))


def stage_runs() -> int:
    client = MlflowClient()
    experiment = client.get_experiment_by_name("vlalign")
    return sum(1 for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("vlalign.stage"))


def aliases(name: str) -> dict[str, int]:
    return {k: int(v) for k, v in MlflowClient().get_registered_model(name).aliases.items()}


def test_retrain(governed: dict) -> None:
    project, data, name = governed["project"], governed["data"], governed["registered"]["name"]
    plan_file, summary_file = data / "08_reporting" / "retrain" / "plan.json", data / "08_reporting" / "retrain" / "summary.json"
    assert versions(name) == [1]
    runs_before = stage_runs()

    # 1. Nothing changed since the champion (v1) was trained: nothing is trained or registered, and the plan says so.
    run_pipeline(project, "retrain")
    plan = json.loads(plan_file.read_text())
    assert plan["run"] is False and plan["champion"]["version"] == 1
    assert plan["reason"].startswith(f"nothing changed since champion v1 of {name} was trained")
    assert "nothing to train, nothing registered" in plan["reason"]
    assert plan["inputs"]["clean_manifest"] == governed["registered"]["lineage"]["inputs"]["clean_manifest"]["md5"]
    assert versions(name) == [1] and stage_runs() == runs_before and not summary_file.exists()

    # 2. The configuration changed: trained from the champion, registered as v2; the gate fails, v1 stays champion.
    run_pipeline(project, "retrain", params=CHANGED)
    plan = json.loads(plan_file.read_text())
    assert plan["run"] is True and "training.stages.stage1.seed: 0 -> 1" in plan["reason"]
    assert versions(name) == [1, 2] and stage_runs() == runs_before + 2
    summary = json.loads(summary_file.read_text())
    assert summary["registered_version"] == 2 and summary["outcome"] == "keep" and summary["champion"] == 1
    assert "below min_improvement 1" in summary["reason"] or "worse" in summary["reason"]
    assert aliases(name) == {"champion": 1, "challenger": 2}
    decision = json.loads((data / "08_reporting" / "gate_decision.json").read_text())
    assert decision["version"] == 2 and decision["passed"] is False
    # v2's lineage: the champion checkpoint it started from is an input, stage1's recorded spec starts from it.
    lineage = json.loads((data / "08_reporting" / "registered_model.json").read_text())["lineage"]
    init = lineage["inputs"]["init_checkpoint"]
    assert init["md5"] == governed["registered"]["lineage"]["outputs"]["registered"]["md5"]
    assert lineage["stages"]["stage1"]["init"] == init["path"] and lineage["stages"]["stage1"]["stage"]["seed"] == 1
    assert lineage["params"]["retrain"]["started_from"] == f"models:/{name}/1"

    # 3. The same change again: v2 was trained on exactly this and lost, so nothing is trained twice.
    run_pipeline(project, "retrain", params=CHANGED)
    plan = json.loads(plan_file.read_text())
    assert plan["run"] is False and plan["challenger"]["version"] == 2
    assert "but v2 was already trained on exactly this data and configuration" in plan["reason"]
    assert versions(name) == [1, 2] and stage_runs() == runs_before + 2

    # 4. The retrained version is reproducible: its stages retrain bit for bit from the recorded inputs.
    report = audit(AuditConfig(f"models:/{name}/2", repo=str(project), retrain=True, log_to_registry=False))
    assert report.passed, "\n".join(report.lines())
    assert {c.name for c in report.checks} >= {"data:init_checkpoint", "retrain:stage1", "retrain:stage2", "retrain:merged"}
    assert dvc_hash(Path(project) / init["path"])["md5"] == init["md5"]
