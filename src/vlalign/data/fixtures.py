"""Tiny benchmark fixtures in exactly the published on-disk formats (for tests; no downloads).

- :func:`make_flickr30k_fixture`: Karpathy ``dataset_flickr30k.json`` + ``flickr30k-images/<id>.jpg``,
  5 captions per image, splits train/val/test.
- :func:`make_coco_cn_fixture`: COCO-CN ``coco-cn_{train,val,test}.txt`` split lists,
  ``imageid.human-written-caption.txt`` (``<id>#<n>\\t<caption>``) and MS-COCO ``images/train2014`` /
  ``images/val2014`` folders of ``COCO_<folder>_<12 digits>.jpg``.
- :func:`make_imagenet_fixture`: ImageNet-1k val in the class-folder layout (``val/<wnid>/*.JPEG``) or the
  flat layout (``val/ILSVRC2012_val_<8 digits>.JPEG`` + label files).

Each returns a dict of the paths written and the facts a test asserts on. Images are small solid-colour
JPEGs (one colour per image) drawn with PIL.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

#: The first three ImageNet-1k classes in sorted-wnid order (labels 0, 1, 2 of open_clip's class names).
IMAGENET_FIXTURE_WNIDS = ("n01440764", "n01443537", "n01484850")
#: An ILSVRC2012_ID-style order of the same wnids, as a devkit meta.mat export would list them (line i = ID i).
IMAGENET_FIXTURE_DEVKIT_ORDER = ("n01484850", "n01440764", "n01443537")


def _jpeg(path: Path, index: int, size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = ((37 * index) % 256, (91 * index + 40) % 256, (53 * index + 120) % 256)
    Image.new("RGB", (size, size), colour).save(path, format="JPEG", quality=90)


def make_flickr30k_fixture(root: Path, n_train: int = 4, n_val: int = 2, n_test: int = 2) -> dict[str, Any]:
    """Write ``root/dataset_flickr30k.json`` (Karpathy format) and ``root/flickr30k-images/*.jpg``."""
    root = Path(root)
    image_dir = root / "flickr30k-images"
    images, sentid = [], 0
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    for imgid, split in enumerate(splits):
        filename = f"{1000092795 + 17 * imgid}.jpg"
        _jpeg(image_dir / filename, imgid)
        sentences = []
        for k in range(5):
            raw = f"Image {imgid} caption {k}: a person in a coloured scene."
            tokens = raw.lower().rstrip(".").replace(":", "").split()
            sentences.append({"tokens": tokens, "raw": raw, "imgid": imgid, "sentid": sentid})
            sentid += 1
        images.append({
            "sentids": [s["sentid"] for s in sentences],
            "imgid": imgid,
            "sentences": sentences,
            "split": split,
            "filename": filename,
        })
    json_path = root / "dataset_flickr30k.json"
    json_path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}), encoding="utf-8")
    return {"root": root, "json": json_path, "image_root": image_dir, "n_images": len(splits),
            "captions_per_image": 5, "splits": {s: splits.count(s) for s in ("train", "val", "test")}}


def make_coco_cn_fixture(root: Path) -> dict[str, Any]:
    """Write a COCO-CN release in miniature under ``root`` (split lists, caption file, COCO image folders).

    Test images have 1 or 2 captions (as the real test set's 1,053 captions over 1,000 images); the
    caption file also holds a caption of an image in no split list, which loaders must ignore.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    splits = {
        "train": ["COCO_train2014_000000000009", "COCO_train2014_000000000025", "COCO_val2014_000000000042"],
        "val": ["COCO_val2014_000000000073"],
        "test": ["COCO_val2014_000000290833", "COCO_train2014_000000000138", "COCO_val2014_000000000164"],
    }
    n_captions = {image_id: 1 for ids in splits.values() for image_id in ids}
    n_captions.update({"COCO_val2014_000000290833": 2, "COCO_train2014_000000000025": 2})
    for split, ids in splits.items():
        (root / f"coco-cn_{split}.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
    lines, k = [], 0
    for image_id, count in n_captions.items():
        folder = image_id.split("_")[1]
        _jpeg(root / "images" / folder / f"{image_id}.jpg", k)
        for n in range(count):
            lines.append(f"{image_id}#{n}\t第{k}张图片里有一个穿红衣服的人，描述{n}。")
        k += 1
    lines.append("COCO_val2014_000000999999#0\t这张图片不在任何划分中。")  # in no split list: ignored
    (root / "imageid.human-written-caption.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"root": root, "image_roots": root / "images", "captions_file": root / "imageid.human-written-caption.txt",
            "splits": splits, "n_captions": n_captions}


def make_imagenet_fixture(root: Path, layout: str = "folder", per_class: int = 2) -> dict[str, Any]:
    """Write an ImageNet-1k val set in miniature: 3 real classes (labels 0-2 in sorted-wnid order).

    ``layout="folder"``: ``root/val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG``.
    ``layout="flat"``: ``root/val/ILSVRC2012_val_<8 digits>.JPEG`` plus
    ``root/val_labels.txt`` (one 0-based label per line, file-name order),
    ``root/val_labels.csv`` (``filename,label``),
    ``root/ILSVRC2012_validation_ground_truth.txt`` (1-based devkit IDs, file-name order) and
    ``root/devkit_wnids.txt`` (line i = wnid of devkit ID i).
    The returned ``labels`` are the true 0-based labels in file-name order.
    """
    if layout not in ("folder", "flat"):
        raise ValueError(f"make_imagenet_fixture: layout={layout!r}; expected 'folder' or 'flat'.")
    root = Path(root)
    val = root / "val"
    n = len(IMAGENET_FIXTURE_WNIDS) * per_class
    # Interleave classes so that file-name order differs from label order.
    labels = [i % len(IMAGENET_FIXTURE_WNIDS) for i in range(n)]
    names = [f"ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(n)]
    for i, (name, label) in enumerate(zip(names, labels)):
        folder = val / IMAGENET_FIXTURE_WNIDS[label] if layout == "folder" else val
        _jpeg(folder / name, label * 10 + i)
    out: dict[str, Any] = {"root": root, "image_dir": val, "wnids": list(IMAGENET_FIXTURE_WNIDS),
                           "files": names, "labels": labels}
    if layout == "flat":
        (root / "val_labels.txt").write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
        (root / "val_labels.csv").write_text(
            "filename,label\n" + "".join(f"{name},{label}\n" for name, label in zip(names, labels)), encoding="utf-8"
        )
        devkit_id = {wnid: i + 1 for i, wnid in enumerate(IMAGENET_FIXTURE_DEVKIT_ORDER)}
        (root / "ILSVRC2012_validation_ground_truth.txt").write_text(
            "".join(f"{devkit_id[IMAGENET_FIXTURE_WNIDS[label]]}\n" for label in labels), encoding="utf-8"
        )
        (root / "devkit_wnids.txt").write_text("\n".join(IMAGENET_FIXTURE_DEVKIT_ORDER) + "\n", encoding="utf-8")
        out.update({"labels_txt": root / "val_labels.txt", "labels_csv": root / "val_labels.csv",
                    "ground_truth": root / "ILSVRC2012_validation_ground_truth.txt",
                    "devkit_wnids": root / "devkit_wnids.txt"})
    return out


def coco_cn_from_demo(demo_root: Path, root: Path) -> dict[str, Any]:
    """A COCO-CN release built from the default dataset's Chinese captions, at the default dataset's size (2,000 /
    200 / 500 images): the exact COCO-CN layout (split lists, ``imageid.human-written-caption.txt``,
    ``images/train2014`` and ``images/val2014`` of ``COCO_<folder>_<12 digits>.jpg``) with real content, to run
    ``kedro run --env coco_cn`` end to end where the real COCO-CN is not at hand."""
    demo_root, root = Path(demo_root), Path(root)
    entries = json.loads((demo_root / "flickr_demo" / "dataset_demo_zh.json").read_text(encoding="utf-8"))["images"]
    split_ids: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    lines = []
    for entry in entries:
        folder = "train2014" if entry["split"] == "train" else "val2014"
        image_id = f"COCO_{folder}_{int(entry['imgid']):012d}"
        target = root / "images" / folder / f"{image_id}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(demo_root / "flickr_demo" / "images" / entry["filename"]) as image:
            image.convert("RGB").save(target, format="JPEG", quality=95)
        split_ids[entry["split"]].append(image_id)
        lines += [f"{image_id}#{n}\t{sentence['raw']}" for n, sentence in enumerate(entry["sentences"])]
    for split, ids in split_ids.items():
        (root / f"coco-cn_{split}.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
    (root / "imageid.human-written-caption.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"root": root, "splits": {s: len(ids) for s, ids in split_ids.items()}, "captions": len(lines)}
