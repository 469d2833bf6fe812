"""Training data for the loop: streamed tar shards (the default, any corpus size) or an in-RAM cache (tiny corpora).

Both give the loop the same three things: how many batches this rank gets in an epoch, the batches from a given
position on (for exact mid-epoch resume), and a fingerprint of what is trained on. Per-sample randomness (which
caption, which augmentation) comes from a generator seeded by ``(seed, epoch, sample)``, so a sample does not depend
on worker count, visiting order or global RNG state.
"""

from __future__ import annotations

import hashlib
import io
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from vlalign.data.datasets import ImageTextDataset, collate_pairs
from vlalign.data.images import DEFAULT_MAX_PIXELS, decode_image
from vlalign.data.tokenizers import tokenize
from vlalign.data.transforms import ImageTransform
from vlalign.errors import ConfigError, DatasetFormatError


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one sample's random choices in one epoch."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0]))


class TrainData(ABC):
    """What the training loop reads: this rank's batches of ``per_rank_batch`` samples, epoch by epoch."""

    per_rank_batch: int

    @abstractmethod
    def steps_in_epoch(self, epoch: int) -> int:
        """Batches every rank yields in ``epoch`` (the same on all ranks)."""

    @abstractmethod
    def batches(self, epoch: int, start: int) -> Iterable[dict[str, Any]]:
        """This rank's batches of ``epoch`` from batch ``start`` on."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A sha256 of the training samples (what a stage's result depends on besides configs and init)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """A JSON-able description for logs and checkpoints."""


# ------------------------------------------------------------------------------------------------
# In-RAM cache
# ------------------------------------------------------------------------------------------------


def manifest_fingerprint(rows: pd.DataFrame) -> str:
    """sha256 of the training rows that matter (ids, files, captions, languages), order-sensitive."""
    rows = rows[["image_id", "image_path", "caption", "lang"]].reset_index(drop=True)
    return hashlib.sha256(pd.util.hash_pandas_object(rows, index=False).to_numpy().tobytes()).hexdigest()


class MemoryData(TrainData):
    """Every training image decoded once and cached as uint8; an epoch is a seeded permutation of the images,
    cut into global batches of which rank r takes rows ``[r*b, (r+1)*b)`` (the same global batch as one process)."""

    def __init__(self, dataset: ImageTextDataset, global_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, pin_memory: bool = False, fingerprint: str = "") -> None:
        self.dataset = dataset
        self.global_batch = global_batch
        self.per_rank_batch = global_batch // world_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._fingerprint = fingerprint
        if len(dataset) < global_batch:
            raise ConfigError(f"batch_size={global_batch} exceeds the {len(dataset)} training images; lower it.")

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self.dataset) // self.global_batch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's share of every global batch of ``epoch`` (a function of seed and epoch only)."""
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
        order = torch.randperm(len(self.dataset), generator=generator)  # (n_items,)
        n = self.steps_in_epoch(epoch)
        batches = order[: n * self.global_batch].view(n, self.world_size, self.per_rank_batch)  # (n, world, b)
        return batches[:, self.rank].tolist()

    def batches(self, epoch: int, start: int) -> Iterable[dict[str, Any]]:
        self.dataset.set_epoch(epoch)
        return DataLoader(self.dataset, batch_sampler=self.epoch_batches(epoch)[start:], collate_fn=collate_pairs,
                          num_workers=self.num_workers, pin_memory=self.pin_memory, generator=torch.Generator())

    def fingerprint(self) -> str:
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return {"kind": "memory", "images": len(self.dataset), "fingerprint": self._fingerprint}


# ------------------------------------------------------------------------------------------------
# Streamed shards
# ------------------------------------------------------------------------------------------------


