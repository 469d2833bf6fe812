"""Lineage of a registered model: the code, data, parameters, environment and outputs that produced it.

:func:`build_lineage` returns a plain JSON-serialisable dict, written as ``lineage.json`` beside the
registered model and summarised in model-version tags (:func:`lineage_tags`). Every hash in it can be
checked by an audit:

- data hashes are DVC's own (``md5`` of a file, ``<md5>.dir`` of a folder; :func:`vlalign.tracking.hashing.dvc_hash`),
  so they compare directly with ``dvc.lock``, ``.dvc`` files and the DVC cache;
- checkpoint hashes come twice: the file's DVC md5, and ``weights_sha256`` over the tensors only, which a
  retrain can reproduce although its checkpoint files differ (optimizer state, timestamps);
- the git commit, with the uncommitted changes as a patch (``git apply``-able) in a separate artifact.

``lineage.json`` fields (format ``vlalign-lineage-v3``; v3 added ``root``, ``git.watched``, ``stages``,
``dvc``, ``evaluation_inputs`` and ``outputs.*.merge.sources``):

``format``
    ``"vlalign-lineage-v3"``.
``created``
    UTC time the lineage was built (ISO 8601).
``root``
    the project folder's absolute path when the run wrote the lineage (paths below that are relative are
    relative to it; an audit elsewhere maps this prefix to its own checkout).
``git``
    ``commit`` (HEAD), ``branch``, ``dirty`` (tracked changes anywhere except DVC's own records ``dvc.lock``
    and ``*.dvc``, untracked files under the watched folders ``conf/`` and ``src/``, or git-ignored files under
    ``conf/`` such as ``conf/local/*.yml``), ``tracked_changes`` / ``untracked`` / ``ignored_config`` (paths;
    ignored config files with their md5, never their contents, since they may hold credentials;
    ``credentials*`` files are left out), ``watched`` (those folders) and ``diff_sha256`` (sha256 of the patch
    artifact). All ``None`` outside a git work tree. It is the state when the run started (the hooks take a
    snapshot, :func:`remember_code_state`); ``changed_during_run`` says whether the tree changed before the
    model was registered (None: no snapshot was taken, the state is the one at registration).
``inputs``
    name -> ``{"path", "md5", "size", "isdir", "nfiles"?}``: every input file or folder the run used (raw
    data, the clean manifest, shards, pretrained weight and vocabulary files), hashed as DVC does.
``outputs``
    name -> the same record plus ``weights_sha256``, ``stage``, ``step`` and the checkpoint's own
    ``inputs`` fingerprints, for each stage's ``final.pt`` and the merged model (with ``merge``: ``beta`` and
    ``sources``, the two stages); ``registered`` is the checkpoint file stored with the model version (its md5
    and ``weights_sha256``).
``stages``
    stage name -> the exact :class:`vlalign.train.spec.TrainSpec` the stage ran (its ``spec.json``, without the
    MLflow context), in run order: what ``vlalign audit --retrain`` runs again.
``training_data``
    ``manifest_sha256`` (row-content fingerprint of the clean manifest), ``rows``, ``images``, ``splits``, and
    ``images_outside_inputs``: how many of its images lie under no input folder (0 when the raw images are
    covered by ``inputs``; otherwise a warning is logged).
``evaluation_data``
    the evaluated data's identity (:func:`vlalign.tracking.hashing.evaluation_data_identity`).
``validation``
    ``n_rows``, ``n_clean``, ``rejected_fraction`` of the validation report.
``params``
    the resolved run parameters. ``seeds``: every ``seed`` found in them, by dotted path.
``packages`` / ``hardware``
    installed versions of the packages that shape a model; CPU model, cores, RAM, GPUs, torch, CUDA, cuDNN,
    Python and platform.
``dvc_lock``
    ``{"sha256", "outs"}`` of ``dvc.lock`` as it was when the lineage was written (``{}`` without one); the
    default ``make run`` commits its own stages to ``dvc.lock`` right after the run.
``dvc``
    where DVC keeps each input and output (:func:`dvc_state`): ``remote`` (default remote name and URL),
    ``outs`` (name -> the ``dvc.yaml`` stage and output that hold it, and the hash ``dvc.lock`` records for that
    output now), ``experiment`` (``DVC_EXP_NAME`` etc. under ``dvc exp run``); ``{}`` outside a DVC repository.
``evaluation_inputs``
    ``{"sha256", "verified"}`` of the ``evaluation_inputs.json`` artifact (what evaluation scored, so an audit
    can score it again); ``verified`` says its content hash equals ``evaluation_data.sha256``.
``metrics`` / ``mlflow_run_id``
    the evaluation metrics and the run the model was logged from.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from vlalign import reproducibility
from vlalign.tracking.hashing import dvc_hash, dvc_hashes, weights_sha256

log = logging.getLogger(__name__)

LINEAGE_FORMAT = "vlalign-lineage-v3"
TRACKED_PACKAGES = ("torch", "torchvision", "timm", "transformers", "numpy", "pillow", "kedro", "mlflow", "dvc",
                    "dvc-data", "great-expectations", "vlalign")
#: Folders whose untracked files make a work tree dirty (data/, mlruns/ etc. are untracked by design).
WATCHED_FOLDERS = ("conf", "src")
#: Tracked files that record data versions, not code: their changes do not make a tree dirty (``make run`` ends
#: with ``dvc commit``, which rewrites dvc.lock).
DATA_RECORDS = ("dvc.lock",)
DATA_RECORD_SUFFIXES = (".dvc",)
#: Untracked files larger than this go into the patch by name and md5 only.
MAX_PATCH_FILE_BYTES = 1 << 20


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def frame_fingerprint(frame: pd.DataFrame) -> str:
    """A sha256 over a table's rows (order-sensitive), independent of how the table is stored."""
    hashed = pd.util.hash_pandas_object(frame.reset_index(drop=True), index=False).to_numpy()
    return hashlib.sha256(hashed.tobytes()).hexdigest()


