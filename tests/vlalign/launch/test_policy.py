"""The restricted-profile checker: finds every pod template (also inside JobSet and TrainJob) and fails on each
rule it enforces (one negative test per rule)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from vlalign.launch import policy
from vlalign.launch.config import KubernetesConfig
from vlalign.launch.render import load_template_file, render_stage

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture()
def job() -> dict:
    template = load_template_file(REPO / "k8s" / "base" / "train-podtemplate.yaml")
    return render_stage(template, KubernetesConfig(), stage="s", spec_path="/app/data/s/k8s-spec.json").workload


def _pod(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def _c(obj: dict) -> dict:
    return _pod(obj)["containers"][0]


# Each case breaks one rule of a compliant Job; the checker must name exactly that rule.
BREAKERS = {
    "host-namespaces": lambda j: _pod(j).__setitem__("hostNetwork", True),
    "privileged": lambda j: _c(j)["securityContext"].__setitem__("privileged", True),
    "capabilities": lambda j: _c(j)["securityContext"]["capabilities"].__setitem__("add", ["SYS_ADMIN"]),
    "privilege-escalation": lambda j: _c(j)["securityContext"].pop("allowPrivilegeEscalation"),
    "non-root": lambda j: _c(j)["securityContext"].__setitem__("runAsNonRoot", False),
    "non-root-user": lambda j: _c(j)["securityContext"].__setitem__("runAsUser", 0),
    "seccomp": lambda j: _c(j)["securityContext"].__setitem__("seccompProfile", {"type": "Unconfined"}),
    "volume-types": lambda j: _pod(j)["volumes"].append({"name": "host", "hostPath": {"path": "/var/run"}}),
    "host-ports": lambda j: _c(j).__setitem__("ports", [{"containerPort": 29500, "hostPort": 29500}]),
    "read-only-root": lambda j: _c(j)["securityContext"].__setitem__("readOnlyRootFilesystem", False),
    "resources": lambda j: _c(j)["resources"].pop("limits"),
}


def test_every_rule_has_a_negative_case():
    assert set(BREAKERS) == set(policy.RULES)


def test_compliant_job_passes(job):
    assert policy.violations(job) == []


@pytest.mark.parametrize("rule", policy.RULES)
def test_each_rule_fails_on_its_violation(job, rule):
    broken = copy.deepcopy(job)
    BREAKERS[rule](broken)
    found = policy.violations(broken)
    assert found and all(f"[{rule}]" in v for v in found), found


def test_dropping_capabilities_is_required(job):
    _c(job)["securityContext"]["capabilities"]["drop"] = ["NET_RAW"]
    assert any("[capabilities]" in v and "lacks ALL" in v for v in policy.violations(job))


def test_pod_level_settings_count_for_every_container(job):
    sc = _c(job)["securityContext"]
    sc.pop("runAsNonRoot")
    sc.pop("seccompProfile")
    assert policy.violations(job) == []  # the pod-level runAsNonRoot and seccomp apply
    _pod(job)["securityContext"].pop("seccompProfile")
    assert [v for v in policy.violations(job) if "[seccomp]" in v]


def test_init_containers_are_checked(job):
    _pod(job)["initContainers"] = [{"name": "init", "image": "busybox"}]
    rules = {v.split("[")[1].split("]")[0] for v in policy.violations(job)}
    assert {"privilege-escalation", "capabilities", "read-only-root", "resources"} <= rules


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
    assert [v for v in policy.violations(obj) if "[host-namespaces]" in v]


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


def test_objects_without_pod_templates_have_none():
    assert not policy.has_pod_template({"kind": "Service", "metadata": {"name": "s"}, "spec": {}})
    assert policy.violations({"kind": "ConfigMap", "metadata": {"name": "c"}}) == []
