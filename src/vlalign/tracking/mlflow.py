"""MLflow integration: nested runs per training stage, metrics, and the registered embedding model.

This module and ``vlalign.tracking.registry`` are the only library modules that import mlflow.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

# Pins recorded with the logged model. Passing them skips mlflow's slow requirement inference.
MODEL_PIP_REQUIREMENTS = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "timm==1.0.31",
    "transformers==5.23.0",
    "pillow",
    "pandas",
    "pyyaml",
    "tqdm",
    "mlflow==3.17.2",
]


def mlflow_metric_name(name: str) -> str:
    """MLflow refuses ``@`` in metric names: ``image_retrieval_recall@5`` -> ``image_retrieval_recall_at_5``."""
    return name.replace("@", "_at_")


def flatten(tree: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Leaves of a nested dict as ``{"a.b.c": value}`` (lists are kept as one value)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)


def log_metrics(metrics: Mapping[str, Any], prefix: str = "", step: int | None = None) -> None:
    """Log the numeric leaves of ``metrics`` to the active run (no-op without one)."""
    if mlflow.active_run() is None:
        return
    flat = {mlflow_metric_name(k): float(v) for k, v in flatten(metrics, prefix).items() if _is_number(v)}
    if flat:
        mlflow.log_metrics(flat, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Log a local file or folder to the active run (no-op without one)."""
    if mlflow.active_run() is None:
        return
    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path)
    elif path.exists():
        mlflow.log_artifact(str(path), artifact_path)


