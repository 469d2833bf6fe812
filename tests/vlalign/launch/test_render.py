"""Rendering a stage from the pod template: Indexed Job + headless Service, TrainJob, overrides, and the command and
environment a pod runs (pod_command_env)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from vlalign.errors import ConfigError
from vlalign.launch import policy
from vlalign.launch.config import KubernetesConfig, StorageConfig
from vlalign.launch.crd import validate_custom_resource
from vlalign.launch.render import (
    INDEX_ANNOTATION,
    job_name,
    load_template_file,
    parse_quantity,
    pod_command_env,
    render_stage,
)

REPO = Path(__file__).resolve().parents[3]
TEMPLATE_FILE = REPO / "k8s" / "base" / "train-podtemplate.yaml"
K8S_VERSION = "1.35.0"
SPEC = "/app/data/06_models/stage1/k8s-spec.json"


@pytest.fixture()
def template() -> dict:
    return load_template_file(TEMPLATE_FILE)


def _render(template, stage="stage1", **config):
    return render_stage(template, KubernetesConfig(**config), stage=stage, spec_path=SPEC)


def test_job_engine_renders_headless_service_and_indexed_job(template):
    rendered = _render(template, nnodes=3)
    service, job = rendered.objects
    name = rendered.name
    assert service["kind"] == "Service" and job["kind"] == "Job" and service["metadata"]["name"] == name
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == ("Indexed", 3, 3, 0)
    assert spec["podFailurePolicy"]["rules"] == [
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == name and pod["restartPolicy"] == "Never"
    (train,) = pod["containers"]
    assert train["command"] == ["torchrun", "-m", "vlalign", "train", "--spec", SPEC]
    env = {e["name"]: e for e in train["env"]}
    assert env["PET_NNODES"]["value"] == "3" and env["PET_NPROC_PER_NODE"]["value"] == "1"
    assert env["PET_MASTER_ADDR"]["value"] == f"{name}-0.{name}" and env["PET_MASTER_PORT"]["value"] == "29500"
    assert env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.annotations['{INDEX_ANNOTATION}']"
    for obj in rendered.objects:
        assert kubernetes_validate.validate(obj, K8S_VERSION, strict=True) == "1.35"
        assert policy.violations(obj) == []


def test_everything_but_command_env_and_names_comes_from_the_template(template):
    job = _render(template).workload
    pod = job["spec"]["template"]["spec"]
    original = template["template"]["spec"]
    for key in ("securityContext", "volumes", "serviceAccountName", "automountServiceAccountToken"):
        assert pod[key] == original[key]
    (train,), (orig,) = pod["containers"], original["containers"]
    for key in ("image", "resources", "securityContext", "volumeMounts", "workingDir"):
        assert train[key] == orig[key]
    assert train["env"][: len(orig["env"])] == orig["env"]


def test_overrides_apply_only_where_set(template):
    rendered = _render(
        template, image="registry.example.com/vlalign:2", gpus_per_node=2, resources={"limits": {"memory": "64Gi"}},
        node_selector={"pool": "a100"}, tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        service_account="other", storage=StorageConfig(claim_name="my-rwx"), queue_name="team-a",
    )
    job = rendered.workload
    pod = job["spec"]["template"]["spec"]
    train = pod["containers"][0]
    assert train["image"] == "registry.example.com/vlalign:2"
    assert train["resources"]["limits"] == {"cpu": "4", "memory": "64Gi", "nvidia.com/gpu": "2"}
    assert train["resources"]["requests"] == {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "2"}
    assert rendered.nproc_per_node == 2  # one process per GPU
    assert pod["nodeSelector"] == {"pool": "a100"} and pod["tolerations"][0]["key"] == "gpu"
    assert pod["serviceAccountName"] == "other"
    assert {v["name"]: v for v in pod["volumes"]}["data"]["persistentVolumeClaim"]["claimName"] == "my-rwx"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" and job["spec"]["suspend"] is True
    assert kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def test_gpu_limit_of_the_template_sets_processes_per_pod(template):
    template["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "4"
    assert _render(template).nproc_per_node == 4
    assert _render(template, nproc_per_node=2).nproc_per_node == 2


def test_names_are_stable_short_dns_labels(template):
    first, again = _render(template), _render(template)
    assert first.name == again.name  # same inputs: same job (a restarted pipeline follows the running one)
    assert render_stage(template, KubernetesConfig(), stage="stage1", spec_path=SPEC, attempt=1).name.endswith("-r1")
    assert _render(template, nnodes=2).name != first.name
    changed = render_stage(template, KubernetesConfig(), stage="stage1", spec_path=SPEC, spec_json='{"epochs": 2}')
    assert changed.name != first.name  # a changed spec is a new job, not the running one
    name = job_name("vlalign", "A Very_Long Stage Name With Spaces" * 3, "0123456789abcdef", 12)
    assert len(name) <= 52 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name


def test_storage_mount_must_match_the_template(template):
    with pytest.raises(ConfigError, match=r"does not mount volume 'data' at /mnt/shared"):
        _render(template, storage=StorageConfig(mount_path="/mnt/shared"))
    with pytest.raises(ConfigError, match=r"no persistentVolumeClaim volume named 'shared'"):
        _render(template, storage=StorageConfig(volume_name="shared"))
    with pytest.raises(ConfigError, match=r"no container 'trainer'.*\['train'\]"):
        _render(template, container_name="trainer")


def test_trainjob_engine(template):
    rendered = _render(template, engine="trainjob", nnodes=2, trainjob_runtime="torch-distributed")
    (trainjob,) = rendered.objects
    assert validate_custom_resource(trainjob) == "trainer.kubeflow.org/v1alpha1/TrainJob"
    spec = trainjob["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": "torch-distributed"}
    trainer = spec["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 1)
    assert trainer["command"] == ["torchrun", "-m", "vlalign", "train", "--spec", SPEC]
    assert not [e for e in trainer["env"] if e["name"].startswith("PET_")]  # the torch plugin injects them
    # resourceFieldRef follows the container's new name
    assert {e["name"]: e for e in trainer["env"]}["VLALIGN_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]["containerName"] == "node"
    original = template["template"]["spec"]
    assert trainer["resourcesPerNode"] == original["containers"][0]["resources"]
    patch = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod = patch["template"]["spec"]["template"]["spec"]
    assert pod["securityContext"] == original["securityContext"] and pod["volumes"] == original["volumes"]
    assert pod["containers"] == [{"name": "node", "securityContext": original["containers"][0]["securityContext"],
                                  "volumeMounts": original["containers"][0]["volumeMounts"]}]
    assert policy.violations(trainjob) == []
    # what a TrainJob (v1alpha1, 2.3.0) cannot carry is reported, not silently lost
    assert "pod spec field 'automountServiceAccountToken'" in rendered.notes
    assert "container field 'workingDir'" in rendered.notes


def test_engine_and_queue_come_from_template_annotations(template):
    template["metadata"]["annotations"] = {"vlalign.dev/engine": "trainjob", "vlalign.dev/queue-name": "q"}
    rendered = _render(template)
    assert rendered.engine == "trainjob" and rendered.workload["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "q"
    assert _render(template, engine="job", queue_name="other").workload["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "other"
    template["metadata"]["annotations"] = {"vlalign.dev/engine": "mpi"}
    with pytest.raises(ConfigError, match=r"engine 'mpi'"):
        _render(template)


def test_trainjob_refuses_pet_variables_in_the_template(template):
    template["template"]["spec"]["containers"][0]["env"].append({"name": "PET_NNODES", "value": "2"})
    with pytest.raises(ConfigError, match="PET_"):
        _render(template, engine="trainjob")
    # the job engine replaces them with its own
    env = _render(template, nnodes=3).workload["spec"]["template"]["spec"]["containers"][0]["env"]
    assert [e["value"] for e in env if e["name"] == "PET_NNODES"] == ["3"]


def test_object_storage_spec_travels_in_a_configmap(template):
    rendered = render_stage(template, KubernetesConfig(storage=StorageConfig(kind="fsspec", url="s3://b/v")),
                            stage="stage1", spec_path="/etc/vlalign/spec.json", spec_json='{"x": 1}',
                            spec_in_configmap=True)
    configmap, service, job = rendered.objects
    assert configmap["kind"] == "ConfigMap" and configmap["data"] == {"spec.json": '{"x": 1}'}
    pod = job["spec"]["template"]["spec"]
    assert {"name": "vlalign-spec", "configMap": {"name": configmap["metadata"]["name"]}} in pod["volumes"]
    assert {"name": "vlalign-spec", "mountPath": "/etc/vlalign", "readOnly": True} in pod["containers"][0]["volumeMounts"]
    for obj in rendered.objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


# ------------------------------------------------------------------------------------------------
# pod_command_env
# ------------------------------------------------------------------------------------------------


def test_pod_command_env_resolves_index_and_resources(template):
    rendered = _render(template, nnodes=2)
    for index in (0, 1):
        command, env = pod_command_env(rendered.objects, index)
        assert command == ["torchrun", "-m", "vlalign", "train", "--spec", SPEC]
        assert env["PET_NODE_RANK"] == str(index) and env["JOB_COMPLETION_INDEX"] == str(index)
        assert env["PET_NNODES"] == "2" and env["PET_MASTER_ADDR"] == f"{rendered.name}-0.{rendered.name}"
        assert env["VLALIGN_NUM_THREADS"] == "4"  # limits.cpu "4" / divisor 1
        assert env["HF_HUB_OFFLINE"] == "1" and env["HOME"] == "/tmp"
    with pytest.raises(ValueError, match="outside the Job's completions"):
        pod_command_env(rendered.objects, 2)


def test_pod_command_env_follows_kubernetes_rules(template):
    job = copy.deepcopy(_render(template).workload)
    train = job["spec"]["template"]["spec"]["containers"][0]
    train["resources"]["limits"]["cpu"] = "1500m"
    train["env"] += [
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "GREETING", "value": "rank $(PET_NODE_RANK) of $(PET_NNODES), literal $$(X), unknown $(NOPE)"},
        {"name": "FROM_MAP", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "level"}}},
        {"name": "OPTIONAL", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k", "optional": True}}},
    ]
    train["args"] = ["--note", "$(GREETING)"]
    settings = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": {"level": "debug"}}
    command, env = pod_command_env([job, settings], 0)
    assert env["VLALIGN_NUM_THREADS"] == "2"  # 1.5 CPUs rounded up, as the kubelet does
    assert env["POD"] == f"{job['metadata']['name']}-0"
    assert env["GREETING"] == "rank 0 of 1, literal $(X), unknown $(NOPE)"
    assert env["FROM_MAP"] == "debug" and "OPTIONAL" not in env
    assert command[-2:] == ["--note", "rank 0 of 1, literal $(X), unknown $(NOPE)"]
    train["env"].append({"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}})
    with pytest.raises(ValueError, match="spec.nodeName"):
        pod_command_env([job, settings], 0)


def test_pod_command_env_needs_exactly_one_job(template):
    with pytest.raises(ValueError, match="expected one Job"):
        pod_command_env(_render(template, engine="trainjob").objects, 0)


def test_parse_quantity():
    assert parse_quantity("500m") * 2 == 1
    assert parse_quantity("16Gi") == 16 * 2**30 and parse_quantity("2k") == 2000 and parse_quantity(3) == 3
    with pytest.raises(ValueError):
        parse_quantity("lots")


def test_template_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_template_file(tmp_path / "missing.yaml")
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}))
    with pytest.raises(ConfigError, match=r"expected one PodTemplate named 'vlalign-train'.*ConfigMap/x"):
        load_template_file(other)


def test_pod_phase_summary_and_log_overlap():
    from vlalign.launch.k8s import PodState, new_lines, pod_state, summarize

    few = [PodState("a", 0, "Running"), PodState("b", 1, "Pending", reason="Unschedulable")]
    assert summarize(few) == "rank 0 Running, rank 1 Pending (Unschedulable)"
    many = [PodState(f"p{i}", i, "Running") for i in range(7)] + [PodState("p7", 7, "Pending", reason="ErrImagePull")]
    assert summarize(many) == "8 pods: 1 Pending (ErrImagePull), 7 Running"
    assert new_lines(["a", "b", "c"], ["b", "c", "d", "e"]) == ["d", "e"]
    assert new_lines(["a", "b"], ["a", "b"]) == []
    assert new_lines(["x"], ["y", "z"]) == ["y", "z"]  # no overlap: the tail moved past everything seen
    pod = {"metadata": {"name": "p", "annotations": {INDEX_ANNOTATION: "3"}},
           "status": {"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}}
    state = pod_state(pod, "train", 0)
    assert state.rank == 3 and state.disrupted == "Evicted: The node was low on resource: memory."
