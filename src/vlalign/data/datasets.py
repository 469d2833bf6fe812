"""Torch dataset over a manifest (INTERFACES §1) for contrastive training.

Every unique image is decoded and resized once and cached as uint8; every caption is tokenised once.
An epoch visits each image once with one of its captions (in ``caption_langs``) drawn at random. All
randomness (caption choice, augmentation) comes from a generator seeded by (seed, epoch, index), so
a sample does not depend on worker count, visiting order or global RNG state, which makes resuming
exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from vlalign.data.images import ImageAccessError, decode_roots, open_image
from vlalign.data.tokenizers import tokenize
from vlalign.data.transforms import ImageTransform
from vlalign.errors import DatasetFormatError

REQUIRED_COLUMNS = ("image_id", "image_path", "image_root", "caption", "lang")


class ImageTextDataset(Dataset):
    """One item per unique image: ``{"pixels" (3,H,W), "input_ids" (L,), "attention_mask" (L,), "index" ()}``."""

    def __init__(
        self,
        manifest: pd.DataFrame,
        transform: ImageTransform,
        tokenizer: PreTrainedTokenizerBase,
        context_length: int,
        caption_langs: Sequence[str],
        seed: int = 0,
        image_loader: Callable[[str, str], Image.Image] | None = None,
    ) -> None:
        """``image_loader(image_path, image_root)`` returns a loaded PIL image; by default the file is read with
        :func:`vlalign.data.images.open_image` inside the row's allowed roots."""
        missing = [c for c in REQUIRED_COLUMNS if c not in manifest.columns]
        if missing:
            raise DatasetFormatError(f"manifest lacks column(s) {missing}; expected the columns of INTERFACES §1.")
        rows = manifest[manifest["lang"].isin(list(caption_langs))].reset_index(drop=True)
        if rows.empty:
            raise DatasetFormatError(
                f"the manifest has no captions in languages {list(caption_langs)} (it has "
                f"{sorted(manifest['lang'].unique())}); change the stage's caption_langs."
            )
        self.transform = transform
        self.image_loader = image_loader or (lambda path, root: open_image(path, decode_roots(root)))
        self.seed = seed
        self.epoch = 0
        first = rows.drop_duplicates("image_id")  # one row per image, first-seen order
        groups = rows.groupby("image_id", sort=False).indices  # image_id -> row positions
        self.image_ids = first["image_id"].tolist()
        self.caption_rows = [np.asarray(groups[i]) for i in self.image_ids]  # per image: its caption row positions
        sources = first["source"] if "source" in first.columns else first["image_path"]
        self.pixels = torch.stack(
            [self._decode(path, root, source) for path, root, source in zip(first["image_path"], first["image_root"], sources)]
        )  # (N, 3, H, W) uint8
        tokens = tokenize(tokenizer, rows["caption"].tolist(), context_length)
        self.input_ids = tokens["input_ids"]  # (R, L)
        self.attention_mask = tokens["attention_mask"]  # (R, L)

    def _decode(self, path: str, root: str, source: str) -> torch.Tensor:
        """Decode and resize one (contained) image to (3, H, W) uint8, naming the manifest row on failure."""
        try:
            return self.transform.prepare(self.image_loader(path, root))
        except ImageAccessError as exc:
            raise DatasetFormatError(f"{source}: {exc} Fix the file or quarantine the row before training.") from exc

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose captions and augmentations ``__getitem__`` draws."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        candidates = self.caption_rows[index]
        row = int(candidates[int(torch.randint(len(candidates), (1,), generator=generator))])
        return {
            "pixels": self.transform.finish(self.pixels[index], generator),  # (3, H, W)
            "input_ids": self.input_ids[row],  # (L,)
            "attention_mask": self.attention_mask[row],  # (L,)
            "index": torch.tensor(index),  # ()
        }


def collate_pairs(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items into a batch and drop the padding columns no caption in the batch uses."""
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
    length = max(int(batch["attention_mask"].sum(dim=1).max()), 1)
    batch["input_ids"] = batch["input_ids"][:, :length]  # (B, L')
    batch["attention_mask"] = batch["attention_mask"][:, :length]  # (B, L')
    return batch
