"""Render one training stage into Kubernetes objects, from the pod template of the kustomize base.

The pod template (PodTemplate ``vlalign-train``, k8s/base/train-podtemplate.yaml, patched by the applied
overlay) is the one source of truth for image, resources, security context, volumes and scheduling. This module
only wraps it, per stage and attempt, into

- engine ``job``: a headless Service and an Indexed Job (no operator needed). Each pod runs
  ``torchrun -m vlalign train --spec FILE`` with static rendezvous: ``PET_NODE_RANK`` is the pod's completion
  index (downward API), ``PET_MASTER_ADDR`` is pod 0's DNS name ``<job>-0.<service>``. ``backoffLimit: 0`` and a
  ``podFailurePolicy`` fail the whole Job at the first failure; the launcher resubmits after node loss.
- engine ``trainjob``: a Kubeflow Trainer v2 ``TrainJob`` (trainer.kubeflow.org/v1alpha1, as of
  kubeflow-trainer-api 2.3.0). Its torch plugin injects the ``PET_*`` variables; the template's pod-level fields
  travel in ``runtimePatches``.

and it overrides only what :class:`~vlalign.launch.config.KubernetesConfig` sets explicitly.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from vlalign.errors import ConfigError
from vlalign.launch.config import ENGINES, KubernetesConfig

TRAINER_API_VERSION = "trainer.kubeflow.org/v1alpha1"  # the TrainJob version rendered (kubeflow-trainer-api 2.3.0)
TRAINJOB_NODE = "node"  # replicated job and container name of the torch runtimes (torch-distributed)
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"  # set by the Job controller on Indexed Job pods
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set by the Job controller on its pods
JOB_LABEL = "vlalign.dev/job"  # our label on every pod of a stage's job: the launcher lists pods by it
STAGE_LABEL = "vlalign.dev/stage"
ATTEMPT_LABEL = "vlalign.dev/attempt"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
ENGINE_ANNOTATION = "vlalign.dev/engine"  # on the PodTemplate: the engine, unless kubernetes.engine is set
QUEUE_ANNOTATION = "vlalign.dev/queue-name"  # on the PodTemplate: the Kueue queue, unless kubernetes.queue_name is set
SPEC_ANNOTATION = "vlalign.dev/spec"  # on the job: the spec file the pods train from
CONTAINER_ANNOTATION = "vlalign.dev/container"  # on the job: the training container's name
PATCH_MANAGER = "vlalign.dev/launcher"  # manager of our TrainJob runtimePatches entry
SPEC_MOUNT_DIR = "/etc/vlalign"  # object storage: the spec ConfigMap is mounted here
GPU_RESOURCE = "nvidia.com/gpu"
PET_VARIABLES = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
MAX_JOB_NAME = 52  # pod hostnames are <job>-<index> (63 characters at most); room for 10,000,000 indexes


# ------------------------------------------------------------------------------------------------
# The pod template
# ------------------------------------------------------------------------------------------------


def load_template_file(path: str | Path, name: str = "vlalign-train") -> dict:
    """The PodTemplate ``name`` from a YAML file (one or several documents, e.g. ``kubectl kustomize`` output)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"kubernetes.template={str(path)!r}: file not found. Use 'cluster' (the PodTemplate applied with "
            "`kubectl apply -k k8s/overlays/...`) or a YAML file such as k8s/base/train-podtemplate.yaml."
        )
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if isinstance(d, dict)]
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc}).") from exc
    found = [d for d in docs if d.get("kind") == "PodTemplate" and d.get("metadata", {}).get("name") == name]
    if len(found) != 1:
        kinds = sorted(f"{d.get('kind')}/{d.get('metadata', {}).get('name')}" for d in docs)
        raise ConfigError(f"{path}: expected one PodTemplate named {name!r} (kubernetes.template_name), found {kinds}.")
    return check_template(found[0], str(path))


def check_template(template: dict, where: str) -> dict:
    """Check that ``template`` is a PodTemplate with a pod spec and containers; returns it."""
    spec = (template.get("template") or {}).get("spec") if isinstance(template, dict) else None
    if template.get("kind") != "PodTemplate" or not isinstance(spec, dict) or not spec.get("containers"):
        raise ConfigError(f"{where}: expected a PodTemplate with template.spec.containers (see k8s/base/train-podtemplate.yaml).")
    return template


