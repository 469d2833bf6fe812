"""The gate against a real MLflow tracking server: aliases, tags, the decision artifact, racing registrations,
and what makes runs comparable in the UI (flat params, per-step metrics, datasets as run inputs)."""

from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from vlalign.errors import RegistryError
from vlalign.tracking.mlflow import StageRunLogger, log_dataset_input
from vlalign.tracking.registry import (
    TAG_EVAL_DATASETS,
    TAG_EVAL_METRICS,
    TAG_EVAL_SHA256,
    GateConfig,
    apply_gate,
    read_versions,
    reconcile,
    register_version,
    withdraw,
)

GATE = GateConfig.from_dict({"primary": [{"metric": "retrieval.mean_recall", "min_improvement": 0.01}],
                             "guards": [{"metric": "zero_shot.acc1", "max_drop": 0.05}],
                             "tie_breakers": ["zero_shot.acc1"]})
DATA = "d" * 64


def new_version(client: MlflowClient, name: str, recall: float, acc: float = 0.5, data: str = DATA) -> int:
    """A version whose source is a small artifact of its own run, created with the tags the gate reads."""
    experiment = client.get_experiment_by_name("gate-tests") or client.get_experiment(client.create_experiment("gate-tests"))
    run = client.create_run(experiment.experiment_id)
    client.log_dict(run.info.run_id, {"recall": recall}, "model/weights.json")
    client.set_terminated(run.info.run_id)
    tags = {TAG_EVAL_SHA256: data, TAG_EVAL_DATASETS: f"retrieval=set-{data[:4]}",
            TAG_EVAL_METRICS: json.dumps({"retrieval.mean_recall": recall, "zero_shot.acc1": acc})}
    mv = register_version(f"{run.info.artifact_uri}/model", name, tags, run_id=run.info.run_id, client=client)
    return int(mv.version)


def aliases(client: MlflowClient, name: str) -> dict[str, int]:
    return {k: int(v) for k, v in client.get_registered_model(name).aliases.items()}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_gate_sets_aliases_tags_and_decision_artifact(server_uri: str) -> None:
    client = MlflowClient(server_uri)
    name = unique("gate")
    first = apply_gate(name, new_version(client, name, 0.30), GATE, client)
    assert first["outcome"] == "promote" and first["champion"] == 1 and first["challenger"] == 1
    assert aliases(client, name) == {"champion": 1, "challenger": 1}

    worse = apply_gate(name, new_version(client, name, 0.25, acc=0.9), GATE, client)
    assert worse["outcome"] == "keep" and not worse["passed"] and worse["champion_version"] == 1
    assert aliases(client, name) == {"champion": 1, "challenger": 2}  # a worse challenger is never promoted

    better = apply_gate(name, new_version(client, name, 0.40, acc=0.48), GATE, client)
    assert better["passed"] and aliases(client, name) == {"champion": 3, "challenger": 3}

    tied = apply_gate(name, new_version(client, name, 0.40, acc=0.47), GATE, client)  # tie, tie-breaker worse
    assert tied["tie"] and tied["outcome"] == "keep" and aliases(client, name)["champion"] == 3

    version = client.get_model_version(name, "3")
    assert version.tags["gate.outcome"] == "promote" and version.tags["gate.passed"] == "true"
    assert version.tags["gate.compared_with"] == "1"
    assert version.tags["gate.delta.retrieval.mean_recall"] == "+0.1"
    assert version.tags["gate.config_sha256"] == GATE.sha256()
    path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="gate/decision-v3.json")
    with open(path, encoding="utf-8") as handle:
        artifact = json.load(handle)
    assert artifact == json.loads(json.dumps(better))
    assert [d["metric"] for d in artifact["deltas"]] == ["retrieval.mean_recall", "zero_shot.acc1", "zero_shot.acc1"]
    assert client.get_model_version(name, "2").tags["gate.outcome"] == "keep"


def test_version_evaluated_on_other_data_is_refused(server_uri: str) -> None:
    client = MlflowClient(server_uri)
    name = unique("data")
    apply_gate(name, new_version(client, name, 0.30), GATE, client)
    refused = apply_gate(name, new_version(client, name, 0.90, data="f" * 64), GATE, client)
    assert refused["outcome"] == "refuse" and aliases(client, name) == {"champion": 1, "challenger": 2}
    assert DATA in refused["reason"] and "f" * 64 in refused["reason"] and "set-dddd" in refused["reason"]
    assert client.get_model_version(name, "2").tags["gate.outcome"] == "refuse"


def test_withdrawing_the_champion_rolls_back(server_uri: str) -> None:
    client = MlflowClient(server_uri)
    name = unique("rollback")
    for recall in (0.30, 0.40, 0.50):
        apply_gate(name, new_version(client, name, recall), GATE, client)
    assert aliases(client, name)["champion"] == 3
    result = withdraw(name, 3, "labels leaked into the test split", GATE, client)
    assert result.plan.champion == 2 and aliases(client, name) == {"champion": 2, "challenger": 2}
    assert [v.withdrawn for v in read_versions(name, client)] == [None, None, "labels leaked into the test split"]


