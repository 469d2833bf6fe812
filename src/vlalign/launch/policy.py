"""Pod Security Standards (baseline + restricted, Kubernetes 1.35), plus our own rules, on every pod template.

Off-the-shelf scanners skip pod templates nested in custom resources (JobSet, TrainJob), so this small checker
finds them itself: Pod, PodTemplate, Job, CronJob, Deployment, StatefulSet, DaemonSet, ReplicaSet, JobSet,
(Cluster)TrainingRuntime (a JobSet template) and TrainJob (the pod-spec patches of ``runtimePatches``, with the
trainer's resources on the ``node`` container). The launcher refuses to submit a job that fails it.

Source of the controls: the Pod Security Standards page (https://kubernetes.io/docs/concepts/security/
pod-security-standards/, found with the ``search`` tool) and, for the exact per-version values, the reference
implementation the API server runs, k8s.io/pod-security-admission v0.35.6 (= Kubernetes 1.35, the version
tests/k8s validates the manifests against), ``policy/check_*.go``. ``CONTROLS`` below is the whole list: one entry per
control and field path. Containers are initContainers, containers and ephemeralContainers alike.

Baseline: host-process, host-namespaces, privileged, capabilities (add only the default set), host-path, host-ports,
apparmor (annotation and ``appArmorProfile.type``), selinux, proc-mount, seccomp (never Unconfined), sysctls (the
safe set as of 1.32: the 1.29 set plus ``net.ipv4.tcp_rmem``/``tcp_wmem``), probe-host (1.34+: no ``host`` in probes
and lifecycle handlers). Restricted adds volume-types (replaces host-path; ``image`` volumes are allowed since they
were added), privilege-escalation, non-root, non-root-user, and tightens capabilities (drop ALL, add only
NET_BIND_SERVICE) and seccomp (RuntimeDefault or Localhost on the pod or every container). Ours (level "vlalign"):
read-only-root and resources.

Deliberately stricter than the admission controller: the 1.35 relaxations for user-namespace pods
(``hostUsers: false`` lifts non-root and non-root-user) and for Windows pods (``os.name: windows`` lifts
capabilities, seccomp and privilege-escalation) are not applied. Later upstream checks are not 1.35 controls, and
their fields are not in the 1.35 schema that strict validation enforces: ``securityContext.ulimits`` (1.37+) and
``securityContext.cgroupOptions``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

# each level includes the ones before it; "vlalign" (baseline + restricted + ours) is what the launcher enforces
LEVELS = ("baseline", "restricted", "vlalign")
BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range",
                "net.ipv4.ip_local_reserved_ports",  # 1.27+
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes",  # 1.29+
                "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"}  # 1.32+
SELINUX_TYPES = {None, "", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}  # engine: 1.31+
ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "image", "persistentVolumeClaim",
                   "projected", "secret"}
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"
_CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")
_WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "ReplicationController"}


@dataclass(frozen=True)
class Control:
    """One control on one field path.

    ``scope``: "pod" (path in the pod spec), "container" (path in each container) or "metadata" (the pod template's
    metadata). ``path``: dot-separated keys; ``key[*]`` checks every item of a list. ``ok(value)`` says whether the
    value is allowed (``None`` = unset); ``expect`` says what is. ``pod_default``: for a container path, the pod-spec
    path whose value applies when the container leaves it unset. ``replaces``: rules of lower levels this one
    supersedes (as restricted's volume types supersede baseline's hostPath).
    """

    rule: str
    level: str
    scope: str
    path: str
    ok: Callable[[Any], bool]
    expect: str
    pod_default: str | None = None
    show: Callable[[Any], str] = repr
    replaces: tuple[str, ...] = ()


def _unset_or(*allowed: Any) -> Callable[[Any], bool]:
    return lambda v: v is None or v in allowed


def _has_all(resources: dict | None) -> bool:
    return {"cpu", "memory"} <= set(resources or {})


def _volume_types(volume: dict) -> set[str]:
    return set(volume) - {"name"}


def _bad_apparmor(annotations: dict | None) -> dict[str, str]:
    return {k: v for k, v in (annotations or {}).items() if k.startswith(APPARMOR_ANNOTATION)
            and not (not v or v == "runtime/default" or str(v).startswith("localhost/"))}


_HOST_HANDLERS = [f"{probe}.{action}.host" for probe in ("livenessProbe", "readinessProbe", "startupProbe",
                                                          "lifecycle.postStart", "lifecycle.preStop")
                  for action in ("httpGet", "tcpSocket")]
_PROFILE_OK = ("RuntimeDefault", "Localhost")  # the seccomp and AppArmor profile types allowed
_SC = "securityContext"

CONTROLS: tuple[Control, ...] = (
    # --- baseline
    Control("host-process", "baseline", "pod", f"{_SC}.windowsOptions.hostProcess", _unset_or(False), "false or unset"),
    Control("host-process", "baseline", "container", f"{_SC}.windowsOptions.hostProcess", _unset_or(False),
            "false or unset"),
    *(Control("host-namespaces", "baseline", "pod", key, _unset_or(False), "false or unset")
      for key in ("hostNetwork", "hostPID", "hostIPC")),
    Control("privileged", "baseline", "container", f"{_SC}.privileged", _unset_or(False), "false or unset"),
    Control("capabilities", "baseline", "container", f"{_SC}.capabilities.add[*]",
            lambda v: v in BASELINE_CAPABILITIES, "one of vlalign.launch.policy.BASELINE_CAPABILITIES"),
    Control("host-path", "baseline", "pod", "volumes[*].hostPath", lambda v: v is None, "unset"),
    Control("host-ports", "baseline", "container", "ports[*].hostPort", _unset_or(0), "0 or unset"),
    Control("apparmor", "baseline", "metadata", "annotations", lambda v: not _bad_apparmor(v),
            "runtime/default, localhost/* or empty", show=lambda v: repr(_bad_apparmor(v))),
    Control("apparmor", "baseline", "pod", f"{_SC}.appArmorProfile.type", _unset_or(*_PROFILE_OK),
            "RuntimeDefault, Localhost or unset"),
    Control("apparmor", "baseline", "container", f"{_SC}.appArmorProfile.type", _unset_or(*_PROFILE_OK),
            "RuntimeDefault, Localhost or unset"),
    *(Control("selinux", "baseline", scope, f"{_SC}.seLinuxOptions.type", lambda v: v in SELINUX_TYPES,
              f"one of {sorted(t for t in SELINUX_TYPES if t)} or unset") for scope in ("pod", "container")),
    *(Control("selinux", "baseline", scope, f"{_SC}.seLinuxOptions.{key}", _unset_or(""), "unset")
      for scope in ("pod", "container") for key in ("user", "role")),
    Control("proc-mount", "baseline", "container", f"{_SC}.procMount", _unset_or("Default"), "Default or unset"),
    *(Control("seccomp", "baseline", scope, f"{_SC}.seccompProfile.type", _unset_or(*_PROFILE_OK),
              "RuntimeDefault, Localhost or unset") for scope in ("pod", "container")),
    Control("sysctls", "baseline", "pod", f"{_SC}.sysctls[*].name", lambda v: v in SAFE_SYSCTLS,
            "one of vlalign.launch.policy.SAFE_SYSCTLS"),
    *(Control("probe-host", "baseline", "container", path, _unset_or(""), "unset") for path in _HOST_HANDLERS),
    # --- restricted
    Control("volume-types", "restricted", "pod", "volumes[*]", lambda v: _volume_types(v) <= ALLOWED_VOLUMES,
            f"one of {sorted(ALLOWED_VOLUMES)}", show=lambda v: f"of type {sorted(_volume_types(v))}",
            replaces=("host-path",)),
    Control("privilege-escalation", "restricted", "container", f"{_SC}.allowPrivilegeEscalation",
            lambda v: v is False, "false"),
    Control("non-root", "restricted", "pod", f"{_SC}.runAsNonRoot", _unset_or(True), "true or unset"),
    Control("non-root", "restricted", "container", f"{_SC}.runAsNonRoot", lambda v: v is True,
            "true (on the container or the pod)", pod_default=f"{_SC}.runAsNonRoot"),
    *(Control("non-root-user", "restricted", scope, f"{_SC}.runAsUser", lambda v: v != 0, "non-zero or unset")
      for scope in ("pod", "container")),
    Control("seccomp", "restricted", "pod", f"{_SC}.seccompProfile.type", _unset_or(*_PROFILE_OK),
            "RuntimeDefault, Localhost or unset"),
    Control("seccomp", "restricted", "container", f"{_SC}.seccompProfile.type", lambda v: v in _PROFILE_OK,
            "RuntimeDefault or Localhost (on the container or the pod)", pod_default=f"{_SC}.seccompProfile.type"),
    Control("capabilities", "restricted", "container", f"{_SC}.capabilities.drop", lambda v: "ALL" in (v or []),
            "a list with ALL"),
    Control("capabilities", "restricted", "container", f"{_SC}.capabilities.add[*]", lambda v: v == "NET_BIND_SERVICE",
            "NET_BIND_SERVICE only"),
    # --- ours
    Control("read-only-root", "vlalign", "container", f"{_SC}.readOnlyRootFilesystem", lambda v: v is True, "true"),
    *(Control("resources", "vlalign", "container", f"resources.{kind}", _has_all, "cpu and memory")
      for kind in ("requests", "limits")),
    Control("resources", "vlalign", "pod", "containers", bool, "at least one container",
            show=lambda v: "empty"),
)
RULES = tuple(dict.fromkeys(c.rule for c in CONTROLS))


def controls(level: str = "vlalign") -> list[Control]:
    """The controls of ``level``: every lower level's too, except the rules a higher level tightens or replaces."""
    if level not in LEVELS:
        raise ValueError(f"unknown pod security level {level!r}; expected one of {LEVELS}")
    rank = LEVELS.index(level)
    active = [c for c in CONTROLS if LEVELS.index(c.level) <= rank]
    top: dict[str, int] = {}
    for c in active:
        for rule in (c.rule, *c.replaces):
            top[rule] = max(top.get(rule, -1), LEVELS.index(c.level))
    return [c for c in active if LEVELS.index(c.level) == top[c.rule]]


