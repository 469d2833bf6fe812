"""Run one training stage on Kubernetes: render, submit, wait (pod phases, rank 0's log), resubmit, collect.

:func:`run_stage_on_kubernetes` is what the Kedro training node calls for a stage with ``compute: kubernetes``.

1. The pod-side spec (paths as the pods see them) goes to the shared storage (see :mod:`vlalign.launch.storage`).
2. The pod template (the PodTemplate applied with ``kubectl apply -k k8s/overlays/...``, or a YAML file) is
   wrapped into an Indexed Job + headless Service, or a TrainJob (:mod:`vlalign.launch.render`); the result must
   pass the restricted-profile checker (and, for a TrainJob, the strict schema) before it is submitted.
3. The launcher polls the job and its pods, prints a line whenever the pod phases change and the new lines of
   rank 0's log, and fails with a short message on a failed pod (naming rank, exit code, and its log tail), an
   image that cannot be pulled, a pod that stays unschedulable, or the timeout.
4. A pod lost with its node, pre-empted or evicted (condition ``DisruptionTarget``) makes the whole job be
   deleted and submitted again, up to ``max_resubmits`` times; training resumes from the stage's last checkpoint.
5. On success it returns the local path of ``<out_dir>/final.pt``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlalign.errors import ConfigError, KubernetesJobError
from vlalign.launch import policy
from vlalign.launch.config import KubernetesConfig
from vlalign.launch.crd import CustomResourceError, validate_custom_resource
from vlalign.launch.render import (
    INDEX_ANNOTATION,
    JOB_LABEL,
    RenderedStage,
    check_template,
    load_template_file,
    pod_command_env,  # noqa: F401 - re-exported: what a pod of stage_manifests(...) runs
    render_stage,
)
from vlalign.launch.storage import SharedStorage

if TYPE_CHECKING:  # importing vlalign.train loads torch; the launcher does not need it
    from vlalign.train.spec import TrainSpec

IMAGE_PULL_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "RegistryUnavailable"}
CONTAINER_CONFIG_REASONS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
DISRUPTION_REASONS = {"Evicted", "NodeLost", "Shutdown", "NodeShutdown", "Terminated", "Preempting"}
TRANSIENT_ERRORS_ALLOWED = 5  # consecutive failed polls (API server restarts, network blips) before giving up
TRAINJOB = ("trainer.kubeflow.org", "v1alpha1", "trainjobs")

Echo = Callable[[str], Any]


# ------------------------------------------------------------------------------------------------
# API access: a few calls, on plain JSON dicts
# ------------------------------------------------------------------------------------------------


def default_api_client(config: KubernetesConfig):
    """An ApiClient from the pod's service account (in a cluster) or from the kubeconfig (``config.context``)."""
    from kubernetes import client
    from kubernetes import config as kube_config

    configuration = client.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            kube_config.load_incluster_config(client_configuration=configuration)
        else:
            kube_config.load_kube_config(context=config.context, client_configuration=configuration)
    except (kube_config.ConfigException, OSError) as exc:
        raise KubernetesJobError(
            f"no Kubernetes credentials: {exc}. Outside a cluster, point KUBECONFIG at a kubeconfig (and set "
            "kubernetes.context); inside one, run with a service account (k8s/base: vlalign-submitter)."
        ) from exc
    return client.ApiClient(configuration)


