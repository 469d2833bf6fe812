"""``vlalign train`` on streamed shards with 2 DataLoader workers, killed with SIGKILL (its whole process group) and
run again: the final weights equal an uninterrupted run's bit for bit, and no temporary file is left in the stage
folder.

One stage folder, killed twice: (a) at once after a checkpoint is written; (b) its re-run, between checkpoints, as
soon as a temporary file of a checkpoint being written shows (so often in the middle of that write, leaving the file
behind for the next run to remove), else after a few more checkpoints. Checkpoints are seen by polling the folder.
Every run is a fresh ``python -m vlalign train`` process with the same environment, so exact equality is right.
Four processes (uninterrupted, killed, killed, completed): about 36 s of CPU, mostly imports.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vlalign.cli import main as vlalign_main
from vlalign.models import get_model_config
from vlalign.train import CheckpointStore, StageConfig, load_checkpoint
from vlalign.train.spec import TrainSpec

from shared import TINY, make_manifest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads DataLoader workers from /proc")

# 16 images in 4 shards of 4; 2 workers x 2 shards x 4 images / batch 2 = 8 steps an epoch, 32 in all; checkpoints at
# steps 3, 6, 9, ...: most of them mid-epoch, so the resumed stream starts inside an epoch
STAGE = {"name": "killed", "trainable": ["all"], "epochs": 4, "batch_size": 2, "lr": 1e-3, "warmup_steps": 2,
         "checkpoint_every": 3, "log_every": 1, "caption_langs": ["en", "zh"], "seed": 0, "device": "cpu",
         "num_workers": 2, "shuffle_buffer": 3}
TOTAL_STEPS = 32
SRC = str(Path(__file__).parents[3] / "src")  # the vlalign these tests import, in the runs too
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)}
DEADLINE_S = 120
TEMPORARY = re.compile(r"^\.|\.tmp$")  # the atomic writes' temporary files: .final.pt.*.tmp, .step-*.tmp, .LATEST.*


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory) -> Path:
    """A train spec of the tiny model on shards written by `vlalign shard`."""
    root = tmp_path_factory.mktemp("killed")
    make_manifest(root / "images").to_parquet(root / "manifest.parquet")
    assert vlalign_main(["shard", str(root / "manifest.parquet"), "--out", str(root / "shards"),
                         "--max-samples", "4"]) == 0
    spec = TrainSpec(model=get_model_config("tiny-vit-bert", **TINY).to_dict(), stage=StageConfig(**STAGE).to_dict(),
                     data=str(root / "shards"), out_dir=str(root / "unused"))
    return spec.save(root / "spec.json")


def _start(spec_file: Path, out: Path) -> subprocess.Popen:
    """``vlalign train`` in a new session (its own process group), its output in ``out``.log."""
    log = open(f"{out}.log", "ab")  # a file, not a pipe: nobody reads while the test polls
    with log:
        return subprocess.Popen([sys.executable, "-m", "vlalign", "train", "--spec", str(spec_file), "--out", str(out)],
                                env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _output(out: Path) -> str:
    return Path(f"{out}.log").read_text(encoding="utf-8", errors="replace")


def _stop(proc: subprocess.Popen) -> None:
    """SIGKILL the run's process group (the training process and its DataLoader workers) and reap the process."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _run_to_completion(spec_file: Path, out: Path) -> dict:
    proc = _start(spec_file, out)
    try:
        assert proc.wait(timeout=DEADLINE_S) == 0, _output(out)
    finally:
        _stop(proc)
    return load_checkpoint(out / "final.pt")


def _latest_step(store: CheckpointStore) -> int:
    pointer = store.steps_dir / "LATEST"
    try:
        match = re.search(r"step-(\d+)\.pt", pointer.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return 0
    return int(match.group(1)) if match else 0


def _workers(pid: int) -> set[int]:
    """The DataLoader worker processes (named pt_data_worker by torch) that ``pid`` runs now (Linux /proc)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return set()
    found = set()
    for child in children:
        try:
            if Path(f"/proc/{child}/comm").read_text().strip() == "pt_data_worker":
                found.add(int(child))
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed and not yet reaped by its new parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill_when(proc: subprocess.Popen, out: Path, ready) -> tuple[int, set[int]]:
    """Poll the stage folder until ``ready(listing of checkpoints/, latest step)`` holds, then SIGKILL the process
    group; return the step of the checkpoint it left as the latest and the DataLoader worker pids seen while it ran."""
    store = CheckpointStore(out)
    workers: set[int] = set()
    start = time.monotonic()
    try:
        while True:
            assert proc.poll() is None, f"the run ended before it was killed:\n{_output(out)}"
            assert time.monotonic() - start < DEADLINE_S, f"no kill condition within {DEADLINE_S} s:\n{_output(out)}"
            workers |= _workers(proc.pid)
            try:
                names = os.listdir(store.steps_dir)
            except FileNotFoundError:
                names = []
            if ready(names, _latest_step(store)):
                break
            time.sleep(0.001)
    finally:
        _stop(proc)
    assert proc.returncode == -signal.SIGKILL
    return _latest_step(store), workers


def _resumed_at(out: Path) -> list[int]:
    """The steps the runs into ``out`` resumed from, as each logged it."""
    return [int(s) for s in re.findall(r"resuming stage 'killed' from \S+ at step (\d+)", _output(out))]


def _check_workers_died(workers: set[int]) -> None:
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert workers and not any(_alive(pid) for pid in workers), workers  # the workers ran and died with the group


def test_sigkilled_runs_rerun_to_the_uninterrupted_weights_leaving_no_temporary_file(tmp_path, spec_file) -> None:
    reference = _run_to_completion(spec_file, tmp_path / "reference")
    assert reference["step"] == TOTAL_STEPS and reference["data"]["kind"] == "shards"
    out = tmp_path / "killed"

    # (a) killed at once after step 6's checkpoint is written
    proc = _start(spec_file, out)
    killed_a, workers = _kill_when(proc, out, lambda names, latest: latest >= 6)
    _check_workers_died(workers)
    assert 6 <= killed_a < TOTAL_STEPS and _resumed_at(out) == []

    # (b) the re-run resumes, and is killed as soon as a temporary file of its own next checkpoint shows (maybe in the
    # middle of that write), else once it has written three checkpoints
    left_by_a = {p.name for p in out.rglob("*") if TEMPORARY.search(p.name)}

    def ready(names: list[str], latest: int) -> bool:
        return any(TEMPORARY.search(n) and n not in left_by_a for n in names) or latest >= killed_a + 9

    proc = _start(spec_file, out)
    killed_b, workers = _kill_when(proc, out, ready)
    _check_workers_died(workers)
    assert _resumed_at(out) == [killed_a] and killed_a <= killed_b < TOTAL_STEPS

    # the last re-run resumes too and ends with the uninterrupted run's losses and weights, bit for bit
    final = _run_to_completion(spec_file, out)
    assert _resumed_at(out) == [killed_a, killed_b], _output(out)
    assert final["step"] == TOTAL_STEPS and final["completed"]
    assert [h["loss"] for h in final["history"]] == [h["loss"] for h in reference["history"]]
    assert final["model"].keys() == reference["model"].keys()
    for key, value in reference["model"].items():
        assert torch.equal(final["model"][key], value), key
    left = [str(p.relative_to(out)) for p in out.rglob("*") if TEMPORARY.search(p.name)]
    assert left == [], f"temporary files left in the stage folder: {left}"