def _lookup(node: Any, path: str) -> list[tuple[str, Any]]:
    """(concrete path, value) for ``path`` in ``node``: an unset field gives None, ``key[*]`` one entry per item."""
    found: list[tuple[str, Any]] = [("", node)]
    for part in path.split("."):
        key, each = (part[:-3], True) if part.endswith("[*]") else (part, False)
        step: list[tuple[str, Any]] = []
        for where, value in found:
            child = value.get(key) if isinstance(value, dict) else None
            here = f"{where}.{key}" if where else key
            if not each:
                step.append((here, child))
                continue
            for i, item in enumerate(child or []):
                name = item.get("name") if isinstance(item, dict) else None
                step.append((f"{here}[{i}:{name}]" if name else f"{here}[{i}]", item))
        found = step
    return found


def pod_violations(pod: dict, metadata: dict | None = None, level: str = "vlalign") -> list[tuple[str, str]]:
    """(rule, message) for every control of ``level`` the pod spec (and its template's ``metadata``) breaks."""
    out: list[tuple[str, str]] = []
    for c in controls(level):
        if c.scope == "container":
            for kind in _CONTAINER_LISTS:
                for i, container in enumerate(pod.get(kind) or []):
                    for where, value in _lookup(container, c.path):
                        if value is None and c.pod_default:
                            value = _lookup(pod, c.pod_default)[0][1]
                        if not c.ok(value):
                            out.append((c.rule, f"container {container.get('name', '?')}: spec.{kind}[{i}].{where} "
                                                f"is {c.show(value)}; allowed: {c.expect}"))
        else:
            node, prefix = (metadata or {}, "metadata") if c.scope == "metadata" else (pod, "spec")
            for where, value in _lookup(node, c.path):
                if not c.ok(value):
                    out.append((c.rule, f"pod: {prefix}.{where} is {c.show(value)}; allowed: {c.expect}"))
    return out


