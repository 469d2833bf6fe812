"""Lineage: git state (what counts as dirty, a patch that restores the tree), environment, seeds, hashes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from vlalign.errors import ConfigError
from vlalign.tracking.hashing import dvc_hash, weights_sha256
from vlalign.tracking.lineage import (
    LINEAGE_FORMAT,
    build_lineage,
    find_seeds,
    git_patch,
    git_state,
    hardware,
    dvc_environment,
    dvc_state,
    forget_code_state,
    lineage_tags,
    remember_code_state,
)


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
    return done.stdout


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    """A committed project: conf/base, src/pkg, a .gitignore like ours (conf/local/*, data/**)."""
    root = tmp_path / "project"
    (root / "conf" / "base").mkdir(parents=True)
    (root / "conf" / "local").mkdir()
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "conf" / "base" / "parameters.yml").write_text("seed: 0\n")
    (root / "conf" / "local" / ".gitkeep").write_text("")
    (root / "src" / "pkg" / "a.py").write_text("X = 1\n")
    (root / ".gitignore").write_text("conf/local/*\n!conf/local/.gitkeep\ndata/**\n__pycache__/\n")
    git(root, "init", "-q", "-b", "main")
    git(root, "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    git(root, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "init")
    return root


def test_clean_tree(repo: Path) -> None:
    state = git_state(repo)
    assert state["commit"] == git(repo, "rev-parse", "HEAD").strip() and state["branch"] == "main"
    assert state["dirty"] is False and state["untracked"] == [] and state["tracked_changes"] == []
    assert git_patch(repo) == ""


def test_files_outside_conf_and_src_do_not_make_it_dirty(repo: Path) -> None:
    (repo / "data" / "raw.csv").write_text("1,2\n")  # git-ignored data
    (repo / "notes.txt").write_text("todo\n")  # untracked, outside the watched folders
    (repo / "src" / "pkg" / "__pycache__").mkdir()
    (repo / "src" / "pkg" / "__pycache__" / "a.pyc").write_bytes(b"\0")
    (repo / "conf" / "local" / "credentials.yml").write_text("token: secret\n")
    state = git_state(repo)
    assert state["dirty"] is False, state


def test_untracked_environment_folder_makes_it_dirty(repo: Path) -> None:
    (repo / "conf" / "myenv").mkdir()
    (repo / "conf" / "myenv" / "parameters.yml").write_text("seed: 3\n")
    state = git_state(repo)
    assert state["dirty"] is True and state["untracked"] == ["conf/myenv/parameters.yml"]


def test_untracked_source_and_tracked_changes_make_it_dirty(repo: Path) -> None:
    (repo / "src" / "pkg" / "b.py").write_text("Y = 2\n")
    assert git_state(repo)["untracked"] == ["src/pkg/b.py"]
    (repo / "src" / "pkg" / "b.py").unlink()
    (repo / "src" / "pkg" / "a.py").write_text("X = 2\n")
    state = git_state(repo)
    assert state["dirty"] is True and state["tracked_changes"] == ["src/pkg/a.py"]


def test_local_config_counts_by_hash_never_by_content(repo: Path) -> None:
    local = repo / "conf" / "local" / "parameters.yml"
    local.write_text("seed: 42\n")
    (repo / "conf" / "local" / "credentials.yml").write_text("token: secret\n")
    state = git_state(repo)
    assert state["dirty"] is True
    assert state["ignored_config"] == [{"path": "conf/local/parameters.yml", "md5": dvc_hash(local, None)["md5"]}]
    patch = git_patch(repo, state["untracked"])
    assert "secret" not in patch and "seed: 42" not in patch


def test_patch_restores_the_tree_on_a_fresh_checkout(repo: Path, tmp_path: Path) -> None:
    (repo / "src" / "pkg" / "a.py").write_text("X = 2  # changed\n")
    (repo / "conf" / "base" / "parameters.yml").unlink()
    (repo / "conf" / "myenv").mkdir()
    (repo / "conf" / "myenv" / "parameters.yml").write_text("seed: 3\n")
    (repo / "src" / "pkg" / "blob.bin").write_bytes(bytes(range(256)))
    state = git_state(repo)
    patch = git_patch(repo, state["untracked"])
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    git(clone, "checkout", "-q", state["commit"])
    (tmp_path / "diff.patch").write_text(patch)
    git(clone, "apply", "--binary", str(tmp_path / "diff.patch"))
    for rel in ("src/pkg/a.py", "conf/myenv/parameters.yml", "src/pkg/blob.bin"):
        assert (clone / rel).read_bytes() == (repo / rel).read_bytes(), rel
    assert not (clone / "conf" / "base" / "parameters.yml").exists()


def test_outside_a_git_work_tree(tmp_path: Path) -> None:
    state = git_state(tmp_path)
    assert state["commit"] is None and state["dirty"] is None


def test_seeds_and_hardware() -> None:
    params = {"training": {"stages": [{"name": "stage1", "seed": 0}, {"name": "stage2", "seed": 7}]},
              "evaluation": {"probe": {"seed": 3}}, "demo_config": {"seed": 11}, "other": [{"seed": 1}]}
    assert find_seeds(params) == {"training.stages.stage1.seed": 0, "training.stages.stage2.seed": 7,
                                  "evaluation.probe.seed": 3, "demo_config.seed": 11, "other.0.seed": 1}
    hw = hardware()
    assert hw["cpu_count"] == os.cpu_count() and hw["ram_bytes"] > 0 and hw["cpu_model"]
    assert hw["torch"] == torch.__version__ and hw["cuda"] == torch.version.cuda
    assert hw["gpus"] == ([] if not torch.cuda.is_available() else hw["gpus"])


def checkpoint(path: Path, scale: float, stage: str) -> Path:
    torch.save({"format": "vlalign-checkpoint-v1", "model_config": {"name": "tiny"}, "stage_config": {"name": stage},
                "model": {"w": torch.full((3, 2), scale)}, "optimizer": {"state": {}}, "step": 5, "completed": True,
                "inputs": {"train_rows_sha256": "r", "init_weights_sha256": None}}, path)
    return path


def test_build_lineage_records_what_an_audit_checks(repo: Path, hash_state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = repo / "data"
    (data / "raw" / "images").mkdir(parents=True)
    (data / "raw" / "images" / "0.png").write_bytes(b"png0")
    (data / "clean.parquet").write_bytes(b"parquet")
    stage1 = checkpoint(data / "stage1.pt", 1.0, "stage1")
    merged = checkpoint(data / "merged.pt", 2.0, "stage1")
    registered = checkpoint(data / "registered.pt", 2.0, "stage1")
    manifest = pd.DataFrame({"image_id": ["0", "1"], "image_path": [str(data / "raw" / "images" / "0.png"), "/elsewhere/1.png"],
                             "caption": ["a", "b"], "split": ["train", "test"]})
    (repo / "conf" / "myenv").mkdir()
    (repo / "conf" / "myenv" / "parameters.yml").write_text("seed: 3\n")
    monkeypatch.chdir(repo)
    params = {"training": {"stages": [{"name": "stage1", "seed": 5}]}}
    metrics = {"retrieval": {"metrics": {"mean_recall": 0.5}}, "evaluation_data": {"sha256": "e" * 64}}
    lineage, patch = build_lineage(
        manifest=manifest, inputs={"raw_data": "data/raw", "clean_manifest": "data/clean.parquet"},
        outputs={"stage1": "data/stage1.pt", "merged": "data/merged.pt"}, registered_checkpoint=registered,
        params=params, metrics=metrics, validation_report={"n_rows": 2, "n_clean": 2, "other": 1}, run_id="r1",
        repo=repo, stage_specs={"stage1": {"data": "data/shards", "init": None, "mlflow": {"parent_run_id": "x"}}},
        evaluation_inputs={"sha256": "f" * 64, "verified": True},
    )
    assert lineage["format"] == LINEAGE_FORMAT == "vlalign-lineage-v3"
    # v3: the project root, the stage specs without the MLflow context, no DVC repository here.
    assert lineage["root"] == str(repo.resolve()) and lineage["git"]["watched"] == ["conf", "src"]
    assert lineage["stages"] == {"stage1": {"data": "data/shards", "init": None}}
    assert lineage["evaluation_inputs"] == {"sha256": "f" * 64, "verified": True} and lineage["dvc"] == {}
    assert json.loads(json.dumps(lineage)) == lineage  # plain JSON
    assert lineage["git"]["dirty"] is True and "conf/myenv/parameters.yml" in patch
    assert lineage["git"]["diff_sha256"] is not None
    assert lineage["inputs"]["raw_data"]["md5"] == dvc_hash(data / "raw")["md5"]
    assert lineage["inputs"]["clean_manifest"]["md5"] == dvc_hash(data / "clean.parquet")["md5"]
    out = lineage["outputs"]
    assert out["stage1"]["md5"] == dvc_hash(stage1)["md5"] and out["stage1"]["step"] == 5
    assert out["stage1"]["weights_sha256"] == weights_sha256({"w": torch.full((3, 2), 1.0)})
    assert out["merged"]["weights_sha256"] == out["registered"]["weights_sha256"] != out["stage1"]["weights_sha256"]
    assert out["registered"]["md5"] == dvc_hash(registered)["md5"]
    assert lineage["seeds"] == {"training.stages.stage1.seed": 5}
    assert lineage["evaluation_data"] == {"sha256": "e" * 64}
    assert "evaluation_data" not in lineage["metrics"]
    assert lineage["training_data"]["images_outside_inputs"] == 1  # /elsewhere/1.png
    assert lineage["validation"] == {"n_rows": 2, "n_clean": 2}
    assert set(lineage["packages"]) >= {"torch", "mlflow", "dvc", "kedro"} and lineage["hardware"]["cpu_count"]

    tags = lineage_tags(lineage)
    assert tags["git_dirty"] == "True" and tags["weights_sha256"] == out["registered"]["weights_sha256"]
    assert tags["input.raw_data.md5"] == lineage["inputs"]["raw_data"]["md5"]

    with pytest.raises(ConfigError, match="registration.lineage.inputs.shards"):
        build_lineage(manifest=manifest, inputs={"shards": "data/shards"}, outputs={}, registered_checkpoint=registered,
                      params={}, metrics={}, repo=repo)
    with pytest.raises(ConfigError, match="lineage output 'stage2'"):
        build_lineage(manifest=manifest, inputs={}, outputs={"stage2": "data/none.pt"}, registered_checkpoint=registered,
                      params={}, metrics={}, repo=repo)


def test_dvc_records_are_not_code_and_dvc_state_names_the_outputs(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dvc.lock / *.dvc changes do not make the tree dirty; dvc_state maps each path to the dvc.yaml output holding
    it, the hash dvc.lock records for it, the default remote, and the DVC experiment of this process."""
    (repo / ".dvc").mkdir()
    (repo / ".dvc" / "config").write_text("[core]\n    remote = store\n['remote \"store\"']\n    url = ../.dvc-storage\n")
    (repo / "dvc.yaml").write_text("stages:\n  train:\n    cmd: x\n    outs:\n      - data/models\n"
                                   "    metrics:\n      - data/metrics.json:\n          cache: false\n")
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages:\n  train:\n    cmd: x\n    outs:\n"
                                   "    - path: data/models\n      md5: abc.dir\n")
    git(repo, "add", "dvc.lock", ".dvc/config", "dvc.yaml")
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "dvc")
    (repo / "dvc.lock").write_text((repo / "dvc.lock").read_text().replace("abc.dir", "def.dir"))
    (repo / "data" / "x.dvc").write_text("outs: []\n")
    git(repo, "add", "-f", "data/x.dvc")
    state = git_state(repo)
    assert state["dirty"] is False and state["tracked_changes"] == [] and git_patch(repo) == ""
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-lark")
    found = dvc_state({"stage1": "data/models/stage1/final.pt", "metrics": "data/metrics.json",
                       "raw": "data/raw", "weights": "/usr/lib/x.pt"}, repo)
    assert found["outs"] == {
        "stage1": {"stage": "train", "out": "data/models", "cache": True, "lock_md5": "def.dir"},
        "metrics": {"stage": "train", "out": "data/metrics.json", "cache": False, "lock_md5": None},
        "raw": None, "weights": None}
    assert found["remote"] == {"name": "store", "url": str(repo.resolve() / ".dvc-storage")}
    assert found["experiment"] == {"exp_name": "brisk-lark"}
    assert dvc_environment({"DVC_STAGE": "train", "DVC_EXP_BASELINE_REV": "abc"}) == {"stage": "train", "exp_baseline_rev": "abc"}


def test_lineage_records_the_code_as_it_was_when_the_run_started(repo: Path, hash_state: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    registered = checkpoint(repo / "data" / "registered.pt", 1.0, "stage1")
    manifest = pd.DataFrame({"image_id": ["0"], "image_path": [str(repo / "data" / "0.png")], "caption": ["a"],
                             "split": ["train"]})
    monkeypatch.chdir(repo)
    remember_code_state(repo)  # the hooks do this when a run starts
    try:
        (repo / "src" / "pkg" / "a.py").write_text("X = 2\n")  # edited while the run trains
        lineage, patch = build_lineage(manifest=manifest, inputs={}, outputs={}, registered_checkpoint=registered,
                                       params={}, metrics={}, repo=repo)
        assert lineage["git"]["dirty"] is False and patch == "" and lineage["git"]["changed_during_run"] is True
    finally:
        forget_code_state(repo)
    lineage, patch = build_lineage(manifest=manifest, inputs={}, outputs={}, registered_checkpoint=registered,
                                   params={}, metrics={}, repo=repo)
    assert lineage["git"]["dirty"] is True and "X = 2" in patch and lineage["git"]["changed_during_run"] is None
