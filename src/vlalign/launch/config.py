"""Configuration of Kubernetes execution (``kubernetes:`` in conf/base/parameters_kubernetes.yml).

The pod template (``k8s/base/train-podtemplate.yaml``, patched by the kustomize overlay that was applied) decides
image, resources, security context, volumes, node selectors and tolerations. The fields here say how to run one
stage (engine, nodes, processes, storage, timeouts) and may override the template per run: every override left at
its empty default keeps the template's value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from vlalign.errors import ConfigError

ENGINES = ("job", "trainjob")
STORAGE_KINDS = ("pvc", "fsspec")


@dataclass
class StorageConfig:
    """Where the stage's inputs and outputs live, as the submitting machine and the pods see them."""

    kind: str = "pvc"  # "pvc": a ReadWriteMany volume the submitter also sees; "fsspec": object storage
    claim_name: str | None = None  # pvc: PersistentVolumeClaim of the data volume (None = the template's claim)
    volume_name: str = "data"  # pvc: name of the template's volume that holds the shared data
    local_root: str = "data"  # pvc: the shared folder on the submitting machine (relative = to the cwd)
    mount_path: str = "/app/data"  # pvc: where the pods mount that same folder
    url: str | None = None  # fsspec: base URL of the object store, e.g. s3://bucket/vlalign (kind="fsspec" only)
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec: options for fsspec.filesystem(...)

    def __post_init__(self) -> None:
        if self.kind not in STORAGE_KINDS:
            raise ConfigError(f"kubernetes.storage.kind={self.kind!r}: expected one of {list(STORAGE_KINDS)}.")
        if self.kind == "fsspec" and not self.url:
            raise ConfigError(
                "kubernetes.storage.kind='fsspec' needs kubernetes.storage.url, e.g. s3://bucket/vlalign "
                "(the pods read inputs from and write checkpoints to that URL)."
            )
        if self.kind == "pvc" and not self.mount_path.startswith("/"):
            raise ConfigError(f"kubernetes.storage.mount_path={self.mount_path!r}: expected an absolute path in the pod.")


