"""ALBEF under torch.distributed (2 gloo ranks): the fusion model trains in DDP with every term (the objective runs
the fusion layers, ITM and MLM heads and decoder outside the wrapped forward), and the queue takes the momentum
features gathered from every rank, so both ranks hold the queue one process would hold for the global batch."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlalign.distributed.context import DistContext
from vlalign.models import get_model_config
from vlalign.train import CheckpointStore, StageConfig, train_stage

from shared import TINY, make_manifest

pytestmark = pytest.mark.distributed
WORLD = 2


def _cfg():
    return get_model_config("tiny-vit-bert", **{**TINY, "text.dropout": 0.0, "arch": "fusion",
                                                "arch_options": {"fusion_layers": 1, "decoder_layers": 1}})


def _stage(max_steps: int) -> StageConfig:
    return StageConfig(name="albef", trainable=["all"], max_steps=max_steps, batch_size=8, lr=1e-3, warmup_steps=1,
                       checkpoint_every=0, log_every=1, caption_langs=["en"], seed=0, device="cpu", objective="albef",
                       objective_options={"queue_size": 16, "lm_weight": 1.0})


def _worker(rank: int, init_file: str, manifest_path: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        ctx = DistContext(rank, WORLD, rank, "gloo")
        manifest = pd.read_parquet(manifest_path)
        final = train_stage(_cfg(), _stage(2), manifest, None, CheckpointStore(Path(out_dir) / f"unused{rank}"), dist=ctx)
        torch.save({"objective": final["objective"], "history": final["history"], "model": final["model"]}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_queue_gathers_every_rank_and_ddp_trains_all_terms(tmp_path: Path) -> None:
    manifest = make_manifest(tmp_path / "images")
    manifest_path = tmp_path / "manifest.parquet"
    manifest.to_parquet(manifest_path)
    single = train_stage(_cfg(), _stage(1), manifest, None, CheckpointStore(tmp_path / "single"))
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(manifest_path), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for key, value in ranks[0]["objective"].items():  # the same queue, pointer and teacher on every rank
        assert torch.equal(value, ranks[1]["objective"][key]), key
    objective = ranks[0]["objective"]
    assert int(objective["queue_filled"]) == 16 and int(objective["queue_ptr"]) == 0  # 2 steps x global batch 8
    # step 1's momentum features of the whole global batch, in the order one process sees it
    assert torch.equal(objective["id_queue"][:8], single["objective"]["id_queue"][:8])
    assert sorted(objective["id_queue"].tolist()) == list(range(16))  # both steps: the epoch's 16 images, once each
    for name in ("image_queue", "text_queue"):
        assert torch.allclose(objective[name][:8], single["objective"][name][:8], atol=1e-5), name
    assert {"itc", "itm", "mlm", "lm"} <= set(ranks[0]["history"][-1])
    for key, value in ranks[0]["model"].items():  # DDP averaged the gradients of every head the objective ran
        assert torch.allclose(value, ranks[1]["model"][key], atol=1e-6), key