@pytest.mark.parametrize(("with_champion", "recalls"), [(True, (0.35, 0.40)), (True, (0.40, 0.35)),
                                                        (False, (0.35, 0.40)), (False, (0.40, 0.35))])
def test_concurrent_registrations_converge_on_the_better_one(server_uri: str, with_champion: bool, recalls: tuple) -> None:
    """Two registrations at once (also the very first two, which race to create the registered model): both
    get versions; the better one ends champion, the newest challenger."""
    client = MlflowClient(server_uri)
    name = unique("race")
    if with_champion:
        apply_gate(name, new_version(client, name, 0.30), GATE, client)
    barrier = threading.Barrier(2)

    def register(recall: float) -> dict:
        own = MlflowClient(server_uri)
        barrier.wait()
        return apply_gate(name, new_version(own, name, recall), GATE, own)

    with ThreadPoolExecutor(2) as pool:
        records = list(pool.map(register, recalls))
    versions = sorted(r["version"] for r in records)
    assert versions == ([2, 3] if with_champion else [1, 2])  # both registered, distinct numbers
    best = next(r["version"] for r, recall in zip(records, recalls) if recall == 0.40)
    assert aliases(client, name) == {"champion": best, "challenger": versions[-1]}
    assert all(r["converged"] for r in records)


def test_stale_alias_write_is_corrected(server_uri: str) -> None:
    """Force the bad interleaving: A plans from {v1, v2}; B registers v3 and finishes; then A writes its stale
    champion. A's re-listing sees v3 and writes the right champion again. With one round only, A would
    leave the stale alias behind, which is what the re-listing exists for."""
    for rounds, expected in ((1, 2), (20, 3)):
        client = MlflowClient(server_uri)
        name = unique(f"stale{rounds}")
        apply_gate(name, new_version(client, name, 0.30), GATE, client)
        planned, release = threading.Event(), threading.Event()

        def hold_first_write(plan, calls=[]) -> None:  # noqa: B006 - counts calls of this closure only
            calls.append(plan)
            if len(calls) == 1:
                planned.set()
                assert release.wait(60)

        def slow_a() -> dict:
            own = MlflowClient(server_uri)
            return apply_gate(name, new_version(own, name, 0.35), GATE, own, before_write=hold_first_write,
                              max_rounds=rounds)

        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(slow_a)
            assert planned.wait(60)
            b = apply_gate(name, new_version(client, name, 0.40), GATE, client)  # B: v3, beats v2, done
            assert b["champion"] == 3 and aliases(client, name)["champion"] == 3
            release.set()
            a = future.result(timeout=60)
        assert aliases(client, name)["champion"] == expected
        assert a["converged"] is (rounds > 1) and a["rounds"] == min(rounds, 2)


def test_reconcile_is_idempotent(server_uri: str) -> None:
    client = MlflowClient(server_uri)
    name = unique("idem")
    for recall in (0.30, 0.28, 0.45):
        new_version(client, name, recall)
    first = reconcile(name, GATE, client)
    second = reconcile(name, GATE, client)
    assert first.plan.champion == second.plan.champion == 3 and second.rounds == 1 and second.converged


# ------------------------------------------------------------------------------------------------
# Runs comparable in the UI
# ------------------------------------------------------------------------------------------------


def test_stage_runs_have_flat_params_per_step_metrics_and_dataset_inputs(server_uri: str) -> None:
    client = MlflowClient(server_uri)
    mlflow.set_experiment("ui-tests")
    frame = pd.DataFrame({"image_id": ["0", "1"], "caption": ["a red circle", "a blue square"], "split": ["train", "test"]})
    with mlflow.start_run() as parent:
        log_dataset_input(frame, "clean_manifest", "training", digest="0123456789abcdef0123456789abcdef-extra",
                          source="data/03_primary/clean_manifest.parquet")
        params = {"model": {"name": "tiny", "image": {"image_size": 64, "mean": [0.5, 0.5, 0.5]}},
                  "stage": {"name": "stage1", "lr": 0.001, "trainable": ["image_proj", "text_proj"]}}
        with StageRunLogger("stage1", params=params, flush_every=2) as logger:
            for step in range(5):
                logger.on_step(step, {"loss": 1.0 / (step + 1), "lr": 0.001})
    stage = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")[0]
    assert stage.data.params["model.image.image_size"] == "64"
    assert stage.data.params["model.image.mean"] == "[0.5, 0.5, 0.5]"
    assert stage.data.params["stage.trainable"] == "['image_proj', 'text_proj']"
    assert [m.step for m in client.get_metric_history(stage.info.run_id, "loss")] == [0, 1, 2, 3, 4]
    inputs = client.get_run(parent.info.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    assert dataset.name == "clean_manifest" and dataset.digest == "0123456789abcdef0123456789abcdef"
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"
    assert json.loads(dataset.profile)["num_rows"] == 2


def test_gate_on_a_missing_version_says_so(server_uri: str) -> None:
    client = MlflowClient(server_uri)
    name = unique("missing")
    new_version(client, name, 0.3)
    with pytest.raises(RegistryError, match=f"registered model '{name}' has no version 7"):
        apply_gate(name, 7, GATE, client)
