"""Offline checks of the Kubernetes manifests under k8s/.

No Kubernetes API server can run on our machines, so every YAML document is validated against the
official OpenAPI schemas bundled in ``kubernetes-validate`` (strict mode: unknown fields are errors),
and the fields the training Job depends on are asserted one by one.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
KUBERNETES_VERSION = "1.33.0"


def _documents() -> list[tuple[str, dict]]:
    found = []
    for path in sorted([*K8S.rglob("*.yaml"), *K8S.rglob("*.yml")]):
        for index, doc in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if doc is not None:
                found.append((f"{path.relative_to(REPO)}[{index}]", doc))
    return found


DOCUMENTS = _documents()


def _the(kind: str) -> dict:
    matches = [doc for _, doc in DOCUMENTS if doc.get("kind") == kind]
    assert len(matches) == 1, f"expected exactly one {kind} under k8s/, found {len(matches)}"
    return matches[0]


@pytest.fixture()
def job() -> dict:
    return copy.deepcopy(_the("Job"))


@pytest.fixture()
def pod(job) -> dict:
    return job["spec"]["template"]["spec"]


@pytest.fixture()
def train(pod) -> dict:
    (container,) = [c for c in pod["containers"] if c["name"] == "train"]
    return container


def _all_containers(pod: dict) -> list[dict]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _env(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def _dockerfile(instruction: str) -> str:
    """Argument of the last ``instruction`` line of k8s/Dockerfile."""
    values = re.findall(rf"^{instruction}\s+(\S+)", (K8S / "Dockerfile").read_text(), flags=re.M)
    assert values, f"k8s/Dockerfile has no {instruction} line"
    return values[-1]


# ------------------------------------------------------------------------------------------------
# Schema validation
# ------------------------------------------------------------------------------------------------


def test_k8s_folder_has_documents() -> None:
    kinds = sorted(doc["kind"] for _, doc in DOCUMENTS)
    assert "Job" in kinds, f"no Job under k8s/ (found {kinds})"


@pytest.mark.parametrize("name,doc", DOCUMENTS, ids=[name for name, _ in DOCUMENTS])
def test_document_validates_strictly(name: str, doc: dict) -> None:
    try:
        version = kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{name} ({doc.get('kind')}) fails the Kubernetes {KUBERNETES_VERSION} schema at {where}: {exc.message}")
    assert version == "1.33"


def test_misspelt_field_is_rejected_in_strict_mode(job) -> None:
    """The check can fail: an unknown key (here a typo of restartPolicy) is an error under strict mode."""
    pod = job["spec"]["template"]["spec"]
    pod["restartPolcy"] = pod.pop("restartPolicy")
    # Non-strict validation, like the API server, silently ignores the unknown field ...
    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=False)
    # ... strict validation names it.
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolcy"):
        kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)


def test_wrong_type_is_rejected(job) -> None:
    job["spec"]["backoffLimit"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError, match="three"):
        kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)


# ------------------------------------------------------------------------------------------------
# The fields the training Job relies on
# ------------------------------------------------------------------------------------------------


def test_job_runs_the_training_pipeline(job, train) -> None:
    assert job["apiVersion"] == "batch/v1"
    command = [*train.get("command", []), *train.get("args", [])]
    assert command[:4] == ["kedro", "run", "--pipeline", "training"], command
    # resume: stages whose final checkpoint is on the volume are skipped after a pod restart
    assert "--only-missing-outputs" in command
    if "--env" in command:
        env_name = command[command.index("--env") + 1]
        assert (REPO / "conf" / env_name).is_dir(), f"the Job runs --env {env_name} but conf/{env_name} does not exist"
    assert (REPO / "src" / "vlalign_pipelines" / "pipelines" / "training" / "pipeline.py").is_file()
    assert train["image"].split("/")[-1].startswith("vlalign:")


def test_job_failure_handling(job, pod) -> None:
    spec = job["spec"]
    assert pod["restartPolicy"] == "Never"
    assert isinstance(spec["backoffLimit"], int) and 0 <= spec["backoffLimit"] <= 10
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] >= 3600
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0


def test_offline_and_tracking_environment(pod) -> None:
    for container in _all_containers(pod):
        env = _env(container)
        assert env["HF_HUB_OFFLINE"]["value"] == "1", container["name"]
        tracking = env["MLFLOW_TRACKING_URI"]
        assert tracking.get("value", "").startswith("http") or "configMapKeyRef" in tracking.get("valueFrom", {})


def test_data_folder_is_a_persistent_volume(pod, train) -> None:
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims, "the Job mounts no PersistentVolumeClaim"
    workdir = train["workingDir"]
    data_mounts = [m for m in train["volumeMounts"] if m["mountPath"].rstrip("/") == f"{workdir.rstrip('/')}/data"]
    assert len(data_mounts) == 1, f"expected one mount at {workdir}/data, got {train['volumeMounts']}"
    assert data_mounts[0]["name"] in claims, "data/ is mounted from a volume that is not a PVC"
    assert not data_mounts[0].get("readOnly", False)
    # the claim the Job names is defined next to it
    assert _the("PersistentVolumeClaim")["metadata"]["name"] == claims[data_mounts[0]["name"]]
    # the working directory is the project root of the image
    assert workdir == _dockerfile("WORKDIR")


def test_runs_as_non_root(pod) -> None:
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] != 0
    assert f"{context['runAsUser']}:{context['runAsGroup']}" == _dockerfile("USER")
    for container in _all_containers(pod):
        security = container.get("securityContext", {})
        assert security.get("allowPrivilegeEscalation") is False, container["name"]
        assert security.get("runAsUser", context["runAsUser"]) != 0, container["name"]


def test_resources_requests_and_limits(pod) -> None:
    for container in _all_containers(pod):
        resources = container["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[kind]), f"{container['name']}: {kind} lacks cpu or memory"


def test_labels(job) -> None:
    expected = {"app.kubernetes.io/name": "vlalign", "app.kubernetes.io/component": "training"}
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert expected.items() <= labels.items()
