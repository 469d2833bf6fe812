"""Tests of the tar shards (vlalign.data.shards): deterministic writing, rank/worker coverage, exact resume."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from shared import png_bomb
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlalign.data import shards as sh
from vlalign.data.formats import MANIFEST_COLUMNS
from vlalign.data.images import decode_image, encode_roots, resolve_roots
from vlalign.errors import ConfigError, DatasetFormatError

N_TRAIN, N_VAL = 36, 6
SEED = 7


def _colour(i: int) -> tuple[int, int, int]:
    return ((37 * i) % 256, (91 * i + 40) % 256, (53 * i + 120) % 256)


def _manifest(image_dir: Path) -> pd.DataFrame:
    """A corpus as load_corpus gives it: English rows of every image first, then Chinese rows of every other one.

    Train images have 1-3 English captions; a few have an upper-case suffix (.PNG) and one is a JPEG.
    """
    image_dir.mkdir(parents=True, exist_ok=True)
    roots = encode_roots(resolve_roots([image_dir]))
    en, zh = [], []
    for i in range(N_TRAIN + N_VAL):
        split = "train" if i < N_TRAIN else "val"
        suffix = ".jpg" if i == 5 else ".PNG" if i % 7 == 3 else ".png"
        path = image_dir / f"{i:04d}{suffix}"
        Image.new("RGB", (8, 8), _colour(i)).save(path, format="JPEG" if suffix == ".jpg" else "PNG")
        common = {"image_id": f"img{i}", "image_path": str(path), "split": split, "image_root": roots,
                  "load_error": None}
        for k in range(1 + i % 3):
            en.append({**common, "caption": f"image {i} caption {k}", "caption_id": f"en:{i * 10 + k}",
                       "lang": "en", "source": f"dataset.json:images[{i}].sentences[{k}]",
                       "entry": f"dataset.json:images[{i}]"})
        if i % 2 == 0:
            zh.append({**common, "caption": f"第{i}张图片", "caption_id": f"zh:{i}", "lang": "zh",
                       "source": f"dataset_zh.json:images[{i}].sentences[0]", "entry": f"dataset_zh.json:images[{i}]"})
    return pd.DataFrame(en + zh, columns=list(MANIFEST_COLUMNS))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[pd.DataFrame, Path]:
    root = tmp_path_factory.mktemp("corpus")
    return _manifest(root / "images"), root


@pytest.fixture(scope="module")
def written(corpus, tmp_path_factory) -> sh.ShardIndex:
    manifest, _ = corpus
    return sh.write_shards(manifest, tmp_path_factory.mktemp("shards") / "train", max_samples=4, seed=3)


def _with_path(manifest: pd.DataFrame, image_id: str, path: Path | str) -> pd.DataFrame:
    """The manifest with every row of ``image_id`` pointing at ``path``."""
    changed = manifest.copy()
    changed.loc[changed["image_id"] == image_id, "image_path"] = str(path)
    return changed


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _all_samples(index: sh.ShardIndex) -> list[sh.ShardSample]:
    starts = index.shard_starts()
    return [s for i, shard in enumerate(index.shards)
            for s in sh.iter_shard(index.shard_url(shard), int(starts[i]), shard.n_samples)]


def sample_fn(sample: sh.ShardSample, epoch: int) -> dict[str, torch.Tensor]:
    """Decode, augment with noise and pick a caption, all seeded by (SEED, epoch, ordinal) (module level: picklable)."""
    image = decode_image(io.BytesIO(sample.image), f"sample {sample.key}").convert("RGB")
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float()  # (3, 8, 8)
    seed = int(np.random.SeedSequence([SEED, epoch, sample.ordinal]).generate_state(1)[0])
    generator = torch.Generator().manual_seed(seed)
    captions = sample.meta["captions"]["en"]
    pick = int(torch.randint(len(captions), (1,), generator=generator))
    return {"pixels": pixels + torch.randn(pixels.shape, generator=generator),  # (3, 8, 8)
            "caption": torch.tensor(pick), "ordinal": torch.tensor(sample.ordinal)}


def ordinal_fn(sample: sh.ShardSample, epoch: int) -> dict[str, torch.Tensor]:
    """No decoding: only the ordinal (for coverage tests)."""
    return {"ordinal": torch.tensor(sample.ordinal)}


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def _run(stream: sh.ShardStream, loader_workers: int | None = None) -> list[dict[str, torch.Tensor]]:
    workers = stream.num_workers if loader_workers is None else loader_workers
    return list(DataLoader(stream, batch_size=None, num_workers=workers))


# --------------------------------------------------------------------------------------------------- writing


def test_writing_is_deterministic_bounded_and_content_addressed(corpus, written, tmp_path):
    manifest, _ = corpus
    folder = Path(written.location)
    again = sh.write_shards(manifest, tmp_path / "elsewhere", max_samples=4, seed=3)
    assert _files(tmp_path / "elsewhere") == _files(folder)  # byte-identical shards and index, another folder
    assert again == written and again.to_json() == written.to_json()
    assert sh.ShardIndex.load(folder) == written == sh.ShardIndex.load(folder / "shards.json")
    assert written.n_samples == N_TRAIN and sum(s.n_samples for s in written.shards) == N_TRAIN
    assert len(written.shards) == 9 and all(s.n_samples <= 4 for s in written.shards)
    assert written.langs == ["en", "zh"] and written.split == "train" and written.format == sh.SHARD_FORMAT
    for k, shard in enumerate(written.shards):
        data = (folder / shard.name).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        assert shard.name == f"train-{k:05d}-{sha[:16]}.tar" and shard.sha256 == sha and shard.n_bytes == len(data)
        with tarfile.open(folder / shard.name) as archive:
            members = archive.getmembers()
        names = [m.name for m in members]
        assert names == sorted(names) and len(names) == 2 * shard.n_samples
        assert all((m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644) for m in members)
    different_seed = sh.write_shards(manifest, tmp_path / "seed4", max_samples=4, seed=4)
    assert [s.name for s in different_seed.shards] != [s.name for s in written.shards]


def test_max_bytes_closes_a_shard_before_it_would_pass_the_bound(corpus, tmp_path):
    manifest, _ = corpus
    max_bytes = 4 * 10240
    index = sh.write_shards(manifest, tmp_path / "bytes", max_samples=1000, max_bytes=max_bytes)
    folder = Path(index.location)
    assert len(index.shards) >= 2 and all(s.n_bytes <= max_bytes for s in index.shards)
    for shard, following in zip(index.shards, index.shards[1:]):  # each closed shard could not take one more sample
        with tarfile.open(folder / shard.name) as archive:
            content = sum(512 + -(-m.size // 512) * 512 for m in archive.getmembers())
        with tarfile.open(folder / following.name) as archive:
            first = archive.getmembers()[:2]
        extra = sum(512 + -(-m.size // 512) * 512 for m in first)
        grown = content + extra + 1024
        assert grown + (-grown % 10240) > max_bytes


def test_rerun_with_the_same_input_writes_nothing(corpus, written):
    manifest, _ = corpus
    folder = Path(written.location)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}
    again = sh.write_shards(manifest, folder, max_samples=4, seed=3)
    assert again == written
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()} == before


def test_a_new_index_removes_the_stale_shards_after_it_is_in_place(corpus, tmp_path):
    manifest, _ = corpus
    folder = tmp_path / "train"
    old = sh.write_shards(manifest, folder, max_samples=4)
    (folder / "train-00099-0123456789abcdef.tar").write_bytes(b"orphan of a killed run")
    (folder / ".train-00000-0123456789abcdef.tar.abc.part").write_bytes(b"temporary file of a killed run")
    (folder / "notes.txt").write_text("not ours")
    new = sh.write_shards(manifest, folder, max_samples=6)
    assert not {s.name for s in old.shards} & {s.name for s in new.shards}
    expected = [s.name for s in new.shards] + ["notes.txt", "shards.json"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)
    assert sh.verify_shards(sh.ShardIndex.load(folder)) == []


def test_every_clean_image_of_the_split_once_with_all_its_captions(corpus, written):
    manifest, _ = corpus
    samples = _all_samples(written)
    assert [s.ordinal for s in samples] == list(range(N_TRAIN))
    assert [s.key for s in samples] == [f"{i:010d}" for i in range(N_TRAIN)]
    train = manifest[manifest["split"] == "train"]
    assert sorted(s.meta["image_id"] for s in samples) == sorted(train["image_id"].unique())
    ids = [s.meta["image_id"] for s in samples]
    assert ids != sorted(ids) and ids != sorted(ids, key=lambda t: int(t[3:]))  # shuffled before sharding
    for sample in samples:
        rows = train[train["image_id"] == sample.meta["image_id"]]
        path = rows["image_path"].iloc[0]
        assert sample.image == Path(path).read_bytes()
        assert sample.image_ext == Path(path).suffix.lower().lstrip(".")
        expected = {lang: group["caption"].tolist() for lang, group in rows.groupby("lang")}
        assert sample.meta["captions"] == expected
        assert sample.meta["caption_ids"] == {lang: g["caption_id"].tolist() for lang, g in rows.groupby("lang")}
        assert sample.meta["source"].startswith("dataset.json:images[")
    assert {s.image_ext for s in samples} == {"png", "jpg"}


def test_source_fingerprint_follows_the_rows_not_their_image_order(corpus, written, tmp_path):
    manifest, _ = corpus
    reordered = manifest.sort_values("image_id", ascending=False, kind="stable")  # captions keep their order
    index = sh.write_shards(reordered, tmp_path / "reordered", max_samples=4, seed=3)
    assert index.source_fingerprint == written.source_fingerprint and index == written
    changed = manifest.copy()
    changed.loc[0, "caption"] = "a different caption"
    assert sh.write_shards(changed, tmp_path / "changed", max_samples=4, seed=3).source_fingerprint != (
        written.source_fingerprint)


def test_bad_rows_are_refused_with_the_row_named(corpus, tmp_path):
    manifest, root = corpus
    outside = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(outside)
    escaping = _with_path(manifest, "img2", root / "images" / ".." / ".." / outside.parent.name / "secret.png")
    with pytest.raises(DatasetFormatError, match=r"dataset.json:images\[2\].* outside the image root"):
        sh.write_shards(escaping, tmp_path / "out1")
    link = root / "images" / "link.png"
    link.symlink_to(outside)
    try:
        with pytest.raises(DatasetFormatError, match=r"images\[2\].*resolves to .*secret.png"):
            sh.write_shards(_with_path(manifest, "img2", link), tmp_path / "out2")
    finally:
        link.unlink()
    quarantined = manifest.copy()
    quarantined.loc[4, "load_error"] = "images[4].filename is missing"
    with pytest.raises(DatasetFormatError, match="carry a load_error .*clean manifest"):
        sh.write_shards(quarantined, tmp_path / "out3")
    with pytest.raises(DatasetFormatError, match="lacks column"):
        sh.write_shards(manifest.drop(columns=["image_root"]), tmp_path / "out4")
    with pytest.raises(DatasetFormatError, match="no rows of split 'test'"):
        sh.write_shards(manifest, tmp_path / "out5", split="test")
    big = root / "images" / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)).save(big)
    with pytest.raises(ConfigError, match="more than max_bytes=40,960; raise max_bytes"):
        sh.write_shards(_with_path(manifest, "img0", big), tmp_path / "out6", max_bytes=40960)
    with pytest.raises(DatasetFormatError, match="8x8 pixels, more than max_image_pixels=50"):
        sh.write_shards(manifest, tmp_path / "out7", max_image_pixels=50)
    two_files = manifest.copy()
    two_files.loc[2, "image_path"] = str(big)  # img1 has rows 1 and 2
    with pytest.raises(DatasetFormatError, match="image_id 'img1' names 2 image files"):
        sh.write_shards(two_files, tmp_path / "out8")
    bomb = png_bomb(root / "images" / "bomb.png")  # Image.open would raise DecompressionBombError first
    try:
        with pytest.raises(DatasetFormatError, match="bomb.png is 60000x60000 pixels, more than max_image_pixels=64,0"):
            sh.write_shards(_with_path(manifest, "img0", bomb), tmp_path / "out9")
    finally:
        bomb.unlink()
    assert not any((tmp_path / f"out{k}" / "shards.json").exists() for k in range(1, 10))


def test_damaged_index_or_shard_is_a_clear_error(written, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(written.location, folder)
    data = json.loads((folder / "shards.json").read_text())
    data["shards"][0]["name"] = "../../etc/passwd"
    (folder / "bad.json").write_text(json.dumps(data))
    with pytest.raises(DatasetFormatError, match=r"shards\[0\]"):
        sh.ShardIndex.load(folder / "bad.json")
    with pytest.raises(DatasetFormatError, match="shard index not found"):
        sh.ShardIndex.load(tmp_path / "nowhere")
    shard = folder / written.shards[1].name
    shard.write_bytes(shard.read_bytes()[:700])  # truncated inside the first member's data
    index = sh.ShardIndex.load(folder)
    with pytest.raises(DatasetFormatError, match="truncated or corrupt"):
        list(sh.iter_shard(index.shard_url(index.shards[1])))
    assert len(sh.verify_shards(index)) == 1
    with pytest.raises(DatasetFormatError, match="does not match"):
        list(sh.iter_shard(index.shard_url(index.shards[0]), first_ordinal=1))


# --------------------------------------------------------------------------------------------------- planning


LAYOUTS = [(1, 0), (1, 1), (1, 3), (2, 2), (3, 2), (4, 1), (2, 5)]  # (world_size, num_workers); 9 shards


@pytest.mark.parametrize("world_size,num_workers", LAYOUTS)
def test_plan_deals_every_shard_exactly_once(written, world_size, num_workers):
    sizes = [s.n_samples for s in written.shards]
    plans = []
    for epoch in range(3):
        plan = sh.plan_epoch(written, epoch, SEED, world_size, num_workers)
        assert len(plan) == world_size and all(len(rank) == max(1, num_workers) for rank in plan)
        dealt = [s for rank in plan for worker in rank for s in worker]
        assert sorted(dealt) == list(range(len(written.shards)))  # no overlap, no gap
        totals = [sum(sizes[s] for worker in rank for s in worker) for rank in plan]
        assert max(totals) - min(totals) <= max(sizes)
        assert all(rank_shards for rank_shards in ([s for w in rank for s in w] for rank in plan))
        plans.append(plan)
    assert plans[0] != plans[1] or plans[1] != plans[2]  # re-dealt every epoch
    assert sh.plan_epoch(written, 1, SEED, world_size, num_workers) == plans[1]


def test_too_few_shards_or_samples_is_a_config_error(written):
    with pytest.raises(ConfigError, match="9 shard\\(s\\) for 10 ranks.*max_samples <="):
        sh.plan_epoch(written, 0, SEED, 10, 0)
    with pytest.raises(ConfigError, match="no full batch of 40"):
        sh.steps_in_epoch(written, 0, SEED, 1, 0, 40)
    plan = sh.plan_epoch(written, 0, SEED, 2, 5)  # 10 worker slots, 9 shards: one worker idles, allowed
    assert sum(1 for rank in plan for worker in rank if not worker) == 1


@pytest.mark.parametrize("world_size,num_workers,batch_size", [(1, 0, 5), (1, 3, 2), (2, 2, 3), (3, 2, 2),
                                                               (4, 1, 4), (2, 5, 2)])
def test_streams_of_all_ranks_cover_the_epoch_without_repeats(written, world_size, num_workers, batch_size):
    epoch = 2
    starts = written.shard_starts()
    plan = sh.plan_epoch(written, epoch, SEED, world_size, num_workers)
    owner = {o: (r, w) for r, rank in enumerate(plan) for w, worker in enumerate(rank)
             for s in worker for o in range(starts[s], starts[s + 1])}
    steps = sh.steps_in_epoch(written, epoch, SEED, world_size, num_workers, batch_size)
    full = sh.batches_per_worker(written, epoch, SEED, world_size, num_workers, batch_size)
    yielded: list[int] = []
    for rank in range(world_size):
        stream = sh.ShardStream(written, ordinal_fn, collate, batch_size, seed=SEED, rank=rank,
                                world_size=world_size, num_workers=num_workers, shuffle_buffer=6)
        stream.set_position(epoch, 0)
        batches = [b["ordinal"].tolist() for b in stream]  # main process: the DataLoader's worker interleaving
        assert len(batches) == steps == len(stream)  # every rank the same number of batches
        per_worker = Counter()
        for batch in batches:
            assert len(batch) == batch_size
            workers = {owner[o] for o in batch}
            assert len(workers) == 1 and workers.pop()[0] == rank  # a batch comes from one worker of this rank
            per_worker[owner[batch[0]][1]] += 1
        caps = sh.consumed_per_worker(full[rank], steps)
        assert [per_worker[w] for w in range(len(caps))] == caps
        yielded += [o for batch in batches for o in batch]
    assert len(yielded) == len(set(yielded)) == steps * batch_size * world_size  # never repeated
    left = Counter(owner[o] for o in set(range(written.n_samples)) - set(yielded))
    for (rank, w), n in left.items():  # left out: the worker's remainder, plus its batches past the rank's steps
        in_worker = sum(1 for key in owner.values() if key == (rank, w))
        caps = sh.consumed_per_worker(full[rank], steps)
        assert n == in_worker % batch_size + batch_size * (full[rank][w] - caps[w])
    assert written.n_samples - len(yielded) <= sh.dropped_bound(written, world_size, num_workers, batch_size)
    assert min(sum(rank) for rank in full) == steps


def test_consumed_per_worker_matches_a_round_robin_simulation():
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = rng.integers(0, 6, size=int(rng.integers(1, 5))).tolist()
        sequence, left = [], list(counts)
        while any(left):
            for w in range(len(left)):
                if left[w]:
                    sequence.append(w)
                    left[w] -= 1
        for k in range(len(sequence) + 1):
            assert sh.consumed_per_worker(counts, k) == [sequence[:k].count(w) for w in range(len(counts))]
            assert sh.next_worker(counts, k) == (sequence[k] if k < len(sequence) else 0)
    with pytest.raises(ConfigError):
        sh.consumed_per_worker([1, 2], 4)


class WorkerTagged(IterableDataset):
    """Worker w yields (w, 0), (w, 1), ... counts[w] items."""

    def __init__(self, counts: list[int]) -> None:
        self.counts = counts

    def __iter__(self):
        worker = get_worker_info().id
        for i in range(self.counts[worker]):
            yield torch.tensor([worker, i])


@pytest.mark.parametrize("counts,prefetch", [([3, 1], 2), ([1, 4], 2), ([0, 3], 1), ([5, 2], 4)])
def test_round_robin_claim_holds_for_a_real_dataloader(counts, prefetch):
    loader = DataLoader(WorkerTagged(counts), batch_size=None, num_workers=2, prefetch_factor=prefetch)
    got = [tuple(item.tolist()) for item in loader]
    assert sorted(got) == sorted((w, i) for w in range(2) for i in range(counts[w]))
    workers = [w for w, _ in got]
    for k in range(len(got) + 1):
        assert sh.consumed_per_worker(counts, k) == [workers[:k].count(w) for w in range(2)]


def test_buffer_order_is_a_bounded_permutation_that_depends_on_the_count_only(monkeypatch):
    monkeypatch.setattr(sh, "_DRAW_CHUNK", 4)  # several draw chunks
    for n, size in [(0, 5), (1, 5), (10, 1), (10, 0), (50, 7), (5, 50), (12, 4)]:
        order = sh.buffer_order(n, size, np.random.default_rng(1))
        assert sorted(order.tolist()) == list(range(n))
        assert all(order[p] < p + max(size, 1) for p in range(n))  # an item waits among at most `size` others
        if size <= 1:
            assert order.tolist() == list(range(n))
    again = sh.buffer_order(50, 7, np.random.default_rng(1))
    assert again.tolist() == sh.buffer_order(50, 7, np.random.default_rng(1)).tolist() != list(range(50))


# --------------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("num_workers,world_size,rank", [(0, 1, 0), (2, 2, 1)])
def test_resume_at_any_batch_gives_the_tail_of_the_epoch(written, num_workers, world_size, rank):
    def make() -> sh.ShardStream:
        return sh.ShardStream(written, sample_fn, collate, 2, seed=SEED, rank=rank, world_size=world_size,
                              num_workers=num_workers, shuffle_buffer=5)

    stream = make()
    stream.set_position(1, 0)
    full = _run(stream)
    steps = stream.steps()
    assert len(full) == steps >= 5
    predicted = sh.rank_batches(written, 1, SEED, rank, world_size, num_workers, 2, 5)
    assert [b["ordinal"].tolist() for b in full] == [p.tolist() for p in predicted]
    positions = range(steps + 1) if num_workers == 0 else [1, 2, 3, steps - 1, steps]
    for k in positions:
        resumed = make()  # a fresh process would build a new stream from the checkpoint's position
        resumed.set_position(1, k)
        assert len(resumed) == steps - k
        tail = _run(resumed)
        assert len(tail) == steps - k
        for got, want in zip(tail, full[k:]):
            assert got.keys() == want.keys() and all(torch.equal(got[key], want[key]) for key in got)
    other_epoch = make()
    other_epoch.set_position(2, 0)
    assert [b["ordinal"].tolist() for b in _run(other_epoch)][:3] != [b["ordinal"].tolist() for b in full][:3]


class CountingSampleFn:
    """sample_fn that counts its calls (main process only)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, sample: sh.ShardSample, epoch: int) -> dict[str, torch.Tensor]:
        self.calls += 1
        return sample_fn(sample, epoch)