@dataclass
class KubernetesConfig:
    """How one training stage runs on a cluster (see docs/design/kubernetes.md)."""

    namespace: str = "vlalign"  # namespace of the jobs (the kustomize base creates it)
    engine: str | None = None  # "job": Indexed Job + Service; "trainjob": Kubeflow Trainer v2; None = the template's
    #   vlalign.dev/engine annotation (set by k8s/components/trainjob), else "job"
    template: str = "cluster"  # pod template: "cluster" = the PodTemplate applied with kubectl, or a YAML file path
    template_name: str = "vlalign-train"  # name of the PodTemplate (in the cluster or in the file)
    container_name: str = "train"  # the training container of the template
    image: str | None = None  # training image; None = the template's (set with `kustomize edit set image`)
    nnodes: int = 1  # pods (torchrun nodes) per stage
    nproc_per_node: int | None = None  # processes per pod; None = the pod's nvidia.com/gpu limit, or 1 without GPUs
    gpus_per_node: int | None = None  # nvidia.com/gpu per pod; None = the template's (0 on the cpu overlay)
    resources: dict[str, dict[str, str]] = field(default_factory=dict)  # {"requests": {...}, "limits": {...}} overrides
    node_selector: dict[str, str] = field(default_factory=dict)  # added to the template's nodeSelector
    tolerations: list[dict[str, Any]] = field(default_factory=list)  # added to the template's tolerations
    service_account: str | None = None  # service account of the training pods; None = the template's
    queue_name: str | None = None  # Kueue LocalQueue (gang admission); None = the template's vlalign.dev/queue-name
    #   annotation (set by k8s/components/kueue), else no Kueue
    storage: StorageConfig = field(default_factory=StorageConfig)  # shared storage of inputs, checkpoints, final.pt
    mlflow_tracking_uri: str | None = None  # tracking URI the pods log to; None = the stage's own (must be a server)
    master_port: int = 29500  # torchrun rendezvous port on node 0
    timeout_s: float = 86400.0  # give up (and delete the job) after this long per attempt, queueing included
    unschedulable_grace_s: float = 600.0  # fail when a pod stays Unschedulable this long (autoscalers need minutes)
    poll_interval_s: float = 5.0  # seconds between status polls
    log_interval_s: float = 30.0  # seconds between reads of rank 0's log tail
    log_tail_lines: int = 20  # log lines shown per read, and on a failure
    max_resubmits: int = 2  # resubmissions after node loss or pre-emption (each resumes from the last checkpoint)
    output_wait_s: float = 60.0  # after success, wait this long for final.pt to be visible on the shared storage
    ttl_after_finished_s: int = 604800  # the cluster deletes finished jobs after this long (7 days)
    trainjob_runtime: str = "torch-distributed"  # trainjob: the runtime the TrainJob references
    trainjob_runtime_kind: str = "ClusterTrainingRuntime"  # trainjob: ClusterTrainingRuntime or TrainingRuntime
    job_name_prefix: str = "vlalign"  # prefix of job names: <prefix>-<stage>-<hash>-r<attempt>
    context: str | None = None  # kubeconfig context when run outside the cluster; None = the current context

    def __post_init__(self) -> None:
        if isinstance(self.storage, dict):
            self.storage = storage_from_dict(self.storage)
        checks = [
            (self.engine is None or self.engine in ENGINES, "engine", f"null or one of {list(ENGINES)}"),
            (isinstance(self.nnodes, int) and self.nnodes >= 1, "nnodes", "an integer >= 1"),
            (self.nproc_per_node is None or self.nproc_per_node >= 1, "nproc_per_node", "null or an integer >= 1"),
            (self.gpus_per_node is None or self.gpus_per_node >= 0, "gpus_per_node", "null or an integer >= 0"),
            (set(self.resources) <= {"requests", "limits"}, "resources", "a mapping with keys requests and/or limits"),
            (1 <= self.master_port <= 65535, "master_port", "a port number"),
            (self.timeout_s > 0, "timeout_s", "a positive number of seconds"),
            (self.unschedulable_grace_s >= 0, "unschedulable_grace_s", "a number of seconds >= 0"),
            (self.poll_interval_s > 0, "poll_interval_s", "a positive number of seconds"),
            (self.log_interval_s >= 0, "log_interval_s", "a number of seconds >= 0"),
            (self.log_tail_lines >= 1, "log_tail_lines", "an integer >= 1"),
            (self.max_resubmits >= 0, "max_resubmits", "an integer >= 0"),
            (self.output_wait_s >= 0, "output_wait_s", "a number of seconds >= 0"),
            (self.trainjob_runtime_kind in ("ClusterTrainingRuntime", "TrainingRuntime"), "trainjob_runtime_kind",
             "ClusterTrainingRuntime or TrainingRuntime"),
            (bool(self.namespace) and bool(self.job_name_prefix), "namespace/job_name_prefix", "non-empty strings"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(
                    f"kubernetes.{name}={getattr(self, name, None)!r}: expected {expected} "
                    "(conf/base/parameters_kubernetes.yml or your environment's override)."
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "kubernetes") -> KubernetesConfig:
        """Build from the ``kubernetes:`` parameters, naming ``where`` and the key on an unknown key."""
        data = dict(data or {})
        _reject_unknown(cls, data, where)
        if "storage" in data:
            data["storage"] = storage_from_dict(data["storage"], f"{where}.storage")
        return cls(**data)


def storage_from_dict(data: dict[str, Any] | None, where: str = "kubernetes.storage") -> StorageConfig:
    """Build a :class:`StorageConfig`, rejecting unknown keys."""
    data = dict(data or {})
    _reject_unknown(StorageConfig, data, where)
    return StorageConfig(**data)


def _reject_unknown(cls: type, data: dict[str, Any], where: str) -> None:
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(allowed)}.")