def pod_templates(obj: dict) -> Iterator[tuple[str, dict, dict]]:
    """(where, pod metadata, pod spec) for every pod template inside ``obj``; ``where`` names the path."""
    kind = obj.get("kind")
    name = f"{kind}/{(obj.get('metadata') or {}).get('name')}"
    spec = obj.get("spec") or {}
    if kind == "Pod":
        yield name, obj.get("metadata") or {}, spec
    elif kind == "PodTemplate":
        yield f"{name}.template", *_split(obj.get("template"))
    elif kind in _WORKLOADS:
        yield f"{name}.spec.template", *_split(spec.get("template"))
    elif kind == "CronJob":
        job = ((spec.get("jobTemplate") or {}).get("spec") or {})
        yield f"{name}.spec.jobTemplate.spec.template", *_split(job.get("template"))
    elif kind == "JobSet":
        yield from _jobset(spec, f"{name}.spec")
    elif kind in ("TrainingRuntime", "ClusterTrainingRuntime"):
        yield from _jobset((spec.get("template") or {}).get("spec") or {}, f"{name}.spec.template.spec")
    elif kind == "TrainJob":
        yield from _trainjob(spec, name)


def _split(template: dict | None) -> tuple[dict, dict]:
    return (template or {}).get("metadata") or {}, (template or {}).get("spec") or {}