class StageRunLogger:
    """A nested MLflow run for one training stage; a ``TrainCallback`` for ``train_stage``.

    The run is a child of ``parent_run_id`` (given explicitly, e.g. in a torchrun worker or a pod, which have no
    active run) or else of the active run (kedro-mlflow's run inside ``kedro run``). It is written through the
    client API, never the fluent run stack, so it works the same in every process. Per-step metrics are batched
    and sent every ``flush_every`` steps; the stage's last checkpoint is logged as an artifact when the stage
    ends. Without a parent (plain library use) it logs nothing unless ``force=True``.
    """

    def __init__(
        self,
        stage_name: str,
        params: Mapping[str, Any] | None = None,
        flush_every: int = 25,
        force: bool = False,
        parent_run_id: str | None = None,
        experiment_id: str | None = None,
        tracking_uri: str | None = None,
    ) -> None:
        self.stage_name = stage_name
        self.params = dict(params or {})
        self.flush_every = flush_every
        self.force = force
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id
        self.run_id: str | None = None
        self._buffer: list[Metric] = []
        self._last_checkpoint: Path | None = None
        self._client = MlflowClient(tracking_uri=tracking_uri)

    def __enter__(self) -> "StageRunLogger":
        active = mlflow.active_run()
        parent = self.parent_run_id or (active.info.run_id if active is not None else None)
        if parent is None and not self.force:
            return self
        experiment = self.experiment_id
        if experiment is None:
            experiment = (self._client.get_run(parent).info.experiment_id if parent is not None
                          else mlflow.tracking.fluent._get_experiment_id())
        tags = {"vlalign.stage": self.stage_name, "mlflow.runName": self.stage_name}
        if parent is not None:
            tags["mlflow.parentRunId"] = parent
        self.run_id = self._client.create_run(experiment, tags=tags, run_name=self.stage_name).info.run_id
        flat = [Param(k, str(v)[:500]) for k, v in flatten(self.params).items()]
        for start in range(0, len(flat), 100):
            self._client.log_batch(self.run_id, params=flat[start:start + 100])
        return self

    def on_step(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.run_id is None:
            return
        timestamp = int(pd.Timestamp.now().timestamp() * 1000)
        self._buffer.extend(Metric(mlflow_metric_name(k), float(v), timestamp, step) for k, v in metrics.items())
        if len(self._buffer) >= self.flush_every * max(1, len(metrics)):
            self._flush()

    def on_checkpoint(self, path: Path, step: int) -> None:
        self._last_checkpoint = Path(path)

    def _flush(self) -> None:
        if self.run_id is not None and self._buffer:
            for start in range(0, len(self._buffer), 1000):
                self._client.log_batch(self.run_id, metrics=self._buffer[start:start + 1000])
        self._buffer = []

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.run_id is None:
            return
        self._flush()
        if exc_type is None and self._last_checkpoint is not None and self._last_checkpoint.exists():
            self._client.log_artifact(self.run_id, str(self._last_checkpoint), "checkpoint")
        self._client.set_terminated(self.run_id, status="FINISHED" if exc_type is None else "FAILED")


def tracking_context() -> dict[str, Any] | None:
    """Where a stage launched from here should log: the tracking URI and the active run as its parent (None
    without an active run). Stored in a TrainSpec, so torchrun workers and pods log into the same run tree."""
    active = mlflow.active_run()
    if active is None:
        return None
    return {"tracking_uri": mlflow.get_tracking_uri(), "experiment_id": active.info.experiment_id,
            "parent_run_id": active.info.run_id}


#: The "model from code" file of the registered model: it calls ``mlflow.models.set_model(VLAlignEmbedder())``.
SERVED_MODEL_CODE = Path(__file__).with_name("served_model.py")


class VLAlignEmbedder(mlflow.pyfunc.PythonModel):
    """The registered model: embeds images and texts into the shared space (set by :data:`SERVED_MODEL_CODE`).

    Input: a DataFrame with a ``text`` column (str) and/or an ``image`` column (encoded image bytes,
    e.g. PNG/JPEG, or base64 text of them). Each row holds exactly one of the two.
    Output: an ``(n, D)`` float32 array of L2-normalised embeddings, row for row.
    """

    def load_context(self, context: Any) -> None:
        from vlalign.models import build_tokenizer_for
        from vlalign.train import load_checkpoint, model_from_checkpoint

        ckpt = load_checkpoint(Path(context.artifacts["checkpoint"]))
        self.model = model_from_checkpoint(ckpt).eval()
        self.cfg = self.model.config
        self.tokenizer = build_tokenizer_for(self.cfg)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        return embed_frame(self.model, self.cfg, self.tokenizer, model_input)


def _decode_image(value: Any):
    from PIL import Image

    raw = base64.b64decode(value) if isinstance(value, str) else bytes(value)
    return Image.open(io.BytesIO(raw)).convert("RGB")


def embed_frame(model: Any, cfg: Any, tokenizer: Any, frame: pd.DataFrame) -> np.ndarray:
    """Embed each row of ``frame`` (``text`` or ``image`` column) -> ``(n, D)`` float32."""
    import torch

    from vlalign.data.tokenizers import tokenize
    from vlalign.models import build_transform

    texts = frame["text"] if "text" in frame else pd.Series([None] * len(frame))
    images = frame["image"] if "image" in frame else pd.Series([None] * len(frame))
    transform = build_transform(cfg, train=False)
    out = np.zeros((len(frame), cfg.embed_dim), dtype=np.float32)
    is_text = [isinstance(t, str) and bool(t) for t in texts]
    text_rows = [i for i, flag in enumerate(is_text) if flag]
    image_rows = [i for i, flag in enumerate(is_text) if not flag]
    with torch.no_grad():
        if text_rows:
            batch = tokenize(tokenizer, [texts.iloc[i] for i in text_rows], cfg.text.context_length)
            out[text_rows] = model.encode_text(batch["input_ids"], batch["attention_mask"]).numpy()
        if image_rows:
            missing = [i for i in image_rows if images.iloc[i] is None]
            if missing:
                raise ValueError(f"rows {missing[:5]} have neither a 'text' nor an 'image' value.")
            pixels = torch.stack([transform(_decode_image(images.iloc[i])) for i in image_rows])  # (B, 3, H, W)
            out[image_rows] = model.encode_image(pixels).numpy()
    return out


def log_embedder(
    checkpoint_path: Path, example_image_png: bytes, extra_artifacts: Mapping[str, Path] | None = None
) -> tuple[Any, int]:
    """Log the checkpoint as a pyfunc embedding model with a signature; return ``(ModelInfo, embedding_dim)``.

    The model is logged from code (:data:`SERVED_MODEL_CODE`), not pickled: the model folder holds that file,
    the MLmodel/environment files and the ``artifacts`` (the checkpoint, read with ``torch.load(weights_only=True)``).
    No ``code_paths`` are logged, so loading imports the installed ``vlalign``, never a copy from the artifact store.
    """
    from vlalign.models import build_tokenizer_for
    from vlalign.train import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(checkpoint_path)).eval()
    example = pd.DataFrame({"text": ["a small red circle on the left", None], "image": [None, example_image_png]})
    output = embed_frame(model, model.config, build_tokenizer_for(model.config), example)
    signature = infer_signature(example, output)
    artifacts = {"checkpoint": str(checkpoint_path)}
    artifacts.update({k: str(v) for k, v in (extra_artifacts or {}).items()})
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(SERVED_MODEL_CODE),
        artifacts=artifacts,
        signature=signature,
        pip_requirements=MODEL_PIP_REQUIREMENTS,
    )
    return info, int(output.shape[1])