def test_resume_decodes_nothing_it_skips_and_needs_only_the_shards_still_in_play(written, tmp_path):
    folder = tmp_path / "partial"
    shutil.copytree(written.location, folder)
    index = sh.ShardIndex.load(folder)
    stream = sh.ShardStream(index, sample_fn, collate, 3, seed=SEED, num_workers=2, shuffle_buffer=4)
    full = list(stream)
    k = len(full) - 2
    needed = {o for batch in sh.rank_batches(index, 0, SEED, 0, 1, 2, 3, 4, start_batch=k) for o in batch.tolist()}
    starts = index.shard_starts()
    unused = [s for i, s in enumerate(index.shards) if not needed & set(range(starts[i], starts[i + 1]))]
    assert unused  # late in the epoch most shards are done
    for shard in unused:
        (folder / shard.name).unlink()
    counting = CountingSampleFn()
    resumed = sh.ShardStream(index, counting, collate, 3, seed=SEED, num_workers=2, shuffle_buffer=4)
    resumed.set_position(0, k)
    tail = list(resumed)
    assert counting.calls == 2 * 3  # only the samples of the two remaining batches were decoded
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(tail, full[k:])) and len(tail) == 2


def test_positions_and_layouts_are_checked(written):
    stream = sh.ShardStream(written, ordinal_fn, collate, 2, seed=SEED, num_workers=2)
    with pytest.raises(ConfigError, match="start_batch=99"):
        stream.set_position(0, 99)
    saved = stream.layout()
    stream.check_layout(saved)
    other = sh.ShardStream(written, ordinal_fn, collate, 2, seed=SEED, num_workers=3)
    with pytest.raises(ConfigError, match="num_workers: saved 2, now 3"):
        other.check_layout(saved)
    with pytest.raises(ConfigError, match="DataLoader has num_workers=1"):
        _run(stream, loader_workers=1)


