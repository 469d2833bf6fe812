"""``vlalign audit``: check that a registered model version is what its lineage says.

An audit downloads a version's ``lineage.json`` (and the artifacts stored beside it) and checks, one line each:

``commit``
    the recorded git commit exists in this repository.
``code``
    the code here (the watched folders ``src/`` and ``conf/``, and git-ignored ``conf/`` files) is the recorded
    code: the commit plus the recorded patch (``git_diff.patch``, whose sha256 the lineage holds). The
    evaluation and the retraining below run this code, so a difference is named file by file.
``data:<input>``
    each recorded input (raw data, clean manifest, shards, pretrained files, initial weights) has the recorded
    DVC hash, in the work tree or, when the work tree changed, in DVC: the local cache, else fetched from the
    default remote into the cache, then checked out into a temporary folder (the work tree is never touched)
    and hashed again. A folder's changed files are named from the ``.dir`` listing stored with the version.
    Every cache object is hashed before it is used: a corrupt or missing one fails the check, naming the file,
    its recorded and actual md5 and what to do (``dvc fetch``/``dvc pull`` from a remote, or restore the data).
``weights``
    the registered checkpoint hashes to the recorded ``weights_sha256`` (lineage, version tag, merged output).
``evaluation_data``
    the recorded evaluation inputs (``evaluation_inputs.json``), located on the audited data, hash to the
    version's ``eval.data_sha256``: the audit scores exactly what evaluation scored.
``metrics``
    evaluating the registered weights on that data reproduces every registered metric within ``tolerance``
    (1e-6), with torch using the recorded number of CPU threads.
``retrain:<stage>`` / ``retrain:merged`` (``--retrain``)
    each stage's recorded TrainSpec, run again on CPU into a temporary folder from the audited inputs (a stage
    that started from another stage starts from its retrained weights), gives the recorded ``weights_sha256``
    bit for bit, and so does merging the retrained stages with the recorded beta. Each stage runs in its own
    process in its recorded reproducibility mode; a different hash FAILs where the recorded numerics say this
    machine computes as the recorded run did, and is SKIPped naming the differences where it cannot (another GPU,
    a native run with other kernels, or initial weights from such a stage).
``retrain:metrics-within-tolerance`` (only when a stage's bits could not be promised)
    the retrained counterpart of the registered model reproduces every registered metric within
    ``retrain_tolerance``.

A check that cannot run because an earlier one failed is skipped and says why; the audit passes when no check
fails. :func:`write_report` writes ``audit.md`` and ``audit.json``; :func:`log_report` stores them in the
version's run (``audit/<time>/``) and sets ``audit.*`` tags on the version.

The module also builds what registration records for the audit: :func:`build_evaluation_inputs` and
:func:`evaluate_inputs` (the evaluation blocks recomputed with the library's own functions).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from vlalign import reproducibility
from vlalign.errors import ConfigError, VLAlignError
from vlalign.tracking.hashing import dvc_hash, dvc_listing, evaluation_data_identity, listing_diff, weights_sha256

log = logging.getLogger(__name__)

AUDIT_FORMAT = "vlalign-audit-v1"
EVALUATION_INPUTS_FORMAT = "vlalign-evaluation-inputs-v1"
PASS, FAIL, SKIP = "pass", "fail", "skip"
#: Default largest absolute difference between a recorded and a recomputed metric.
DEFAULT_TOLERANCE = 1e-6
#: Artifacts stored with a registered model (pyfunc artifact names) that an audit reads.
ARTIFACTS = ("checkpoint", "lineage", "git_diff", "evaluation_inputs", "input_listings")
#: Model-version tag prefix of the audit summary.
AUDIT_TAG_PREFIX = "audit."
#: Files listed by name in a reason before "and N more".
MAX_NAMED = 5


class AuditError(VLAlignError, RuntimeError):
    """An audit cannot start (bad model URI, missing version or lineage), or it found a failing check."""


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------


@dataclass
class Check:
    """One line of the audit report."""

    name: str  # e.g. "commit", "data:raw_data", "retrain:stage2"
    status: str  # "pass" | "fail" | "skip"
    reason: str  # what was compared and what differs (or why it was skipped)
    details: dict[str, Any] = field(default_factory=dict)  # machine-readable extras (hashes, file lists, values)


@dataclass
class AuditReport:
    """Every check of one audit."""

    model_uri: str  # what was asked for, e.g. models:/name@champion
    name: str  # registered model name
    version: int  # the version the URI resolved to
    run_id: str | None  # the run the version was logged from
    repo: str  # the repository the audit ran in
    retrain: bool  # whether the retrain checks ran
    tolerance: float  # metric tolerance
    started: str  # UTC start time (ISO 8601)
    seconds: float = 0.0  # wall time
    checks: list[Check] = field(default_factory=list)  # in order

    @property
    def passed(self) -> bool:
        """True when no check failed (and at least one passed)."""
        return not self.failed and any(c.status == PASS for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        """The failing checks."""
        return [c for c in self.checks if c.status == FAIL]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (``audit.json``)."""
        return {"format": AUDIT_FORMAT, "model_uri": self.model_uri, "name": self.name, "version": self.version,
                "run_id": self.run_id, "repo": self.repo, "retrain": self.retrain, "tolerance": self.tolerance,
                "started": self.started, "seconds": round(self.seconds, 1), "passed": self.passed,
                "failed": [c.name for c in self.failed], "checks": [asdict(c) for c in self.checks]}

    def lines(self) -> list[str]:
        """The report as printed: a header, one line per check, the verdict."""
        width = max((len(c.name) for c in self.checks), default=8)
        out = [f"audit of {self.model_uri} ({self.name} v{self.version}, run {self.run_id}) in {self.repo}"]
        out += [f"  {c.status.upper():<4} {c.name:<{width}}  {c.reason}" for c in self.checks]
        verdict = "PASSED" if self.passed else f"FAILED ({len(self.failed)} check(s): {', '.join(c.name for c in self.failed)})"
        out.append(f"audit {verdict} in {self.seconds:.0f} s")
        return out

    def to_markdown(self) -> str:
        """``audit.md``: a table with one row per check."""
        head = [f"# Audit of `{self.model_uri}`", "",
                f"{self.name} version {self.version} (run `{self.run_id}`), audited in `{self.repo}` on {self.started} "
                f"({self.seconds:.0f} s); metric tolerance {self.tolerance:g}; retrain: {'yes' if self.retrain else 'no'}.",
                "", f"**{'PASSED' if self.passed else 'FAILED'}**", "", "| check | result | reason |", "|---|---|---|"]
        rows = [f"| `{c.name}` | {c.status.upper()} | {c.reason.replace('|', '/')} |" for c in self.checks]
        return "\n".join(head + rows) + "\n"