def register_model(
    checkpoint_path: Path,
    registered_model_name: str,
    example_image_png: bytes,
    tags: Mapping[str, str] | None = None,
    extra_artifacts: Mapping[str, Path] | None = None,
) -> dict[str, Any]:
    """Log the checkpoint as a pyfunc embedding model and register a new version, created with ``tags``."""
    from vlalign.tracking.registry import register_version

    info, dim = log_embedder(checkpoint_path, example_image_png, extra_artifacts)
    version = str(register_version(info.model_uri, registered_model_name, tags or {}).version)
    log.info("registered %s version %s (%s)", registered_model_name, version, info.model_uri)
    return {
        "name": registered_model_name,
        "version": version,
        "model_uri": f"models:/{registered_model_name}/{version}",
        "run_id": info.run_id,
        "embedding_dim": dim,
    }


def png_bytes(image_path: str | Path, image_root: str | Sequence[str]) -> bytes:
    """The image at ``image_path`` (read only inside ``image_root``: an ``image_root`` column value or a list of
    folders) re-encoded as PNG bytes (an input example for the signature)."""
    from vlalign.data.images import decode_roots, open_image, resolve_roots

    roots = decode_roots(image_root) if isinstance(image_root, str) else resolve_roots(image_root)
    buffer = io.BytesIO()
    open_image(str(image_path), roots).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def log_dataset_input(
    frame: pd.DataFrame, name: str, context: str, digest: str | None = None, source: str | None = None
) -> None:
    """Log a table as an input of the active run (shown under "Datasets" in the MLflow UI; no-op without a run).

    ``digest`` (e.g. a DVC md5) identifies the content; MLflow keeps its first 32 characters.
    """
    if mlflow.active_run() is None:
        return
    import warnings

    with warnings.catch_warnings():  # mlflow 3.17 registers the local-file source twice and warns about it
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest[:32] if digest else None)
    mlflow.log_input(dataset, context=context)