class KubeApi:
    """The calls the launcher makes, through the real ``kubernetes`` client, returning the API's JSON."""

    def __init__(self, api_client, namespace: str) -> None:
        from kubernetes import client

        self.namespace = namespace
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    @staticmethod
    def _json(response) -> dict:
        data = response.data
        return json.loads(data) if data else {}

    def create(self, obj: dict) -> None:
        kind, ns = obj["kind"], self.namespace
        if kind == "Job":
            self.batch.create_namespaced_job(ns, obj, _preload_content=False)
        elif kind == "Service":
            self.core.create_namespaced_service(ns, obj, _preload_content=False)
        elif kind == "ConfigMap":
            self.core.create_namespaced_config_map(ns, obj, _preload_content=False)
        elif kind == "TrainJob":
            self.custom.create_namespaced_custom_object(*TRAINJOB[:2], ns, TRAINJOB[2], obj, _preload_content=False)
        else:
            raise ValueError(f"the launcher does not create {kind} objects")

    def get(self, kind: str, name: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        ns = self.namespace
        try:
            if kind == "Job":
                return self._json(self.batch.read_namespaced_job(name, ns, _preload_content=False))
            if kind == "Service":
                return self._json(self.core.read_namespaced_service(name, ns, _preload_content=False))
            if kind == "ConfigMap":
                return self._json(self.core.read_namespaced_config_map(name, ns, _preload_content=False))
            if kind == "TrainJob":
                return self._json(self.custom.get_namespaced_custom_object(*TRAINJOB[:2], ns, TRAINJOB[2], name, _preload_content=False))
            if kind == "PodTemplate":
                return self._json(self.core.read_namespaced_pod_template(name, ns, _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        raise ValueError(f"the launcher does not read {kind} objects")

    def delete(self, kind: str, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        ns = self.namespace
        try:
            if kind == "Job":
                self.batch.delete_namespaced_job(name, ns, propagation_policy="Background", _preload_content=False)
            elif kind == "Service":
                self.core.delete_namespaced_service(name, ns, _preload_content=False)
            elif kind == "ConfigMap":
                self.core.delete_namespaced_config_map(name, ns, _preload_content=False)
            elif kind == "TrainJob":
                self.custom.delete_namespaced_custom_object(*TRAINJOB[:2], ns, TRAINJOB[2], name,
                                                            propagation_policy="Background", _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def list_pods(self, job: str) -> list[dict]:
        """Pods of a job, by our ``vlalign.dev/job`` label (filtered here too, whatever the server does)."""
        items = self._json(self.core.list_namespaced_pod(self.namespace, label_selector=f"{JOB_LABEL}={job}",
                                                         _preload_content=False)).get("items", [])
        return [p for p in items if ((p.get("metadata") or {}).get("labels") or {}).get(JOB_LABEL) == job]

    def pod_log(self, pod: str, container: str, tail_lines: int) -> str:
        response = self.core.read_namespaced_pod_log(pod, self.namespace, container=container, tail_lines=tail_lines,
                                                     _preload_content=False)
        data = response.data
        return data.decode("utf-8", errors="replace") if isinstance(data, bytes) else str(data or "")


def _api_error(exc: Exception, action: str, namespace: str) -> KubernetesJobError:
    """A short message with a hint for an error of the API server."""
    status = getattr(exc, "status", None)
    body = getattr(exc, "body", None)
    detail = ""
    if body:
        try:
            detail = json.loads(body).get("message", "")
        except (ValueError, AttributeError):
            detail = str(body)[:300]
    hints = {
        401: "the credentials were rejected; refresh your kubeconfig login.",
        403: (f"the service account may not do this in namespace {namespace!r}; apply k8s/base (Role vlalign-submitter)"
              " or check `kubectl auth can-i create jobs -n " + namespace + "`."),
        404: f"namespace {namespace!r} or the resource type does not exist (for TrainJobs: is Kubeflow Trainer installed?).",
        422: "the API server rejected the object as invalid.",
    }
    hint = hints.get(status, "")
    return KubernetesJobError(f"{action} failed: HTTP {status} {getattr(exc, 'reason', '')}: {detail or exc}. {hint}".strip())


# ------------------------------------------------------------------------------------------------
# Pod and job status
# ------------------------------------------------------------------------------------------------


@dataclass
class PodState:
    """What the launcher needs to know about one pod."""

    name: str  # pod name
    rank: int  # node rank (completion index)
    phase: str  # Pending, Running, Succeeded, Failed, Unknown
    reason: str = ""  # the training container's waiting/terminated reason, or the pod's reason
    message: str = ""  # its message
    exit_code: int | None = None  # the training container's exit code, once terminated
    finished_at: str = ""  # when it terminated (RFC 3339), for ordering failures
    disrupted: str = ""  # why the pod was lost with its node / pre-empted / evicted ("" = not disrupted)
    unschedulable: str = ""  # the scheduler's message while it cannot place the pod

    def describe(self) -> str:
        extra = f" ({self.reason})" if self.reason and self.phase != "Succeeded" else ""
        return f"rank {self.rank} {self.phase}{extra}"


def pod_state(pod: dict, container: str, position: int) -> PodState:
    """A :class:`PodState` from a pod's JSON."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    index = (meta.get("annotations") or {}).get(INDEX_ANNOTATION) or (meta.get("labels") or {}).get(INDEX_ANNOTATION)
    state = PodState(name=meta.get("name", "?"), rank=int(index) if str(index).isdigit() else position,
                     phase=status.get("phase") or "Pending", reason=status.get("reason") or "", message=status.get("message") or "")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            state.disrupted = f"{cond.get('reason') or 'DisruptionTarget'}: {cond.get('message') or ''}".strip(": ")
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
            state.unschedulable = cond.get("message") or "Unschedulable"
            state.reason = state.reason or "Unschedulable"
    if not state.disrupted and state.phase == "Failed" and state.reason in DISRUPTION_REASONS:
        state.disrupted = f"{state.reason}: {state.message}".strip(": ")
    statuses = status.get("containerStatuses") or []
    chosen = next((c for c in statuses if c.get("name") == container), statuses[0] if statuses else None)
    if chosen:
        current = chosen.get("state") or {}
        if "waiting" in current:
            state.reason = current["waiting"].get("reason") or state.reason
            state.message = current["waiting"].get("message") or state.message
        if "terminated" in current:
            term = current["terminated"]
            state.exit_code = term.get("exitCode")
            state.reason = term.get("reason") or state.reason
            state.message = term.get("message") or state.message
            state.finished_at = term.get("finishedAt") or ""
    return state


def summarize(states: list[PodState], detail_up_to: int = 4) -> str:
    """One line of pod phases: per rank for a few pods, counts per phase for many."""
    if len(states) <= detail_up_to:
        return ", ".join(s.describe() for s in states)
    counts: dict[str, int] = {}
    for s in states:
        key = s.describe().split(" ", 2)[2]  # the phase (and reason) without "rank N"
        counts[key] = counts.get(key, 0) + 1
    return f"{len(states)} pods: " + ", ".join(f"{n} {phase}" for phase, n in sorted(counts.items()))


def workload_condition(obj: dict) -> tuple[str, str, str] | None:
    """("Complete" | "Failed", reason, message) once a Job or TrainJob has finished, else None."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return cond["type"], cond.get("reason") or "", cond.get("message") or ""
    return None


def new_lines(previous: list[str], current: list[str]) -> list[str]:
    """Lines of ``current`` after its overlap with the end of ``previous`` (two reads of a log tail)."""
    for k in range(min(len(previous), len(current)), 0, -1):
        if previous[-k:] == current[:k]:
            return current[k:]
    return current


# ------------------------------------------------------------------------------------------------
# The launcher
# ------------------------------------------------------------------------------------------------


@dataclass
class _Outcome:
    ok: bool  # the job completed
    lost: str = ""  # why it has to be resubmitted (node loss, pre-emption)


class _Watch:
    """Polls one submitted job until it completes, fails or has to be resubmitted."""

    def __init__(self, api: KubeApi, rendered: RenderedStage, config: KubernetesConfig, stage: str, echo: Echo) -> None:
        self.api, self.rendered, self.config, self.stage, self.echo = api, rendered, config, stage, echo
        self.kind = rendered.workload["kind"]
        self.last_summary = ""
        self.last_log_at = -math.inf
        self.log_lines: list[str] = []
        self.unschedulable_since: dict[str, float] = {}

    def fail(self, message: str, delete: bool) -> KubernetesJobError:
        where = f"{self.kind.lower()} {self.rendered.name} in namespace {self.config.namespace}"
        if delete:
            _delete(self.api, self.rendered)
            where += " (deleted)"
        else:
            where += f" (kept: kubectl -n {self.config.namespace} describe {self.kind.lower()} {self.rendered.name})"
        return KubernetesJobError(f"stage {self.stage}: {message}\n[{where}]")

    def log_tail(self, pod: str) -> list[str]:
        try:
            text = self.api.pod_log(pod, self.rendered.container, self.config.log_tail_lines)
        except Exception:  # noqa: BLE001 - logs are a courtesy; the status decides
            return []
        return text.splitlines()[-self.config.log_tail_lines:]

    def show_rank0_log(self, states: list[PodState], now: float) -> None:
        rank0 = next((s for s in states if s.rank == 0 and s.phase in ("Running", "Succeeded", "Failed")), None)
        if rank0 is None or now - self.last_log_at < self.config.log_interval_s:
            return
        self.last_log_at = now
        lines = self.log_tail(rank0.name)
        for line in new_lines(self.log_lines, lines):
            self.echo(f"  [rank 0] {line}")
        self.log_lines = lines

    def poll(self, now: float, started: float) -> _Outcome | None:
        workload = self.api.get(self.kind, self.rendered.name)
        if workload is None:
            raise self.fail("the job disappeared while running (deleted by someone else?).", delete=False)
        pods = sorted(self.api.list_pods(self.rendered.name), key=lambda p: (p.get("metadata") or {}).get("name", ""))
        states = sorted((pod_state(p, self.rendered.container, i) for i, p in enumerate(pods)), key=lambda s: (s.rank, s.name))
        suspended = bool((workload.get("spec") or {}).get("suspend"))
        summary = summarize(states) or ("suspended: waiting for Kueue to admit it" if suspended else "no pods yet")
        if summary != self.last_summary:
            self.echo(f"[{self.rendered.name}] {summary}")
            self.last_summary = summary
        self.show_rank0_log(states, now)

        lost = [s for s in states if s.disrupted]
        if lost:
            return _Outcome(ok=False, lost=f"pod {lost[0].name} (rank {lost[0].rank}) {lost[0].disrupted}")
        for s in states:
            if s.reason in IMAGE_PULL_REASONS:
                image = self.rendered.workload.get("spec", {}).get("trainer", {}).get("image") or _image(self.rendered)
                raise self.fail(
                    f"pod {s.name} (rank {s.rank}) cannot pull image {image!r}: {s.reason}: {s.message}\n"
                    "Hint: push the image, check its name and tag (kubernetes.image, or `images:` of the kustomize "
                    "overlay), and give the namespace an imagePullSecret for a private registry.", delete=True)
            if s.reason in CONTAINER_CONFIG_REASONS:
                raise self.fail(f"pod {s.name} (rank {s.rank}) cannot start its container: {s.reason}: {s.message}", delete=True)
        failed = sorted((s for s in states if s.phase == "Failed"), key=lambda s: (s.finished_at or "~", s.rank))
        if failed:
            first = failed[0]
            code = f"exit code {first.exit_code}" if first.exit_code is not None else "no exit code"
            hint = "\nHint: the container ran out of memory; raise kubernetes.resources.limits.memory." if first.reason == "OOMKilled" else ""
            tail = self.log_tail(first.name)
            shown = "\n".join(f"  {line}" for line in tail) or "  (no log)"
            raise self.fail(
                f"pod {first.name} (rank {first.rank}) failed: container {self.rendered.container} {code}"
                f"{f' ({first.reason})' if first.reason else ''}{f': {first.message}' if first.message else ''}.{hint}\n"
                f"Last {len(tail)} log line(s) of rank {first.rank}:\n{shown}", delete=False)
        for s in states:
            if s.unschedulable:
                since = self.unschedulable_since.setdefault(s.name, now)
                if now - since >= self.config.unschedulable_grace_s:
                    raise self.fail(
                        f"pod {s.name} (rank {s.rank}) could not be scheduled for {now - since:.0f} s: {s.unschedulable}\n"
                        "Hint: ask for less (kubernetes.resources, gpus_per_node, nnodes), check the node selector and "
                        "tolerations of the overlay, or raise kubernetes.unschedulable_grace_s while a node autoscaler "
                        "adds nodes.", delete=True)
            else:
                self.unschedulable_since.pop(s.name, None)
        condition = workload_condition(workload)
        if condition and condition[0] == "Complete":
            return _Outcome(ok=True)
        if condition and condition[0] == "Failed":
            _, reason, message = condition
            if "DisruptionTarget" in message or reason in DISRUPTION_REASONS:
                return _Outcome(ok=False, lost=f"{reason}: {message}")
            raise self.fail(f"the job failed: {reason}: {message}", delete=False)
        if now - started >= self.config.timeout_s:
            raise self.fail(f"timed out after {self.config.timeout_s:g} s (kubernetes.timeout_s); last state: {summary}.", delete=True)
        return None

    def run(self) -> _Outcome:
        import urllib3
        from kubernetes.client.exceptions import ApiException

        started = time.monotonic()
        errors = 0
        while True:
            now = time.monotonic()
            try:
                outcome = self.poll(now, started)
                errors = 0
            except KubernetesJobError:
                raise
            except ApiException as exc:
                if exc.status is not None and exc.status < 500 and exc.status != 429:
                    raise _api_error(exc, f"watching {self.rendered.name}", self.config.namespace) from exc
                errors += 1
                outcome = None
                if errors > TRANSIENT_ERRORS_ALLOWED:
                    raise _api_error(exc, f"watching {self.rendered.name}", self.config.namespace) from exc
            except (OSError, urllib3.exceptions.HTTPError) as exc:  # connection refused / reset, timeouts
                errors += 1
                outcome = None
                if errors > TRANSIENT_ERRORS_ALLOWED:
                    raise KubernetesJobError(f"lost the Kubernetes API while watching {self.rendered.name}: {exc}") from exc
            if outcome is not None:
                return outcome
            time.sleep(self.config.poll_interval_s)


def _image(rendered: RenderedStage) -> str:
    pod = rendered.workload["spec"]["template"]["spec"]
    return next((c.get("image", "") for c in pod["containers"] if c["name"] == rendered.container), "")


def _delete(api: KubeApi, rendered: RenderedStage) -> None:
    for obj in reversed(rendered.objects):
        try:
            api.delete(obj["kind"], obj["metadata"]["name"])
        except Exception:  # noqa: BLE001 - best effort; the Job's TTL and deadline clean up the rest
            pass


def _check(rendered: RenderedStage) -> None:
    """Refuse to submit objects that break the restricted profile or (TrainJob) the schema."""
    problems = [v for obj in rendered.objects for v in policy.violations(obj)]
    if problems:
        raise ConfigError(
            "the rendered training job breaks the restricted pod profile (fix the pod template or the kubernetes.* "
            "overrides):\n  " + "\n  ".join(problems)
        )
    if rendered.engine == "trainjob":
        try:
            validate_custom_resource(rendered.workload)
        except CustomResourceError as exc:
            raise ConfigError(f"the rendered TrainJob is invalid: {exc}") from exc


def _submit(api: KubeApi, rendered: RenderedStage, config: KubernetesConfig, echo: Echo) -> None:
    """Create the objects; adopt a running job of the same name, replace a finished one."""
    from kubernetes.client.exceptions import ApiException

    kind, name = rendered.workload["kind"], rendered.name
    existing = api.get(kind, name)
    if existing is not None and workload_condition(existing) is None:
        echo(f"[{name}] already running (submitted earlier with the same spec): following it")
        return
    if existing is not None:
        echo(f"[{name}] deleting the finished {kind} of an earlier run before submitting again")
        _delete(api, rendered)
        deadline = time.monotonic() + max(30.0, 10 * config.poll_interval_s)
        while api.get(kind, name) is not None:
            if time.monotonic() > deadline:
                raise KubernetesJobError(f"the earlier {kind} {name} is still being deleted; try again in a minute.")
            time.sleep(config.poll_interval_s)
    for obj in rendered.objects:
        try:
            api.create(obj)
        except ApiException as exc:
            if exc.status == 409 and obj["kind"] in ("Service", "ConfigMap"):
                continue  # same name = same content (the name carries a hash of it)
            raise _api_error(exc, f"creating {obj['kind']} {obj['metadata']['name']}", config.namespace) from exc
    echo(f"[{name}] submitted: {rendered.nnodes} pod(s) x {rendered.nproc_per_node} process(es), engine {rendered.engine}")


def load_template(config: KubernetesConfig, api: KubeApi) -> dict:
    """The pod template: the PodTemplate in the cluster, or the YAML file ``config.template``."""
    if config.template != "cluster":
        return load_template_file(config.template, config.template_name)
    from kubernetes.client.exceptions import ApiException

    try:
        template = api.get("PodTemplate", config.template_name)
    except ApiException as exc:
        raise _api_error(exc, f"reading PodTemplate {config.template_name}", config.namespace) from exc
    if template is None:
        raise KubernetesJobError(
            f"PodTemplate {config.template_name!r} not found in namespace {config.namespace!r}: apply the kustomize "
            "overlay first (kubectl apply -k k8s/overlays/cpu, gpu or trainjob), or set kubernetes.template to a "
            "YAML file such as k8s/base/train-podtemplate.yaml."
        )
    return check_template(template, f"PodTemplate {config.template_name} in namespace {config.namespace}")


@dataclass
class PreparedStage:
    """A stage ready to render: its pod-side spec, written to the shared storage."""

    stage: str  # stage name
    spec: TrainSpec  # the spec as given (local paths)
    pod_spec: TrainSpec  # the spec as the pods see it
    spec_path: str  # the spec file in the pods
    spec_json: str  # the pod-side spec's text
    identity: str  # what names the job: the pod-side spec without the MLflow run ids
    storage: SharedStorage  # how files travel

    def render(self, template: dict, config: KubernetesConfig, attempt: int = 0) -> RenderedStage:
        """The objects of one attempt, checked (restricted profile, TrainJob schema)."""
        rendered = render_stage(template, config, stage=self.stage, spec_path=self.spec_path, attempt=attempt,
                                spec_json=self.spec_json, spec_in_configmap=config.storage.kind == "fsspec",
                                identity=self.identity)
        _check(rendered)
        return rendered


def prepare_stage(spec: TrainSpec, config: KubernetesConfig, echo: Echo = print) -> PreparedStage:
    """Translate the spec for the pods (uploading inputs to object storage) and write it to the shared storage."""
    stage = str(spec.stage.get("name") or Path(spec.out_dir).name)
    storage = SharedStorage(config.storage)
    pod_spec, spec_path, _ = storage.pod_spec(spec, config.mlflow_tracking_uri, echo)
    spec_json = json.dumps(pod_spec.to_dict(), indent=2, sort_keys=True)
    identity = json.dumps({k: v for k, v in pod_spec.to_dict().items() if k != "mlflow"}, sort_keys=True)
    written = storage.write_spec(spec.out_dir, pod_spec.out_dir, spec_json)
    echo(f"stage {stage}: pod-side spec written to {written}")
    return PreparedStage(stage, spec, pod_spec, spec_path, spec_json, identity, storage)


def stage_manifests(spec: TrainSpec, config: KubernetesConfig, template: dict | None = None, *, attempt: int = 0,
                    echo: Echo = print) -> list[dict]:
    """The objects :func:`run_stage_on_kubernetes` submits for ``spec`` (after writing the pod-side spec), without
    a cluster: ``template`` is a PodTemplate dict, or None for the file ``config.template`` names.

    With :func:`~vlalign.launch.render.pod_command_env` this gives what each pod runs, e.g. to run it locally.
    """
    if template is None:
        if config.template == "cluster":
            raise ConfigError("stage_manifests needs a template (or kubernetes.template set to a YAML file) without a cluster.")
        template = load_template_file(config.template, config.template_name)
    return prepare_stage(spec, config, echo).render(check_template(template, "template"), config, attempt).objects


def run_stage_on_kubernetes(spec: TrainSpec, config: KubernetesConfig, *, api_client=None, echo: Echo = print) -> Path:
    """Train one stage on the cluster and return the local path of its ``final.pt`` (see the module docstring).

    Raises :class:`~vlalign.errors.KubernetesJobError` when the job fails, cannot be scheduled, cannot pull its
    image, times out, or keeps losing nodes; :class:`~vlalign.errors.ConfigError` for a bad configuration.
    """
    prepared = prepare_stage(spec, config, echo)
    stage, storage, pod_spec = prepared.stage, prepared.storage, prepared.pod_spec
    api = KubeApi(api_client if api_client is not None else default_api_client(config), config.namespace)
    template = load_template(config, api)

    attempts = config.max_resubmits + 1
    for attempt in range(attempts):
        rendered = prepared.render(template, config, attempt)
        for note in rendered.notes:
            echo(f"note: a TrainJob cannot carry the template's {note}; the runtime decides it")
        _submit(api, rendered, config, echo)
        outcome = _Watch(api, rendered, config, stage, echo).run()
        if outcome.ok:
            for obj in rendered.objects[:-1]:  # the Service and spec ConfigMap; the job stays until its TTL
                api.delete(obj["kind"], obj["metadata"]["name"])
            echo(f"[{rendered.name}] completed")
            break
        _delete(api, rendered)
        if attempt + 1 == attempts:
            raise KubernetesJobError(
                f"stage {stage}: lost a node or was pre-empted on every one of {attempts} attempt(s) "
                f"(kubernetes.max_resubmits={config.max_resubmits}); last: {outcome.lost}"
            )
        latest = storage.latest_checkpoint(spec.out_dir, pod_spec.out_dir)
        echo(f"[{rendered.name}] {outcome.lost}\nstage {stage}: resubmitting (attempt {attempt + 2} of {attempts}), "
             f"resuming from {'checkpoint ' + latest if latest else 'the start (no checkpoint yet)'}")

    deadline = time.monotonic() + config.output_wait_s
    while not storage.final_ready(spec.out_dir, pod_spec.out_dir):
        if time.monotonic() >= deadline:
            raise KubernetesJobError(
                f"stage {stage}: the job completed but {pod_spec.out_dir}/final.pt is not on the shared storage "
                f"(looked for {spec.out_dir}/final.pt here); check kubernetes.storage (local_root / mount_path / url)."
            )
        time.sleep(min(config.poll_interval_s, 1.0))
    final = storage.fetch_final(spec.out_dir, pod_spec.out_dir)
    echo(f"stage {stage}: {final}")
    return final