# ------------------------------------------------------------------------------------------------
# git
# ------------------------------------------------------------------------------------------------


def _git(repo: str | Path, *args: str, ok_codes: Sequence[int] = (0,)) -> str | None:
    """stdout of ``git args`` in ``repo``, or None when git is missing, fails or ``repo`` is no work tree."""
    try:
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode in ok_codes else None


def _lines(text: str | None) -> list[str]:
    return [line for line in (text or "").splitlines() if line.strip()]


def git_state(repo: str | Path = ".", watched: Sequence[str] = WATCHED_FOLDERS) -> dict[str, Any]:
    """The commit checked out in ``repo`` and what differs from it.

    ``dirty`` is True when a tracked file changed (anywhere), when a file under ``watched`` is untracked
    (e.g. a new environment folder ``conf/myenv/``), or when a git-ignored file under ``conf/`` other than
    ``credentials*``/``.gitkeep`` exists (``conf/local/`` overrides change a run). All fields are None outside
    a git work tree.
    """
    commit = _git(repo, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "branch": None, "dirty": None, "tracked_changes": None, "untracked": None,
                "ignored_config": None, "watched": list(watched)}
    watched = [w for w in watched if (Path(repo) / w).exists()]
    tracked = [line[3:] for line in _lines(_git(repo, "status", "--porcelain=v1", "--untracked-files=no"))]
    tracked = [p for p in tracked if not is_data_record(p)]
    untracked = _lines(_git(repo, "ls-files", "--others", "--exclude-standard", "--", *watched)) if watched else []
    ignored = ignored_config(repo)
    return {
        "commit": commit.strip(),
        "branch": (_git(repo, "rev-parse", "--abbrev-ref", "HEAD") or "").strip() or None,
        "dirty": bool(tracked or untracked or ignored),
        "tracked_changes": tracked,
        "untracked": untracked,
        "ignored_config": ignored,
        "watched": list(watched),
    }


def is_data_record(path: str) -> bool:
    """True for DVC's records of data versions (``dvc.lock``, ``*.dvc``), which are not code."""
    name = path.strip().strip('"').rsplit("/", 1)[-1]
    return name in DATA_RECORDS or name.endswith(DATA_RECORD_SUFFIXES)


