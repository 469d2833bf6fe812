"""A loopback Kubernetes API (kmock 0.8) and a scripted stand-in for the controllers and kubelets.

kmock stores objects and serves the real API paths, so the launcher talks to it with the real ``kubernetes``
client, unchanged. It runs no controller: :class:`FakeCluster` plays the Job/TrainJob controllers, the scheduler
and the kubelets. It watches the emulator through the API (its own client), creates each job's pods, moves them
through the phases of a scenario, writes what rank 0 writes on the shared folder (checkpoints/LATEST, final.pt),
serves their logs, and sets the job's conditions. Scenarios are scripted per attempt; each step is a real API write
the launcher then observes.

kmock quirks handled here: the emulator runs in its own thread and event loop (a sync client inside an async test
hangs); resources are declared up front (a list of a resource with no object yet is a 404); logs need a reaction;
a custom-resource create answers 200, which the typed client maps to None (a 201 reaction here; the launcher reads
raw responses anyway).
"""

from __future__ import annotations

import asyncio
import json
import shlex
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

import fsspec
import kmock
import kubernetes

from vlalign.launch.render import INDEX_ANNOTATION, JOB_NAME_LABEL, SPEC_MOUNT_DIR, pod_command_env

NAMESPACE = "vlalign"
STEP = 0.02  # seconds between the steps of a scenario


