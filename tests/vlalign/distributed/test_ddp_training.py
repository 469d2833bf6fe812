"""Data-parallel training: 2 gloo processes equal 1 process on the same global batch; a dead rank fails the job
with its rank named, and re-running resumes from the last checkpoint.

Two multi-process runs in all (about 10 s each on 2 cores): one ``mp.spawn`` of the training loop, and torchrun
running ``vlalign train`` (the very command a pod runs) twice: once with a rank that crashes, once resumed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlalign.distributed.context import DistContext
from vlalign.models import get_model_config
from vlalign.train import CheckpointStore, StageConfig, load_checkpoint, train_stage
from vlalign.train.spec import TrainSpec

from shared import TINY, make_manifest

pytestmark = pytest.mark.distributed
WORLD = 2


def _stage(**overrides) -> StageConfig:
    fields = {"name": "ddp", "trainable": ["all"], "max_steps": 3, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1,
              "checkpoint_every": 0, "log_every": 1, "caption_langs": ["en"], "seed": 0, "device": "cpu"}
    return StageConfig(**{**fields, **overrides})


def _cfg():
    return get_model_config("tiny-vit-bert", **{**TINY, "text.dropout": 0.0})


def first_step_grads(manifest: pd.DataFrame, options: dict, ctx: DistContext) -> dict[str, torch.Tensor]:
    """The parameter gradients of the first optimizer step (after DDP's averaging when distributed)."""
    from vlalign.models import build_model
    from vlalign.objectives import ObjectiveContext, build_objective
    from vlalign.train.loop import build_train_data, train_step
    from vlalign.train.runtime import Runtime

    stage = _stage(objective_options=options)
    torch.manual_seed(0)
    model = build_model(_cfg())
    runtime = Runtime.create("cpu", "fp32", ctx)
    batch = next(iter(build_train_data(manifest, _cfg(), stage, ctx, runtime).batches(0, 0)))
    objective = build_objective("clip", options, ObjectiveContext(dist=ctx, model=model))
    wrapped = runtime.wrap(model)
    model.train()
    train_step(wrapped, objective, runtime, batch, 1)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


MODES = {"local": {}, "global": {"local_loss": False}, "no_grad_gather": {"local_loss": False, "gather_with_grad": False}}


def _worker(rank: int, init_file: str, manifest_path: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        ctx = DistContext(rank, WORLD, rank, "gloo")
        manifest = pd.read_parquet(manifest_path)
        grads = {name: first_step_grads(manifest, options, ctx) for name, options in MODES.items()}
        final = train_stage(_cfg(), _stage(), manifest, None, CheckpointStore(Path(out_dir) / "local"), dist=ctx)
        if rank == 0:
            torch.save({"grads": grads, "model": final["model"], "losses": [h["loss"] for h in final["history"]]},
                       Path(out_dir) / "ranks.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_and_the_gradient_pitfall_shows(tmp_path: Path) -> None:
    manifest = make_manifest(tmp_path / "images")
    manifest_path = tmp_path / "manifest.parquet"
    manifest.to_parquet(manifest_path)
    single = train_stage(_cfg(), _stage(), manifest, None, CheckpointStore(tmp_path / "single"))
    single_grads = first_step_grads(manifest, {}, DistContext())

    mp.spawn(_worker, args=(str(tmp_path / "init"), str(manifest_path), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = torch.load(tmp_path / "ranks.pt", weights_only=True)
    for name in ("local", "global"):  # the same loss and gradients as one process on the global batch
        for key, grad in single_grads.items():
            assert torch.allclose(ranks["grads"][name][key], grad, atol=1e-6, rtol=1e-4), (name, key)
    # the known pitfall: a global loss over features gathered without gradient gives exactly half the towers'
    # gradient (the logit scale's is whole), so the comparison above would fail on it
    wrong = ranks["grads"]["no_grad_gather"]
    assert torch.allclose(wrong["image_proj.weight"], 0.5 * single_grads["image_proj.weight"], atol=1e-7, rtol=1e-4)
    assert not torch.allclose(wrong["image_proj.weight"], single_grads["image_proj.weight"], atol=1e-6)
    assert torch.allclose(wrong["logit_scale"], single_grads["logit_scale"], atol=1e-6)
    # after several optimizer steps: the same losses and weights (fp32)
    assert ranks["losses"] == pytest.approx([h["loss"] for h in single["history"]], abs=1e-5)
    for key, value in single["model"].items():
        assert torch.allclose(ranks["model"][key], value, atol=2e-5), key
    # rank 0 alone wrote the checkpoints: one final.pt, no per-rank files
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == ["checkpoints", "final.pt"]


CRASHING_RUN = textwrap.dedent(
    """
    import os, sys
    from vlalign.train.run import run_stage
    from vlalign.train.spec import TrainSpec

    class CrashRank1:
        def on_step(self, step, metrics):
            pass
        def on_checkpoint(self, path, step):
            pass

    class Crash:  # rank 1 dies at step 3 (after the step-2 checkpoint)
        def __init__(self):
            import vlalign.train.loop as loop
            original = loop.train_step
            def step(*args, **kwargs):
                Crash.calls = getattr(Crash, "calls", 0) + 1
                if os.environ["RANK"] == "1" and Crash.calls == 3:
                    raise RuntimeError("simulated failure of this rank")
                return original(*args, **kwargs)
            loop.train_step = step

    Crash()
    run_stage(TrainSpec.load(sys.argv[1]))
    """
)


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--master-port",
               str(29500 + os.getpid() % 1000), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_dead_rank_fails_the_job_naming_it_and_a_rerun_resumes(tmp_path: Path) -> None:
    manifest = make_manifest(tmp_path / "images")
    manifest.to_parquet(tmp_path / "manifest.parquet")
    stage = _stage(max_steps=4, checkpoint_every=2)
    reference = train_stage(_cfg(), stage, manifest, None, CheckpointStore(tmp_path / "single"))
    spec = TrainSpec(model=_cfg().to_dict(), stage=stage.to_dict(), data=str(tmp_path / "manifest.parquet"),
                     out_dir=str(tmp_path / "stage"))
    spec_path = spec.save(tmp_path / "spec.json")
    (tmp_path / "crash.py").write_text(CRASHING_RUN, encoding="utf-8")

    failed = _torchrun([str(tmp_path / "crash.py"), str(spec_path)], tmp_path)
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0
    assert "rank 1/2 failed: RuntimeError: simulated failure of this rank" in output
    assert "rank       : 1" in output or "rank: 1" in output  # torchrun's own summary names it too
    latest = load_checkpoint(CheckpointStore(tmp_path / "stage").latest())
    assert (latest["step"], latest["completed"]) == (2, False)

    resumed = _torchrun(["-m", "vlalign", "train", "--spec", str(spec_path)], tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming stage 'ddp'" in resumed.stdout + resumed.stderr
    final = load_checkpoint(tmp_path / "stage" / "final.pt")
    assert final["world_size"] == WORLD and final["step"] == 4
    for key, value in reference["model"].items():
        assert torch.allclose(final["model"][key], value, atol=2e-5), key
    assert json.loads((tmp_path / "stage" / "spec.json").read_text())["data"].endswith("manifest.parquet")