def ignored_config(repo: str | Path = ".") -> list[dict[str, str]]:
    """Git-ignored files under ``conf/`` (e.g. ``conf/local/parameters.yml``) with their md5, never their contents
    (``credentials*``, ``.gitkeep`` and ``__pycache__`` are left out)."""
    ignored = []
    if (Path(repo) / "conf").exists():
        for path in _lines(_git(repo, "ls-files", "--others", "--ignored", "--exclude-standard", "--", "conf")):
            name = Path(path).name
            if name == ".gitkeep" or name.startswith("credentials") or "__pycache__" in Path(path).parts:
                continue
            ignored.append({"path": path, "md5": dvc_hash(Path(repo) / path, state_dir=None)["md5"]})
    return ignored


def git_patch(repo: str | Path = ".", untracked: Sequence[str] = (), base: str = "HEAD") -> str:
    """The work tree's changes against ``base`` as one patch: ``git apply`` on a checkout of it restores them.

    Tracked changes (staged and unstaged) come from ``git diff --binary <base>`` (DVC's records ``dvc.lock`` /
    ``*.dvc`` left out); each untracked file in ``untracked`` is added as a new-file patch (files over 1 MiB by
    name and md5 only, in a comment line).
    """
    tracked = _git(repo, "diff", "--binary", base, "--", ".", *(f":(exclude,glob)**/{name}" for name in DATA_RECORDS),
                   *(f":(exclude,glob)**/*{suffix}" for suffix in DATA_RECORD_SUFFIXES))
    parts = [tracked or ""]
    for path in untracked:
        full = Path(repo) / path
        if not full.is_file():
            continue
        if full.stat().st_size > MAX_PATCH_FILE_BYTES:
            parts.append(f"# untracked file too large for the patch: {path} md5={dvc_hash(full, state_dir=None)['md5']}\n")
            continue
        parts.append(_git(repo, "diff", "--no-index", "--binary", "--", "/dev/null", path, ok_codes=(0, 1)) or "")
    return "".join(part if part.endswith("\n") or not part else part + "\n" for part in parts)


#: Code state taken when a run started (:func:`remember_code_state`), by absolute repository path.
_CODE_AT_START: dict[str, tuple[dict[str, Any], str]] = {}


def remember_code_state(repo: str | Path = ".", watched: Sequence[str] = WATCHED_FOLDERS) -> None:
    """Take the git state and patch now (when a run starts): :func:`build_lineage` records this snapshot, the code
    that ran, rather than the tree as it is when the model is registered, minutes or hours later."""
    state = git_state(repo, watched)
    patch = git_patch(repo, state["untracked"] or ()) if state["commit"] and state["dirty"] else ""
    _CODE_AT_START[str(Path(repo).resolve())] = (state, patch)


def forget_code_state(repo: str | Path = ".") -> None:
    """Drop the snapshot of :func:`remember_code_state` (when the run ends)."""
    _CODE_AT_START.pop(str(Path(repo).resolve()), None)


def code_state(repo: str | Path = ".", watched: Sequence[str] = WATCHED_FOLDERS) -> tuple[dict[str, Any], str]:
    """``(git state, patch)`` of the code that ran: the snapshot taken when the run started when there is one (for
    the same watched folders), else the tree now. ``changed_during_run`` says whether the tree changed since."""
    state = git_state(repo, watched)
    patch = git_patch(repo, state["untracked"] or ()) if state["commit"] and state["dirty"] else ""
    started = _CODE_AT_START.get(str(Path(repo).resolve()))
    if started is None or started[0].get("watched") != state.get("watched"):
        return {**state, "changed_during_run": None}, patch
    changed = (started[0]["commit"], started[1]) != (state["commit"], patch)
    if changed:
        log.warning("the code in %s changed while the run ran (commit or uncommitted changes): the lineage records the "
                    "code as it was when the run started.", repo)
    return {**started[0], "changed_during_run": changed}, started[1]


# ------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------