class ShardSampleDecoder:
    """Turns one shard sample into a training item: decode (bounded), resize, augment, pick a caption, tokenize.

    Picklable, so DataLoader workers run it; randomness from :func:`sample_generator` keyed by the sample's ordinal.
    """

    def __init__(self, transform: ImageTransform, tokenizer: Any, context_length: int, caption_langs: Sequence[str],
                 seed: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.transform, self.tokenizer, self.context_length = transform, tokenizer, context_length
        self.caption_langs, self.seed, self.max_pixels = list(caption_langs), seed, max_pixels

    def captions(self, meta: dict[str, Any]) -> list[str]:
        """The sample's captions in the stage's languages, in language order."""
        found = meta.get("captions") or {}
        return [c for lang in self.caption_langs for c in found.get(lang, [])]

    def __call__(self, sample: Any, epoch: int) -> dict[str, torch.Tensor]:
        generator = sample_generator(self.seed, epoch, sample.ordinal)
        captions = self.captions(sample.meta)
        if not captions:
            raise DatasetFormatError(f"shard sample {sample.key} has no caption in {self.caption_langs}.")
        caption = captions[int(torch.randint(len(captions), (1,), generator=generator))]
        image = decode_image(io.BytesIO(sample.image), f"shard sample {sample.key}", self.max_pixels)
        pixels = self.transform.finish(self.transform.prepare(image), generator)  # (3, H, W)
        return {"pixels": pixels, "caption": caption, "index": torch.tensor(sample.ordinal)}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """A batch of decoded items: the captions tokenized in one tokenizer call (the per-call overhead of the
        tokenizer is most of its cost at caption length), then stacked as :func:`collate_pairs` does."""
        tokens = tokenize(self.tokenizer, [item["caption"] for item in items], self.context_length)  # (B, L) each
        return collate_pairs([{"pixels": item["pixels"], "input_ids": ids, "attention_mask": mask, "index": item["index"]}
                              for item, ids, mask in zip(items, tokens["input_ids"], tokens["attention_mask"])])


class ShardData(TrainData):
    """Tar shards streamed by worker processes (:class:`vlalign.data.shards.ShardStream`): shards are split over
    ranks then workers, each rank yields the same number of batches, and a position resumes exactly."""

    def __init__(self, index: Any, decoder: ShardSampleDecoder, per_rank_batch: int, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, shuffle_buffer: int = 1000, pin_memory: bool = False) -> None:
        from vlalign.data.shards import ShardStream

        self.index = index
        self.per_rank_batch = per_rank_batch
        self.stream = ShardStream(index, decoder, decoder.collate, per_rank_batch, seed=seed, rank=rank,
                                  world_size=world_size, num_workers=num_workers, shuffle_buffer=shuffle_buffer)
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def steps_in_epoch(self, epoch: int) -> int:
        self.stream.set_position(epoch, 0)
        return self.stream.steps()

    def batches(self, epoch: int, start: int) -> Iterable[dict[str, Any]]:
        self.stream.set_position(epoch, start)
        # its own generator: a DataLoader with workers otherwise draws its base seed from the global RNG, which would
        # shift the model's dropout stream between a straight run and a resumed one
        return DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                          generator=torch.Generator())

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.index.source_fingerprint.encode())
        for shard in self.index.shards:
            digest.update(shard.sha256.encode())
        return digest.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"kind": "shards", "location": self.index.location, "shards": len(self.index.shards),
                "samples": self.index.n_samples, "fingerprint": self.fingerprint()}


def memory_dataset_from_shards(index: Any, decoder: ShardSampleDecoder) -> tuple[ImageTextDataset, str]:
    """The in-RAM dataset of a shard index (``cache_in_memory``): every sample decoded once, captions tokenized."""
    from vlalign.data.shards import iter_shard

    rows = []
    images: dict[str, bytes] = {}
    for shard in index.shards:
        for sample in iter_shard(index.shard_url(shard)):
            images[sample.key] = sample.image
            for lang in decoder.caption_langs:
                for caption in (sample.meta.get("captions") or {}).get(lang, []):
                    rows.append({"image_id": sample.key, "image_path": sample.key, "image_root": "", "caption": caption,
                                 "lang": lang, "source": f"{shard.name}:{sample.key}"})
    manifest = pd.DataFrame(rows)
    if manifest.empty:
        raise DatasetFormatError(f"{index.location}: the shards hold no captions in {decoder.caption_langs}.")

    def load(key: str, _root: str) -> Any:
        return decode_image(io.BytesIO(images[key]), f"shard sample {key}", decoder.max_pixels)

    dataset = ImageTextDataset(manifest, decoder.transform, decoder.tokenizer, decoder.context_length,
                               decoder.caption_langs, seed=decoder.seed, image_loader=load)
    return dataset, manifest_fingerprint(manifest)
