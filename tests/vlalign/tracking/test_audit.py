"""The audit's building blocks: recorded data against the work tree and a real DVC repository (cache, local remote,
checkout into a temporary folder, corruption), metric tolerance, patch and path handling, what changed."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from vlalign.tracking.audit import (
    DvcStore,
    Relocation,
    changed_inputs,
    changed_params,
    check_input,
    check_metrics,
    split_patch,
)
from vlalign.tracking.hashing import dvc_hash, dvc_listing


def run(cwd: Path, *args: str) -> None:
    subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True,
                   env={**__import__("os").environ, "DVC_NO_ANALYTICS": "1"})


@pytest.fixture()
def dvc_repo(tmp_path: Path) -> Path:
    """git + DVC: data/raw (3 files) added with `dvc add` and pushed to a local remote."""
    repo = tmp_path / "repo"
    (repo / "data" / "raw" / "sub").mkdir(parents=True)
    for name, text in (("a.txt", "alpha"), ("b.txt", "beta"), ("sub/c.txt", "gamma")):
        (repo / "data" / "raw" / name).write_text(text)
    run(repo, "git", "init", "-q")
    dvc = [sys.executable, "-m", "dvc"]
    run(repo, *dvc, "init", "-q")
    run(repo, *dvc, "config", "core.analytics", "false")
    run(repo, *dvc, "remote", "add", "-d", "store", str(tmp_path / "remote"))
    run(repo, *dvc, "add", "-q", "data/raw")
    run(repo, *dvc, "push", "-q")
    return repo


def lineage_for(repo: Path, record: dict) -> dict:
    return {"root": str(repo), "inputs": {"raw_data": record},
            "dvc": {"outs": {"raw_data": {"stage": None, "out": "data/raw", "cache": True, "lock_md5": record["md5"]}}}}


def object_path(root: Path, md5: str) -> Path:
    return root / "files" / "md5" / md5[:2] / md5[2:]


def test_recorded_data_from_work_tree_cache_remote_and_corruption(dvc_repo: Path, tmp_path: Path, hash_state: Path) -> None:
    record = {"path": "data/raw", **dvc_hash(dvc_repo / "data" / "raw")}
    listings = {"raw_data": dvc_listing(dvc_repo / "data" / "raw")}
    lineage = lineage_for(dvc_repo, record)
    a_md5 = next(e["md5"] for e in listings["raw_data"] if e["relpath"] == "a.txt")
    store = DvcStore(dvc_repo)

    def audit_input(name: str):
        return check_input("raw_data", record, lineage, dvc_repo, listings, store, tmp_path / name)

    # Untouched: the work tree has the recorded hash, and so does the DVC cache.
    check, located = audit_input("untouched")
    assert check.status == "pass" and located.source == "work tree" and "DVC has it in the cache" in check.reason

    # The work tree changed: the recorded data comes from the DVC cache into a temporary folder; the work tree stays.
    (dvc_repo / "data" / "raw" / "a.txt").write_text("tampered")
    check, located = audit_input("cache")
    assert check.status == "pass" and located.source == "cache"
    assert "has " in check.reason and "changed 1: a.txt" in check.reason and "DVC cache" in check.reason
    assert (located.local / "a.txt").read_text() == "alpha" and (dvc_repo / "data" / "raw" / "a.txt").read_text() == "tampered"

    # Without a local cache: fetched from the remote first.
    shutil.rmtree(dvc_repo / ".dvc" / "cache")
    store.close()
    check, located = audit_input("remote")
    assert check.status == "pass" and located.source == "remote" and "DVC remote" in check.reason
    assert dvc_hash(located.local, state_dir=None)["md5"] == record["md5"]

    # A corrupt object in the remote (and no cache): found when the fetched objects are hashed, before any checkout;
    # the fetched corrupt object does not stay in the cache (DVC would trust it later, it is read-only).
    shutil.rmtree(dvc_repo / ".dvc" / "cache")
    store.close()
    object_path(tmp_path / "remote", a_md5).chmod(0o644)
    object_path(tmp_path / "remote", a_md5).write_text("bit rot")
    check, located = audit_input("corrupt")
    assert check.status == "fail" and located.local is None and "changed 1: a.txt" in check.reason
    rot = hashlib.md5(b"bit rot").hexdigest()
    assert "the remote's copy is corrupt" in check.reason and f"data/raw/a.txt (recorded md5 {a_md5}" in check.reason
    assert f"hashes to {rot}; the work tree's copy hashes to {hashlib.md5(b'tampered').hexdigest()}" in check.reason
    assert not object_path(dvc_repo / ".dvc" / "cache", a_md5).exists() and not (tmp_path / "corrupt" / "data").exists()

    # No copy anywhere: the reason names the changed file and where it looked.
    shutil.rmtree(dvc_repo / ".dvc" / "cache")
    shutil.rmtree(tmp_path / "remote")
    store.close()
    check, located = audit_input("gone")
    assert check.status == "fail" and located.local is None
    assert "changed 1: a.txt" in check.reason and "DVC has no intact copy" in check.reason
    assert "remote 'store'" in check.reason
    assert f"data/raw (folder listing) (recorded md5 {record['md5']}, missing)" in check.reason
    store.close()


@pytest.fixture()
def flickr_repo(tmp_path: Path) -> Path:
    """git + DVC with the Flickr demo layout: data/01_raw/demo (dataset_demo.json and one image) added with `dvc add`,
    a default local remote, nothing pushed yet."""
    repo = tmp_path / "repo"
    flickr = repo / "data" / "01_raw" / "demo" / "flickr_demo"
    (flickr / "images").mkdir(parents=True)
    (flickr / "dataset_demo.json").write_text('{"images": [{"filename": "0.png"}]}')
    (flickr / "images" / "0.png").write_bytes(b"\x89PNG not really")
    run(repo, "git", "init", "-q")
    dvc = [sys.executable, "-m", "dvc"]
    run(repo, *dvc, "init", "-q")
    run(repo, *dvc, "config", "core.analytics", "false")
    run(repo, *dvc, "remote", "add", "-d", "store", str(tmp_path / "remote"))
    run(repo, *dvc, "add", "-q", "data/01_raw/demo")
    return repo


def raw_data_input(repo: Path, tmp_path: Path, name: str):
    """check_input of the raw data as the lineage records it (taken from the .dvc file) with a fresh DvcStore."""
    md5 = yaml.safe_load((repo / "data" / "01_raw" / "demo.dvc").read_text())["outs"][0]["md5"]
    record = {"path": "data/01_raw/demo", "md5": md5, "isdir": True, "nfiles": 2}
    lineage = {"root": str(repo), "inputs": {"raw_data": record},
               "dvc": {"outs": {"raw_data": {"stage": "demo_data", "out": "data/01_raw/demo", "cache": True}}}}
    store = DvcStore(repo)
    try:
        return check_input("raw_data", record, lineage, repo, {}, store, tmp_path / name)
    finally:
        store.close()


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_a_corrupt_cache_object_is_never_used(flickr_repo: Path, tmp_path: Path, hash_state: Path,
                                              read_only: bool) -> None:
    """One byte appended to the cached dataset_demo.json while the work tree also changed: FAIL data:raw_data naming
    the file, its recorded and actual md5 and what to do, not dvc_data's CheckoutError. DVC itself trusts a
    read-only cache file unread, so both modes are covered. Following the advice then restores the data."""
    json_file = flickr_repo / "data" / "01_raw" / "demo" / "flickr_demo" / "dataset_demo.json"
    recorded_md5 = hashlib.md5(json_file.read_bytes()).hexdigest()
    run(flickr_repo, sys.executable, "-m", "dvc", "push", "-q")  # the remote holds an intact copy
    cached = object_path(flickr_repo / ".dvc" / "cache", recorded_md5)
    cached.chmod(0o644)
    cached.write_bytes(cached.read_bytes() + b"!")
    if read_only:
        cached.chmod(0o444)
    corrupt_md5 = hashlib.md5(cached.read_bytes()).hexdigest()
    json_file.write_text('{"images": []}')
    work_md5 = hashlib.md5(json_file.read_bytes()).hexdigest()

    check, located = raw_data_input(flickr_repo, tmp_path, "corrupt")
    assert check.name == "data:raw_data" and check.status == "fail" and located.local is None
    reason = check.reason
    assert "data/01_raw/demo/flickr_demo/dataset_demo.json" in reason
    assert "changed 1: flickr_demo/dataset_demo.json" in reason
    assert f"recorded md5 {recorded_md5}" in reason and f"{cached} hashes to {corrupt_md5}" in reason
    assert f"the work tree's copy hashes to {work_md5}" in reason
    assert f"rm -f {cached}" in reason and "dvc fetch data/01_raw/demo" in reason
    assert "dvc pull data/01_raw/demo" in reason
    assert "restore data/01_raw/demo" in reason
    assert [(o["relpath"], o["md5"], o["actual"]) for o in check.details["dvc_objects"]] == [
        ("flickr_demo/dataset_demo.json", recorded_md5, corrupt_md5)]
    # Neither the corrupt object nor the work tree was touched, and nothing was checked out.
    assert hashlib.md5(cached.read_bytes()).hexdigest() == corrupt_md5 and json_file.read_text() == '{"images": []}'
    assert not (tmp_path / "corrupt" / "data").exists()

    # The advice works: without the corrupt object the audit fetches the intact one from the remote.
    cached.unlink()
    check, located = raw_data_input(flickr_repo, tmp_path, "advised")
    assert check.status == "pass" and located.source == "remote", check.reason
    assert (located.local / "flickr_demo" / "dataset_demo.json").read_bytes() == b'{"images": [{"filename": "0.png"}]}'


@pytest.mark.parametrize("remote", ["none configured", "without the object"])
def test_a_missing_cache_object_that_no_remote_has(flickr_repo: Path, tmp_path: Path, hash_state: Path,
                                                   remote: str) -> None:
    """The object is in neither the cache nor a remote: FAIL naming the file, its recorded md5 and the work tree's,
    and what to do (push it from where it is, then fetch; or restore the data)."""
    json_file = flickr_repo / "data" / "01_raw" / "demo" / "flickr_demo" / "dataset_demo.json"
    recorded_md5 = hashlib.md5(json_file.read_bytes()).hexdigest()
    if remote == "none configured":
        run(flickr_repo, sys.executable, "-m", "dvc", "remote", "remove", "store")
    else:
        run(flickr_repo, sys.executable, "-m", "dvc", "push", "-q")
        object_path(tmp_path / "remote", recorded_md5).unlink()
    object_path(flickr_repo / ".dvc" / "cache", recorded_md5).unlink()
    json_file.write_text('{"images": []}')
    work_md5 = hashlib.md5(json_file.read_bytes()).hexdigest()

    check, located = raw_data_input(flickr_repo, tmp_path, "missing")
    assert check.name == "data:raw_data" and check.status == "fail" and located.local is None
    reason = check.reason
    assert (f"data/01_raw/demo/flickr_demo/dataset_demo.json (recorded md5 {recorded_md5}, missing; the work tree's "
            f"copy hashes to {work_md5})") in reason
    assert "dvc push data/01_raw/demo" in reason and "dvc fetch data/01_raw/demo" in reason
    assert "restore data/01_raw/demo" in reason
    if remote == "none configured":
        assert "NoRemoteError" in reason and "dvc remote add -d" in reason
    else:
        assert "neither the cache nor the remote has it" in reason
        assert f"the remote 'store' ({tmp_path / 'remote'})" in reason
    objects = check.details["dvc_objects"]
    assert [(o["relpath"], o["actual"]) for o in objects] == [("flickr_demo/dataset_demo.json", None)]


def test_without_dvc_the_work_tree_must_match(tmp_path: Path, hash_state: Path) -> None:
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "x.txt").write_text("x")
    record = {"path": str(folder), **dvc_hash(folder)}
    listings = {"raw_data": dvc_listing(folder)}
    (folder / "y.txt").write_text("new")
    (folder / "x.txt").unlink()
    check, _ = check_input("raw_data", record, {"root": str(tmp_path)}, tmp_path, listings, None, tmp_path / "s")
    assert check.status == "fail" and "added 1: y.txt; removed 1: x.txt" in check.reason
    assert "this is no DVC repository" in check.reason


def test_metrics_within_tolerance() -> None:
    recorded = {"retrieval.mean_recall": 0.5, "zero_shot.acc1": 0.25}
    assert check_metrics(recorded, {"retrieval.mean_recall": 0.5 + 5e-7, "zero_shot.acc1": 0.25}, 1e-6).status == "pass"
    failed = check_metrics(recorded, {"retrieval.mean_recall": 0.5 + 2e-6, "zero_shot.acc1": 0.25}, 1e-6)
    assert failed.status == "fail" and "1 of 2 metrics differ by more than 1e-06: retrieval.mean_recall" in failed.reason
    missing = check_metrics(recorded, {"retrieval.mean_recall": 0.5}, 1e-6)
    assert missing.status == "fail" and "not recomputed: zero_shot.acc1" in missing.reason
    nan = check_metrics(recorded, {"retrieval.mean_recall": float("nan"), "zero_shot.acc1": 0.25}, 1e-6)
    assert nan.status == "fail"


def test_split_patch_and_relocation(tmp_path: Path) -> None:
    patch = ("diff --git a/src/x.py b/src/x.py\n--- a/src/x.py\n+++ b/src/x.py\n@@ -1 +1 @@\n-1\n+2\n"
             "diff --git a/conf/n.yml b/conf/n.yml\nnew file mode 100644\n+a: 1\n"
             "# untracked file too large for the patch: src/big.bin md5=abc\n")
    chunks = split_patch(patch)
    assert list(chunks) == ["src/x.py", "conf/n.yml", "src/big.bin"] and chunks["conf/n.yml"].endswith("+a: 1\n")
    moved = Relocation()
    moved.add("/old/project", "/new/project")
    moved.add("/old/project/data/raw", "/tmp/restored/raw")
    frame = pd.DataFrame({"image_path": ["/old/project/data/raw/i/0.png", "/old/project/other/1.png", "/elsewhere/2.png"],
                          "image_root": ["/old/project/data/raw/i:/old/project/x", "/old/project/other", "/elsewhere"]})
    out = moved.frame(frame)
    assert list(out["image_path"]) == ["/tmp/restored/raw/i/0.png", "/new/project/other/1.png", "/elsewhere/2.png"]
    assert out["image_root"][0] == "/tmp/restored/raw/i:/new/project/x"
    assert moved.path("/old/projectX/a") == "/old/projectX/a"  # a prefix only at a path boundary


def test_what_changed_since_a_version(tmp_path: Path, hash_state: Path) -> None:
    recorded = {"training": {"recipe": "clip", "stages": [{"name": "stage1", "lr": 0.001, "seed": 0}]},
                "validation": {"config": {"min_words_en": 3}, "quarantine_file": "data/a.csv"}, "model": {"overrides": {}}}
    current = {"training": {"recipe": "clip", "stages": [{"name": "stage1", "lr": 0.0005, "seed": 0}]},
               "validation": {"config": {"min_words_en": 3}, "quarantine_file": "data/runs/x/a.csv"},
               "model": {"overrides": {"embed_dim": 32}}}
    changes = changed_params(recorded, current, ["training", "validation", "model"], ignore=["validation.quarantine_file"])
    assert changes == ["model.overrides.embed_dim: '<unset>' -> 32", "training.stages.stage1.lr: 0.001 -> 0.0005"]
    assert changed_params(recorded, recorded, ["training", "validation", "model"]) == []
    data = tmp_path / "clean.parquet"
    data.write_bytes(b"v1")
    record = {"clean_manifest": {"md5": dvc_hash(data)["md5"]}}
    assert changed_inputs(record, {"clean_manifest": data})[0] == []
    data.write_bytes(b"v2")
    changes, hashes = changed_inputs(record, {"clean_manifest": data, "raw_data": tmp_path / "none"})
    assert changes == [f"clean_manifest: md5 {record['clean_manifest']['md5']} -> {hashes['clean_manifest']}",
                       f"raw_data: {tmp_path / 'none'} does not exist"]
