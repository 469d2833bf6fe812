"""Training on streamed tar shards: a kill in the middle of a streamed epoch resumes bit-exactly (CPU), with
DataLoader worker processes; the in-RAM cache of the same shards trains too."""

from __future__ import annotations

import pytest
import torch

from vlalign.data.shards import ShardIndex, write_shards
from vlalign.models import get_model_config
from vlalign.train import CheckpointStore, StageConfig, load_checkpoint, train_stage

from shared import TINY, make_manifest


class CrashAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, step, metrics):
        if step == self.step:
            raise KeyboardInterrupt(f"killed at step {step}")

    def on_checkpoint(self, path, step):
        pass


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> ShardIndex:
    root = tmp_path_factory.mktemp("streamed")
    manifest = make_manifest(root / "images")
    write_shards(manifest, root / "shards", max_samples=4)  # 16 images in 4 shards
    return ShardIndex.load(str(root / "shards"))


def _stage(**overrides) -> StageConfig:
    fields = {"name": "s", "trainable": ["all"], "epochs": 2, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1,
              "checkpoint_every": 2, "log_every": 1, "caption_langs": ["en", "zh"], "seed": 0, "device": "cpu",
              "num_workers": 2, "shuffle_buffer": 3}
    return StageConfig(**{**fields, **overrides})


def test_kill_mid_streamed_epoch_resumes_bit_exactly(tmp_path, shards) -> None:
    cfg = get_model_config("tiny-vit-bert", **TINY)
    stage = _stage()
    reference = train_stage(cfg, stage, shards, None, CheckpointStore(tmp_path / "ref"))
    steps = reference["step"]
    assert steps == 8 and reference["data"]["kind"] == "shards"  # 2 workers x 2 shards x 4 samples / batch 4, 2 epochs

    store = CheckpointStore(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        train_stage(cfg, stage, shards, None, store, callbacks=[CrashAt(7)])  # mid-epoch 1, after step 6's checkpoint
    latest = load_checkpoint(store.latest())
    assert latest["step"] == 6 and latest["stream"] == {"epoch": 1, "batch": 2}
    resumed = train_stage(cfg, stage, shards, None, store)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in reference["history"]]
    for key, value in reference["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    # another worker count changes the stream: the checkpoint is not resumed, the stage trains afresh
    other = train_stage(cfg, _stage(num_workers=0), shards, None, store)
    assert other["history"][0]["step"] == 1


def test_in_memory_cache_of_the_shards_trains(tmp_path, shards) -> None:
    cfg = get_model_config("tiny-vit-bert", **TINY)
    final = train_stage(cfg, _stage(cache_in_memory=True, num_workers=0, epochs=1), shards, None,
                        CheckpointStore(tmp_path / "mem"))
    assert final["data"]["kind"] == "memory" and final["data"]["images"] == 16 and final["step"] == 4