def package_versions(names: Sequence[str] = TRACKED_PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that shape a model."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _ram_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def hardware() -> dict[str, Any]:
    """CPU model, cores (all and usable by this process), RAM, GPUs, and the torch / CUDA / cuDNN builds."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"name": props.name, "memory_bytes": int(props.total_memory),
                         "capability": f"{props.major}.{props.minor}"})
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "cpu_model": reproducibility.cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "ram_bytes": _ram_bytes(),
        "gpus": gpus,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def find_seeds(params: Any, prefix: str = "") -> dict[str, Any]:
    """Every value under a key named ``seed`` in a nested parameters tree, by dotted path
    (list items by their ``name`` when they have one, e.g. ``training.stages.stage1.seed``)."""
    found: dict[str, Any] = {}
    if isinstance(params, Mapping):
        for key, value in params.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if key == "seed" and not isinstance(value, (Mapping, list)):
                found[path] = value
            else:
                found.update(find_seeds(value, path))
    elif isinstance(params, list):
        for index, item in enumerate(params):
            label = item.get("name", index) if isinstance(item, Mapping) else index
            found.update(find_seeds(item, f"{prefix}.{label}"))
    return found


def dvc_lock_state(repo: str | Path = ".") -> dict[str, Any]:
    """sha256 of ``dvc.lock`` and the hash it records for each stage output (``{}`` without a dvc.lock)."""
    lock = Path(repo) / "dvc.lock"
    if not lock.exists():
        return {}
    import yaml

    data = yaml.safe_load(lock.read_text()) or {}
    outs: dict[str, Any] = {}
    for body in (data.get("stages") or {}).values():
        for out in body.get("outs", []) or []:
            outs[out["path"]] = out.get("md5") or out.get("hash")
    return {"sha256": sha256_file(lock), "outs": outs}


#: Environment variables DVC sets for a stage's command (``dvc repro`` / ``dvc exp run``), as lineage keys.
DVC_ENVIRONMENT = {"DVC_EXP_NAME": "exp_name", "DVC_EXP_BASELINE_REV": "exp_baseline_rev", "DVC_STAGE": "stage"}


def dvc_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The DVC experiment / stage this process runs under (``{}`` outside ``dvc repro`` / ``dvc exp run``)."""
    environ = os.environ if environ is None else environ
    return {key: environ[var] for var, key in DVC_ENVIRONMENT.items() if environ.get(var)}


def _dvc_yaml_outs(root: Path) -> dict[str, dict[str, Any]]:
    """``dvc.yaml`` stage outputs (outs, metrics, plots): path -> ``{"stage", "cache"}``."""
    import yaml

    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        return {}
    stages = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages") or {}
    outs: dict[str, dict[str, Any]] = {}
    for stage, body in stages.items():
        for kind in ("outs", "metrics", "plots"):
            for entry in (body or {}).get(kind) or []:
                path, opts = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
                outs[str(path).rstrip("/")] = {"stage": stage, "cache": bool((opts or {}).get("cache", kind == "outs"))}
    return outs


def dvc_remote(root: str | Path) -> dict[str, Any]:
    """``{"name", "url"}`` of the DVC repository's default remote (``url`` as DVC resolves it), or ``{}``."""
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            name = repo.config["core"].get("remote")
            if not name:
                return {}
            url = (repo.config["remote"].get(name) or {}).get("url")
            return {"name": name, "url": url}
    except Exception as exc:  # a broken .dvc/config must not stop a registration; the audit reports it
        log.warning("could not read the DVC remote of %s: %s", root, exc)
        return {}


def dvc_state(paths: Mapping[str, str | Path], repo: str | Path = ".") -> dict[str, Any]:
    """Where DVC keeps each named path: the ``dvc.yaml`` stage output that holds it (the path itself or a folder
    above it) and the hash ``dvc.lock`` records for that output right now, the default remote, and the DVC
    experiment this process runs in. ``{}`` when ``repo`` is not a DVC repository.

    The hashes of the paths themselves are the lineage's own ``inputs``/``outputs`` records, computed as DVC
    does; ``make run`` ends with ``dvc commit``, so ``dvc.lock`` and the DVC cache then hold the same hashes.
    """
    root = Path(repo).resolve()
    if not (root / ".dvc").is_dir():
        return {}
    outs = _dvc_yaml_outs(root)
    lock = dvc_lock_state(root).get("outs", {})
    held: dict[str, Any] = {}
    for name, path in paths.items():
        full = Path(path) if Path(path).is_absolute() else root / path
        try:
            rel = full.resolve().relative_to(root).as_posix()
        except ValueError:
            held[name] = None  # outside the repository (e.g. a package's pretrained weights)
            continue
        owner = next((out for out in sorted(outs, key=len, reverse=True) if rel == out or rel.startswith(out + "/")), None)
        held[name] = None if owner is None else {"stage": outs[owner]["stage"], "out": owner,
                                                   "cache": outs[owner]["cache"], "lock_md5": lock.get(owner)}
    return {"root": str(root), "remote": dvc_remote(root), "outs": held, "experiment": dvc_environment()}


# ------------------------------------------------------------------------------------------------
# checkpoints and model files
# ------------------------------------------------------------------------------------------------


def checkpoint_record(path: str | Path, state_dir: Any = True) -> dict[str, Any]:
    """DVC md5 of a checkpoint file, the sha256 of its weights, and what the checkpoint says about itself."""
    import torch

    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    record = {"path": str(path), **dvc_hash(path, state_dir), "weights_sha256": weights_sha256(ckpt["model"])}
    stage = (ckpt.get("stage_config") or {}).get("name")
    record.update({"stage": stage, "step": ckpt.get("step"), "inputs": ckpt.get("inputs"),
                   "numerics": ckpt.get("numerics")})  # what decided the stage's bits (vlalign.reproducibility)
    if ckpt.get("merge"):
        record["merge"] = {k: v for k, v in ckpt["merge"].items() if isinstance(v, (str, int, float, type(None)))}
        if isinstance(ckpt["merge"].get("sources"), (list, tuple)):
            record["merge"]["sources"] = [str(s) for s in ckpt["merge"]["sources"]]
    return record


#: Model-config fields that name files (pretrained weights, vocabularies): section -> keys.
MODEL_FILE_FIELDS = {"image": ("weights",), "text": ("pretrained", "vocab")}


def model_files(model_config: Mapping[str, Any]) -> dict[str, str]:
    """The local files a model config builds from (pretrained weights, vocabularies), resolved to paths.

    Keys are ``model.<section>.<field>``; ``pkg:`` paths are resolved to the installed package's file.
    """
    from vlalign.paths import resolve_path

    files = {}
    for section, keys in MODEL_FILE_FIELDS.items():
        for key in keys:
            spec = (model_config.get(section) or {}).get(key)
            if spec:
                files[f"model.{section}.{key}"] = str(resolve_path(spec))
    return files


# ------------------------------------------------------------------------------------------------
# the manifest
# ------------------------------------------------------------------------------------------------


def images_outside(image_paths: Iterable[str], folders: Sequence[str]) -> list[str]:
    """The distinct image paths that lie under none of ``folders`` (path-prefix test, symlinks resolved)."""
    roots = {os.path.join(os.path.abspath(f), "") for f in folders} | {os.path.join(os.path.realpath(f), "") for f in folders}

    def inside(path: str) -> bool:
        return any(os.path.abspath(path).startswith(r) for r in roots) or \
            any(os.path.realpath(path).startswith(r) for r in roots)

    return [p for p in dict.fromkeys(map(str, image_paths)) if not inside(p)]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def build_lineage(
    *,
    manifest: pd.DataFrame,
    inputs: Mapping[str, str | Path],
    outputs: Mapping[str, str | Path],
    registered_checkpoint: str | Path,
    params: Mapping[str, Any],
    metrics: Mapping[str, Any],
    validation_report: Mapping[str, Any] | None = None,
    model_config: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    repo: str | Path = ".",
    watched: Sequence[str] = WATCHED_FOLDERS,
    state_dir: Any = True,
    inputs_where: str = "registration.lineage.inputs",
    stage_specs: Mapping[str, Mapping[str, Any]] | None = None,
    evaluation_inputs: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], str]:
    """Everything needed to audit and reproduce a model, and the work tree's patch against its commit.

    Args:
        manifest: the clean manifest training read (fingerprinted by row content).
        inputs: name -> file or folder the run used (raw data, the clean manifest file, shards, ...);
            files named by ``model_config`` (pretrained weights, vocab) are added as ``model.*``.
        outputs: name -> checkpoint file (each stage's ``final.pt``, the merged model).
        registered_checkpoint: the checkpoint file stored with the model version.
        params: the resolved run parameters (seeds are collected from them).
        metrics: the evaluation metrics (``evaluation_data`` in them becomes ``lineage["evaluation_data"]``).
        validation_report: the validation report (row counts).
        model_config: the model's config dict (for its pretrained weight and vocabulary files).
        run_id: the MLflow run the model is logged from.
        repo: the project folder (git work tree, ``dvc.lock``).
        watched: folders of ``repo`` whose untracked files make the tree dirty.
        state_dir: hash cache folder (see :func:`vlalign.tracking.hashing.dvc_hash`).
        inputs_where: where ``inputs`` is configured, for error messages.
        stage_specs: stage name -> the TrainSpec dict it ran (``<stage folder>/spec.json``), in run order.
        evaluation_inputs: ``{"sha256", "verified"}`` of the evaluation-inputs artifact, when there is one.

    Returns:
        ``(lineage, patch)``: the plain dict documented in this module, and the patch text (empty when
        the tree is clean or not a git work tree).

    Raises:
        ConfigError: an input or output path does not exist.
    """
    git, patch = code_state(repo, watched)
    git["diff_sha256"] = hashlib.sha256(patch.encode()).hexdigest() if patch else None
    all_inputs = dict(inputs)
    all_inputs.update(model_files(model_config or {}))
    outputs_record = {}
    for name, path in outputs.items():
        if not Path(path).is_file():
            from vlalign.errors import ConfigError

            raise ConfigError(f"lineage output {name!r}: checkpoint {path} does not exist; run the stage that writes it.")
        outputs_record[name] = checkpoint_record(path, state_dir)
    registered = checkpoint_record(registered_checkpoint, state_dir=None)
    registered.pop("path")
    outputs_record["registered"] = registered
    report = validation_report or {}
    input_records = dvc_hashes(all_inputs, state_dir, where=inputs_where)
    outside = images_outside(manifest["image_path"], [r["path"] for r in input_records.values() if r["isdir"]])
    if outside:
        log.warning("%d training/evaluation images lie outside every input folder of %s (e.g. %s): the lineage does "
                    "not hash the raw images this run used; add their folder there.", len(outside), inputs_where, outside[0])
    lineage = {
        "format": LINEAGE_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "root": str(Path(repo).resolve()),
        "git": git,
        "inputs": input_records,
        "outputs": outputs_record,
        "training_data": {
            "manifest_sha256": frame_fingerprint(manifest),
            "rows": int(len(manifest)),
            "images": int(manifest["image_id"].nunique()),
            "splits": {str(k): int(v) for k, v in manifest["split"].value_counts().items()},
            "images_outside_inputs": len(outside),
        },
        "evaluation_data": _jsonable(metrics.get("evaluation_data")),
        "validation": {k: report.get(k) for k in ("n_rows", "n_clean", "rejected_fraction") if k in report},
        "params": _jsonable(params),
        "seeds": _jsonable(find_seeds(params)),
        "packages": package_versions(),
        "hardware": hardware(),
        "numerics": reproducibility.describe(),  # what decided evaluation's bits (each stage's: outputs.<stage>)
        "dvc_lock": dvc_lock_state(repo),
        "dvc": dvc_state({**{n: r["path"] for n, r in input_records.items()},
                          **{n: r["path"] for n, r in outputs_record.items() if "path" in r}}, repo),
        "stages": {name: _jsonable({k: v for k, v in spec.items() if k != "mlflow"})
                   for name, spec in (stage_specs or {}).items()},
        "evaluation_inputs": _jsonable(evaluation_inputs) if evaluation_inputs else None,
        "metrics": _jsonable({k: v for k, v in metrics.items() if k != "evaluation_data"}),
        "mlflow_run_id": run_id,
    }
    return lineage, patch


def lineage_tags(lineage: Mapping[str, Any]) -> dict[str, str]:
    """The short, searchable part of the lineage as model-version tags."""
    git = lineage["git"]
    registered = lineage["outputs"]["registered"]
    tags = {
        "lineage_format": lineage["format"],
        "git_commit": str(git.get("commit")),
        "git_dirty": str(git.get("dirty")),
        "checkpoint_md5": registered["md5"],
        "weights_sha256": registered["weights_sha256"],
        "training_manifest_sha256": lineage["training_data"]["manifest_sha256"],
        "mlflow_run_id": str(lineage.get("mlflow_run_id")),
    }
    for name, record in lineage["inputs"].items():
        if not name.startswith("model."):
            tags[f"input.{name}.md5"] = record["md5"]
    if lineage.get("dvc_lock"):
        tags["dvc_lock_sha256"] = lineage["dvc_lock"]["sha256"]
    experiment = (lineage.get("dvc") or {}).get("experiment") or {}
    if experiment.get("exp_name"):
        tags["dvc.exp_name"] = experiment["exp_name"]
    return tags
