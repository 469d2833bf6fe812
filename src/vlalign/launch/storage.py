"""How a stage's files reach the pods and come back: a shared volume, or object storage through fsspec.

- ``pvc``: the submitting machine and the pods see the same ReadWriteMany volume, the first at
  ``storage.local_root`` (e.g. ``data`` in the project root, or an NFS mount), the pods at ``storage.mount_path``.
  Paths are translated; nothing is copied. The pod-side spec is written next to the stage's checkpoints.
- ``fsspec``: inputs are uploaded under ``storage.url`` (skipped when the same file is already there), the pods
  read and write URLs, and ``final.pt`` is downloaded into the local stage folder after the job.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from vlalign.errors import ConfigError, KubernetesJobError
from vlalign.launch.config import KubernetesConfig, StorageConfig
from vlalign.launch.render import SPEC_MOUNT_DIR

if TYPE_CHECKING:  # importing vlalign.train loads torch; the launcher does not need it
    from vlalign.train.spec import TrainSpec

SPEC_NAME = "k8s-spec.json"  # the pod-side spec, next to checkpoints/ in the stage folder
FINAL_NAME = "final.pt"
LOCAL_TRACKING_SCHEMES = ("", "file", "sqlite")  # MLflow stores only the submitting machine can open


def is_url(path: str) -> bool:
    """Whether ``path`` is an fsspec URL (``s3://...``) rather than a local path."""
    return "://" in str(path)


class SharedStorage:
    """Translation between the submitting machine and the pods; see the module docstring."""

    def __init__(self, config: StorageConfig) -> None:
        self.config = config

    # ---- what the pods see --------------------------------------------------------------------
    def pod_spec(self, spec: TrainSpec, tracking_uri: str | None, echo=print) -> tuple[TrainSpec, str, str | None]:
        """(pod-side spec, path of the spec file in the pods, spec JSON for a ConfigMap or None)."""
        mlflow = _pod_mlflow(spec.mlflow, tracking_uri)
        if self.config.kind == "pvc":
            pod = replace(
                spec,
                data=self.to_pod(spec.data, "data"),
                out_dir=self.to_pod(spec.out_dir, "out_dir"),
                init=self.to_pod(spec.init, "init") if spec.init else None,
                image_roots=[self.to_pod(p, "image_roots") for p in spec.image_roots],
                mlflow=mlflow,
            )
            return pod, posixpath.join(pod.out_dir, SPEC_NAME), None
        if spec.image_roots:
            raise ConfigError(
                f"train spec image_roots={spec.image_roots}: with object storage (kubernetes.storage.kind=fsspec) the "
                "pods cannot read local image folders; train from WebDataset shards (they carry the images) or use a "
                "shared volume (kind=pvc)."
            )
        if not is_url(spec.data) and Path(spec.data).suffix == ".parquet":
            raise ConfigError(
                f"train spec data={spec.data!r}: a manifest points at local image files, which pods reading object "
                "storage cannot open; write WebDataset shards (shards.json) or use a shared volume (kind=pvc)."
            )
        pod = replace(
            spec,
            data=self.upload(spec.data, "data", echo),
            init=self.upload(spec.init, "init", echo) if spec.init else None,
            out_dir=self.remote(spec.out_dir),
            mlflow=mlflow,
        )
        return pod, posixpath.join(SPEC_MOUNT_DIR, "spec.json"), None  # spec JSON filled in by the caller

    def to_pod(self, local: str, field: str) -> str:
        """The pod's path of a file on the shared volume; a :class:`ConfigError` names ``field`` otherwise."""
        if is_url(local):
            return local
        mount = PurePosixPath(self.config.mount_path)
        root = Path(self.config.local_root).resolve()
        path = Path(local).resolve()
        if path == root or root in path.parents:
            return str(mount.joinpath(*path.relative_to(root).parts))
        if str(PurePosixPath(local)).startswith(str(mount) + "/") or str(PurePosixPath(local)) == str(mount):
            return str(PurePosixPath(local))  # already the pod's path (the submitter runs in a pod with the volume)
        raise ConfigError(
            f"train spec {field}={local!r} is not on the shared volume: the pods see only {root} "
            f"(kubernetes.storage.local_root), mounted at {mount}. Put it under {root} or change local_root."
        )

    # ---- object storage -----------------------------------------------------------------------
    def _fs(self):
        import fsspec

        fs, _ = fsspec.core.url_to_fs(self.config.url, **(self.config.storage_options or {}))
        return fs

    def remote(self, local: str) -> str:
        """The URL under ``storage.url`` that mirrors a local path (relative to the cwd when inside it)."""
        if is_url(local):
            return local
        path = Path(local).resolve()
        cwd = Path.cwd().resolve()
        key = path.relative_to(cwd).as_posix() if cwd in path.parents else path.as_posix().lstrip("/")
        return f"{self.config.url.rstrip('/')}/{key}"

    def upload(self, local: str, field: str, echo=print) -> str:
        """Copy a local file or folder (a shard index: its folder) to its URL, unless it is there already."""
        if is_url(local):
            return local
        path = Path(local)
        if not path.exists():
            raise ConfigError(f"train spec {field}={local!r}: not found, so it cannot be uploaded to {self.config.url}.")
        fs = self._fs()
        source = path.parent if path.is_file() and path.name == "shards.json" else path
        files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        copied = 0
        for file in files:
            url = self.remote(str(file))
            if fs.exists(url) and fs.size(url) == file.stat().st_size:
                continue
            fs.makedirs(posixpath.dirname(url), exist_ok=True)
            fs.put_file(str(file), url)
            copied += 1
        if copied:
            echo(f"uploaded {copied} of {len(files)} file(s) of {field} to {self.remote(str(source))}")
        return self.remote(str(path))

    # ---- files written for, and read back from, the pods -----------------------------------
    def write_spec(self, local_out_dir: str, pod_out_dir: str, text: str) -> str:
        """Write the pod-side spec into the stage folder (pvc: where the pods read it); returns where."""
        if self.config.kind == "pvc":
            target = Path(local_out_dir) / SPEC_NAME
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, target)
            return str(target)
        fs = self._fs()
        url = posixpath.join(pod_out_dir, SPEC_NAME)
        fs.makedirs(pod_out_dir, exist_ok=True)
        with fs.open(url, "w") as handle:
            handle.write(text)
        return url

    def latest_checkpoint(self, local_out_dir: str, pod_out_dir: str) -> str | None:
        """Name of the stage's latest checkpoint (checkpoints/LATEST), if any."""
        try:
            if self.config.kind == "pvc":
                pointer = Path(local_out_dir) / "checkpoints" / "LATEST"
                return pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
            fs = self._fs()
            url = posixpath.join(pod_out_dir, "checkpoints", "LATEST")
            return fs.cat_file(url).decode("utf-8").strip() if fs.exists(url) else None
        except OSError:
            return None

    def final_ready(self, local_out_dir: str, pod_out_dir: str) -> bool:
        """Whether final.pt is on the shared storage."""
        if self.config.kind == "pvc":
            return (Path(local_out_dir) / FINAL_NAME).is_file()
        return self._fs().exists(posixpath.join(pod_out_dir, FINAL_NAME))

    def fetch_final(self, local_out_dir: str, pod_out_dir: str) -> Path:
        """The local path of final.pt (downloaded first with object storage, atomically)."""
        target = Path(local_out_dir) / FINAL_NAME
        if self.config.kind == "pvc":
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{FINAL_NAME}.", dir=target.parent)
        os.close(fd)
        try:
            self._fs().get_file(posixpath.join(pod_out_dir, FINAL_NAME), tmp)
            os.replace(tmp, target)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise KubernetesJobError(f"could not download {pod_out_dir}/{FINAL_NAME} to {target}: {exc}") from exc
        return target


def _pod_mlflow(mlflow: dict | None, tracking_uri: str | None) -> dict | None:
    """The spec's MLflow settings as the pods need them: a tracking server they can reach."""
    if mlflow is None:
        return None
    mlflow = dict(mlflow)
    if tracking_uri:
        mlflow["tracking_uri"] = tracking_uri
        return mlflow
    uri = str(mlflow.get("tracking_uri") or "")
    scheme = uri.split(":", 1)[0] if "://" in uri or uri.startswith("sqlite:") else ""
    if scheme in LOCAL_TRACKING_SCHEMES:
        raise ConfigError(
            f"the stage logs to MLflow at {uri or '(no tracking_uri)'!r}, which the pods cannot open; set "
            "kubernetes.mlflow_tracking_uri (or MLFLOW_TRACKING_URI for the pipeline) to a tracking server they reach, "
            "e.g. http://vlalign-mlflow:5000 from k8s/base."
        )
    return mlflow


def config_storage(config: KubernetesConfig) -> SharedStorage:
    """The :class:`SharedStorage` of a config."""
    return SharedStorage(config.storage)
