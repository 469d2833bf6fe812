"""DVC-style folder hashing for the lineage: dvc-data's hashing with and without its state cache, against a
plain md5 loop over the same files (the cost floor: read every byte once).

Usage:
    .venv/bin/python benchmarks/bench_hashing.py [--root data/01_raw/demo] [--repeat 3] [--json OUT]

Generate the default dataset first if needed: ``vlalign demo --root data/01_raw/demo``.

Methods, all in this process, each timed ``--repeat`` times (best time reported), in this order so the OS
page cache is warm for all of them:

- ``md5_loop``: ``hashlib.md5`` over every file's bytes (no DVC listing, no ignore rules): the reference.
- ``dvc_hash_no_state``: :func:`vlalign.tracking.hashing.dvc_hash` hashing every file afresh.
- ``dvc_hash_cold_state``: the same with an empty state cache (hashes every file and records it).
- ``dvc_hash_warm_state``: the same with the cache filled: files whose inode, mtime and size did not
  change are not read again (what a re-run of the registration costs).

It also times :func:`vlalign.tracking.hashing.zero_shot_identity` and ``retrieval_identity`` on the demo
dataset's zero-shot set and test split when ``--root`` is the default dataset. The script exits non-zero
unless every ``dvc_hash`` variant returns the same md5.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def best_time(fn, repeat: int):
    best, value = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def md5_loop(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                total += len(hashlib.md5(handle.read(), usedforsecurity=False).hexdigest())
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="data/01_raw/demo")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    root = Path(args.root)
    if not root.is_dir():
        print(f"{root}: not a folder; generate the default dataset with `vlalign demo --root {root}`.", file=sys.stderr)
        return 2
    from vlalign.tracking.hashing import dvc_hash, retrieval_identity, zero_shot_identity

    files = sum(len(f) for _, _, f in os.walk(root))
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    results: dict[str, float] = {}
    md5s = set()
    results["md5_loop"], _ = best_time(lambda: md5_loop(root), args.repeat)
    results["dvc_hash_no_state"], rec = best_time(lambda: dvc_hash(root, state_dir=None), args.repeat)
    md5s.add(rec["md5"])
    cold = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as state:
            start = time.perf_counter()
            md5s.add(dvc_hash(root, state_dir=state)["md5"])
            cold.append(time.perf_counter() - start)
    results["dvc_hash_cold_state"] = min(cold)
    with tempfile.TemporaryDirectory() as state:
        dvc_hash(root, state_dir=state)
        results["dvc_hash_warm_state"], rec = best_time(lambda: dvc_hash(root, state_dir=state), args.repeat)
        md5s.add(rec["md5"])
        extra = {}
        flickr, imagenet = root / "flickr_demo", root / "imagenet_demo"
        if flickr.is_dir() and imagenet.is_dir():
            from vlalign.data.formats import load_corpus, load_imagefolder, load_lines

            manifest = load_corpus([{"json": flickr / "dataset_demo.json", "image_root": flickr / "images", "lang": "en"}])
            images, _ = load_imagefolder(imagenet / "val", imagenet / "wnids.txt")
            names, templates = load_lines(imagenet / "classnames_en.txt"), load_lines(imagenet / "templates_en.txt")
            extra["retrieval_identity_test_split"], _ = best_time(
                lambda: retrieval_identity(manifest, "test", "en", "demo-flickr", state_dir=state), args.repeat)
            extra["zero_shot_identity"], _ = best_time(
                lambda: zero_shot_identity(images, names, templates, "demo-imagenet", "en", state_dir=state), args.repeat)
            extra["n_test_images"] = int(manifest[manifest["split"] == "test"]["image_id"].nunique())
            extra["n_zero_shot_images"] = len(images)
    report = {
        "root": str(root), "files": files, "bytes": size, "md5": sorted(md5s), "seconds": results,
        "ratio_to_md5_loop": {k: v / results["md5_loop"] for k, v in results.items()},
        "identity_seconds": extra, "cpu_count": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if len(md5s) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