def pod_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    """(where, pod spec) for every pod template inside ``obj``."""
    for where, _, spec in pod_templates(obj):
        yield where, spec


def _jobset(spec: dict, where: str) -> Iterator[tuple[str, dict, dict]]:
    for i, rjob in enumerate(spec.get("replicatedJobs") or []):
        job = ((rjob.get("template") or {}).get("spec") or {})
        yield f"{where}.replicatedJobs[{i}:{rjob.get('name')}].template.spec.template", *_split(job.get("template"))


def _trainjob(spec: dict, name: str) -> Iterator[tuple[str, dict, dict]]:
    """The pod spec a TrainJob asks for: its runtime patches, the trainer's resources on container ``node``."""
    resources = (spec.get("trainer") or {}).get("resourcesPerNode")
    found = False
    for p, patch in enumerate(spec.get("runtimePatches") or []):
        runtime = ((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}
        for where, meta, pod in _jobset(runtime, f"{name}.spec.runtimePatches[{p}]"):
            found = True
            fill = resources is not None
            pod = dict(pod, containers=[
                dict(c, resources=resources) if fill and c.get("name") == "node" and "resources" not in c else c
                for c in pod.get("containers") or []
            ])
            yield where, meta, pod
    if not found:
        # nothing patched: the runtime's own pod template applies, which this TrainJob does not constrain
        yield f"{name}.spec (no runtimePatches)", {}, {"containers": [{"name": "node", "resources": resources or {}}]}


def violations(obj: dict, level: str = "vlalign") -> list[str]:
    """Every violation in every pod template of ``obj``, as ``"<where>: [<rule>] <message>"``."""
    return [f"{where}: [{rule}] {message}" for where, meta, pod in pod_templates(obj)
            for rule, message in pod_violations(pod, meta, level)]


def has_pod_template(obj: dict) -> bool:
    """Whether ``obj`` holds at least one pod template."""
    return any(True for _ in pod_templates(obj))