def resolve_engine(config: KubernetesConfig, template: dict) -> str:
    """``kubernetes.engine`` if set, else the template's ``vlalign.dev/engine`` annotation, else ``job``."""
    engine = config.engine or (template.get("metadata", {}).get("annotations") or {}).get(ENGINE_ANNOTATION) or "job"
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r} (kubernetes.engine or the PodTemplate's {ENGINE_ANNOTATION}): expected one of {list(ENGINES)}.")
    return engine


def resolve_queue(config: KubernetesConfig, template: dict) -> str | None:
    """``kubernetes.queue_name`` if set, else the template's ``vlalign.dev/queue-name`` annotation, else None."""
    return config.queue_name or (template.get("metadata", {}).get("annotations") or {}).get(QUEUE_ANNOTATION) or None


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------


@dataclass
class RenderedStage:
    """The objects of one attempt of one stage, in creation order."""

    name: str  # name of the Job / TrainJob (and of the Service and spec ConfigMap)
    engine: str  # "job" or "trainjob"
    objects: list[dict]  # [ConfigMap (object storage only)], [Service (job only)], Job or TrainJob
    nnodes: int  # pods
    nproc_per_node: int  # processes per pod
    container: str  # the training container's name in the pods
    notes: list[str] = field(default_factory=list)  # template fields a TrainJob cannot carry (dropped)

    @property
    def workload(self) -> dict:
        """The Job or TrainJob."""
        return self.objects[-1]


def slug(text: str, max_len: int = 20) -> str:
    """A DNS-1123 label fragment of ``text`` (lower case, digits, '-')."""
    out = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return (out[:max_len].strip("-")) or "stage"


def job_name(prefix: str, stage: str, digest: str, attempt: int) -> str:
    """``<prefix>-<stage>-<digest6>-r<attempt>``, at most 52 characters, a valid DNS-1035 label."""
    tail = f"-{digest[:6]}-r{attempt}"
    head = f"{slug(prefix, 12)}-{slug(stage, MAX_JOB_NAME)}"
    name = head[: MAX_JOB_NAME - len(tail)].rstrip("-") + tail
    if not name[0].isalpha():
        name = "v" + name[: MAX_JOB_NAME - 1]
    return name


def render_stage(
    template: dict,
    config: KubernetesConfig,
    *,
    stage: str,
    spec_path: str,
    attempt: int = 0,
    spec_json: str | None = None,
    spec_in_configmap: bool = False,
    identity: str | None = None,
) -> RenderedStage:
    """Objects that run ``torchrun -m vlalign train --spec spec_path`` on ``config.nnodes`` pods.

    ``spec_json``: the spec's text; it goes into the job's name hash (a changed spec is a new job, an unchanged
    one is followed if still running). With ``spec_in_configmap`` (object storage) it travels in a ConfigMap
    mounted at /etc/vlalign and ``spec_path`` is ``/etc/vlalign/spec.json``; otherwise ``spec_path`` is a file on
    the shared volume. ``identity``: what names the job instead of ``spec_json`` (the launcher leaves out the
    MLflow run ids, which change with every pipeline run, so that a restarted pipeline finds its running job).
    """
    check_template(template, f"PodTemplate {template.get('metadata', {}).get('name')}")
    engine = resolve_engine(config, template)
    queue = resolve_queue(config, template)
    digest = _digest(template, config, stage, spec_path, spec_json if identity is None else identity)
    name = job_name(config.job_name_prefix, stage, digest, attempt)
    labels = {
        "app.kubernetes.io/name": "vlalign",
        "app.kubernetes.io/component": "training",
        JOB_LABEL: name,
        STAGE_LABEL: slug(stage, 63),
        ATTEMPT_LABEL: str(attempt),
    }
    pod = _pod_template(template, config, labels)
    container = _container(pod["spec"], config.container_name)
    nproc = config.nproc_per_node or _gpus(container) or 1
    command = ["torchrun", "-m", "vlalign", "train", "--spec", spec_path]
    objects: list[dict] = []
    if spec_in_configmap:
        if spec_json is None:
            raise ValueError("spec_in_configmap needs spec_json")
        objects.append(_spec_configmap(name, config.namespace, labels, spec_json))
        _mount_spec(pod["spec"], container, name)
    meta_labels = dict(labels, **({QUEUE_LABEL: queue} if queue else {}))
    annotations = {SPEC_ANNOTATION: spec_path}
    if engine == "job":
        container["command"] = command
        container.pop("args", None)
        _set_env(container, _pet_env(name, config, nproc))
        pod["spec"]["subdomain"] = name
        pod["spec"]["restartPolicy"] = "Never"
        annotations[CONTAINER_ANNOTATION] = container["name"]
        objects.append(_headless_service(name, config, labels))
        objects.append(_indexed_job(name, config, meta_labels, annotations, pod, suspend=bool(queue)))
        return RenderedStage(name, engine, objects, config.nnodes, nproc, container["name"])
    if any(e.get("name") in PET_VARIABLES for e in container.get("env", [])):
        raise ConfigError(
            "the pod template sets PET_* variables; a TrainJob's torch runtime injects them and rejects a job that "
            "sets them. Remove them from the template (the job engine sets them itself)."
        )
    annotations[CONTAINER_ANNOTATION] = TRAINJOB_NODE
    trainjob, notes = _trainjob(name, config, meta_labels, annotations, pod, container, command, nproc, bool(queue))
    objects.append(trainjob)
    return RenderedStage(name, engine, objects, config.nnodes, nproc, TRAINJOB_NODE, notes)


def _digest(template: dict, config: KubernetesConfig, stage: str, spec_path: str, spec_json: str | None) -> str:
    payload = json.dumps([template.get("template"), config.to_dict(), stage, spec_path, spec_json], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _pod_template(template: dict, config: KubernetesConfig, labels: dict[str, str]) -> dict:
    """The template's pod template with the config's overrides and our labels."""
    pod = copy.deepcopy(template["template"])
    meta = pod.setdefault("metadata", {})
    meta["labels"] = {**(meta.get("labels") or {}), **labels}
    spec = pod["spec"]
    container = _container(spec, config.container_name)
    if config.image:
        container["image"] = config.image
    resources = container.setdefault("resources", {})
    for kind, values in (config.resources or {}).items():
        resources[kind] = {**(resources.get(kind) or {}), **{k: str(v) for k, v in (values or {}).items()}}
    if config.gpus_per_node is not None:
        for kind in ("requests", "limits"):
            bucket = resources.setdefault(kind, {})
            if config.gpus_per_node:
                bucket[GPU_RESOURCE] = str(config.gpus_per_node)
            else:
                bucket.pop(GPU_RESOURCE, None)
    if config.node_selector:
        spec["nodeSelector"] = {**(spec.get("nodeSelector") or {}), **config.node_selector}
    if config.tolerations:
        spec["tolerations"] = [*(spec.get("tolerations") or []), *copy.deepcopy(config.tolerations)]
    if config.service_account:
        spec["serviceAccountName"] = config.service_account
    storage = config.storage
    if storage.kind == "pvc":
        volumes = {v.get("name"): v for v in spec.get("volumes", [])}
        volume = volumes.get(storage.volume_name)
        if volume is None or "persistentVolumeClaim" not in volume:
            raise ConfigError(
                f"the pod template has no persistentVolumeClaim volume named {storage.volume_name!r} "
                "(kubernetes.storage.volume_name); the pods need the shared data volume."
            )
        if storage.claim_name:
            volume["persistentVolumeClaim"]["claimName"] = storage.claim_name
        mounts = [m for m in container.get("volumeMounts", []) if m.get("name") == storage.volume_name]
        if not any(m.get("mountPath", "").rstrip("/") == storage.mount_path.rstrip("/") for m in mounts):
            raise ConfigError(
                f"container {container['name']!r} of the pod template does not mount volume {storage.volume_name!r} at "
                f"{storage.mount_path} (kubernetes.storage.mount_path); it mounts it at "
                f"{[m.get('mountPath') for m in mounts] or 'no path'}."
            )
    return pod


def _container(pod_spec: dict, name: str) -> dict:
    for container in pod_spec.get("containers", []):
        if container.get("name") == name:
            return container
    names = [c.get("name") for c in pod_spec.get("containers", [])]
    raise ConfigError(f"the pod template has no container {name!r} (kubernetes.container_name); its containers are {names}.")


def _gpus(container: dict) -> int:
    limits = (container.get("resources") or {}).get("limits") or {}
    return int(limits.get(GPU_RESOURCE, 0) or 0)


def _set_env(container: dict, extra: list[dict]) -> None:
    names = {e["name"] for e in extra}
    container["env"] = [e for e in container.get("env", []) if e.get("name") not in names] + extra


def _pet_env(name: str, config: KubernetesConfig, nproc: int) -> list[dict]:
    """torchrun's static rendezvous, as environment variables (torchrun reads PET_<OPTION>)."""
    return [
        {"name": "PET_NNODES", "value": str(config.nnodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(nproc)},
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}},
        {"name": "PET_MASTER_ADDR", "value": f"{name}-0.{name}"},
        {"name": "PET_MASTER_PORT", "value": str(config.master_port)},
    ]


def _spec_configmap(name: str, namespace: str, labels: dict[str, str], spec_json: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-spec", "namespace": namespace, "labels": dict(labels)},
        "data": {"spec.json": spec_json},
    }


def _mount_spec(pod_spec: dict, container: dict, name: str) -> None:
    pod_spec.setdefault("volumes", []).append({"name": "vlalign-spec", "configMap": {"name": f"{name}-spec"}})
    container.setdefault("volumeMounts", []).append({"name": "vlalign-spec", "mountPath": SPEC_MOUNT_DIR, "readOnly": True})


def _headless_service(name: str, config: KubernetesConfig, labels: dict[str, str]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": config.namespace, "labels": dict(labels)},
        "spec": {
            "clusterIP": "None",  # headless: DNS names per pod, <job>-<index>.<service>
            "publishNotReadyAddresses": True,  # resolvable before the pods are Ready (rendezvous happens first)
            "selector": {JOB_NAME_LABEL: name},
            "ports": [{"name": "rendezvous", "port": config.master_port, "targetPort": config.master_port}],
        },
    }


def _indexed_job(name: str, config: KubernetesConfig, labels: dict, annotations: dict, pod: dict, suspend: bool) -> dict:
    spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": config.nnodes,
        "parallelism": config.nnodes,
        "backoffLimit": 0,  # no pod is retried: torchrun ranks cannot rejoin a static rendezvous
        "podFailurePolicy": {
            "rules": [
                # node loss, pre-emption, eviction: fail at once, with a reason naming the pod; the launcher
                # resubmits the whole job, which resumes from the last checkpoint
                {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]
        },
        "activeDeadlineSeconds": max(1, int(math.ceil(config.timeout_s))),
        "ttlSecondsAfterFinished": int(config.ttl_after_finished_s),
        "template": pod,
    }
    if suspend:
        spec["suspend"] = True  # Kueue admits the whole gang, then unsuspends
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": config.namespace, "labels": labels, "annotations": annotations},
        "spec": spec,
    }


