"""Offline checks of k8s/: every object of every overlay, and every object the launcher renders.

No Kubernetes API server runs here. Instead:

- every document of ``kubectl kustomize k8s/overlays/<cpu|gpu|trainjob>`` (and of an overlay with every optional
  component) validates strictly against the official Kubernetes 1.35.0 schemas shipped in kubernetes-validate
  (unknown fields are errors); custom resources validate against the strict schema of vlalign.launch.crd;
- every pod template passes the Pod Security Standards checker (vlalign.launch.policy: baseline, restricted, ours);
- the renderer's objects, filled from each overlay's PodTemplate, agree with it on everything security- and
  resource-related, and validate too;
- the CronJob, the conf/ ConfigMaps, RBAC and the Dockerfile are checked field by field.

Tests that need kubectl (kustomize) skip with a reason when it is not on the PATH, and fail when the variable CI is
set (tests/shared.py: missing_tool); the base files are also checked one by one without it.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
import zoneinfo
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from vlalign.launch import policy
from vlalign.launch.config import KubernetesConfig
from vlalign.launch.crd import known_kinds, validate_custom_resource
from vlalign.launch.render import render_stage

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
KUBERNETES_VERSION = "1.35.0"  # schema version of the strict checks (kubernetes-validate ships 1.25-1.37)
OVERLAYS = ("cpu", "gpu", "trainjob")
OPTIONAL_COMPONENTS = ("gpu", "trainjob", "kueue", "object-storage", "mlflow-postgres")
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.usefixtures("kubectl")  # skips without kubectl, fails under CI (tests/conftest.py)
CUSTOM = set(known_kinds())


@functools.cache
def _build(path: str) -> tuple[dict, ...]:
    result = subprocess.run([KUBECTL, "kustomize", path], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def build(overlay: str) -> list[dict]:
    """``kubectl kustomize k8s/overlays/<overlay>``, or of the every-component overlay ("all")."""
    if overlay != "all":
        return copy.deepcopy(list(_build(str(K8S / "overlays" / overlay))))
    return copy.deepcopy(list(_build(str(_all_components_overlay()))))


@functools.cache
def _all_components_overlay() -> Path:
    """A throw-away overlay with the base and every optional component (kustomize wants relative paths)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="vlalign-all-components-"))
    rel = lambda p: os.path.relpath(p, folder)  # noqa: E731
    (folder / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [rel(K8S / "base")],
        "components": [rel(K8S / "components" / c) for c in OPTIONAL_COMPONENTS],
    }))
    return folder


def _the(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def validate(doc: dict) -> str:
    """Strict validation: official schemas for built-in kinds, our strict CRD schema for custom resources."""
    if (doc.get("apiVersion"), doc.get("kind")) in CUSTOM:
        return validate_custom_resource(doc)
    try:
        return kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata'].get('name')} fails the Kubernetes {KUBERNETES_VERSION} schema at {where}: {exc.message}")


def _base_files() -> list[tuple[str, dict]]:
    found = []
    for path in sorted([*(K8S / "base").glob("*.yaml"), *(K8S / "tools").glob("*.yaml")]):
        if path.name == "kustomization.yaml":
            continue
        for i, doc in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if doc:
                found.append((f"{path.parent.name}/{path.name}[{i}]", doc))
    return found


# ------------------------------------------------------------------------------------------------
# Strict schema validation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,doc", _base_files(), ids=[n for n, _ in _base_files()])
def test_base_file_validates_strictly_without_kustomize(name, doc):
    validate(doc)
    assert policy.violations(doc) == [], name


@needs_kubectl
@pytest.mark.parametrize("overlay", [*OVERLAYS, "all"])
def test_every_rendered_document_validates_strictly(overlay):
    docs = build(overlay)
    kinds = sorted({d["kind"] for d in docs})
    assert {"Namespace", "PersistentVolumeClaim", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment",
            "Service", "PodTemplate", "CronJob"} <= set(kinds), kinds
    for doc in docs:
        validate(doc)
        assert doc["kind"] == "Namespace" or doc["metadata"].get("namespace") == "vlalign", doc["metadata"]


def test_strict_mode_rejects_a_misspelt_field():
    """The check can fail: an unknown key (a typo of restartPolicy) passes non-strict validation, not strict."""
    doc = copy.deepcopy(_the([d for _, d in _base_files()], "PodTemplate"))
    spec = doc["template"]["spec"]
    spec["restartPolcy"] = spec.pop("restartPolicy")
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=False)
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolcy"):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


# ------------------------------------------------------------------------------------------------
# Restricted pod profile
# ------------------------------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("overlay", [*OVERLAYS, "all"])
def test_every_pod_template_is_restricted(overlay):
    docs = build(overlay)
    with_pods = [d for d in docs if policy.has_pod_template(d)]
    assert sorted(f"{d['kind']}/{d['metadata']['name']}" for d in with_pods) == [
        "CronJob/vlalign-pipeline", "CronJob/vlalign-retrain", "Deployment/vlalign-mlflow", "PodTemplate/vlalign-train"]
    for doc in with_pods:
        assert policy.violations(doc) == []


