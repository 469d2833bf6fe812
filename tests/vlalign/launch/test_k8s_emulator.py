"""run_stage_on_kubernetes against a loopback Kubernetes API (kmock), with the real kubernetes client.

The fake controllers of k8s_fake_cluster.py play each scenario through the API: success, a failing rank, an image
that cannot be pulled, an unschedulable pod, a hanging job (timeout), node loss then success, node loss every time,
Kueue admission, a TrainJob, and object storage. No real cluster runs here.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import kmock
import pytest
import yaml

from conftest import REPO, fast_config
from k8s_fake_cluster import (
    NAMESPACE,
    FakeCluster,
    Run,
    fail_rank,
    hang,
    image_pull_error,
    lose_node,
    succeed,
    unschedulable,
)
from vlalign.errors import ConfigError, KubernetesJobError
from vlalign.launch.config import StorageConfig
from vlalign.launch.k8s import run_stage_on_kubernetes
from vlalign.train.spec import TrainSpec


def _spec(shared: Path, name: str = "stage1", **fields) -> TrainSpec:
    values = dict(
        model={"name": "tiny-vit-bert"},
        stage={"name": name, "epochs": 1},
        data=str(shared / "03_primary" / "clean_manifest.parquet"),
        out_dir=str(shared / "06_models" / name),
        init=None,
        mlflow=None,
    )
    values.update(fields)
    return TrainSpec(**values)


class Echo(list):
    """Collects what the launcher prints."""

    def __call__(self, line: str) -> None:
        self.append(line)

    @property
    def text(self) -> str:
        return "\n".join(self)


def _exists(cluster: FakeCluster, kind: str, name: str) -> bool:
    api = {"Job": cluster.batch.read_namespaced_job, "Service": cluster.core.read_namespaced_service,
           "ConfigMap": cluster.core.read_namespaced_config_map}[kind]
    try:
        api(name, NAMESPACE, _preload_content=False)
        return True
    except Exception:  # noqa: BLE001 - 404
        return False


def test_success_returns_final_checkpoint(cluster, podtemplate, launcher_client, shared):
    cluster.scenarios = [succeed]
    echo = Echo()
    final = run_stage_on_kubernetes(_spec(shared), fast_config(shared, nnodes=2), api_client=launcher_client, echo=echo)

    assert final == shared / "06_models" / "stage1" / "final.pt"
    assert final.read_bytes() == b"final weights"
    (run,) = cluster.runs
    assert run.kind == "Job" and run.name.startswith("vlalign-stage1-") and run.name.endswith("-r0")
    # the pods ran torchrun with static rendezvous: rank from the completion index, master = pod 0's DNS name
    assert [p.env["PET_NODE_RANK"] for p in run.pods] == ["0", "1"]
    assert {p.env["PET_MASTER_ADDR"] for p in run.pods} == {f"{run.name}-0.{run.name}"}
    # ... reading the pod-side spec the launcher wrote to the shared volume (paths as the pods see them)
    pod_spec = json.loads((shared / "06_models" / "stage1" / "k8s-spec.json").read_text())
    assert pod_spec["out_dir"] == "/app/data/06_models/stage1"
    assert pod_spec["data"] == "/app/data/03_primary/clean_manifest.parquet"
    # pod phases and rank 0's log, each new log line once
    assert any("rank 0 Running, rank 1 Running" in line for line in echo), echo.text
    assert any("rank 0 Succeeded, rank 1 Succeeded" in line for line in echo), echo.text
    logged = [line for line in echo if "[rank 0]" in line]
    assert logged == ["  [rank 0] step 1/3 loss 2.00", "  [rank 0] step 2/3 loss 1.50", "  [rank 0] step 3/3 loss 1.00"]
    # the headless Service is removed after success; the Job stays for its TTL
    assert not _exists(cluster, "Service", run.name) and _exists(cluster, "Job", run.name)


def test_pod_failure_names_rank_and_shows_log(cluster, podtemplate, launcher_client, shared):
    cluster.scenarios = [fail_rank(1)]
    with pytest.raises(KubernetesJobError) as info:
        run_stage_on_kubernetes(_spec(shared), fast_config(shared, nnodes=2), api_client=launcher_client, echo=Echo())
    message = str(info.value)
    (run,) = cluster.runs
    assert f"pod {run.pods[1].name} (rank 1) failed" in message  # the first to fail, not the peers it took down
    assert "exit code 1" in message
    assert "RuntimeError: CUDA error: device-side assert" in message  # its log tail
    assert "kubectl -n vlalign describe job" in message
    assert _exists(cluster, "Job", run.name)  # kept for inspection
    assert len(cluster.runs) == 1  # a crash is not resubmitted


def test_oom_kill_hints_at_memory_limit(cluster, podtemplate, launcher_client, shared):
    cluster.scenarios = [fail_rank(0, code=137, reason="OOMKilled")]
    with pytest.raises(KubernetesJobError, match=r"(?s)rank 0\) failed.*exit code 137 \(OOMKilled\).*limits.memory"):
        run_stage_on_kubernetes(_spec(shared), fast_config(shared), api_client=launcher_client, echo=Echo())


def test_image_pull_error_fails_fast_with_hint(cluster, podtemplate, launcher_client, shared):
    cluster.scenarios = [image_pull_error]
    started = time.monotonic()
    with pytest.raises(KubernetesJobError) as info:
        run_stage_on_kubernetes(_spec(shared), fast_config(shared, timeout_s=30), api_client=launcher_client, echo=Echo())
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "cannot pull image 'vlalign:0.1.0'" in message and "ErrImagePull" in message
    assert "Hint: push the image" in message
    (run,) = cluster.runs
    assert not _exists(cluster, "Job", run.name) and not _exists(cluster, "Service", run.name)  # cleaned up


def test_unschedulable_fails_after_grace(cluster, podtemplate, launcher_client, shared):
    cluster.scenarios = [unschedulable]
    started = time.monotonic()
    with pytest.raises(KubernetesJobError) as info:
        run_stage_on_kubernetes(_spec(shared), fast_config(shared, unschedulable_grace_s=0.3), api_client=launcher_client,
                                echo=Echo())
    assert time.monotonic() - started >= 0.3
    assert "could not be scheduled" in str(info.value) and "Insufficient nvidia.com/gpu" in str(info.value)
    assert not _exists(cluster, "Job", cluster.runs[0].name)


def test_timeout_deletes_the_job(cluster, podtemplate, launcher_client, shared):
    cluster.scenarios = [hang]
    with pytest.raises(KubernetesJobError, match=r"timed out after 0.4 s \(kubernetes.timeout_s\); last state: rank 0 Running"):
        run_stage_on_kubernetes(_spec(shared), fast_config(shared, timeout_s=0.4), api_client=launcher_client, echo=Echo())
    assert not _exists(cluster, "Job", cluster.runs[0].name)


def test_node_loss_resubmits_and_resumes(cluster, podtemplate, launcher_client, shared):
    cluster.scenarios = [lose_node(rank=1), succeed]
    echo = Echo()
    final = run_stage_on_kubernetes(_spec(shared), fast_config(shared, nnodes=2, max_resubmits=2),
                                    api_client=launcher_client, echo=echo)
    assert final.read_bytes() == b"final weights"
    first, second = cluster.runs
    assert first.name.endswith("-r0") and second.name.endswith("-r1")
    assert not _exists(cluster, "Job", first.name)  # deleted before the resubmission
    assert "DeletionByTaintManager" in echo.text
    assert "resubmitting (attempt 2 of 3), resuming from checkpoint step-00000002.pt" in echo.text
    # the second attempt trained from the same spec (so the engine resumes from that checkpoint)
    assert second.spec == first.spec and second.spec["out_dir"] == "/app/data/06_models/stage1"


def test_node_loss_every_time_gives_up(cluster, podtemplate, launcher_client, shared):
    cluster.scenarios = [lose_node(rank=0)]
    with pytest.raises(KubernetesJobError, match=r"on every one of 2 attempt\(s\) \(kubernetes.max_resubmits=1\)"):
        run_stage_on_kubernetes(_spec(shared), fast_config(shared, max_resubmits=1), api_client=launcher_client, echo=Echo())
    assert len(cluster.runs) == 2


def test_kueue_job_waits_suspended_until_admitted(cluster, podtemplate, launcher_client, shared):
    def admit_then_succeed(fake: FakeCluster, run: Run) -> None:
        assert run.obj["spec"]["suspend"] is True
        assert run.obj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        time.sleep(0.1)
        fake.batch.patch_namespaced_job(run.name, NAMESPACE, {"spec": {"suspend": False}}, _preload_content=False)  # Kueue admits the gang
        succeed(fake, run)

    cluster.scenarios = [admit_then_succeed]
    echo = Echo()
    run_stage_on_kubernetes(_spec(shared), fast_config(shared, queue_name="team-a"), api_client=launcher_client, echo=echo)
    assert "suspended: waiting for Kueue to admit it" in echo.text


def test_trainjob_engine_from_the_template_annotation(cluster, launcher_client, shared):
    template = yaml.safe_load((REPO / "k8s/base/train-podtemplate.yaml").read_text(encoding="utf-8"))
    template["metadata"]["annotations"] = {"vlalign.dev/engine": "trainjob"}  # what k8s/components/trainjob adds
    cluster.core.create_namespaced_pod_template(NAMESPACE, template)
    cluster.scenarios = [succeed]
    echo = Echo()
    final = run_stage_on_kubernetes(_spec(shared), fast_config(shared, nnodes=2), api_client=launcher_client, echo=echo)
    assert final.is_file()
    (run,) = cluster.runs
    assert run.kind == "TrainJob"
    trainer = run.obj["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and not any(e["name"].startswith("PET_") for e in trainer.get("env", []))
    assert "engine trainjob" in echo.text


def test_object_storage_uploads_inputs_and_downloads_final(cluster, podtemplate, launcher_client, shared, tmp_path):
    bucket = tmp_path / "bucket"
    shards = tmp_path / "local" / "shards"
    shards.mkdir(parents=True)
    (shards / "shards.json").write_text('{"shards": ["train-000000.tar"]}')
    (shards / "train-000000.tar").write_bytes(b"tar bytes")
    init = tmp_path / "local" / "stage0.pt"
    init.write_bytes(b"init weights")
    out_dir = tmp_path / "local" / "06_models" / "stage2"
    spec = _spec(shared, name="stage2", data=str(shards / "shards.json"), init=str(init), out_dir=str(out_dir))
    config = fast_config(shared, storage=StorageConfig(kind="fsspec", url=f"file://{bucket}"))
    cluster.scenarios = [succeed]
    echo = Echo()
    final = run_stage_on_kubernetes(spec, config, api_client=launcher_client, echo=echo)

    assert final == out_dir / "final.pt" and final.read_bytes() == b"final weights"  # downloaded
    uploaded = sorted(p.relative_to(bucket).as_posix() for p in bucket.rglob("*") if p.is_file())
    key = str(tmp_path).lstrip("/")
    assert f"{key}/local/shards/train-000000.tar" in uploaded and f"{key}/local/stage0.pt" in uploaded
    (run,) = cluster.runs
    assert run.pods[0].command[-1] == "/etc/vlalign/spec.json"  # from the job's ConfigMap
    pod_spec = run.spec
    assert pod_spec["out_dir"] == f"file://{bucket}/{key}/local/06_models/stage2"
    assert pod_spec["data"] == f"file://{bucket}/{key}/local/shards/shards.json"
    assert not _exists(cluster, "ConfigMap", f"{run.name}-spec")  # removed with the Service after success


def test_missing_podtemplate_says_apply_the_overlay(cluster, launcher_client, shared):
    with pytest.raises(KubernetesJobError, match=r"PodTemplate 'vlalign-train' not found.*kubectl apply -k k8s/overlays"):
        run_stage_on_kubernetes(_spec(shared), fast_config(shared), api_client=launcher_client, echo=Echo())


def test_template_breaking_restricted_profile_is_not_submitted(cluster, launcher_client, shared):
    template = yaml.safe_load((REPO / "k8s/base/train-podtemplate.yaml").read_text(encoding="utf-8"))
    template["template"]["spec"]["containers"][0]["securityContext"]["privileged"] = True
    cluster.core.create_namespaced_pod_template(NAMESPACE, template)
    with pytest.raises(ConfigError, match=r"(?s)restricted pod profile.*\[privileged\]"):
        run_stage_on_kubernetes(_spec(shared), fast_config(shared), api_client=launcher_client, echo=Echo())
    assert cluster.runs == []


def test_spec_outside_the_shared_volume_is_refused(cluster, podtemplate, launcher_client, shared, tmp_path):
    spec = _spec(shared, data=str(tmp_path / "elsewhere" / "clean_manifest.parquet"))
    with pytest.raises(ConfigError, match=r"train spec data=.* is not on the shared volume"):
        run_stage_on_kubernetes(spec, fast_config(shared), api_client=launcher_client, echo=Echo())
    assert cluster.runs == []


def test_a_restarted_pipeline_follows_the_running_job(cluster, podtemplate, launcher_client, emulator, shared):
    release = threading.Event()

    def slow(fake: FakeCluster, run: Run) -> None:
        release.wait(10)
        succeed(fake, run)

    cluster.scenarios = [slow]
    results, first_echo, second_echo = {}, Echo(), Echo()
    config = fast_config(shared)
    tracking = {"tracking_uri": "http://vlalign-mlflow:5000", "experiment_id": "1"}
    first_spec = _spec(shared, mlflow={**tracking, "parent_run_id": "run-of-the-first-pipeline"})
    second_spec = _spec(shared, mlflow={**tracking, "parent_run_id": "run-of-the-restarted-pipeline"})
    first = threading.Thread(target=lambda: results.setdefault(
        "first", run_stage_on_kubernetes(first_spec, config, api_client=launcher_client, echo=first_echo)))
    first.start()
    deadline = time.monotonic() + 10
    while not cluster.runs and time.monotonic() < deadline:
        time.sleep(0.01)
    second_client = emulator.api_client()
    second_client.user_agent = launcher_client.user_agent
    second = threading.Thread(target=lambda: results.setdefault(
        "second", run_stage_on_kubernetes(second_spec, config, api_client=second_client, echo=second_echo)))
    second.start()
    time.sleep(0.2)
    release.set()
    first.join(10)
    second.join(10)
    assert results["first"] == results["second"] == shared / "06_models" / "stage1" / "final.pt"
    assert len(cluster.runs) == 1  # one job, followed by both
    assert "already running (submitted earlier with the same spec): following it" in second_echo.text


def test_forbidden_submission_explains_rbac(cluster, podtemplate, launcher_client, emulator, shared):
    status = {"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403,
              "message": 'jobs.batch is forbidden: User "system:serviceaccount:vlalign:default" cannot create resource "jobs"'}
    emulator.handler[kmock.action.CREATE, kmock.resource("batch/v1/jobs")] << 403 << status
    # (kmock stores the object even when a reaction answers: the fake controllers have no scenario for it)
    with pytest.raises(KubernetesJobError, match=r"(?s)creating Job .* HTTP 403.*cannot create resource.*Role vlalign-submitter"):
        run_stage_on_kubernetes(_spec(shared), fast_config(shared), api_client=launcher_client, echo=Echo())