# Pod-spec fields a TrainJob runtime patch can carry (TrainerV1alpha1PodSpecPatch, kubeflow-trainer-api 2.3.0).
_POD_PATCH_FIELDS = ("affinity", "imagePullSecrets", "nodeSelector", "schedulingGates", "securityContext",
                     "serviceAccountName", "terminationGracePeriodSeconds", "tolerations", "volumes")
# Container fields carried by the trainer section or the container patch.
_CONTAINER_FIELDS = ("name", "image", "command", "args", "env", "resources", "securityContext", "volumeMounts")
# Fields the torch runtime sets itself: not reported as dropped.
_RUNTIME_OWNED = ("restartPolicy", "subdomain", "containers")


def _trainjob(name, config, labels, annotations, pod, container, command, nproc, suspend):
    spec = pod["spec"]
    notes = [f"pod spec field {k!r}" for k in sorted(spec) if k not in _POD_PATCH_FIELDS + _RUNTIME_OWNED]
    notes += [f"container field {k!r}" for k in sorted(container) if k not in _CONTAINER_FIELDS]
    notes += [f"container {c.get('name')!r}" for c in spec.get("containers", []) if c is not container]
    env = copy.deepcopy(container.get("env", []))
    for item in env:  # the container is called "node" in the runtime
        ref = (item.get("valueFrom") or {}).get("resourceFieldRef")
        if ref and ref.get("containerName") == container["name"]:
            ref["containerName"] = TRAINJOB_NODE
    trainer: dict[str, Any] = {
        "image": container.get("image"),
        "command": command,
        "numNodes": config.nnodes,
        "numProcPerNode": nproc,
        "resourcesPerNode": copy.deepcopy(container.get("resources") or {}),
    }
    if env:
        trainer["env"] = env
    node_patch: dict[str, Any] = {"name": TRAINJOB_NODE}
    for key in ("securityContext", "volumeMounts"):
        if key in container:
            node_patch[key] = copy.deepcopy(container[key])
    pod_patch = {k: copy.deepcopy(spec[k]) for k in _POD_PATCH_FIELDS if k in spec}
    pod_patch["containers"] = [node_patch]
    pod_meta = {"labels": dict(pod["metadata"].get("labels") or {})}
    if pod["metadata"].get("annotations"):
        pod_meta["annotations"] = dict(pod["metadata"]["annotations"])
        if pod_meta["annotations"].get("kubectl.kubernetes.io/default-container") == container["name"]:
            pod_meta["annotations"]["kubectl.kubernetes.io/default-container"] = TRAINJOB_NODE
    body: dict[str, Any] = {
        "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": config.trainjob_runtime_kind, "name": config.trainjob_runtime},
        "activeDeadlineSeconds": max(1, int(math.ceil(config.timeout_s))),
        "trainer": trainer,
        "runtimePatches": [{
            "manager": PATCH_MANAGER,
            "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
                "name": TRAINJOB_NODE,
                "template": {"metadata": {"labels": dict(pod_meta["labels"])},
                             "spec": {"template": {"metadata": pod_meta, "spec": pod_patch}}},
            }]}}},
        }],
    }
    if suspend:
        body["suspend"] = True
    trainjob = {
        "apiVersion": TRAINER_API_VERSION,
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": config.namespace, "labels": labels, "annotations": annotations},
        "spec": body,
    }
    return trainjob, notes