# --------------------------------------------------------------------------------------------------- storage


def test_fsspec_urls_give_the_same_stream(written):
    folder = Path(written.location)
    memory = fsspec.filesystem("memory")
    for path in folder.iterdir():  # object storage stand-in: the same files under memory://
        memory.pipe(f"/bucket/run/train/{path.name}", path.read_bytes())
    try:
        by_path = sh.ShardIndex.load(folder)
        by_file_url = sh.ShardIndex.load(f"file://{folder}/shards.json")
        by_memory = sh.ShardIndex.load("memory://bucket/run/train")
        assert by_path == by_file_url == by_memory
        assert by_memory.shard_url(by_memory.shards[0]) == f"memory://bucket/run/train/{written.shards[0].name}"
        assert by_file_url.location == f"file://{folder}"

        def batches(index: sh.ShardIndex, workers: int) -> list[list[int]]:
            stream = sh.ShardStream(index, sample_fn, collate, 3, seed=SEED, num_workers=workers, shuffle_buffer=4)
            return [b["ordinal"].tolist() + b["pixels"].flatten().tolist() for b in _run(stream)]

        reference = batches(by_path, 2)
        assert batches(by_file_url, 2) == reference
        assert batches(by_memory, 2) == reference  # forked workers see the in-memory store
        assert sh.verify_shards(by_memory) == []
    finally:
        memory.rm("/bucket", recursive=True)
    with pytest.raises(ConfigError, match="Install the fsspec backend"):
        sh.ShardIndex.load("nosuchscheme://bucket/train")