class Emulator:
    """kmock's KubernetesEmulator served on 127.0.0.1 from a background thread."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.logs: dict[str, str] = {}  # pod name -> its log
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with kmock.KubernetesEmulator() as handler, kmock.Server(handler) as server:
                self.handler = handler
                for resource in ("v1/pods", "v1/services", "v1/configmaps", "v1/podtemplates", "batch/v1/jobs",
                                 "trainer.kubeflow.org/v1alpha1/trainjobs"):
                    handler.resources[resource] = {}
                handler["get", kmock.resource("v1/pods"), kmock.subresource("log")] << self._serve_log
                handler[kmock.action.CREATE, kmock.resource("trainer.kubeflow.org/v1alpha1/trainjobs")] << 201 << (lambda req: req.data)
                self.url = str(server.url).rstrip("/")
                self.ready.set()
                await self._stop.wait()

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self.error = exc
            self.ready.set()

    def _serve_log(self, request) -> bytes:
        lines = self.logs.get(request.name, "").splitlines()
        tail = int(request.params.get("tailLines", 0) or 0)
        return ("\n".join(lines[-tail:] if tail else lines) + ("\n" if lines else "")).encode()

    def start(self) -> Emulator:
        self._thread.start()
        if not self.ready.wait(10) or self.error:
            raise RuntimeError(f"kmock did not start: {self.error}")
        return self

    def stop(self) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def api_client(self) -> kubernetes.client.ApiClient:
        configuration = kubernetes.client.Configuration()
        configuration.host = self.url
        return kubernetes.client.ApiClient(configuration)


@dataclass
class Pod:
    """One pod the fake controller made."""

    name: str  # pod name
    rank: int  # completion index
    command: list[str] = field(default_factory=list)  # what the container runs
    env: dict[str, str] = field(default_factory=dict)  # its environment (Job pods only)


@dataclass
class Run:
    """One job (attempt) the fake controller is driving."""

    kind: str  # "Job" or "TrainJob"
    name: str  # its name
    obj: dict  # the object as submitted
    pods: list[Pod] = field(default_factory=list)  # its pods, by rank
    spec: dict | None = None  # the train spec rank 0 trained from


Scenario = Callable[["FakeCluster", Run], None]


class FakeCluster:
    """Plays the controllers and kubelets for the jobs the launcher submits (see the module docstring)."""

    def __init__(self, emulator: Emulator, shared_local: Path, shared_pod: str = "/app/data") -> None:
        self.emulator = emulator
        self.shared_local = shared_local  # the shared folder here ...
        self.shared_pod = shared_pod  # ... as the pods see it
        self.api_client = emulator.api_client()
        self.core = kubernetes.client.CoreV1Api(self.api_client)
        self.batch = kubernetes.client.BatchV1Api(self.api_client)
        self.custom = kubernetes.client.CustomObjectsApi(self.api_client)
        self.scenarios: list[Scenario] = []  # one per attempt; the last one repeats
        self.runs: list[Run] = []  # every job seen, in order
        self.errors: list[BaseException] = []  # exceptions of the scenario threads
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fake-controller", daemon=True)

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> FakeCluster:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                for kind, items in (("Job", self._list_jobs()), ("TrainJob", self._list_trainjobs())):
                    for obj in items:
                        name = obj["metadata"]["name"]
                        if name not in self._seen:
                            self._seen.add(name)
                            run = Run(kind, name, obj)
                            self.runs.append(run)
                            if not self.scenarios:
                                continue  # nothing scripted: the job just sits there
                            scenario = self.scenarios[min(len(self.runs) - 1, len(self.scenarios) - 1)]
                            threading.Thread(target=self._drive, args=(scenario, run), daemon=True).start()
            except Exception as exc:  # noqa: BLE001 - surfaced by the tests
                self.errors.append(exc)
            time.sleep(0.02)

    def _drive(self, scenario: Scenario, run: Run) -> None:
        try:
            scenario(self, run)
        except Exception as exc:  # noqa: BLE001 - surfaced by the tests
            self.errors.append(exc)

    def _list_jobs(self) -> list[dict]:
        return json.loads(self.batch.list_namespaced_job(NAMESPACE, _preload_content=False).data)["items"]

    def _list_trainjobs(self) -> list[dict]:
        raw = self.custom.list_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", NAMESPACE, "trainjobs",
                                                        _preload_content=False)
        return json.loads(raw.data)["items"]

    # ---- controller actions (each one an API write) ----------------------------------------------
    def create_pods(self, run: Run) -> list[Pod]:
        """The job's pods, Pending, as the Job controller (or JobSet) makes them."""
        if run.kind == "Job":
            template = run.obj["spec"]["template"]
            count = run.obj["spec"]["completions"]
            container = run.obj["metadata"]["annotations"]["vlalign.dev/container"]
        else:
            trainer = run.obj["spec"]["trainer"]
            rjob = run.obj["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
            template = rjob["template"]["spec"]["template"]
            count = trainer["numNodes"]
            container = "node"
        for rank in range(count):
            name = f"{run.name}-{rank}-x{rank}abc"
            labels = {**template["metadata"]["labels"], JOB_NAME_LABEL: run.name, INDEX_ANNOTATION: str(rank)}
            annotations = {**(template["metadata"].get("annotations") or {}), INDEX_ANNOTATION: str(rank)}
            if run.kind == "Job":
                spec = dict(template["spec"], hostname=f"{run.name}-{rank}")
                command, env = pod_command_env([run.obj], rank)
            else:
                spec = {"containers": [{"name": container, "image": trainer["image"], "command": trainer["command"]}]}
                command, env = trainer["command"], {}
            self.core.create_namespaced_pod(NAMESPACE, {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels, "annotations": annotations},
                "spec": spec,
            }, _preload_content=False)
            self.set_pod(name, {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]})
            run.pods.append(Pod(name, rank, command, env))
        return run.pods

    def set_pod(self, name: str, status: dict) -> None:
        self.core.patch_namespaced_pod_status(name, NAMESPACE, {"status": status}, _preload_content=False)

    def container(self, run: Run) -> str:
        return "node" if run.kind == "TrainJob" else run.obj["metadata"]["annotations"]["vlalign.dev/container"]

    def running(self, run: Run, pod: Pod) -> None:
        self.set_pod(pod.name, {"phase": "Running", "containerStatuses": [
            {"name": self.container(run), "ready": True, "state": {"running": {"startedAt": "2026-12-01T10:00:00Z"}}}]})

    def terminated(self, run: Run, pod: Pod, code: int, reason: str, conditions: list | None = None,
                   finished: str = "2026-12-01T10:05:00Z") -> None:
        status = {"phase": "Succeeded" if code == 0 else "Failed", "containerStatuses": [
            {"name": self.container(run), "ready": False,
             "state": {"terminated": {"exitCode": code, "reason": reason, "finishedAt": finished}}}]}
        if conditions is not None:
            status["conditions"] = conditions
        self.set_pod(pod.name, status)

    def log(self, pod: Pod, *lines: str) -> None:
        self.emulator.logs[pod.name] = self.emulator.logs.get(pod.name, "") + "".join(f"{line}\n" for line in lines)

    def finish(self, run: Run, kind: str, reason: str = "", message: str = "") -> None:
        """Set the job's Complete or Failed condition."""
        body = {"status": {"conditions": [{"type": kind, "status": "True", "reason": reason, "message": message}]}}
        try:
            if run.kind == "Job":
                self.batch.patch_namespaced_job_status(run.name, NAMESPACE, body, _preload_content=False)
            else:
                self.custom.patch_namespaced_custom_object_status("trainer.kubeflow.org", "v1alpha1", NAMESPACE,
                                                                  "trainjobs", run.name, body, _preload_content=False)
        except kubernetes.client.exceptions.ApiException as exc:
            if exc.status != 404:  # 404: the launcher deleted it already (it acts on the first disrupted pod)
                raise

    # ---- what rank 0 writes ---------------------------------------------------------------------
    def local(self, pod_path: str) -> Path:
        """The local file behind a path on the pods' shared volume."""
        relative = PurePosixPath(pod_path).relative_to(self.shared_pod)
        return self.shared_local.joinpath(*relative.parts)

    def spec_of(self, run: Run, pod: Pod) -> dict:
        """The train spec the pod's command names, read as the pod would: from the shared volume, or from the
        job's spec ConfigMap mounted at /etc/vlalign (object storage)."""
        argv = pod.command
        assert argv[:5] == ["torchrun", "-m", "vlalign", "train", "--spec"], shlex.join(argv)
        if argv[5].startswith(SPEC_MOUNT_DIR + "/"):
            configmap = self.core.read_namespaced_config_map(f"{run.name}-spec", NAMESPACE)
            return json.loads(configmap.data[PurePosixPath(argv[5]).name])
        return json.loads(self.local(argv[5]).read_text(encoding="utf-8"))

    def train(self, run: Run, pod: Pod, steps: int, final: bool) -> None:
        """Write checkpoints (and final.pt) under the spec's out_dir, as `vlalign train` rank 0 does."""
        run.spec = self.spec_of(run, pod)
        out = run.spec["out_dir"]
        fs, root = fsspec.core.url_to_fs(out if "://" in out else str(self.local(out)))
        fs.makedirs(f"{root}/checkpoints", exist_ok=True)
        for step in range(1, steps + 1):
            fs.pipe_file(f"{root}/checkpoints/step-{step:08d}.pt", b"ckpt")
            fs.pipe_file(f"{root}/checkpoints/LATEST", f"step-{step:08d}.pt".encode())
        if final:
            fs.pipe_file(f"{root}/final.pt", b"final weights")


