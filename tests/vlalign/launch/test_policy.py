"""The Pod Security Standards checker: finds every pod template (also inside JobSet and TrainJob) and fails on every
control of baseline and restricted (Kubernetes 1.35) and of our own rules: one case per control and field path,
each applied to the compliant Job the launcher renders, which still validates strictly against the 1.35 schema
(the schema accepts every one of these pods; only the checker refuses them)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest

from vlalign.launch import policy
from vlalign.launch.config import KubernetesConfig
from vlalign.launch.render import load_template_file, render_stage

REPO = Path(__file__).resolve().parents[3]
K8S_VERSION = "1.35.0"  # the schema version tests/k8s validates the manifests against


@pytest.fixture()
def job() -> dict:
    template = load_template_file(REPO / "k8s" / "base" / "train-podtemplate.yaml")
    return render_stage(template, KubernetesConfig(), stage="s", spec_path="/app/data/s/k8s-spec.json").workload


def _pod(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def _c(obj: dict) -> dict:
    return _pod(obj)["containers"][0]


def _sc(obj: dict) -> dict:
    return _c(obj)["securityContext"]


def _psc(obj: dict) -> dict:
    return _pod(obj)["securityContext"]


def _set(node: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def _annotate(obj: dict, key: str, value: str) -> None:
    obj["spec"]["template"]["metadata"].setdefault("annotations", {})[key] = value


_PROBE_HOSTS = [p.rsplit(".", 1)[0] for p in policy._HOST_HANDLERS]  # e.g. "lifecycle.preStop.tcpSocket"


def _probe_host(path: str):
    handler = {"port": 8080, "host": "10.0.0.1"}
    if path.endswith("httpGet"):
        handler["path"] = "/healthz"
    return lambda j: _set(_c(j), path, handler)


# (id, level, rule, breaker): each breaks one control of a compliant Job; the checker must name exactly that rule.
# Level "vlalign" (the default) is what the launcher enforces. Cases marked * are the ones the checker missed before
# it covered every control (procMount Unmasked, kernel.msgmax, spc_t, AppArmor Unconfined, hostProcess and others).
CASES = [
    ("host-process-pod*", "vlalign", "host-process", lambda j: _set(_psc(j), "windowsOptions.hostProcess", True)),
    ("host-process-container*", "vlalign", "host-process", lambda j: _set(_sc(j), "windowsOptions.hostProcess", True)),
    ("host-network", "vlalign", "host-namespaces", lambda j: _pod(j).__setitem__("hostNetwork", True)),
    ("host-pid", "vlalign", "host-namespaces", lambda j: _pod(j).__setitem__("hostPID", True)),
    ("host-ipc", "vlalign", "host-namespaces", lambda j: _pod(j).__setitem__("hostIPC", True)),
    ("privileged", "vlalign", "privileged", lambda j: _sc(j).__setitem__("privileged", True)),
    ("capabilities-add", "vlalign", "capabilities", lambda j: _set(_sc(j), "capabilities.add", ["SYS_ADMIN"])),
    ("capabilities-add-default-set", "vlalign", "capabilities", lambda j: _set(_sc(j), "capabilities.add", ["CHOWN"])),
    ("capabilities-drop", "vlalign", "capabilities", lambda j: _set(_sc(j), "capabilities.drop", ["NET_RAW"])),
    ("capabilities-baseline", "baseline", "capabilities", lambda j: _set(_sc(j), "capabilities.add", ["NET_RAW"])),
    ("host-path-baseline", "baseline", "host-path",
     lambda j: _pod(j)["volumes"].append({"name": "host", "hostPath": {"path": "/var/run"}})),
    ("host-path", "vlalign", "volume-types",
     lambda j: _pod(j)["volumes"].append({"name": "host", "hostPath": {"path": "/var/run"}})),
    ("volume-types-nfs", "vlalign", "volume-types",
     lambda j: _pod(j)["volumes"].append({"name": "nfs", "nfs": {"server": "nfs.example", "path": "/x"}})),
    ("host-ports", "vlalign", "host-ports",
     lambda j: _c(j).__setitem__("ports", [{"containerPort": 29500, "hostPort": 29500}])),
    ("apparmor-annotation*", "vlalign", "apparmor",
     lambda j: _annotate(j, "container.apparmor.security.beta.kubernetes.io/train", "unconfined")),
    ("apparmor-pod*", "vlalign", "apparmor", lambda j: _set(_psc(j), "appArmorProfile.type", "Unconfined")),
    ("apparmor-container*", "vlalign", "apparmor", lambda j: _set(_sc(j), "appArmorProfile.type", "Unconfined")),
    ("selinux-type-container*", "vlalign", "selinux", lambda j: _set(_sc(j), "seLinuxOptions.type", "spc_t")),
    ("selinux-type-pod*", "vlalign", "selinux", lambda j: _set(_psc(j), "seLinuxOptions.type", "spc_t")),
    ("selinux-user-container*", "vlalign", "selinux", lambda j: _set(_sc(j), "seLinuxOptions.user", "system_u")),
    ("selinux-user-pod*", "vlalign", "selinux", lambda j: _set(_psc(j), "seLinuxOptions.user", "system_u")),
    ("selinux-role-container*", "vlalign", "selinux", lambda j: _set(_sc(j), "seLinuxOptions.role", "system_r")),
    ("selinux-role-pod*", "vlalign", "selinux", lambda j: _set(_psc(j), "seLinuxOptions.role", "system_r")),
    ("proc-mount*", "vlalign", "proc-mount", lambda j: _sc(j).__setitem__("procMount", "Unmasked")),
    ("proc-mount-baseline", "baseline", "proc-mount", lambda j: _sc(j).__setitem__("procMount", "Unmasked")),
    ("seccomp-container", "vlalign", "seccomp", lambda j: _set(_sc(j), "seccompProfile", {"type": "Unconfined"})),
    ("seccomp-pod", "vlalign", "seccomp", lambda j: (_sc(j).pop("seccompProfile"),
                                                      _set(_psc(j), "seccompProfile", {"type": "Unconfined"}))),
    ("seccomp-pod-overridden", "vlalign", "seccomp",
     lambda j: _set(_psc(j), "seccompProfile", {"type": "Unconfined"})),
    ("seccomp-unset", "vlalign", "seccomp", lambda j: (_sc(j).pop("seccompProfile"), _psc(j).pop("seccompProfile"))),
    ("seccomp-baseline", "baseline", "seccomp", lambda j: _set(_sc(j), "seccompProfile", {"type": "Unconfined"})),
    ("sysctls*", "vlalign", "sysctls",
     lambda j: _set(_psc(j), "sysctls", [{"name": "kernel.msgmax", "value": "65536"}])),
    *((f"probe-host-{p}*", "vlalign", "probe-host", _probe_host(p)) for p in _PROBE_HOSTS),
    ("privilege-escalation-unset", "vlalign", "privilege-escalation", lambda j: _sc(j).pop("allowPrivilegeEscalation")),
    ("privilege-escalation", "vlalign", "privilege-escalation",
     lambda j: _sc(j).__setitem__("allowPrivilegeEscalation", True)),
    ("non-root-container", "vlalign", "non-root", lambda j: _sc(j).__setitem__("runAsNonRoot", False)),
    ("non-root-pod*", "vlalign", "non-root", lambda j: _psc(j).__setitem__("runAsNonRoot", False)),
    ("non-root-unset", "vlalign", "non-root", lambda j: (_sc(j).pop("runAsNonRoot"), _psc(j).pop("runAsNonRoot"))),
    ("non-root-user-container", "vlalign", "non-root-user", lambda j: _sc(j).__setitem__("runAsUser", 0)),
    ("non-root-user-pod", "vlalign", "non-root-user", lambda j: _psc(j).__setitem__("runAsUser", 0)),
    ("read-only-root", "vlalign", "read-only-root", lambda j: _sc(j).__setitem__("readOnlyRootFilesystem", False)),
    ("resources-limits", "vlalign", "resources", lambda j: _c(j)["resources"].pop("limits")),
    ("resources-requests", "vlalign", "resources", lambda j: _c(j)["resources"]["requests"].pop("memory")),
    ("no-containers", "vlalign", "resources", lambda j: _pod(j).__setitem__("containers", [])),
]
_IDS = [case[0] for case in CASES]


@pytest.fixture(scope="module")
def broken_cases() -> dict[str, list[str]]:
    """Case id -> the violations its broken Job gets (rendered once for the coverage test)."""
    template = load_template_file(REPO / "k8s" / "base" / "train-podtemplate.yaml")
    compliant = render_stage(template, KubernetesConfig(), stage="s", spec_path="/x").workload
    out = {}
    for name, level, _, breaker in CASES:
        broken = copy.deepcopy(compliant)
        breaker(broken)
        out[name] = policy.violations(broken, level=level)
    return out


def test_compliant_job_passes(job):
    assert policy.violations(job) == []
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def test_every_rule_has_a_case():
    assert {rule for _, _, rule, _ in CASES} == set(policy.RULES)


@pytest.mark.parametrize("name,level,rule,breaker", CASES, ids=_IDS)
def test_each_control_fails_on_its_violation(job, name, level, rule, breaker):
    broken = copy.deepcopy(job)
    breaker(broken)
    kubernetes_validate.validate(broken, K8S_VERSION, strict=True)  # the schema accepts it: the checker must not
    found = policy.violations(broken) if level == "vlalign" else policy.violations(broken, level=level)
    assert found and all(f"[{rule}]" in v for v in found), found


def _pattern(control: policy.Control) -> str:
    path = re.escape(control.path).replace(r"\[\*\]", r"\[[^\]]+\]")
    where = {"container": r"spec\.(initContainers|containers|ephemeralContainers)\[\d+\]\.", "pod": r"spec\.",
             "metadata": r"metadata\."}[control.scope]
    return rf"\[{re.escape(control.rule)}\] .*: {where}{path} is "


@pytest.mark.parametrize("control", policy.CONTROLS, ids=lambda c: f"{c.level}:{c.rule}:{c.scope}:{c.path}")
def test_every_control_and_field_is_exercised(broken_cases, control):
    """Every entry of the table (each control on each field path) is what some case trips."""
    hits = [name for name, found in broken_cases.items() if any(re.search(_pattern(control), v) for v in found)]
    assert hits, f"no case breaks {control.rule} on {control.scope} field {control.path}"


def test_pod_without_containers():
    found = policy.violations({"kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": []}})
    assert found == ["Pod/p: [resources] pod: spec.containers is empty; allowed: at least one container"]


def test_message_names_template_container_and_field(job):
    _sc(job)["procMount"] = "Unmasked"
    name = job["metadata"]["name"]
    assert policy.violations(job) == [
        f"Job/{name}.spec.template: [proc-mount] container train: spec.containers[0].securityContext.procMount "
        "is 'Unmasked'; allowed: Default or unset"]
    _set(_psc(job), "sysctls", [{"name": "net.ipv4.tcp_rmem", "value": "4096 87380 6291456"},
                                {"name": "kernel.msgmax", "value": "65536"}])
    (sysctl,) = [v for v in policy.violations(job) if "[sysctls]" in v]
    assert "pod: spec.securityContext.sysctls[1:kernel.msgmax].name is 'kernel.msgmax'" in sysctl


@pytest.mark.parametrize("kind", ["initContainers", "ephemeralContainers"])
def test_init_and_ephemeral_containers_are_checked(job, kind):
    hardened = copy.deepcopy(_c(job))
    hardened["name"] = "extra"
    _pod(job)[kind] = [hardened]
    assert policy.violations(job) == []
    hardened["securityContext"]["procMount"] = "Unmasked"
    hardened["securityContext"]["privileged"] = True
    rules = {v.split("[")[1].split("]")[0] for v in policy.violations(job) if "container extra:" in v}
    assert {"proc-mount", "privileged"} <= rules
    assert any(f"spec.{kind}[0].securityContext.procMount" in v for v in policy.violations(job))


def test_an_unhardened_init_container_breaks_every_container_rule(job):
    _pod(job)["initContainers"] = [{"name": "init", "image": "busybox"}]
    rules = {v.split("[")[1].split("]")[0] for v in policy.violations(job)}
    assert rules == {"privilege-escalation", "capabilities", "read-only-root", "resources"}  # seccomp, non-root: pod


def test_allowed_values_pass(job):
    """Every value the standards allow passes: the checker is not stricter than Kubernetes here."""
    _set(_psc(job), "sysctls", [{"name": name, "value": "1"} for name in sorted(policy.SAFE_SYSCTLS)])
    _set(_psc(job), "seLinuxOptions", {"type": "container_engine_t", "level": "s0:c123,c456"})
    _set(_sc(job), "seLinuxOptions", {"type": "container_kvm_t"})
    _set(_psc(job), "appArmorProfile", {"type": "RuntimeDefault"})
    _set(_sc(job), "appArmorProfile", {"type": "Localhost", "localhostProfile": "k8s-train"})
    _annotate(job, "container.apparmor.security.beta.kubernetes.io/train", "localhost/k8s-train")
    _set(_sc(job), "capabilities.add", ["NET_BIND_SERVICE"])
    _set(_sc(job), "procMount", "Default")
    _set(_sc(job), "windowsOptions", {"hostProcess": False})
    _set(_sc(job), "seccompProfile", {"type": "Localhost", "localhostProfile": "profiles/train.json"})
    _c(job)["ports"] = [{"containerPort": 29500, "hostPort": 0}]
    _c(job)["readinessProbe"] = {"httpGet": {"path": "/healthz", "port": 8080}}
    _c(job)["livenessProbe"] = {"tcpSocket": {"port": 8080, "host": ""}}
    _pod(job)["volumes"].append({"name": "weights", "image": {"reference": "registry.example.com/weights:1"}})
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    assert policy.violations(job) == []


def test_levels(job):
    """Baseline allows what restricted refuses: a bare container, the default capability set, root."""
    bare = {"kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [
        {"name": "c", "image": "busybox", "securityContext": {"capabilities": {"add": ["CHOWN"]}, "runAsUser": 0}}]}}
    assert policy.violations(bare, level="baseline") == []
    restricted = {v.split("[")[1].split("]")[0] for v in policy.violations(bare, level="restricted")}
    assert restricted == {"capabilities", "privilege-escalation", "non-root", "non-root-user", "seccomp"}
    ours = {"read-only-root", "resources"}
    assert {v.split("[")[1].split("]")[0] for v in policy.violations(bare)} == restricted | ours
    assert {c.rule for c in policy.controls("restricted")} == set(policy.RULES) - {"host-path"} - ours
    with pytest.raises(ValueError, match="unknown pod security level 'strict'"):
        policy.controls("strict")


def test_pod_level_settings_count_for_every_container(job):
    sc = _sc(job)
    sc.pop("runAsNonRoot")
    sc.pop("seccompProfile")
    assert policy.violations(job) == []  # the pod-level runAsNonRoot and seccomp apply
    _psc(job).pop("seccompProfile")
    assert [v for v in policy.violations(job) if "[seccomp]" in v]


def _nested(kind: str, pod_template: dict) -> dict:
    rjob = {"name": "node", "template": {"spec": {"template": pod_template}}}
    if kind == "JobSet":
        return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": {"name": "js"},
                "spec": {"replicatedJobs": [rjob]}}
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": kind, "metadata": {"name": "rt"},
            "spec": {"template": {"spec": {"replicatedJobs": [rjob]}}}}


@pytest.mark.parametrize("kind", ["JobSet", "TrainingRuntime", "ClusterTrainingRuntime"])
def test_pod_templates_nested_in_jobsets_are_found(job, kind):
    pod_template = copy.deepcopy(job["spec"]["template"])
    obj = _nested(kind, pod_template)
    (where, _), = policy.pod_specs(obj)
    assert "replicatedJobs[0:node]" in where
    assert policy.violations(obj) == []
    pod_template["spec"]["hostPID"] = True
    pod_template["metadata"]["annotations"] = {"container.apparmor.security.beta.kubernetes.io/train": "unconfined"}
    rules = {v.split("[")[2].split("]")[0] for v in policy.violations(obj)}  # after "replicatedJobs[0:node]"
    assert rules == {"host-namespaces", "apparmor"}


def test_trainjob_patches_are_checked():
    template = load_template_file(REPO / "k8s" / "base" / "train-podtemplate.yaml")
    trainjob = render_stage(template, KubernetesConfig(engine="trainjob"), stage="s", spec_path="/x").workload
    assert policy.violations(trainjob) == []
    patch = trainjob["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod = patch["template"]["spec"]["template"]["spec"]
    pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    assert [v for v in policy.violations(trainjob) if "[privilege-escalation]" in v]
    # resources come from trainer.resourcesPerNode
    pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = False
    trainjob["spec"]["trainer"]["resourcesPerNode"] = {"limits": {"cpu": "1"}}
    assert [v for v in policy.violations(trainjob) if "[resources]" in v]
    # without patches the runtime's own pod template applies, unconstrained: reported
    trainjob["spec"].pop("runtimePatches")
    assert policy.violations(trainjob)


def test_trainjob_carries_the_templates_annotations_into_the_check():
    template = load_template_file(REPO / "k8s" / "base" / "train-podtemplate.yaml")
    annotations = template["template"]["metadata"]["annotations"]
    annotations["container.apparmor.security.beta.kubernetes.io/train"] = "unconfined"
    trainjob = render_stage(template, KubernetesConfig(engine="trainjob"), stage="s", spec_path="/x").workload
    (found,) = policy.violations(trainjob)
    assert "[apparmor] pod: metadata.annotations" in found and "unconfined" in found


def test_objects_without_pod_templates_have_none():
    assert not policy.has_pod_template({"kind": "Service", "metadata": {"name": "s"}, "spec": {}})
    assert policy.violations({"kind": "ConfigMap", "metadata": {"name": "c"}}) == []