# ------------------------------------------------------------------------------------------------
# What a pod of a rendered Job runs
# ------------------------------------------------------------------------------------------------


def pod_command_env(manifests: list[dict], index: int) -> tuple[list[str], dict[str, str]]:
    """The training container's command and environment in pod ``index`` of the rendered Indexed Job.

    As the kubelet sets them: ``value`` entries verbatim; downward-API fields resolved for that pod (the
    completion-index annotation, ``metadata.name`` = the pod's hostname ``<job>-<index>``, namespace, labels);
    ``resourceFieldRef`` from the container's resources; ConfigMap/Secret references from ``manifests`` (an
    optional one that is absent is skipped); ``JOB_COMPLETION_INDEX`` added as the Job controller does; and
    ``$(VAR)`` references expanded in values, command and args. Variables the kubelet adds for the cluster
    (``KUBERNETES_SERVICE_HOST``, ...) are not included.
    """
    jobs = [m for m in manifests if m.get("kind") == "Job"]
    if len(jobs) != 1:
        raise ValueError(f"expected one Job among the manifests, found {len(jobs)} (a TrainJob's pods are the operator's).")
    job = jobs[0]
    completions = job["spec"].get("completions", 1)
    if not 0 <= index < completions:
        raise ValueError(f"index {index} is outside the Job's completions 0..{completions - 1}.")
    pod_meta = job["spec"]["template"].get("metadata") or {}
    pod_spec = job["spec"]["template"]["spec"]
    wanted = (job["metadata"].get("annotations") or {}).get(CONTAINER_ANNOTATION)
    containers = pod_spec["containers"]
    container = next((c for c in containers if c["name"] == wanted), containers[0])
    hostname = f"{job['metadata']['name']}-{index}"
    namespace = job["metadata"].get("namespace", "default")
    annotations = {**(pod_meta.get("annotations") or {}), INDEX_ANNOTATION: str(index)}
    labels = {**(pod_meta.get("labels") or {}), JOB_NAME_LABEL: job["metadata"]["name"], "batch.kubernetes.io/job-completion-index": str(index)}
    fields = {"metadata.name": hostname, "metadata.namespace": namespace, "spec.serviceAccountName": pod_spec.get("serviceAccountName", "default")}
    configmaps = {m["metadata"]["name"]: m.get("data", {}) for m in manifests if m.get("kind") == "ConfigMap"}
    secrets = {m["metadata"]["name"]: m.get("stringData", {}) for m in manifests if m.get("kind") == "Secret"}

    def field_value(path: str) -> str:
        if path in fields:
            return fields[path]
        match = re.fullmatch(r"metadata\.(annotations|labels)\['(.+)'\]", path)
        if match:
            source = annotations if match.group(1) == "annotations" else labels
            return source.get(match.group(2), "")
        raise ValueError(f"the downward-API field {path!r} is only known on a running pod (node, IP, uid).")

    env: dict[str, str] = {}
    if completions and job["spec"].get("completionMode") == "Indexed":
        env["JOB_COMPLETION_INDEX"] = str(index)
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef") or source.get("secretRef")
        store = configmaps if "configMapRef" in source else secrets
        if ref["name"] not in store:
            if ref.get("optional"):
                continue
            raise ValueError(f"envFrom {ref['name']!r} is not among the manifests; it lives in the cluster only.")
        for key, value in store[ref["name"]].items():
            env[source.get("prefix", "") + key] = value
    for item in container.get("env", []):
        if "valueFrom" not in item:
            env[item["name"]] = _expand(item.get("value", ""), env)
            continue
        ref = item["valueFrom"]
        if "fieldRef" in ref:
            env[item["name"]] = field_value(ref["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in ref:
            env[item["name"]] = _resource_value(container, ref["resourceFieldRef"])
        else:
            kind = "configMapKeyRef" if "configMapKeyRef" in ref else "secretKeyRef"
            key_ref = ref[kind]
            store = configmaps if kind == "configMapKeyRef" else secrets
            value = store.get(key_ref["name"], {}).get(key_ref["key"])
            if value is None:
                if key_ref.get("optional"):
                    continue
                raise ValueError(f"env {item['name']}: {kind} {key_ref['name']}/{key_ref['key']} is not among the manifests.")
            env[item["name"]] = value
    command = [_expand(part, env) for part in [*container.get("command", []), *container.get("args", [])]]
    if not container.get("command"):
        raise ValueError(f"container {container['name']!r} has no command; the image's entrypoint is not known here.")
    return command, env


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known variables replaced, $$ escapes, unknown references kept."""
    def repl(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", repl, text)


_SUFFIXES = {
    "": Decimal(1), "m": Decimal("0.001"), "k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12, "P": Decimal(10) ** 15, "E": Decimal(10) ** 18, "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40, "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
}


def parse_quantity(value: str | int | float) -> Decimal:
    """A Kubernetes quantity ("500m", "16Gi", "2") as a number."""
    match = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)", str(value).strip())
    if not match or match.group(2) not in _SUFFIXES:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return Decimal(match.group(1)) * _SUFFIXES[match.group(2)]


def _resource_value(container: dict, ref: dict) -> str:
    """A resourceFieldRef as the kubelet computes it: the quantity divided by the divisor, rounded up."""
    kind, _, resource = ref["resource"].partition(".")
    value = ((container.get("resources") or {}).get(kind) or {}).get(resource)
    if value is None and kind == "requests":
        value = ((container.get("resources") or {}).get("limits") or {}).get(resource)
    if value is None:
        raise ValueError(f"resourceFieldRef {ref['resource']}: the container sets no {ref['resource']}, so the pod would see the node's allocatable.")
    result = parse_quantity(value) / parse_quantity(ref.get("divisor", "1"))
    return str(int(result.to_integral_value(rounding="ROUND_CEILING")))