def write_report(report: AuditReport, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``audit.md`` and ``audit.json`` into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "audit.md", out / "audit.json"
    md.write_text(report.to_markdown(), encoding="utf-8")
    js.write_text(json.dumps(report.to_dict(), indent=2, default=str), encoding="utf-8")
    return md, js


def log_report(report: AuditReport, client: Any = None) -> str:
    """Store the report in the version's run (``audit/<UTC time>/audit.{md,json}``) and tag the version with the
    outcome (``audit.passed``, ``audit.time``, ``audit.failed``, ``audit.retrain``, ``audit.report``); returns
    the artifact folder."""
    client = _client(client)
    stamp = report.started.replace(":", "").replace("-", "").replace("+0000", "Z")
    folder = f"audit/{stamp}"
    if report.run_id:
        with tempfile.TemporaryDirectory(prefix="vlalign-audit-report-") as tmp:
            write_report(report, tmp)
            client.log_artifacts(report.run_id, tmp, folder)
    tags = {"passed": str(report.passed).lower(), "time": report.started, "retrain": str(report.retrain).lower(),
            "failed": ",".join(c.name for c in report.failed) or "none", "report": f"runs:/{report.run_id}/{folder}"}
    for key, value in tags.items():
        client.set_model_version_tag(report.name, str(report.version), AUDIT_TAG_PREFIX + key, value[:5000])
    return folder


# ------------------------------------------------------------------------------------------------
# What registration records for the audit: the evaluation inputs
# ------------------------------------------------------------------------------------------------


def build_evaluation_inputs(
    metrics: Mapping[str, Any],
    zero_shot_images: pd.DataFrame | None,
    zero_shot_classnames: Mapping[str, Sequence[str]] | None,
    zero_shot_templates: Mapping[str, Sequence[str]] | None,
    probe_pairs: Sequence[Sequence[str]],
    batch_size: int = 256,
    chunk_size: int = 1024,
) -> dict[str, Any]:
    """What the evaluation scored, as one JSON-serialisable dict (``evaluation_inputs.json``).

    The blocks come from ``metrics["evaluation_data"]["blocks"]``: retrieval blocks name their split and language
    (their rows are the clean manifest's, recorded as an input); the zero-shot block gets the evaluated images
    (path, allowed roots, label), class names and templates of its language; the compositional block gets the
    probe pairs. :func:`evaluation_inputs_identity` must give ``metrics["evaluation_data"]["sha256"]`` back.
    """
    blocks = (metrics.get("evaluation_data") or {}).get("blocks") or {}
    retrieval = {name: {"language": b["language"], "split": b["split"], "dataset": b["dataset"]}
                 for name, b in blocks.items() if name.startswith("retrieval") and "language" in b and "split" in b}
    splits = {b["split"] for b in retrieval.values()}
    inputs: dict[str, Any] = {"format": EVALUATION_INPUTS_FORMAT, "split": next(iter(splits)) if len(splits) == 1 else None,
                              "retrieval": retrieval, "zero_shot": None, "compositional": None,
                              "batch_size": int(batch_size), "chunk_size": int(chunk_size)}
    zero = blocks.get("zero_shot")
    if zero and zero_shot_images is not None and zero.get("language") in (zero_shot_classnames or {}):
        lang = zero["language"]
        images = zero_shot_images[["image_path", "image_root", "label"]]
        inputs["zero_shot"] = {"dataset": zero["dataset"], "language": lang,
                               "classnames": list(zero_shot_classnames[lang]),
                               "templates": list((zero_shot_templates or {}).get(lang, [])),
                               "images": [[str(p), str(r), int(label)] for p, r, label in images.itertuples(index=False)]}
    if "compositional" in blocks and probe_pairs:
        inputs["compositional"] = {"dataset": blocks["compositional"]["dataset"],
                                   "pairs": [[str(x) for x in pair] for pair in probe_pairs]}
    return inputs


def _zero_shot_frame(zero: Mapping[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(zero["images"], columns=["image_path", "image_root", "label"]).astype({"label": int})


def evaluation_inputs_identity(inputs: Mapping[str, Any], manifest: pd.DataFrame, state_dir: Any = True) -> dict[str, Any]:
    """The content identity (:func:`vlalign.tracking.hashing.evaluation_data_identity`) of recorded inputs."""
    zero = inputs.get("zero_shot")
    probe = inputs.get("compositional")
    return evaluation_data_identity(
        manifest, inputs.get("split") or "test",
        retrieval={name: (b["language"], b["dataset"]) for name, b in inputs["retrieval"].items()},
        zero_shot=None if zero is None else {"images": _zero_shot_frame(zero), "classnames": zero["classnames"],
                                             "templates": zero["templates"], "lang": zero["language"],
                                             "dataset": zero["dataset"]},
        probe_pairs=probe["pairs"] if probe else (), probe_dataset=probe["dataset"] if probe else "",
        state_dir=state_dir)


def evaluate_inputs(checkpoint: Mapping[str, Any], manifest: pd.DataFrame, inputs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Score a checkpoint on recorded evaluation inputs with the same library calls as the evaluation pipeline:
    ``{block: {"metrics": {...}, ...}}`` (retrieval per language, zero-shot, compositional probe)."""
    from vlalign.eval.probe import compositional_probe
    from vlalign.eval.run import evaluate_retrieval, evaluate_zero_shot
    from vlalign.train import model_from_checkpoint

    model = model_from_checkpoint(dict(checkpoint)).eval()
    batch, chunk = int(inputs.get("batch_size", 256)), int(inputs.get("chunk_size", 1024))
    blocks: dict[str, dict[str, Any]] = {}
    for name, block in inputs["retrieval"].items():
        blocks[name] = evaluate_retrieval(model, model.config, manifest, split=block["split"], lang=block["language"],
                                          batch_size=batch, chunk_size=chunk)
    zero = inputs.get("zero_shot")
    if zero is not None:
        blocks["zero_shot"] = evaluate_zero_shot(model, model.config, _zero_shot_frame(zero), zero["classnames"],
                                                 zero["templates"], lang=zero["language"], batch_size=batch)
    probe = inputs.get("compositional")
    if probe:
        blocks["compositional"] = compositional_probe(model, model.config, [tuple(p) for p in probe["pairs"]], batch)
    return blocks


def flat_block_metrics(blocks: Mapping[str, Any]) -> dict[str, float]:
    """``{"<block>.<metric>": value}`` of every block holding a ``metrics`` mapping."""
    flat = {}
    for block, body in blocks.items():
        if isinstance(body, Mapping) and isinstance(body.get("metrics"), Mapping):
            for metric, value in body["metrics"].items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    flat[f"{block}.{metric}"] = float(value)
    return flat


def sha256_json(value: Any) -> str:
    """sha256 of a value's canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# What changed since a version was trained (the retrain pipeline's plan)
# ------------------------------------------------------------------------------------------------


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of nested dicts/lists by dotted path (list items by their ``name`` when they have one); empty
    containers have no leaves."""
    if isinstance(tree, Mapping):
        items = tree.items()
    elif isinstance(tree, list):
        items = ((item.get("name", i) if isinstance(item, Mapping) else i, item) for i, item in enumerate(tree))
    else:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat  # an empty mapping or list has no leaves: the same as an absent key


def changed_params(recorded: Mapping[str, Any], current: Mapping[str, Any], groups: Sequence[str],
                   ignore: Sequence[str] = ()) -> list[str]:
    """``"training.stages.stage2.lr: 0.001 -> 0.0005"`` for every parameter of ``groups`` that differs (JSON
    values compared; keys under ``ignore`` skipped)."""
    old = _flatten(json.loads(json.dumps({g: recorded.get(g) for g in groups}, default=str)))
    new = _flatten(json.loads(json.dumps({g: current.get(g) for g in groups}, default=str)))
    skipped = tuple(ignore)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        if any(key == i or key.startswith(i + ".") for i in skipped) or old.get(key, "<unset>") == new.get(key, "<unset>"):
            continue
        changes.append(f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}")
    return changes


def changed_inputs(recorded: Mapping[str, Mapping[str, Any]], current: Mapping[str, str | Path],
                   state_dir: Any = True) -> tuple[list[str], dict[str, str]]:
    """Compare the DVC hashes of ``current`` paths (name -> path) with a lineage's ``inputs`` records.

    Returns ``(changes, hashes)``: ``"clean_manifest: md5 a -> b"`` per input that differs (or is missing on either
    side), and the current hash of each input that exists.
    """
    changes, hashes = [], {}
    for name, path in current.items():
        if not Path(path).exists():
            changes.append(f"{name}: {path} does not exist")
            continue
        hashes[name] = dvc_hash(path, state_dir)["md5"]
        before = (recorded.get(name) or {}).get("md5")
        if before is None:
            changes.append(f"{name}: not recorded for that version (now {hashes[name]})")
        elif before != hashes[name]:
            changes.append(f"{name}: md5 {before} -> {hashes[name]}")
    return changes, hashes


# ------------------------------------------------------------------------------------------------
# Paths: the recorded project root, located inputs
# ------------------------------------------------------------------------------------------------


@dataclass
class Relocation:
    """Maps recorded absolute paths to where the audit finds them (another checkout, a restored copy)."""

    prefixes: list[tuple[str, str]] = field(default_factory=list)  # (recorded prefix, local prefix), longest first

    def add(self, recorded: str | Path, local: str | Path) -> None:
        """Map ``recorded`` (a file or folder) to ``local``."""
        pair = (os.path.normpath(str(recorded)), os.path.normpath(str(local)))
        if pair[0] != pair[1] and pair not in self.prefixes:
            self.prefixes.append(pair)
            self.prefixes.sort(key=lambda p: len(p[0]), reverse=True)

    def path(self, value: str) -> str:
        """``value`` with its longest recorded prefix replaced (unchanged when none applies)."""
        text = str(value)
        for old, new in self.prefixes:
            if text == old or text.startswith(old + os.sep):
                return new + text[len(old):]
        return text

    def roots(self, value: str) -> str:
        """An ``image_root`` value (roots joined with ``os.pathsep``) with each root mapped."""
        return os.pathsep.join(self.path(part) for part in str(value).split(os.pathsep)) if value else value

    def frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        """A manifest or image table with ``image_path`` and ``image_root`` mapped."""
        if not self.prefixes:
            return frame
        out = frame.copy()
        if "image_path" in out:
            out["image_path"] = [self.path(p) if isinstance(p, str) else p for p in out["image_path"]]
        if "image_root" in out:
            out["image_root"] = [self.roots(r) if isinstance(r, str) else r for r in out["image_root"]]
        return out

    def inputs(self, inputs: Mapping[str, Any], roots: bool = True) -> dict[str, Any]:
        """Evaluation inputs with every image path (and, with ``roots``, every allowed root) mapped.

        The content identity of probe pairs includes their root strings as recorded, so it is computed on inputs
        mapped with ``roots=False``; evaluating needs the roots mapped too (images are opened inside them)."""
        root = self.roots if roots else (lambda value: value)
        out = json.loads(json.dumps(inputs))
        if out.get("zero_shot"):
            out["zero_shot"]["images"] = [[self.path(p), root(r), label] for p, r, label in out["zero_shot"]["images"]]
        if out.get("compositional"):
            out["compositional"]["pairs"] = [[self.path(p[0]), *p[1:4], root(p[4])] if len(p) > 4 else
                                             [self.path(p[0]), *p[1:]] for p in out["compositional"]["pairs"]]
        return out


def recorded_path(path: str, root: str | None) -> str:
    """A lineage path as an absolute recorded path (relative ones are relative to the recorded project root)."""
    return os.path.normpath(path if os.path.isabs(path) or not root else os.path.join(root, path))


# ------------------------------------------------------------------------------------------------
# DVC: the cache, the default remote, checkouts into a temporary folder
# ------------------------------------------------------------------------------------------------


#: ``ObjectProblem.relpath`` of a folder's own ``.dir`` listing object.
LISTING = "(folder listing)"


@dataclass
class ObjectProblem:
    """One DVC object that a recorded hash needs and that the cache cannot give intact."""

    relpath: str  # the file inside the recorded folder ("" for a recorded file, LISTING for the .dir object)
    md5: str  # the object's recorded md5 (its name in the cache)
    actual: str | None  # what the cached bytes hash to; None when the object is missing
    object_path: str  # where the cache keeps it

    @property
    def missing(self) -> bool:
        return self.actual is None


def _md5_file(path: str) -> str | None:
    """md5 of a file's bytes (what DVC names an object by), or None when it does not exist."""
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "md5").hexdigest()
    except FileNotFoundError:
        return None


class DvcStore:
    """A DVC repository's objects: is a hash in the cache, fetch it from the default remote, check it out elsewhere.

    Only the cache (``.dvc/cache``) is written to; the work tree never is. An object is used only after its bytes
    were hashed again (:meth:`verify`): DVC itself trusts a read-only cache file unread.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self._repo: Any = None

    @staticmethod
    def find(start: str | Path) -> DvcStore | None:
        """The DVC repository at or above ``start``, or None."""
        for folder in (Path(start).resolve(), *Path(start).resolve().parents):
            if (folder / ".dvc").is_dir():
                return DvcStore(folder)
        return None

    @property
    def repo(self) -> Any:
        if self._repo is None:
            from dvc.repo import Repo

            self._repo = Repo(str(self.root))
        return self._repo

    def close(self) -> None:
        if self._repo is not None:
            self._repo.close()
            self._repo = None

    def remote(self) -> tuple[str | None, str | None]:
        """``(name, url)`` of the default remote (``(None, None)`` when there is none)."""
        name = self.repo.config["core"].get("remote")
        return (name, (self.repo.config["remote"].get(name) or {}).get("url")) if name else (None, None)

    def describe(self) -> str:
        """``cache <path>, remote <name> (<url>)``."""
        try:
            remote, url = self.remote()
            where = f"remote {remote!r} ({url})" if remote else "no default remote"
            return f"cache {self.repo.cache.local.path}, {where}"
        except Exception as exc:  # noqa: BLE001 - only for the message
            return f"unreadable DVC configuration ({exc})"

    def has(self, md5: str) -> bool:
        """True when the cache holds every object of ``md5`` (for a folder: its listing and every file). Only their
        presence is looked at; :meth:`verify` reads them."""
        from dvc_data.hashfile.hash_info import HashInfo
        from dvc_data.hashfile.tree import Tree

        cache = self.repo.cache.local
        if not cache.exists(md5):
            return False
        if not md5.endswith(".dir"):
            return True
        try:
            tree = Tree.load(cache, HashInfo("md5", md5))
        except Exception:  # noqa: BLE001 - an unreadable .dir object is not a usable copy
            return False
        return all(cache.exists(oid.value) for _, _, oid in tree)

    def _problem(self, md5: str, relpath: str) -> ObjectProblem | None:
        """The cached object ``md5`` hashed again: None when its bytes hash to its name."""
        path = self.repo.cache.local.oid_to_path(md5)
        actual = _md5_file(path)
        if actual is not None and actual == md5.removesuffix(".dir"):
            return None
        return ObjectProblem(relpath, md5, actual, path)

    def _tree(self, md5: str) -> Any:
        from dvc_data.hashfile.hash_info import HashInfo
        from dvc_data.hashfile.tree import Tree

        return Tree.load(self.repo.cache.local, HashInfo("md5", md5))

    def verify(self, md5: str) -> list[ObjectProblem]:
        """Hash every cached object that ``md5`` needs (a file, or a folder's listing and each of its files) and
        return those that are missing or whose bytes do not hash to their name; empty when all are intact."""
        top = self._problem(md5, LISTING if md5.endswith(".dir") else "")
        if top is not None or not md5.endswith(".dir"):
            return [top] if top is not None else []
        try:
            tree = self._tree(md5)
        except Exception as exc:  # noqa: BLE001 - intact bytes that are no listing: report, do not use
            return [ObjectProblem(LISTING, md5, f"{md5} but is no DVC listing ({exc})",
                                  self.repo.cache.local.oid_to_path(md5))]
        hashed: dict[str, ObjectProblem | None] = {}  # oid -> its problem (files with equal bytes share one object)
        problems = []
        for key, _, oid in tree:
            if oid.value not in hashed:
                hashed[oid.value] = self._problem(oid.value, "/".join(key))
            if hashed[oid.value] is not None:
                problems.append(replace(hashed[oid.value], relpath="/".join(key)))
        return problems

    def obtain(self, md5: str) -> tuple[str | None, str, list[ObjectProblem]]:
        """Make ``md5`` (a file hash or ``<md5>.dir``) complete and intact in the cache.

        Returns ``(source, note, problems)``: ``source`` is ``"cache"`` or ``"remote"`` (fetched from the default
        remote) when every object is there and hashes to its name, else None with ``note`` saying why and
        ``problems`` naming the objects. A corrupt object already in the cache is never used nor replaced; one
        fetched from the remote that turns out corrupt is removed from the cache again.
        """
        from dvc_data.hashfile.hash_info import HashInfo

        problems = self.verify(md5)
        if not problems:
            return "cache", "", []
        if any(not p.missing for p in problems):
            return None, "the DVC cache holds corrupt objects, which are not used", problems
        try:
            self.repo.cloud.pull([HashInfo("md5", md5)])
            if md5.endswith(".dir") and _md5_file(self.repo.cache.local.oid_to_path(md5)) == md5.removesuffix(".dir"):
                self.repo.cloud.pull({oid for _, _, oid in self._tree(md5)})
        except Exception as exc:  # noqa: BLE001 - no remote, unreachable remote: say so
            why = " ".join(str(exc).split())
            return None, f"fetching from the remote failed ({type(exc).__name__}: {why})", problems
        problems = self.verify(md5)
        if not problems:
            return "remote", "", []
        corrupt = [p for p in problems if not p.missing]
        for problem in corrupt:  # fetched just now: do not leave corrupt objects that DVC would trust later
            Path(problem.object_path).unlink(missing_ok=True)
        if corrupt:
            note = "the remote's copy is corrupt (the fetched objects were removed from the cache again)"
            return None, note, problems
        return None, "neither the cache nor the remote has it", problems

    def checkout(self, md5: str, dest: str | Path) -> Path:
        """Copy the cached object ``md5`` to ``dest`` (a new file or folder); call :meth:`obtain` first."""
        from dvc_data.hashfile.checkout import checkout
        from dvc_objects.fs.local import LocalFileSystem

        cache = self.repo.cache.local
        obj = self._tree(md5) if md5.endswith(".dir") else cache.get(md5)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        checkout(str(dest), LocalFileSystem(), obj, cache)
        return dest

    def listing(self, md5: str) -> list[dict[str, str]] | None:
        """The cached ``.dir`` listing of ``md5`` when its bytes hash to its name, else None."""
        if self._problem(md5, LISTING) is not None:
            return None
        try:
            return [{"md5": e["md5"], "relpath": e["relpath"]} for e in self._tree(md5).as_list()]
        except Exception:  # noqa: BLE001
            return None


# ------------------------------------------------------------------------------------------------
# Checks: code
# ------------------------------------------------------------------------------------------------


def _git(repo: str | Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=120)


def check_commit(lineage: Mapping[str, Any], repo: str | Path) -> Check:
    """The recorded commit exists in ``repo``."""
    git = lineage.get("git") or {}
    commit = git.get("commit")
    if not commit:
        return Check("commit", FAIL, "the lineage records no git commit (the model was registered outside a git "
                     "work tree): its code cannot be identified.")
    try:
        found = _git(repo, "cat-file", "-e", f"{commit}^{{commit}}")
    except (OSError, subprocess.SubprocessError) as exc:
        return Check("commit", FAIL, f"git is not usable in {repo} ({exc}).", {"commit": commit})
    if found.returncode != 0:
        return Check("commit", FAIL, f"commit {commit[:12]} (branch {git.get('branch')}) is not in the repository at "
                     f"{Path(repo).resolve()}: fetch it (git fetch --all) or audit in a clone that has it.",
                     {"commit": commit})
    state = "dirty" if git.get("dirty") else "clean"
    return Check("commit", PASS, f"commit {commit[:12]} exists (branch {git.get('branch')}; the work tree was {state} "
                 "at registration).", {"commit": commit, "dirty": git.get("dirty")})


_DIFF_HEADER = re.compile(r"^diff --git a/(?P<a>.+?) b/(?P<b>.+)$")
_BIG_FILE = re.compile(r"^# untracked file too large for the patch: (?P<path>.+?) md5=")


def split_patch(patch: str) -> dict[str, str]:
    """A patch's text per file (the ``b/`` path of each ``diff --git`` header, or a large-file comment line)."""
    chunks: dict[str, list[str]] = {}
    current: str | None = None
    for line in patch.splitlines(keepends=True):
        header, big = _DIFF_HEADER.match(line.rstrip("\n")), _BIG_FILE.match(line)
        if header or big:
            current = header.group("b") if header else big.group("path")
            chunks.setdefault(current, [])
        if current is not None:
            chunks[current].append(line)
    return {path: "".join(lines) for path, lines in chunks.items()}


def _line_counts(chunk: str) -> str:
    lines = chunk.splitlines()
    added = sum(1 for l in lines if l.startswith("+") and not l.startswith("+++"))
    removed = sum(1 for l in lines if l.startswith("-") and not l.startswith("---"))
    return f"+{added} -{removed}"


def _watched(path: str, watched: Sequence[str]) -> bool:
    return any(path == w or path.startswith(w.rstrip("/") + "/") for w in watched)


def _named(items: Sequence[str], limit: int = MAX_NAMED) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_code(lineage: Mapping[str, Any], recorded_patch: str | None, repo: str | Path) -> Check:
    """The code in ``repo`` (watched folders, git-ignored ``conf/`` files) equals the recorded commit + patch."""
    from vlalign.tracking.lineage import WATCHED_FOLDERS, git_patch, ignored_config

    git = lineage.get("git") or {}
    commit = git.get("commit")
    if not commit:
        return Check("code", SKIP, "no recorded commit to compare with (see commit).")
    if _git(repo, "cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        return Check("code", SKIP, f"commit {commit[:12]} is missing here, so the code cannot be compared (see commit).")
    problems: list[str] = []
    recorded = recorded_patch or ""
    if git.get("diff_sha256"):
        if recorded_patch is None:
            problems.append("the version has no git_diff.patch although the lineage records a dirty tree")
        elif hashlib.sha256(recorded.encode()).hexdigest() != git["diff_sha256"]:
            problems.append(f"the stored git_diff.patch hashes to {hashlib.sha256(recorded.encode()).hexdigest()[:12]}, "
                            f"the lineage records {git['diff_sha256'][:12]}: the patch was altered after registration")
    watched = list(git.get("watched") or WATCHED_FOLDERS)
    present = [w for w in watched if (Path(repo) / w).exists()]
    untracked = [line for line in _git(repo, "ls-files", "--others", "--exclude-standard", "--", *present).stdout.splitlines()
                 if line.strip()] if present else []
    now = {p: c for p, c in split_patch(git_patch(repo, untracked, base=commit)).items() if _watched(p, watched)}
    then = {p: c for p, c in split_patch(recorded).items() if _watched(p, watched)}
    differ = []
    for path in sorted(now.keys() | then.keys()):
        if now.get(path) == then.get(path):
            continue
        if path not in then:
            differ.append(f"{path} ({_line_counts(now[path])} lines against the commit, unchanged at registration)")
        elif path not in now:
            differ.append(f"{path} (changed at registration, {_line_counts(then[path])}; now as in the commit)")
        else:
            differ.append(f"{path} (now {_line_counts(now[path])}, at registration {_line_counts(then[path])} against the commit)")
    if differ:
        problems.append(f"{len(differ)} file(s) under {', '.join(watched)} differ from the recorded code: {_named(differ)}")
    recorded_ignored = {e["path"]: e["md5"] for e in git.get("ignored_config") or []}
    current_ignored = {e["path"]: e["md5"] for e in ignored_config(repo)}
    ignored_diff = sorted(p for p in recorded_ignored.keys() | current_ignored.keys()
                          if recorded_ignored.get(p) != current_ignored.get(p))
    if ignored_diff:
        problems.append(f"git-ignored configuration differs: {_named(ignored_diff)}")
    details = {"commit": commit, "differing_files": differ, "ignored_config": ignored_diff}
    if problems:
        return Check("code", FAIL, "; ".join(problems) + f". The checks below ran with this code; restore the "
                     f"recorded code with `git checkout {commit[:12]}` (+ `git apply git_diff.patch`).", details)
    extra = f" + the recorded patch ({len(then)} file(s))" if then else ""
    return Check("code", PASS, f"{', '.join(watched)} equal commit {commit[:12]}{extra}.", details)


# ------------------------------------------------------------------------------------------------
# Checks: data
# ------------------------------------------------------------------------------------------------


@dataclass
class Located:
    """Where the audit found one recorded input."""

    name: str  # the input's name in the lineage
    recorded: str  # its recorded absolute path
    local: Path | None  # where its recorded content is now (None: not found)
    source: str  # "work tree" | "cache" | "remote" | "" (not found)


def _describe_record(record: Mapping[str, Any]) -> str:
    files = f", {record['nfiles']} files" if record.get("isdir") and record.get("nfiles") is not None else ""
    return f"{record['md5']}{files}"


def _listing_reason(recorded: Sequence[Mapping[str, str]] | None, current: Sequence[Mapping[str, str]] | None) -> str:
    if recorded is None or current is None:
        return ""
    diff = listing_diff(recorded, current)
    parts = [f"{kind} {len(items)}: {_named(items)}" for kind, items in diff.items() if items]
    return "; ".join(parts)


def _dvc_problems_reason(record: Mapping[str, Any], outs: Mapping[str, Any] | None, note: str,
                         problems: Sequence[ObjectProblem], work_md5: Mapping[str, str], dvc: DvcStore) -> str:
    """Why DVC has no intact copy of a recorded input, object by object, and what to do about it."""
    path = record["path"]

    def one(p: ObjectProblem) -> str:
        shown = f"{path} {LISTING}" if p.relpath == LISTING else f"{path}/{p.relpath}" if p.relpath else path
        if p.relpath == LISTING:
            work = ""
        elif p.relpath in work_md5:
            work = f"; the work tree's copy hashes to {work_md5[p.relpath]}"
        else:
            work = "; the work tree has no such file"
        state = "missing" if p.missing else f"the cached copy {p.object_path} hashes to {p.actual}"
        return f"{shown} (recorded md5 {p.md5}, {state}{work})"

    target = (outs or {}).get("out") or path
    try:
        remote, url = dvc.remote()
    except Exception:  # noqa: BLE001 - only for the message
        remote, url = None, None
    from_remote = (f"the remote {remote!r} ({url})" if remote else
                   "a remote that has it (none is configured here: `dvc remote add -d <name> <url>`)")
    restore = f"or restore {path} to the recorded content, then audit again"
    corrupt = [p.object_path for p in problems if not p.missing]
    if corrupt and note.startswith("the DVC cache"):
        todo = (f"Delete the corrupt cache file(s) (`rm -f {' '.join(corrupt[:MAX_NAMED])}`"
                f"{' ...' if len(corrupt) > MAX_NAMED else ''}), then fetch the recorded data from {from_remote} "
                f"with `dvc fetch {target}` (or `dvc pull {target}`, which also checks it out into the work tree), "
                f"{restore}.")
    elif corrupt:
        todo = (f"Replace the corrupt object(s) on {from_remote} with intact ones (`dvc push {target}` from a machine "
                f"that has the recorded data; it skips objects the remote already has, so delete the corrupt ones "
                f"there first), {restore}.")
    else:
        todo = (f"Push the recorded data from a machine that has it (`dvc push {target}`), then fetch it here from "
                f"{from_remote} with `dvc fetch {target}` (or `dvc pull {target}`), {restore}.")
    named = _named([one(p) for p in problems], 3)
    return f"{note}: {named}. {todo}"


def check_input(
    name: str,
    record: Mapping[str, Any],
    lineage: Mapping[str, Any],
    repo: Path,
    listings: Mapping[str, Any],
    dvc: DvcStore | None,
    scratch: Path,
) -> tuple[Check, Located]:
    """One recorded input: the work tree, else DVC (cache, then the remote) checked out under ``scratch``."""
    root = lineage.get("root")
    recorded = recorded_path(record["path"], root)
    local = Path(record["path"]) if os.path.isabs(record["path"]) else repo / record["path"]
    outs = ((lineage.get("dvc") or {}).get("outs") or {}).get(name)
    dvc_note = f"DVC stage {outs['stage']!r} output {outs['out']}" if outs else "not a DVC output"
    details: dict[str, Any] = {"path": record["path"], "recorded_md5": record["md5"], "dvc": outs}
    current = None
    if local.exists():
        current = dvc_hash(local)
        details["work_tree_md5"] = current["md5"]
        if current["md5"] == record["md5"]:
            held = ""
            if dvc is not None and outs:
                held = "; DVC has it in the cache" if dvc.has(record["md5"]) else "; not in the local DVC cache"
            return (Check(f"data:{name}", PASS, f"{record['path']}: the work tree has the recorded {_describe_record(record)} "
                          f"({dvc_note}{held}).", details), Located(name, recorded, local, "work tree"))
    what_differs = "does not exist" if current is None else f"has {_describe_record(current)}"
    work_md5 = {"": current["md5"]} if current is not None and not current.get("isdir") else {}  # relpath -> md5
    if current is not None and record.get("isdir"):
        recorded_listing = listings.get(name) or (dvc.listing(record["md5"]) if dvc else None)
        current_listing = dvc_listing(local)
        work_md5 = {e["relpath"]: e["md5"] for e in current_listing or []}
        changed = _listing_reason(recorded_listing, current_listing)
        if changed:
            what_differs += f" ({changed})"
            details["work_tree_changes"] = listing_diff(recorded_listing, current_listing)
    if dvc is None:
        return (Check(f"data:{name}", FAIL, f"{record['path']}: recorded {_describe_record(record)}; the work tree "
                      f"{what_differs}, and this is no DVC repository, so no other copy exists.", details),
                Located(name, recorded, None, ""))
    where, note, problems = dvc.obtain(record["md5"])
    if where is None:
        details.update({"dvc_note": note, "dvc_objects": [asdict(p) for p in problems]})
        return (Check(f"data:{name}", FAIL, f"{record['path']}: recorded {_describe_record(record)}; the work tree "
                      f"{what_differs}, and DVC has no intact copy: "
                      f"{_dvc_problems_reason(record, outs, note, problems, work_md5, dvc)}", details),
                Located(name, recorded, None, ""))
    try:
        copy = dvc.checkout(record["md5"], scratch / "data" / name / Path(record["path"]).name)
    except Exception as exc:  # noqa: BLE001 - e.g. dvc_data's CheckoutError: report it as this input's failure
        return (Check(f"data:{name}", FAIL, f"{record['path']}: recorded {_describe_record(record)}; the work tree "
                      f"{what_differs}, and checking out the DVC {where} copy failed ({type(exc).__name__}: "
                      f"{' '.join(str(exc).split())}); {dvc.describe()}.", details), Located(name, recorded, None, ""))
    again = dvc_hash(copy, state_dir=None)
    details.update({"dvc_source": where, "restored_to": str(copy), "restored_md5": again["md5"]})
    if again["md5"] != record["md5"]:
        corrupt = _listing_reason(dvc.listing(record["md5"]), dvc_listing(copy, state_dir=None))
        return (Check(f"data:{name}", FAIL, f"{record['path']}: the DVC copy ({where}) of {record['md5']} is corrupt: "
                      f"its content hashes to {again['md5']}{' (' + corrupt + ')' if corrupt else ''}; the work tree "
                      f"{what_differs}.", details), Located(name, recorded, None, ""))
    source = "DVC cache" if where == "cache" else f"DVC remote ({dvc.describe().split(', ', 1)[-1]})"
    return (Check(f"data:{name}", PASS, f"{record['path']}: the work tree {what_differs}; the recorded "
                  f"{_describe_record(record)} came from the {source} and was checked out to {copy} (the checks below "
                  "use that copy).", details), Located(name, recorded, copy, where))


# ------------------------------------------------------------------------------------------------
# Checks: weights, evaluation data, metrics
# ------------------------------------------------------------------------------------------------


def check_weights(lineage: Mapping[str, Any], checkpoint_file: Path | None, tags: Mapping[str, str]) -> tuple[Check, dict | None]:
    """The registered checkpoint holds the recorded weights; returns the check and the loaded checkpoint."""
    from vlalign.train import load_checkpoint

    outputs = lineage.get("outputs") or {}
    registered = outputs.get("registered") or {}
    if checkpoint_file is None or not checkpoint_file.is_file():
        return Check("weights", FAIL, "the version has no checkpoint artifact to check."), None
    checkpoint = load_checkpoint(checkpoint_file)
    actual = weights_sha256(checkpoint["model"])
    md5 = dvc_hash(checkpoint_file, state_dir=None)["md5"]
    claims = {"lineage outputs.registered": registered.get("weights_sha256"), "version tag weights_sha256": tags.get("weights_sha256")}
    if "merged" in outputs:
        claims["lineage outputs.merged"] = outputs["merged"].get("weights_sha256")
    wrong = {k: v for k, v in claims.items() if v != actual}
    details = {"weights_sha256": actual, "md5": md5, "recorded": claims, "recorded_md5": registered.get("md5")}
    if wrong:
        recorded = ", ".join(f"{k} = {str(v)[:12]}" for k, v in wrong.items())
        md5_note = "" if md5 == registered.get("md5") else f"; the file's md5 is {md5}, registration stored {registered.get('md5')}"
        return Check("weights", FAIL, f"the registered checkpoint's weights hash to {actual[:12]}, but {recorded}: the "
                     f"weights are not the ones registered{md5_note}.", details), checkpoint
    return Check("weights", PASS, f"the registered checkpoint's weights_sha256 {actual[:12]} equals the lineage's "
                 f"(registered and merged output) and the version tag.", details), checkpoint


def check_evaluation_data(inputs: Mapping[str, Any] | None, lineage: Mapping[str, Any], manifest: pd.DataFrame | None,
                          tags: Mapping[str, str]) -> Check:
    """The recorded evaluation inputs, on the audited data, have the version's evaluation-data hash."""
    expected = tags.get("eval.data_sha256") or (lineage.get("evaluation_data") or {}).get("sha256")
    if inputs is None:
        return Check("evaluation_data", FAIL, "the version has no evaluation_inputs.json (registered before lineage v3?): "
                     "what was evaluated cannot be scored again.")
    if manifest is None:
        return Check("evaluation_data", SKIP, "the recorded clean manifest is not available (see data:clean_manifest).")
    try:
        identity = evaluation_inputs_identity(inputs, manifest, state_dir=None)
    except (OSError, KeyError, VLAlignError) as exc:
        return Check("evaluation_data", FAIL, f"the recorded evaluation inputs cannot be read on the audited data: "
                     f"{type(exc).__name__}: {exc}")
    details = {"expected": expected, "actual": identity["sha256"]}
    if identity["sha256"] != expected:
        recorded_blocks = (lineage.get("evaluation_data") or {}).get("blocks") or {}
        differ = [f"{name} (recorded {str((recorded_blocks.get(name) or {}).get('sha256'))[:12]}, now {b['sha256'][:12]}"
                  f"{', ' + str(b.get('n_images')) + ' images' if b.get('n_images') is not None else ''})"
                  for name, b in identity["blocks"].items() if (recorded_blocks.get(name) or {}).get("sha256") != b["sha256"]]
        return Check("evaluation_data", FAIL, f"the evaluation data hashes to {identity['sha256'][:12]}, the version records "
                     f"{str(expected)[:12]}; blocks that differ: {_named(differ) or 'none named (the block list differs)'}.",
                     details)
    return Check("evaluation_data", PASS, f"{identity['datasets']}: the audited data hashes to the version's "
                 f"eval.data_sha256 {identity['sha256'][:12]}.", details)


def check_metrics(recorded: Mapping[str, float], actual: Mapping[str, float], tolerance: float) -> Check:
    """Every recorded metric is reproduced within ``tolerance``."""
    missing = sorted(set(recorded) - set(actual))
    diffs = {k: abs(actual[k] - v) for k, v in recorded.items() if k in actual}
    bad = sorted((k for k, d in diffs.items() if not d <= tolerance), key=lambda k: -diffs[k])
    worst = max(diffs.values(), default=0.0)
    details = {"n_metrics": len(recorded), "max_abs_diff": worst, "missing": missing,
               "differing": {k: {"recorded": recorded[k], "now": actual[k]} for k in bad}}
    if missing or bad:
        parts = []
        if bad:
            parts.append(f"{len(bad)} of {len(recorded)} metrics differ by more than {tolerance:g}: " + _named(
                [f"{k} recorded {recorded[k]:.6g}, now {actual[k]:.6g}" for k in bad], 4))
        if missing:
            parts.append(f"not recomputed: {_named(missing)} (blocks the audit cannot evaluate)")
        return Check("metrics", FAIL, "; ".join(parts) + ".", details)
    return Check("metrics", PASS, f"all {len(recorded)} registered metrics reproduced (largest |difference| "
                 f"{worst:.1e}, tolerance {tolerance:g}).", details)


# ------------------------------------------------------------------------------------------------
# Checks: retraining
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` torch CPU threads (the recorded number: CPU results depend on it), then restore."""
    import torch

    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(int(count))
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: Default largest absolute difference per metric between the registered model and its retrained equivalent, used
#: only where this machine cannot promise the recorded bits (another GPU, or a native run on another ISA).
DEFAULT_RETRAIN_TOLERANCE = 0.05


@dataclass
class Retrained:
    """What :func:`check_retrain` produced: its checks, the retrained counterpart of the registered weights, and
    the stages whose bits this machine could not promise (with the differences that say why)."""

    checks: list[Check]
    registered: dict[str, Any] | None = None  # the retrained checkpoint that corresponds to the registered one
    unpromised: dict[str, list[str]] = field(default_factory=dict)  # stage -> numerics differences


def _retrain_stage_spec(body: Mapping[str, Any], numerics: Mapping[str, Any] | None, lineage: Mapping[str, Any]) -> dict:
    """The recorded stage config as the retraining runs it: on CPU, here, in the recorded reproducibility mode and
    thread count (a stage recorded before the mode existed ran natively, with the recorded thread count)."""
    stage = dict(body.get("stage") or {}, device="cpu", compute="local")
    stage.setdefault("reproducibility", "native")
    if stage["reproducibility"] == "native" and not stage.get("cpu_threads"):
        threads = (numerics or {}).get("threads") or (lineage.get("hardware") or {}).get("torch_threads")
        stage["cpu_threads"] = int(threads) if threads else None
    return stage


def check_retrain(lineage: Mapping[str, Any], located: Mapping[str, Located], repo: Path, scratch: Path) -> Retrained:
    """Run every recorded stage spec again on CPU (each in its own process, in the recorded reproducibility mode),
    merge with the recorded beta, and compare ``weights_sha256`` bit for bit.

    Where this machine cannot promise the recorded bits (the stage ran on a GPU, or natively with other kernels)
    and they differ, the stage's check is skipped naming the differences; :func:`check_retrained_metrics` then
    compares metrics within a tolerance as a separate check."""
    from vlalign.merge.sweep import merged_checkpoint
    from vlalign.train import load_checkpoint
    from vlalign.train.run import run_stage_in_subprocess
    from vlalign.train.spec import TrainSpec

    stages = lineage.get("stages") or {}
    outputs = lineage.get("outputs") or {}
    root = lineage.get("root")
    result = Retrained([])
    checks = result.checks
    if not stages:
        checks.append(Check("retrain", FAIL, "the lineage records no stage specs (registered before lineage v3): "
                            "nothing to run again."))
        return result
    by_path = {loc.recorded: loc for loc in located.values()}
    stage_files = {recorded_path(outputs[s]["path"], root): s for s in stages if (outputs.get(s) or {}).get("path")}
    retrained: dict[str, Path] = {}
    for name, body in stages.items():
        recorded_numerics = (outputs.get(name) or {}).get("numerics")
        stage = _retrain_stage_spec(body, recorded_numerics, lineage)
        spec = TrainSpec.from_dict({**body, "stage": stage, "mlflow": None}, where=f"lineage stages.{name}")
        data_loc = by_path.get(recorded_path(spec.data, root))
        if data_loc is None or data_loc.local is None:
            why = "is not a recorded input" if data_loc is None else f"is not available (see data:{data_loc.name})"
            checks.append(Check(f"retrain:{name}", FAIL if data_loc is None else SKIP, f"its training data {spec.data} {why}."))
            continue
        init, init_stage = None, None
        if spec.init:
            init_path = recorded_path(spec.init, root)
            if init_path in stage_files:
                init_stage = stage_files[init_path]
                init = retrained.get(init_stage)
                missing = None if init else f"stage {stage_files[init_path]} was not retrained"
            else:
                loc = by_path.get(init_path)
                init = loc.local if loc else None
                missing = None if init else (f"its initial weights {spec.init} are not a recorded input" if loc is None
                                             else f"its initial weights are not available (see data:{loc.name})")
            if init is None:
                checks.append(Check(f"retrain:{name}", SKIP, f"{missing}."))
                continue
        spec = TrainSpec(model=spec.model, stage=spec.stage, data=str(data_loc.local), out_dir=str(scratch / "retrain" / name),
                         init=str(init) if init else None, image_roots=list(spec.image_roots), mlflow=None)
        try:
            final = run_stage_in_subprocess(spec)
        except Exception as exc:  # noqa: BLE001 - report, do not abort the other checks
            checks.append(Check(f"retrain:{name}", FAIL, f"training failed: {type(exc).__name__}: {exc}"))
            continue
        retrained[name] = final
        ckpt = load_checkpoint(final)
        actual = weights_sha256(ckpt["model"])
        expected = (outputs.get(name) or {}).get("weights_sha256")
        promised, diffs = reproducibility.can_reproduce_bits(recorded_numerics, ckpt.get("numerics") or {})
        if init_stage in result.unpromised:  # it started from weights whose bits could not be promised either
            promised, diffs = False, [f"initial weights: the retrained {init_stage}, whose bits could not be promised",
                                      *diffs]
        details = {"expected": expected, "actual": actual, "steps": ckpt.get("step"), "mode": stage["reproducibility"],
                   "numerics_differences": diffs}
        if actual == expected:
            checks.append(Check(f"retrain:{name}", PASS, f"retrained on CPU ({details['steps']} steps, "
                                f"{stage['reproducibility']}): weights_sha256 {actual[:12]} equals the recorded one, "
                                "bit for bit.", details))
        elif promised:
            checks.append(Check(f"retrain:{name}", FAIL, f"retrained weights hash to {actual[:12]}, the lineage records "
                                f"{str(expected)[:12]}, although this machine computes as the recorded run did "
                                f"({stage['reproducibility']}): the training is not the recorded one.", details))
        else:
            result.unpromised[name] = diffs
            checks.append(Check(f"retrain:{name}", SKIP, f"retrained weights hash to {actual[:12]}, recorded "
                                f"{str(expected)[:12]}; bit equality cannot be promised on this machine: "
                                f"{'; '.join(diffs[:4])}. See retrain:metrics-within-tolerance.", details))
    merge = (outputs.get("merged") or {}).get("merge") or {}
    sources = merge.get("sources") or []
    if "merged" in outputs:
        if len(sources) != 2 or "beta" not in merge:
            checks.append(Check("retrain:merged", FAIL, "the lineage does not record the merge's beta and source stages."))
        elif not all(s in retrained for s in sources):
            checks.append(Check("retrain:merged", SKIP, f"needs the retrained stages {sources}."))
        else:
            first, second = (load_checkpoint(retrained[s]) for s in sources)
            result.registered = merged_checkpoint(first, second, float(merge["beta"]), sources)
            actual = weights_sha256(result.registered["model"])
            expected = outputs["merged"].get("weights_sha256")
            ok = actual == expected == (outputs.get("registered") or {}).get("weights_sha256")
            status = PASS if ok else (SKIP if any(s in result.unpromised for s in sources) else FAIL)
            checks.append(Check("retrain:merged", status, f"beta={merge['beta']:g} * {sources[0]} + (1-beta) * {sources[1]} "
                                f"of the retrained stages hashes to {actual[:12]}; recorded {str(expected)[:12]}"
                                f"{' (= the registered weights)' if ok else ''}.",
                                {"expected": expected, "actual": actual, "beta": merge["beta"], "sources": sources}))
    else:
        registered_sha = (outputs.get("registered") or {}).get("weights_sha256")
        match = [s for s in stages if (outputs.get(s) or {}).get("weights_sha256") == registered_sha and s in retrained]
        if match:
            result.registered = load_checkpoint(retrained[match[-1]])
    return result


def check_retrained_metrics(retrained: Retrained, manifest: pd.DataFrame | None, inputs: Mapping[str, Any] | None,
                            recorded: Mapping[str, float], tolerance: float) -> Check:
    """``retrain:metrics-within-tolerance``: where the retrained bits could not be promised, the retrained
    counterpart of the registered model, evaluated on the recorded data, gives every registered metric within
    ``tolerance`` (an absolute difference)."""
    name = "retrain:metrics-within-tolerance"
    why = "; ".join(f"{stage}: {', '.join(d[:3])}" for stage, d in retrained.unpromised.items())
    if retrained.registered is None or manifest is None or inputs is None:
        return Check(name, SKIP, f"needed because bits could not be promised ({why}), but the retrained registered "
                     "model or the recorded evaluation data is not available.")
    actual = flat_block_metrics(evaluate_inputs(retrained.registered, manifest, inputs))
    check = check_metrics(recorded, actual, tolerance)
    check.name = name
    check.reason = (f"bit equality could not be promised ({why}); the retrained model's metrics: " + check.reason)
    check.details["numerics_differences"] = retrained.unpromised
    return check


# ------------------------------------------------------------------------------------------------
# The registry: resolve a model URI, download what the version stores
# ------------------------------------------------------------------------------------------------

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w.\-]+))/?$")


def _client(client: Any = None) -> Any:
    if client is not None:
        return client
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def resolve_version(model_uri: str, client: Any = None) -> Any:
    """The model version a ``models:/<name>/<version>`` or ``models:/<name>@<alias>`` URI names."""
    import mlflow
    from mlflow.exceptions import MlflowException

    match = _MODEL_URI.match(str(model_uri).strip())
    if not match:
        raise AuditError(f"{model_uri!r}: expected models:/<name>/<version> or models:/<name>@<alias> "
                         "(e.g. models:/vlalign-tiny-vit-bert-demo-flickr_demo-imagenet@champion).")
    client = _client(client)
    try:
        if match.group("alias"):
            return client.get_model_version_by_alias(match.group("name"), match.group("alias"))
        return client.get_model_version(match.group("name"), match.group("version"))
    except MlflowException as exc:
        raise AuditError(f"{model_uri}: no such model version at {mlflow.get_tracking_uri()} ({exc.message if hasattr(exc, 'message') else exc}); "
                         "check the name, version or alias, and MLFLOW_TRACKING_URI.") from exc


def download_version_files(name: str, version: int | str, dest: str | Path) -> dict[str, Path]:
    """The artifacts stored with a version (:data:`ARTIFACTS` that exist), downloaded under ``dest``."""
    import mlflow

    base = f"models:/{name}/{version}"
    flavor = mlflow.models.Model.load(base).flavors.get("python_function", {})
    artifacts = flavor.get("artifacts") or {}
    files = {}
    for key in ARTIFACTS:
        if key in artifacts:
            files[key] = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{artifacts[key]['path']}",
                                                                  dst_path=str(Path(dest) / key)))
    return files


def load_version_lineage(model_uri: str, dest: str | Path, client: Any = None) -> tuple[Any, dict[str, Any], dict[str, Path]]:
    """``(model version, lineage dict, downloaded files)`` of a ``models:/`` URI."""
    version = resolve_version(model_uri, client)
    files = download_version_files(version.name, version.version, dest)
    if "lineage" not in files:
        raise AuditError(f"{model_uri} ({version.name} v{version.version}) has no lineage.json; it was not registered by "
                         "the vlalign registration pipeline, so there is nothing to audit.")
    return version, json.loads(files["lineage"].read_text(encoding="utf-8")), files


# ------------------------------------------------------------------------------------------------
# The audit
# ------------------------------------------------------------------------------------------------


@dataclass
class AuditConfig:
    """What ``vlalign audit`` (and the ``audit`` pipeline) checks."""

    model_uri: str  # models:/<name>/<version> or models:/<name>@<alias>
    repo: str = "."  # the repository (git work tree, DVC repository) to audit in
    retrain: bool = False  # also retrain every stage on CPU and compare weights bit for bit
    tolerance: float = DEFAULT_TOLERANCE  # largest |recorded - recomputed| per metric
    retrain_tolerance: float = DEFAULT_RETRAIN_TOLERANCE  # the same for a retrained model whose bits can differ
    work_dir: str | None = None  # keep downloads, restored data and retrained stages here (None: a temporary folder)
    log_to_registry: bool = True  # store the report in the version's run and tag the version


def _read_json(path: Path | None) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else None


def audit(config: AuditConfig, client: Any = None) -> AuditReport:
    """Run every check on one model version (see the module docstring); never raises for a failing check."""
    started = time.monotonic()
    repo = Path(config.repo).resolve()
    scratch_ctx = (contextlib.nullcontext(config.work_dir) if config.work_dir
                   else tempfile.TemporaryDirectory(prefix="vlalign-audit-"))
    with scratch_ctx as scratch_name:
        scratch = Path(scratch_name)
        scratch.mkdir(parents=True, exist_ok=True)
        version, lineage, files = load_version_lineage(config.model_uri, scratch / "version", client)
        tags = dict(version.tags or {})
        report = AuditReport(config.model_uri, version.name, int(version.version), version.run_id, str(repo),
                             config.retrain, config.tolerance,
                             _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+0000"))
        checks = report.checks
        checks.append(check_commit(lineage, repo))
        patch = files["git_diff"].read_text(encoding="utf-8") if "git_diff" in files else None
        checks.append(check_code(lineage, patch, repo))

        dvc = DvcStore.find(repo)
        listings = _read_json(files.get("input_listings")) or {}
        located: dict[str, Located] = {}
        relocation = Relocation()
        root = lineage.get("root")
        if root and os.path.normpath(root) != str(repo):
            relocation.add(root, repo)
        try:
            for name, record in (lineage.get("inputs") or {}).items():
                try:
                    check, loc = check_input(name, record, lineage, repo, listings, dvc, scratch)
                except Exception as exc:  # noqa: BLE001 - e.g. an unreadable DVC repository: this input fails
                    check = Check(f"data:{name}", FAIL, f"{record.get('path')}: the recorded data could not be checked "
                                  f"({type(exc).__name__}: {' '.join(str(exc).split())}).",
                                  {"path": record.get("path")})
                    loc = Located(name, recorded_path(str(record.get("path")), root), None, "")
                checks.append(check)
                located[name] = loc
                if loc.local is not None and loc.source != "work tree":
                    relocation.add(os.path.realpath(loc.recorded), loc.local.resolve())
        finally:
            if dvc is not None:
                dvc.close()

        weights, checkpoint = check_weights(lineage, files.get("checkpoint"), tags)
        checks.append(weights)

        manifest_loc = located.get("clean_manifest")
        manifest = None
        if manifest_loc is not None and manifest_loc.local is not None:
            manifest = relocation.frame(pd.read_parquet(manifest_loc.local))
        recorded_inputs = _read_json(files.get("evaluation_inputs"))
        inputs = relocation.inputs(recorded_inputs) if recorded_inputs is not None else None
        threads = (lineage.get("hardware") or {}).get("torch_threads")
        data_ok = all(loc.local is not None for loc in located.values())
        identity_inputs = relocation.inputs(recorded_inputs, roots=False) if recorded_inputs is not None else None
        evaluation = check_evaluation_data(identity_inputs, lineage, manifest, tags) if data_ok else \
            Check("evaluation_data", SKIP, "the recorded data is not all available (see the data checks).")
        checks.append(evaluation)
        recorded_metrics = json.loads(tags["eval.metrics"]) if tags.get("eval.metrics") else \
            flat_block_metrics(lineage.get("metrics") or {})
        if evaluation.status != PASS or checkpoint is None:
            checks.append(Check("metrics", SKIP, "not evaluated: needs the recorded evaluation data (evaluation_data) "
                                "and the registered checkpoint."))
        else:
            with torch_threads(threads):
                blocks = evaluate_inputs(checkpoint, manifest, inputs)
            check = check_metrics(recorded_metrics, flat_block_metrics(blocks), config.tolerance)
            check.details["torch_threads"] = threads
            numerics = reproducibility.differences(lineage.get("numerics"), reproducibility.describe())
            check.details["numerics_differences"] = numerics
            if check.status == FAIL and numerics:  # say what else differed from the evaluation that was recorded
                check.reason += f" This machine evaluates with other numerics: {'; '.join(numerics[:4])}."
            checks.append(check)

        if config.retrain:
            retrained = check_retrain(lineage, located, repo, scratch)
            checks.extend(retrained.checks)
            if retrained.unpromised:
                with torch_threads(threads):
                    checks.append(check_retrained_metrics(retrained, manifest, inputs, recorded_metrics,
                                                          config.retrain_tolerance))
        else:
            checks.append(Check("retrain", SKIP, "not requested (vlalign audit --retrain retrains every stage on CPU)."))
        report.seconds = time.monotonic() - started
    return report


def run_audit(config: AuditConfig, out_dir: str | Path | None = None, client: Any = None) -> AuditReport:
    """:func:`audit`, then write the report to ``out_dir`` and, unless ``log_to_registry`` is off, log it to the
    version. Prints nothing; see :meth:`AuditReport.lines`."""
    report = audit(config, client)
    if out_dir is not None:
        write_report(report, out_dir)
    if config.log_to_registry:
        log_report(report, client)
    return report


def audit_config_from_dict(params: Mapping[str, Any], where: str = "audit") -> AuditConfig:
    """An :class:`AuditConfig` from the ``audit`` parameters (unknown fields named)."""
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}: expected a mapping with model_uri (and optionally repo, retrain, tolerance).")
    allowed = set(AuditConfig.__dataclass_fields__)
    unknown = sorted(set(params) - allowed - {"report_dir"})
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; the audit has the fields {sorted(allowed | {'report_dir'})}.")
    if not params.get("model_uri"):
        raise ConfigError(f"{where}.model_uri is not set: run `kedro run --pipeline audit --params "
                          "audit.model_uri=models:/<name>@champion` (or `vlalign audit models:/<name>@champion`).")
    values = {k: v for k, v in params.items() if k in allowed}
    values["tolerance"] = float(values.get("tolerance", DEFAULT_TOLERANCE))
    return AuditConfig(**values)