# ------------------------------------------------------------------------------------------------
# Scenarios
# ------------------------------------------------------------------------------------------------


def succeed(cluster: FakeCluster, run: Run) -> None:
    """All pods run, rank 0 logs and writes final.pt, all succeed, the job completes."""
    pods = cluster.create_pods(run)
    time.sleep(STEP)
    for pod in pods:
        cluster.running(run, pod)
    for i in range(3):
        cluster.log(pods[0], f"step {i + 1}/3 loss {2.0 - i * 0.5:.2f}")
        time.sleep(STEP)
    cluster.train(run, pods[0], steps=3, final=True)
    for pod in pods:
        cluster.terminated(run, pod, 0, "Completed")
    time.sleep(STEP)
    cluster.finish(run, "Complete", "CompletionsReached", "Reached expected number of succeeded pods")


def fail_rank(rank: int, code: int = 1, reason: str = "Error") -> Scenario:
    """Rank ``rank`` crashes with a traceback; the others are killed by the failed job."""
    def scenario(cluster: FakeCluster, run: Run) -> None:
        pods = cluster.create_pods(run)
        for pod in pods:
            cluster.running(run, pod)
        cluster.log(pods[0], "step 1/3 loss 2.00")
        cluster.log(pods[rank], "Traceback (most recent call last):", "RuntimeError: CUDA error: device-side assert")
        time.sleep(STEP)
        cluster.terminated(run, pods[rank], code, reason, finished="2026-12-01T10:01:00Z")
        for pod in pods:
            if pod.rank != rank:  # torchrun's peers exit when the rendezvous breaks, a little later
                cluster.terminated(run, pod, 1, "Error", finished="2026-12-01T10:01:30Z")
        cluster.finish(run, "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    return scenario


def image_pull_error(cluster: FakeCluster, run: Run) -> None:
    """The kubelet cannot pull the image: ErrImagePull, then ImagePullBackOff."""
    for pod in cluster.create_pods(run):
        cluster.set_pod(pod.name, {"phase": "Pending", "containerStatuses": [{
            "name": cluster.container(run), "ready": False,
            "state": {"waiting": {"reason": "ErrImagePull", "message": 'failed to pull "registry.example.com/ml/vlalign:0.1.0": not found'}}}]})


def unschedulable(cluster: FakeCluster, run: Run) -> None:
    """The scheduler finds no node for the pods."""
    for pod in cluster.create_pods(run):
        cluster.set_pod(pod.name, {"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]})


def hang(cluster: FakeCluster, run: Run) -> None:
    """The pods run and never finish."""
    for pod in cluster.create_pods(run):
        cluster.running(run, pod)


def lose_node(rank: int = 1) -> Scenario:
    """Training runs and checkpoints; the node of ``rank`` goes away (DisruptionTarget), the job fails."""
    def scenario(cluster: FakeCluster, run: Run) -> None:
        pods = cluster.create_pods(run)
        for pod in pods:
            cluster.running(run, pod)
        cluster.log(pods[0], "step 2/3 loss 1.50")
        cluster.train(run, pods[0], steps=2, final=False)
        time.sleep(STEP)
        cluster.terminated(run, pods[rank], 137, "Error", conditions=[{
            "type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager",
            "message": "Taint manager: deleting due to NoExecute taint node.kubernetes.io/unreachable"}])
        time.sleep(STEP)
        cluster.finish(run, "Failed", "PodFailurePolicy",
                       f"Pod {NAMESPACE}/{pods[rank].name} has condition DisruptionTarget matching FailJob rule at index 0")
    return scenario
