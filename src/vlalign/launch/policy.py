"""Pod Security "restricted", plus our own rules, checked on every pod template an object holds.

Off-the-shelf scanners skip pod templates nested in custom resources (JobSet, TrainJob), so this small checker
finds them itself: Pod, PodTemplate, Job, CronJob, Deployment, StatefulSet, DaemonSet, ReplicaSet, JobSet,
(Cluster)TrainingRuntime (a JobSet template) and TrainJob (the pod-spec patches of ``runtimePatches``, with the
trainer's resources on the ``node`` container). The launcher refuses to submit a job that fails it.

Rules (https://kubernetes.io/docs/concepts/security/pod-security-standards/, restricted, plus ours):

- ``host-namespaces``: no hostNetwork, hostPID, hostIPC
- ``privileged``: no privileged container
- ``capabilities``: ``drop: [ALL]``; nothing added but NET_BIND_SERVICE
- ``privilege-escalation``: ``allowPrivilegeEscalation: false`` on every container
- ``non-root``: ``runAsNonRoot: true`` on the pod or on every container, never false
- ``non-root-user``: no ``runAsUser: 0``
- ``seccomp``: ``RuntimeDefault`` or ``Localhost`` on the pod or on every container, never Unconfined
- ``volume-types``: only configMap, csi, downwardAPI, emptyDir, ephemeral, image, persistentVolumeClaim,
  projected, secret
- ``host-ports``: no hostPort
- ``read-only-root``: ``readOnlyRootFilesystem: true`` on every container (ours)
- ``resources``: requests and limits of cpu and memory on every container (ours)
"""

from __future__ import annotations

from collections.abc import Iterator

RULES = ("host-namespaces", "privileged", "capabilities", "privilege-escalation", "non-root", "non-root-user",
         "seccomp", "volume-types", "host-ports", "read-only-root", "resources")
ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "image", "persistentVolumeClaim",
                   "projected", "secret"}
_WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "ReplicationController"}


def pod_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    """(where, pod spec) for every pod template inside ``obj``; ``where`` names the path."""
    kind = obj.get("kind")
    name = f"{kind}/{(obj.get('metadata') or {}).get('name')}"
    spec = obj.get("spec") or {}
    if kind == "Pod":
        yield name, spec
    elif kind == "PodTemplate":
        yield f"{name}.template", (obj.get("template") or {}).get("spec") or {}
    elif kind in _WORKLOADS:
        yield f"{name}.spec.template", (spec.get("template") or {}).get("spec") or {}
    elif kind == "CronJob":
        job = ((spec.get("jobTemplate") or {}).get("spec") or {})
        yield f"{name}.spec.jobTemplate.spec.template", (job.get("template") or {}).get("spec") or {}
    elif kind == "JobSet":
        yield from _jobset(spec, f"{name}.spec")
    elif kind in ("TrainingRuntime", "ClusterTrainingRuntime"):
        yield from _jobset((spec.get("template") or {}).get("spec") or {}, f"{name}.spec.template.spec")
    elif kind == "TrainJob":
        yield from _trainjob(spec, name)


def _jobset(spec: dict, where: str) -> Iterator[tuple[str, dict]]:
    for i, rjob in enumerate(spec.get("replicatedJobs") or []):
        job = ((rjob.get("template") or {}).get("spec") or {})
        yield f"{where}.replicatedJobs[{i}:{rjob.get('name')}].template.spec.template", (job.get("template") or {}).get("spec") or {}


def _trainjob(spec: dict, name: str) -> Iterator[tuple[str, dict]]:
    """The pod spec a TrainJob asks for: its runtime patches, the trainer's resources on container ``node``."""
    resources = (spec.get("trainer") or {}).get("resourcesPerNode")
    found = False
    for p, patch in enumerate(spec.get("runtimePatches") or []):
        runtime = ((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}
        for where, pod in _jobset(runtime, f"{name}.spec.runtimePatches[{p}]"):
            found = True
            pod = dict(pod, containers=[
                dict(c, resources=resources) if c.get("name") == "node" and resources is not None and "resources" not in c else c
                for c in pod.get("containers") or []
            ])
            yield where, pod
    if not found:
        # nothing patched: the runtime's own pod template applies, which this TrainJob does not constrain
        yield f"{name}.spec (no runtimePatches)", {"containers": [{"name": "node", "resources": resources or {}}]}


def _containers(pod: dict) -> list[dict]:
    return [*(pod.get("initContainers") or []), *(pod.get("containers") or []), *(pod.get("ephemeralContainers") or [])]


def pod_violations(pod: dict) -> list[tuple[str, str]]:
    """(rule, message) for every rule a pod spec breaks."""
    out: list[tuple[str, str]] = []
    pod_sc = pod.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            out.append(("host-namespaces", f"{key}: true"))
    containers = _containers(pod)
    if not containers:
        out.append(("resources", "no containers"))
    for c in containers:
        cname = c.get("name", "?")
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            out.append(("privileged", f"container {cname}: privileged: true"))
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(("capabilities", f"container {cname}: capabilities.drop lacks ALL"))
        added = set(caps.get("add") or []) - {"NET_BIND_SERVICE"}
        if added:
            out.append(("capabilities", f"container {cname}: adds capabilities {sorted(added)}"))
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(("privilege-escalation", f"container {cname}: allowPrivilegeEscalation is not false"))
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if non_root is not True:
            out.append(("non-root", f"container {cname}: runAsNonRoot is not true (pod or container)"))
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            out.append(("non-root-user", f"container {cname}: runAsUser: 0"))
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(("seccomp", f"container {cname}: seccompProfile.type is {seccomp!r}, expected RuntimeDefault"))
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                out.append(("host-ports", f"container {cname}: hostPort {port['hostPort']}"))
        if sc.get("readOnlyRootFilesystem") is not True:
            out.append(("read-only-root", f"container {cname}: readOnlyRootFilesystem is not true"))
        resources = c.get("resources") or {}
        for kind in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(resources.get(kind) or {})
            if missing:
                out.append(("resources", f"container {cname}: {kind} lacks {sorted(missing)}"))
    if pod_sc.get("runAsUser") == 0:
        out.append(("non-root-user", "pod: runAsUser: 0"))
    if (pod_sc.get("seccompProfile") or {}).get("type") == "Unconfined":
        out.append(("seccomp", "pod: seccompProfile Unconfined"))
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            out.append(("volume-types", f"volume {volume.get('name')}: type {sorted(kinds - ALLOWED_VOLUMES)} not allowed"))
    return out


def violations(obj: dict) -> list[str]:
    """Every violation in every pod template of ``obj``, as ``"<where>: [<rule>] <message>"``."""
    return [f"{where}: [{rule}] {message}" for where, pod in pod_specs(obj) for rule, message in pod_violations(pod)]


def has_pod_template(obj: dict) -> bool:
    """Whether ``obj`` holds at least one pod template."""
    return any(True for _ in pod_specs(obj))