@needs_kubectl
def test_namespace_enforces_restricted():
    labels = _the(build("cpu"), "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


# ------------------------------------------------------------------------------------------------
# Overlays
# ------------------------------------------------------------------------------------------------


def _train(docs: list[dict]) -> tuple[dict, dict]:
    template = _the(docs, "PodTemplate", "vlalign-train")
    pod = template["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "train"]
    return pod, container


@needs_kubectl
def test_cpu_overlay_has_no_gpu():
    pod, train = _train(build("cpu"))
    assert "nvidia.com/gpu" not in train["resources"]["limits"] and "nodeSelector" not in pod
    assert train["image"] == "registry.example.com/ml/vlalign:0.1.0"


@needs_kubectl
@pytest.mark.parametrize("overlay", ["gpu", "trainjob"])
def test_gpu_overlay_sets_gpus_shm_selector_tolerations(overlay):
    pod, train = _train(build(overlay))
    assert train["resources"]["limits"]["nvidia.com/gpu"] == "1"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in train["volumeMounts"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert train["image"].endswith("-cuda")


@needs_kubectl
def test_trainjob_overlay_selects_the_engine_and_grants_trainjobs():
    docs = build("trainjob")
    assert _the(docs, "PodTemplate")["metadata"]["annotations"]["vlalign.dev/engine"] == "trainjob"
    rules = _the(docs, "Role", "vlalign-submitter")["rules"]
    assert {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"], "verbs": ["create", "get", "delete"]} in rules
    assert "vlalign.dev/engine" not in (_the(build("gpu"), "PodTemplate")["metadata"].get("annotations") or {})


@needs_kubectl
def test_optional_components():
    docs = build("all")
    assert _the(docs, "PodTemplate")["metadata"]["annotations"]["vlalign.dev/queue-name"] == "vlalign"
    _, train = _train(docs)
    assert train["envFrom"] == [{"secretRef": {"name": "vlalign-object-storage", "optional": False}}]
    for cronjob in (d for d in docs if d["kind"] == "CronJob"):
        assert cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["secretRef"]["name"] == "vlalign-object-storage"
    mlflow = _the(docs, "Deployment", "vlalign-mlflow")["spec"]["template"]["spec"]["containers"][0]
    store = {e["name"]: e for e in mlflow["env"]}["MLFLOW_BACKEND_STORE_URI"]
    assert store == {"name": "MLFLOW_BACKEND_STORE_URI", "valueFrom": {"secretKeyRef": {"name": "vlalign-mlflow-postgres", "key": "uri"}}}


# ------------------------------------------------------------------------------------------------
# One source of truth: the renderer fills the overlay's PodTemplate
# ------------------------------------------------------------------------------------------------


SECURITY_POD_FIELDS = ("securityContext", "serviceAccountName", "volumes", "nodeSelector", "tolerations",
                       "automountServiceAccountToken", "enableServiceLinks", "restartPolicy")
SECURITY_CONTAINER_FIELDS = ("image", "resources", "securityContext", "volumeMounts", "workingDir", "imagePullPolicy")


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_agrees_with_the_overlay(overlay):
    docs = build(overlay)
    template = _the(docs, "PodTemplate", "vlalign-train")
    tpod, ttrain = _train(docs)
    config = KubernetesConfig(nnodes=2)
    rendered = render_stage(template, config, stage="stage1", spec_path="/app/data/06_models/stage1/k8s-spec.json")
    for obj in rendered.objects:
        validate(obj)
        assert policy.violations(obj) == []
    expected_engine = "trainjob" if overlay == "trainjob" else "job"
    assert rendered.engine == expected_engine
    if rendered.engine == "job":
        pod = rendered.workload["spec"]["template"]["spec"]
        (train,) = pod["containers"]
        for key in SECURITY_POD_FIELDS:
            assert pod.get(key) == tpod.get(key), key
        for key in SECURITY_CONTAINER_FIELDS:
            assert train.get(key) == ttrain.get(key), key
        assert rendered.nproc_per_node == int(ttrain["resources"]["limits"].get("nvidia.com/gpu", 1))
    else:
        spec = rendered.workload["spec"]
        assert spec["trainer"]["image"] == ttrain["image"]
        assert spec["trainer"]["resourcesPerNode"] == ttrain["resources"]
        patch = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
        pod = patch["template"]["spec"]["template"]["spec"]
        for key in ("securityContext", "serviceAccountName", "volumes", "nodeSelector", "tolerations"):
            assert pod.get(key) == tpod.get(key), key
        assert pod["containers"][0]["securityContext"] == ttrain["securityContext"]
        assert pod["containers"][0]["volumeMounts"] == ttrain["volumeMounts"]
    # a TrainJob of the same template, whatever the overlay, validates too
    trainjob = render_stage(template, KubernetesConfig(engine="trainjob"), stage="stage1", spec_path="/x").workload
    validate(trainjob)
    assert policy.violations(trainjob) == []


@needs_kubectl
def test_base_file_is_what_kustomize_deploys():
    """The file the launcher can read without a cluster (kubernetes.template) is the base's PodTemplate."""
    deployed = _the(build("cpu"), "PodTemplate")
    (_, raw), = [(n, d) for n, d in _base_files() if d["kind"] == "PodTemplate"]
    deployed["template"]["spec"]["containers"][0]["image"] = raw["template"]["spec"]["containers"][0]["image"]
    assert deployed["template"] == raw["template"]


# ------------------------------------------------------------------------------------------------
# CronJob, RBAC, MLflow, Dockerfile
# ------------------------------------------------------------------------------------------------


def _cronjobs() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in _base_files() if d["kind"] == "CronJob"}


def test_retrain_cronjob():
    cron = _cronjobs()["vlalign-retrain"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    assert isinstance(cron["startingDeadlineSeconds"], int) and cron["startingDeadlineSeconds"] > 0
    assert cron["successfulJobsHistoryLimit"] >= 1 and cron["failedJobsHistoryLimit"] >= 1
    zoneinfo.ZoneInfo(cron["timeZone"])  # a real IANA zone
    assert len(cron["schedule"].split()) == 5 and not cron.get("suspend")
    job = cron["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0
    container = job["template"]["spec"]["containers"][0]
    argv = container["command"] + container["args"]
    assert argv == ["kedro", "run", "--env=k8s", "--pipeline=retrain"]
    assert job["template"]["spec"]["serviceAccountName"] == "vlalign-submitter"
    assert (REPO / "conf" / "k8s").is_dir()


def test_pipeline_cronjobs_differ_only_in_arguments():
    crons = _cronjobs()
    retrain, whole = copy.deepcopy(crons["vlalign-retrain"]), copy.deepcopy(crons["vlalign-pipeline"])
    assert whole["spec"]["suspend"] is True  # a template for `kubectl create job --from=cronjob/vlalign-pipeline`
    for cron in (retrain, whole):
        cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0].pop("args")
    assert retrain["spec"]["jobTemplate"] == whole["spec"]["jobTemplate"]


def test_pipeline_pods_mount_conf_and_data():
    pod = _cronjobs()["vlalign-retrain"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/app/data"]]["persistentVolumeClaim"]["claimName"] == "vlalign-data"
    assert volumes[mounts["/app/conf/base"]]["configMap"]["name"] == "vlalign-conf-base"
    assert volumes[mounts["/app/conf/k8s"]]["configMap"]["name"] == "vlalign-conf-k8s"
    names = {d["metadata"]["name"] for _, d in _base_files() if d["kind"] == "ConfigMap"}
    assert {"vlalign-conf-base", "vlalign-conf-k8s"} <= names
    claim = {d["metadata"]["name"]: d for _, d in _base_files() if d["kind"] == "PersistentVolumeClaim"}["vlalign-data"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # the pipeline pod and every training pod mount it


def test_submitter_role_is_namespaced_and_minimal():
    docs = [d for _, d in _base_files()]
    role = _the(docs, "Role", "vlalign-submitter")
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    verbs = {v for rule in role["rules"] for v in rule["verbs"]}
    assert verbs <= {"create", "get", "list", "delete"}, verbs  # no update/patch/escalate/bind, no "*"
    assert all("*" not in rule["resources"] and "secrets" not in rule["resources"] for rule in role["rules"])
    binding = _the(docs, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "vlalign-submitter"}]
    train_sa = _the(docs, "ServiceAccount", "vlalign-train")
    assert train_sa["automountServiceAccountToken"] is False


def test_mlflow_server_defaults_to_sqlite_on_a_volume():
    docs = [d for _, d in _base_files()]
    deployment = _the(docs, "Deployment", "vlalign-mlflow")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("sqlite:////mlflow/")
    assert "--serve-artifacts" in container["args"] and deployment["spec"]["strategy"]["type"] == "Recreate"
    service = _the(docs, "Service", "vlalign-mlflow")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    tracking = yaml.safe_load((REPO / "conf/k8s/parameters_kubernetes.yml").read_text())["kubernetes"]["mlflow_tracking_uri"]
    assert tracking == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"


def _dockerfile() -> str:
    return (K8S / "Dockerfile").read_text(encoding="utf-8")


def test_dockerfile_matches_the_pods():
    text = _dockerfile()
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\S+", text, flags=re.M) and "FROM ${BASE_IMAGE}" in text, \
        "the training image starts from a CUDA base by default"
    user = re.findall(r"^USER\s+(\S+)", text, flags=re.M)[-1]
    workdir = re.findall(r"^WORKDIR\s+(\S+)", text, flags=re.M)[-1]
    pod, train = _train([d for _, d in _base_files()])
    assert user == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    assert workdir == train["workingDir"]
    assert "COPY k8s/base/train-podtemplate.yaml" in text  # kubernetes.template can name the file in the image


def test_dockerfile_installs_the_project_pins():
    text = _dockerfile()
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    for package in ("torch", "torchvision"):
        pin = re.search(rf'"{package}==([^"]+)"', pyproject).group(1)
        assert re.search(rf"{package}=={re.escape(pin)}\b", text), f"the Dockerfile does not install {package}=={pin}"
    assert '.[pipelines,pretrained]' in text
