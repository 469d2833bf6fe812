"""Content hashes: DVC's md5 for files and folders (checked against a real `dvc add`), weights, evaluation data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from vlalign.errors import ConfigError
from vlalign.tracking.hashing import (
    dvc_hash,
    dvc_hashes,
    evaluation_data_identity,
    file_md5s,
    retrieval_identity,
    weights_sha256,
    zero_shot_identity,
)


def write_tree(root: Path) -> None:
    """Nested folders, an empty file, binary bytes, a non-ASCII name, a CRLF text file, an ignored file."""
    (root / "data" / "images" / "sub").mkdir(parents=True)
    (root / "data" / "images" / "a.png").write_bytes(bytes(range(256)) * 40)
    (root / "data" / "images" / "sub" / "b.bin").write_bytes(os.urandom(3000))
    (root / "data" / "empty.txt").write_bytes(b"")
    (root / "data" / "captions é.txt").write_text("a red circle\r\na blue square\r\n", encoding="utf-8")
    (root / "data" / "scratch.tmp").write_text("ignored by .dvcignore")
    (root / "single.bin").write_bytes(os.urandom(5000))
    (root / ".dvcignore").write_text("*.tmp\n")


def dvc(root: Path, *args: str) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_hashes_equal_what_dvc_add_records(tmp_path: Path, hash_state: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    write_tree(root)
    dvc(root, "init", "--no-scm", "-q")
    dvc(root, "add", "-q", "data", "single.bin")
    for name in ("data", "single.bin"):
        (out,) = yaml.safe_load((root / f"{name}.dvc").read_text())["outs"]
        ours = dvc_hash(root / name)
        assert ours["md5"] == out["md5"], name
        assert ours["size"] == out["size"]
        assert ours.get("nfiles") == out.get("nfiles")
    assert dvc_hash(root / "data")["md5"].endswith(".dir")
    assert dvc_hash(root / "data")["nfiles"] == 4  # scratch.tmp is ignored, as DVC ignores it


def test_hash_state_cache_notices_changes(tmp_path: Path, hash_state: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "x.txt").write_text("one")
    first = dvc_hash(folder)
    assert dvc_hash(folder) == first  # from the state cache
    assert list(hash_state.rglob("*")), "the state cache was not written"
    (folder / "x.txt").write_text("two")  # same size, new content and mtime
    assert dvc_hash(folder)["md5"] != first["md5"]
    assert dvc_hash(folder, state_dir=None) == dvc_hash(folder)


def test_hash_is_independent_of_location(tmp_path: Path, hash_state: Path) -> None:
    write_tree(tmp_path / "a")
    (tmp_path / "a" / ".dvc").mkdir()  # a DVC repository: its .dvcignore applies
    shutil.copytree(tmp_path / "a" / "data", tmp_path / "b" / "elsewhere")
    assert dvc_hash(tmp_path / "a" / "data", None)["md5"] != dvc_hash(tmp_path / "b" / "elsewhere", None)["md5"]
    (tmp_path / "a" / ".dvcignore").unlink()
    assert dvc_hash(tmp_path / "a" / "data", None)["md5"] == dvc_hash(tmp_path / "b" / "elsewhere", None)["md5"]


def test_missing_input_names_the_parameter(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"registration.lineage.inputs.raw_data: .*does not exist"):
        dvc_hashes({"raw_data": tmp_path / "nope"}, where="registration.lineage.inputs")


# ------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------


def test_weights_hash_ignores_serialisation_but_not_values(tmp_path: Path) -> None:
    sd = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(4, dtype=torch.bfloat16),
          "flag": torch.tensor([True, False])}
    reordered = {k: sd[k].clone() for k in ("flag", "a", "b")}
    torch.save({"model": sd, "optimizer": {"lr": 1.0}}, tmp_path / "one.pt")
    torch.save({"model": reordered, "step": 7}, tmp_path / "two.pt")
    assert (tmp_path / "one.pt").read_bytes() != (tmp_path / "two.pt").read_bytes()
    loaded = [torch.load(tmp_path / n, weights_only=True)["model"] for n in ("one.pt", "two.pt")]
    assert weights_sha256(loaded[0]) == weights_sha256(loaded[1]) == weights_sha256(sd)
    changed = dict(sd, b=sd["b"].clone())
    changed["b"][0, 0] += 1e-6
    assert weights_sha256(changed) != weights_sha256(sd)
    assert weights_sha256(dict(sd, b=sd["b"].double())) != weights_sha256(sd)  # dtype counts
    assert weights_sha256(dict(sd, b=sd["b"].reshape(3, 2))) != weights_sha256(sd)  # shape counts


# ------------------------------------------------------------------------------------------------
# Evaluation data
# ------------------------------------------------------------------------------------------------


def make_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.new("RGB", (8, 8), (i * 40 % 256, 10, 200)).save(path)
        paths.append(path)
    return paths


def manifest_for(paths: list[Path]) -> pd.DataFrame:
    rows = []
    for i, path in enumerate(paths):
        for k in range(2):
            rows.append({"image_id": str(i), "image_path": str(path), "caption": f"caption {k} of {i}",
                         "caption_id": f"en:{i}{k}", "split": "test", "lang": "en", "source": "t"})
        rows.append({"image_id": str(i), "image_path": str(path), "caption": "训练", "caption_id": f"zh:{i}",
                     "split": "train", "lang": "zh", "source": "t"})
    return pd.DataFrame(rows)


def test_retrieval_identity_is_content_not_order_ids_or_location(tmp_path: Path, hash_state: Path) -> None:
    paths = make_images(tmp_path / "a", 4)
    base = manifest_for(paths)
    ref = retrieval_identity(base, "test", "en", "demo")
    assert ref["n_images"] == 4 and ref["n_captions"] == 8
    shuffled = base.sample(frac=1.0, random_state=1)
    assert retrieval_identity(shuffled, "test", "en", "demo")["sha256"] == ref["sha256"]
    renamed = base.assign(image_id=base["image_id"].map(lambda x: f"img-{x}"))
    assert retrieval_identity(renamed, "test", "en", "demo")["sha256"] == ref["sha256"]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    moved = base.assign(image_path=base["image_path"].str.replace(str(tmp_path / "a"), str(tmp_path / "b"), regex=False))
    assert retrieval_identity(moved, "test", "en", "demo")["sha256"] == ref["sha256"]
    other_split = base.assign(caption=base["caption"].where(base["split"] == "test", "changed"))
    assert retrieval_identity(other_split, "test", "en", "demo")["sha256"] == ref["sha256"]  # only the test rows count

    caption = base.copy()
    caption.loc[0, "caption"] = "a different caption"
    swapped = base.copy()  # the same captions, one moved to another image
    swapped.loc[0, ["image_id", "image_path"]] = base.loc[3, ["image_id", "image_path"]].to_numpy()
    image = base.copy()
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "c" / "0.png")
    image["image_path"] = image["image_path"].str.replace(str(tmp_path / "a"), str(tmp_path / "c"), regex=False)
    for changed in (caption, swapped, image, base.iloc[1:]):
        assert retrieval_identity(changed, "test", "en", "demo")["sha256"] != ref["sha256"]


def test_zero_shot_identity_sees_labels_names_and_templates(tmp_path: Path, hash_state: Path) -> None:
    paths = make_images(tmp_path / "zs", 4)
    images = pd.DataFrame({"image_path": [str(p) for p in paths], "label": [0, 0, 1, 1], "wnid": ["n1", "n1", "n2", "n2"]})
    names, templates = ["red circle", "blue square"], ["a photo of a {}.", "a {}."]
    ref = zero_shot_identity(images, names, templates, "demo-imagenet", "en")["sha256"]
    assert zero_shot_identity(images.iloc[::-1], names, templates, "demo-imagenet", "en")["sha256"] == ref
    assert zero_shot_identity(images.assign(label=[0, 1, 1, 1]), names, templates, "d", "en")["sha256"] != ref
    assert zero_shot_identity(images, names[::-1], templates, "d", "en")["sha256"] != ref
    assert zero_shot_identity(images, names, templates[:1], "d", "en")["sha256"] != ref


def test_evaluation_identity_combines_blocks(tmp_path: Path, hash_state: Path) -> None:
    paths = make_images(tmp_path / "img", 3)
    manifest = manifest_for(paths)
    zs = {"images": pd.DataFrame({"image_path": [str(p) for p in paths], "label": [0, 1, 2]}),
          "classnames": ["a", "b", "c"], "templates": ["{}"], "lang": "en", "dataset": "demo-imagenet"}
    pairs = [[str(paths[0]), "a red circle", "a blue circle", "colour"]]
    full = evaluation_data_identity(manifest, "test", {"retrieval": ("en", "demo-flickr")}, zs, pairs, "demo-flickr")
    assert list(full["blocks"]) == ["retrieval", "zero_shot", "compositional"]
    assert full["datasets"] == "retrieval=demo-flickr, zero_shot=demo-imagenet, compositional=demo-flickr"
    again = evaluation_data_identity(manifest.iloc[::-1], "test", {"retrieval": ("en", "demo-flickr")}, zs, pairs, "demo-flickr")
    assert again["sha256"] == full["sha256"]
    no_probe = evaluation_data_identity(manifest, "test", {"retrieval": ("en", "demo-flickr")}, zs)
    assert no_probe["sha256"] != full["sha256"] and "compositional" not in no_probe["blocks"]
    other_pair = [[str(paths[0]), "a red circle", "a red square", "shape"]]
    assert evaluation_data_identity(manifest, "test", {"retrieval": ("en", "demo-flickr")}, zs, other_pair,
                                    "demo-flickr")["sha256"] != full["sha256"]


def test_file_md5s_match_dvc_file_hash(tmp_path: Path, hash_state: Path) -> None:
    paths = make_images(tmp_path / "img", 2)
    md5 = file_md5s(paths)
    assert md5 == {str(p): dvc_hash(p)["md5"] for p in paths}