def test_webdataset_reads_our_shards(written):
    webdataset = pytest.importorskip("webdataset")
    urls = [written.shard_url(s) for s in written.shards]
    theirs = list(webdataset.WebDataset(urls, shardshuffle=False, empty_check=False))
    ours = _all_samples(written)
    assert [t["__key__"] for t in theirs] == [s.key for s in ours]
    for t, s in zip(theirs, ours):
        assert {k for k in t if not k.startswith("__")} == {s.image_ext, "json"}
        assert t[s.image_ext] == s.image and json.loads(t["json"]) == s.meta


def test_a_mixture_renumbers_and_repeats_the_samples_of_its_sources(written, tmp_path):
    out = sh.mix_shards([(written, 1), (written, 2)], tmp_path / "mix", max_samples=5)
    assert out.n_samples == 3 * written.n_samples and out.split == written.split and out.langs == written.langs
    mixed = [s for shard in out.shards for s in sh.iter_shard(out.shard_url(shard))]
    source = [s for shard in written.shards for s in sh.iter_shard(written.shard_url(shard))]
    assert [s.ordinal for s in mixed] == list(range(out.n_samples))  # keys count up through the new set
    assert [(s.image, s.meta) for s in mixed] == [(s.image, s.meta) for s in source] * 3
    assert sh.ShardIndex.load(tmp_path / "mix") == out  # written, content-addressed, loads back
    again = sh.mix_shards([(written, 1), (written, 2)], tmp_path / "mix", max_samples=5)
    assert again == out and again.source_fingerprint != sh.mix_shards([(written, 1)], tmp_path / "one").source_fingerprint
    with pytest.raises(ConfigError, match="integer weight >= 1"):
        sh.mix_shards([(written, 0)], tmp_path / "bad")

