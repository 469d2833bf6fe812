"""Fixtures of the Kubernetes launcher tests: a kmock API on 127.0.0.1 per test, the fake controllers, and a
check that every call the launcher made is allowed by the submitter's Role in k8s/."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import yaml

from k8s_fake_cluster import NAMESPACE, Emulator, FakeCluster
from vlalign.launch.config import KubernetesConfig, StorageConfig

REPO = Path(__file__).resolve().parents[3]
LAUNCHER_AGENT = "vlalign-launcher-under-test"
ACTION_VERBS = {"FETCH": "get", "LIST": "list", "WATCH": "watch", "CREATE": "create", "UPDATE": "patch", "DELETE": "delete"}


def submitter_rules() -> list[dict]:
    """The Role vlalign-submitter of k8s/base, plus the rule the trainjob component adds."""
    docs = list(yaml.safe_load_all((REPO / "k8s/base/rbac.yaml").read_text(encoding="utf-8")))
    (role,) = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "vlalign-submitter"]
    component = yaml.safe_load((REPO / "k8s/components/trainjob/kustomization.yaml").read_text(encoding="utf-8"))
    extra = []
    for patch in component["patches"]:
        ops = yaml.safe_load(patch["patch"])
        if isinstance(ops, list):
            extra += [op["value"] for op in ops if op.get("path") == "/rules/-"]
    return role["rules"] + extra


def allowed(rules: list[dict], group: str, resource: str, verb: str, name: str | None) -> bool:
    for rule in rules:
        if group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]:
            if not rule.get("resourceNames") or name in rule["resourceNames"]:
                return True
    return False


@pytest.fixture()
def emulator():
    emu = Emulator().start()
    yield emu
    emu.stop()


@pytest.fixture()
def shared(tmp_path: Path) -> Path:
    """The shared volume, as the submitting machine sees it."""
    folder = tmp_path / "shared"
    (folder / "03_primary").mkdir(parents=True)
    (folder / "03_primary" / "clean_manifest.parquet").write_bytes(b"PAR1")
    return folder


@pytest.fixture()
def cluster(emulator: Emulator, shared: Path):
    fake = FakeCluster(emulator, shared).start()
    yield fake
    fake.stop()
    assert not fake.errors, "".join(traceback.format_exception(fake.errors[0]))
    # every call of the launcher was one the Role of k8s/ allows
    rules = submitter_rules()
    for request in emulator.handler._requests:  # kmock 0.8 keeps every request it served
        if request.headers.get("User-Agent") != LAUNCHER_AGENT or request.resource is None:
            continue
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        verb = ACTION_VERBS[request.action.value] if request.subresource != "log" else "get"
        assert allowed(rules, request.resource.group, resource, verb, request.name), (
            f"the launcher called {verb} {request.resource.group}/{resource} {request.name or ''}, "
            "which Role vlalign-submitter (k8s/base/rbac.yaml) does not allow"
        )


@pytest.fixture()
def launcher_client(emulator: Emulator):
    """The ApiClient handed to the launcher (its User-Agent marks its requests)."""
    client = emulator.api_client()
    client.user_agent = LAUNCHER_AGENT
    return client


@pytest.fixture()
def podtemplate(cluster: FakeCluster) -> dict:
    """PodTemplate vlalign-train stored in the emulator, as `kubectl apply -k` would (from the base file)."""
    template = yaml.safe_load((REPO / "k8s/base/train-podtemplate.yaml").read_text(encoding="utf-8"))
    template["metadata"]["namespace"] = NAMESPACE
    cluster.core.create_namespaced_pod_template(NAMESPACE, template)
    return template


def fast_config(shared: Path, **overrides) -> KubernetesConfig:
    """Short intervals so that a scenario plays out in well under a second."""
    values = dict(
        namespace=NAMESPACE, poll_interval_s=0.01, log_interval_s=0.0, unschedulable_grace_s=0.2, timeout_s=10.0,
        output_wait_s=1.0, max_resubmits=1, storage=StorageConfig(local_root=str(shared), mount_path="/app/data"),
    )
    values.update(overrides)
    return KubernetesConfig(**values)