def register_checkpoint(
    checkpoint: dict[str, Any],
    registered_model_name: str | None,
    manifest: pd.DataFrame,
    metrics: Mapping[str, Any],
    validation_report: Mapping[str, Any],
    *,
    params: Mapping[str, Any] | None = None,
    inputs: Mapping[str, str | Path] | None = None,
    outputs: Mapping[str, str | Path] | None = None,
    name_template: str = "vlalign-{model}-{datasets}",
    repo: str | Path = ".",
    watched: tuple[str, ...] = ("conf", "src"),
    state_dir: Any = True,
    stage_specs: Mapping[str, Mapping[str, Any]] | None = None,
    evaluation_inputs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Register an in-memory checkpoint as a new model version with its lineage.

    The version is created with its lineage tags (:func:`vlalign.tracking.lineage.lineage_tags`) and the
    tags the gate reads (:func:`vlalign.tracking.registry.evaluation_tags`) in one call; ``lineage.json``
    and, for a dirty work tree, ``git_diff.patch`` are stored with the model (and under ``lineage/`` in the
    active run's artifacts). The clean manifest and the
    evaluated split are logged as inputs of the active run. The checkpoint and lineage files live in a
    temporary folder only while MLflow copies them.

    Args:
        registered_model_name: the name, or None to derive it from ``name_template``
            (:func:`vlalign.tracking.registry.registered_model_name`).
        params: the resolved run parameters (recorded; seeds collected from them).
        inputs: name -> file or folder the run used, hashed as DVC does (``clean_manifest`` is also the
            digest of the logged training dataset).
        outputs: name -> checkpoint file written by the run (stage ``final.pt`` files, the merged model).
        repo, watched, state_dir: see :func:`vlalign.tracking.lineage.build_lineage`.
        stage_specs: stage name -> the TrainSpec dict the stage ran (recorded for ``vlalign audit --retrain``).
        evaluation_inputs: what evaluation scored (:func:`vlalign.tracking.audit.build_evaluation_inputs`), stored
            as ``evaluation_inputs.json`` so an audit can score it again; its content hash is checked against
            ``metrics["evaluation_data"]`` here (a mismatch is recorded and logged, not fatal).

    The ``.dir`` listings of folder inputs are stored as ``input_listings.json`` (an audit names changed files).

    Returns:
        ``{"name", "version", "model_uri", "run_id", "embedding_dim", "lineage"}``.
    """
    from vlalign.tracking.lineage import build_lineage, lineage_tags
    from vlalign.tracking.registry import evaluation_tags, registered_model_name as derive_name
    from vlalign.train import save_checkpoint

    from vlalign.tracking.audit import evaluation_inputs_identity, sha256_json
    from vlalign.tracking.hashing import dvc_listing

    model_config = checkpoint["model_config"]
    name = derive_name(registered_model_name, name_template, str(model_config.get("name")), metrics)
    with tempfile.TemporaryDirectory(prefix="vlalign-register-") as tmp:
        path = save_checkpoint(checkpoint, Path(tmp) / "model.pt")
        artifacts: dict[str, Path] = {}
        evaluation_record = None
        if evaluation_inputs is not None:
            expected = (metrics.get("evaluation_data") or {}).get("sha256")
            actual = evaluation_inputs_identity(evaluation_inputs, manifest, state_dir)["sha256"]
            if actual != expected:
                log.warning("the recorded evaluation inputs hash to %s, the evaluation recorded %s: an audit of this "
                            "version will not be able to score the same data again.", actual, expected)
            evaluation_record = {"sha256": sha256_json(evaluation_inputs), "verified": actual == expected}
            artifacts["evaluation_inputs"] = Path(tmp) / "evaluation_inputs.json"
            artifacts["evaluation_inputs"].write_text(json.dumps(evaluation_inputs))
        lineage, patch = build_lineage(
            manifest=manifest, inputs=inputs or {}, outputs=outputs or {}, registered_checkpoint=path,
            params=params if params is not None else {"merge": checkpoint.get("merge"), "model": model_config},
            metrics=metrics, validation_report=validation_report, model_config=model_config,
            run_id=active_run_id(), repo=repo, watched=watched, state_dir=state_dir,
            stage_specs=stage_specs, evaluation_inputs=evaluation_record,
        )
        listings = {n: dvc_listing(r["path"], state_dir) for n, r in lineage["inputs"].items() if r.get("isdir")}
        if listings:
            artifacts["input_listings"] = Path(tmp) / "input_listings.json"
            artifacts["input_listings"].write_text(json.dumps(listings))
        artifacts["lineage"] = Path(tmp) / "lineage.json"
        artifacts["lineage"].write_text(json.dumps(lineage, indent=2, default=str))
        if patch:
            artifacts["git_diff"] = Path(tmp) / "git_diff.patch"
            artifacts["git_diff"].write_text(patch)
        _log_run_inputs(manifest, metrics, lineage)
        for file in artifacts.values():  # also on the run, beside the metrics and the report
            log_artifact(file, "lineage")
        example = png_bytes(manifest["image_path"].iloc[0], manifest["image_root"].iloc[0])
        tags = {**lineage_tags(lineage), **evaluation_tags(metrics)}
        record = register_model(path, name, example, tags=tags, extra_artifacts=artifacts)
    return {**record, "lineage": lineage}


def _log_run_inputs(manifest: pd.DataFrame, metrics: Mapping[str, Any], lineage: Mapping[str, Any]) -> None:
    """The clean manifest (context ``training``) and each evaluated split (context ``evaluation``) as run inputs."""
    clean = lineage["inputs"].get("clean_manifest")
    log_dataset_input(manifest, "clean_manifest", "training",
                      digest=clean["md5"] if clean else lineage["training_data"]["manifest_sha256"],
                      source=clean["path"] if clean else None)
    blocks = ((metrics.get("evaluation_data") or {}).get("blocks") or {})
    for block_name, block in blocks.items():
        if "split" not in block or "language" not in block:
            continue  # zero-shot and probe sets are not manifest rows
        rows = manifest[(manifest["split"] == block["split"]) & (manifest["lang"] == block["language"])]
        log_dataset_input(rows, f"{block['dataset']}/{block['split']}/{block['language']}", "evaluation",
                          digest=block["sha256"])


def active_run_id() -> str | None:
    """The id of the active MLflow run, or None."""
    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


def close_leftover_runs() -> int:
    """End runs left on this thread's run stack after a pipeline; returns how many were ended.

    kedro-mlflow re-enters its pipeline run before every node (for thread safety). With mlflow 3.17 that
    pushes the same run on the stack again each time, and its single ``end_run`` at the end of the
    pipeline leaves the rest active, so the next ``kedro run`` in the same process would log into it.
    """
    ended = 0
    while mlflow.active_run() is not None:
        mlflow.end_run()
        ended += 1
    return ended


def load_checkpoint_from_uri(uri: str | Path) -> dict[str, Any]:
    """Load a vlalign checkpoint from a registered model, a run artifact or a local file.

    - ``models:/<name>/<version>``, ``models:/<name>@<alias>`` or ``runs:/<run_id>/model``: a model
      logged by :func:`register_model`; only its ``checkpoint`` artifact (listed in the pyfunc
      flavour of its MLmodel file) is downloaded, from the tracking/registry server in
      ``MLFLOW_TRACKING_URI``.
    - ``runs:/<run_id>/<path>`` of a raw checkpoint file (e.g. a stage's ``checkpoint/final.pt``), or
      any other mlflow artifact URI of one: downloaded and loaded.
    - anything else: a local checkpoint path.

    Raises:
        CheckpointError: the URI names no model, no file, or not a vlalign checkpoint.
    """
    from mlflow.exceptions import MlflowException

    from vlalign.errors import CheckpointError
    from vlalign.train import load_checkpoint

    text = str(uri).strip()
    if not text:
        raise CheckpointError("empty model URI; pass models:/<name>/<version>, runs:/<run_id>/model or a checkpoint path.")
    if "://" not in text and not text.startswith(("models:/", "runs:/")):
        return load_checkpoint(Path(text))
    base = text.rstrip("/")
    try:
        try:
            flavor = mlflow.models.Model.load(base).flavors.get("python_function", {})
        except (MlflowException, OSError):
            flavor = None  # not a logged model: an artifact URI of a checkpoint file or folder
        if flavor is not None:
            artifact = (flavor.get("artifacts") or {}).get("checkpoint")
            if not artifact:
                raise CheckpointError(
                    f"{text}: the model has no 'checkpoint' artifact; was it logged by vlalign.tracking.mlflow.register_model?"
                )
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{artifact['path']}"))
        else:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=base))
    except MlflowException as exc:
        raise CheckpointError(
            f"{text}: cannot be downloaded from MLflow at {mlflow.get_tracking_uri()} ({exc}); check the model "
            "name and version (or the run id) and MLFLOW_TRACKING_URI."
        ) from exc
    if local.is_dir():
        found = sorted(local.rglob("*.pt"))
        if len(found) != 1:
            raise CheckpointError(f"{text}: expected one *.pt checkpoint in the downloaded folder {local}, found {len(found)}.")
        local = found[0]
    return load_checkpoint(local)
