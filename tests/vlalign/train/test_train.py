"""Training stages: determinism, exact resume, freezing, init from a previous stage, checkpoints, optimizer."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from vlalign.data.datasets import ImageTextDataset, collate_pairs
from vlalign.errors import CheckpointError, ConfigError
from vlalign.models import build_model, build_tokenizer_for, build_transform, get_model_config
from vlalign.train import CheckpointStore, StageConfig, load_checkpoint, model_from_checkpoint, save_checkpoint, train_stage
from vlalign.train.optim import WarmupCosine, build_optimizer, no_decay_names
from vlalign.train.spec import TrainSpec

from shared import TINY, make_manifest


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """16 train images (colour x shape x left/right) with 2 English and 1 Chinese caption, plus 2 test rows."""
    return make_manifest(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def model_cfg():
    return get_model_config("tiny-vit-bert", **TINY)


def _stage(**overrides) -> StageConfig:
    fields = {"name": "s", "trainable": ["all"], "epochs": 2, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2,
              "checkpoint_every": 0, "log_every": 1, "caption_langs": ["en", "zh"], "seed": 0}
    return StageConfig(**{**fields, **overrides})


class Recorder:
    """Collects callback calls; optionally raises at a given step to simulate a crash."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.steps: list[tuple[int, dict]] = []
        self.checkpoints: list[tuple[Path, int]] = []
        self.crash_at = crash_at

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.steps.append((step, metrics))
        if step == self.crash_at:
            raise KeyboardInterrupt(f"simulated crash at step {step}")

    def on_checkpoint(self, path: Path, step: int) -> None:
        self.checkpoints.append((path, step))


def test_dataset_pairs_each_image_with_one_of_its_captions(manifest, model_cfg) -> None:
    tokenizer = build_tokenizer_for(model_cfg)
    train = manifest[manifest["split"] == "train"].sample(frac=1.0, random_state=0)  # rows of an image not adjacent
    dataset = ImageTextDataset(train, build_transform(model_cfg, train=False), tokenizer, 16, ["en"], seed=0)
    assert len(dataset) == 16
    chosen = {}
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            item = dataset[index]
            image_id = dataset.image_ids[index]
            rows = train[train["image_id"] == image_id]
            ids = item["input_ids"][item["attention_mask"].bool()]
            caption = tokenizer.decode(ids, skip_special_tokens=True)
            assert caption in rows[rows["lang"] == "en"]["caption"].tolist()
            expected = build_transform(model_cfg, train=False)(Image.open(rows["image_path"].iloc[0]))
            assert torch.equal(item["pixels"], expected)
            chosen.setdefault(index, set()).add(caption)
    assert any(len(c) == 2 for c in chosen.values())  # captions are re-drawn per epoch
    dataset.set_epoch(1)
    assert torch.equal(dataset[3]["input_ids"], dataset[3]["input_ids"])
    batch = collate_pairs([dataset[i] for i in range(4)])
    assert batch["pixels"].shape == (4, 3, 32, 32)
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(dim=1).max()) < 16  # padding trimmed


def _losses(ckpt: dict) -> list[float]:
    return [h["loss"] for h in ckpt["history"]]


def test_same_seed_same_losses_other_seed_other_losses(tmp_path, manifest, model_cfg) -> None:
    a = train_stage(model_cfg, _stage(), manifest, None, CheckpointStore(tmp_path / "a"))
    b = train_stage(model_cfg, _stage(), manifest, None, CheckpointStore(tmp_path / "b"))
    c = train_stage(model_cfg, _stage(seed=1), manifest, None, CheckpointStore(tmp_path / "c"))
    assert len(_losses(a)) == 8  # 16 images / batch 4 = 4 steps per epoch, 2 epochs
    assert _losses(a) == _losses(b)
    assert _losses(a) != _losses(c)
    assert all(math.isfinite(x) for x in _losses(a))


def test_interrupted_run_resumes_to_identical_weights(tmp_path, manifest, model_cfg) -> None:
    stage = _stage(epochs=3, checkpoint_every=2)  # 12 steps; the crash at step 7 falls mid-epoch, after step 6's checkpoint
    reference = train_stage(model_cfg, stage, manifest, None, CheckpointStore(tmp_path / "ref"))

    store = CheckpointStore(tmp_path / "run")
    crashing = Recorder(crash_at=7)
    with pytest.raises(KeyboardInterrupt):
        train_stage(model_cfg, stage, manifest, None, store, callbacks=[crashing])
    latest = load_checkpoint(store.latest())
    assert (latest["step"], latest["completed"]) == (6, False)
    assert [s for _, s in crashing.checkpoints] == [2, 4, 6]

    resumed_cb = Recorder()
    resumed = train_stage(model_cfg, stage, manifest, None, store, callbacks=[resumed_cb])
    assert resumed_cb.steps[0][0] == 7  # continued, not restarted
    assert resumed["completed"] and resumed["step"] == 12
    assert _losses(resumed) == _losses(reference)
    for key, value in reference["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert sorted(p.name for p in store.steps_dir.glob("step-*.pt")) == ["step-00000008.pt", "step-00000010.pt"]



def test_the_next_run_removes_the_temporary_files_a_killed_write_left(tmp_path, manifest, model_cfg) -> None:
    stage = _stage(max_steps=4, checkpoint_every=2)
    store = CheckpointStore(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        train_stage(model_cfg, stage, manifest, None, store, callbacks=[Recorder(crash_at=3)])
    # what a SIGKILL in the middle of save_checkpoint or CheckpointStore.save leaves (their mkstemp names)
    stale = [store.steps_dir / ".step-00000004.pt.k1ll3d.tmp", store.steps_dir / ".LATEST.k1ll3d",
             store.directory / ".final.pt.k1ll3d.tmp"]
    kept = [store.directory / "notes.txt", store.steps_dir / "step-00000002.pt"]
    for path in [*stale, store.directory / "notes.txt"]:
        path.write_bytes(b"partial")
    resumed_cb = Recorder()
    final = train_stage(model_cfg, stage, manifest, None, store, callbacks=[resumed_cb])
    assert resumed_cb.steps[0][0] == 3 and final["completed"]  # resumed from step 2's checkpoint
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)

    spec = TrainSpec(model=model_cfg.to_dict(), stage=stage.to_dict(), data="unused", out_dir=str(store.directory))
    (store.directory / ".spec.json.k1ll3d").write_text("{", encoding="utf-8")
    spec.save(store.directory / "spec.json")
    assert sorted(p.name for p in store.directory.iterdir()) == ["checkpoints", "final.pt", "notes.txt", "spec.json"]

def test_stage1_trains_only_projections_and_stage2_starts_from_it(tmp_path, manifest, model_cfg) -> None:
    torch.manual_seed(0)
    initial = build_model(model_cfg).state_dict()  # train_stage seeds the same way before building
    lit = _stage(name="stage1", trainable=["image_proj", "text_proj", "logit_scale"], epochs=1)
    stage1 = train_stage(model_cfg, lit, manifest, None, CheckpointStore(tmp_path / "stage1"))
    for key, value in stage1["model"].items():
        frozen = key.startswith(("image_tower.", "text_tower."))
        assert torch.equal(value, initial[key]) == frozen, key

    only_scale = _stage(name="stage2", trainable=["logit_scale"], epochs=1, seed=5)
    stage2 = train_stage(model_cfg, only_scale, manifest, stage1, CheckpointStore(tmp_path / "stage2"))
    for key, value in stage2["model"].items():
        assert torch.equal(value, stage1["model"][key]) == (key != "logit_scale"), key


def test_checkpoints_describe_themselves(tmp_path, manifest, model_cfg) -> None:
    store = CheckpointStore(tmp_path / "s")
    recorder = Recorder()
    final = train_stage(model_cfg, _stage(max_steps=5, log_every=2, checkpoint_every=3), manifest, None, store, [recorder])
    assert [s for s, _ in recorder.steps] == [2, 4, 5]  # every log_every steps and at the last step
    assert set(recorder.steps[0][1]) == {"loss", "contrastive", "lr", "temperature", "logit_scale"}
    assert recorder.steps[0][1]["temperature"] == pytest.approx(1 / recorder.steps[0][1]["logit_scale"])
    assert recorder.checkpoints == [(store.steps_dir / "step-00000003.pt", 3), (store.final_path, 5)]

    loaded = load_checkpoint(store.latest())  # weights_only=True
    assert store.latest() == store.final_path
    assert loaded["format"] == "vlalign-checkpoint-v1" and loaded["completed"] and loaded["step"] == 5
    assert loaded["model_config"] == model_cfg.to_dict() and loaded["stage_config"]["max_steps"] == 5
    assert loaded["optimizer"]["state"] and loaded["scheduler"]["last_epoch"] == 5
    assert set(loaded["rng"]) == {"torch", "numpy", "python"}  # + "cuda" when CUDA is in use
    assert loaded["stream"] == {"epoch": 1, "batch": 1} and loaded["objective"] == {}
    assert loaded["model_config"]["arch"] == "dual"
    model = model_from_checkpoint(loaded)
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, final["model"][key]), key


def test_completed_stage_is_reused_only_with_the_same_inputs(tmp_path, manifest, model_cfg) -> None:
    store = CheckpointStore(tmp_path / "s")
    first = train_stage(model_cfg, _stage(max_steps=3), manifest, None, store)
    recorder = Recorder()
    again = train_stage(model_cfg, _stage(max_steps=3), manifest, None, store, [recorder])
    assert recorder.steps == [] and recorder.checkpoints == []  # completed with the same inputs: not retrained
    assert all(torch.equal(again["model"][k], first["model"][k]) for k in first["model"])
    # Other training rows or other initial weights make the stored result stale: the stage trains again.
    fewer_rows = manifest.drop(index=manifest.index[manifest["split"] == "train"][:3])
    recorder = Recorder()
    train_stage(model_cfg, _stage(max_steps=3), fewer_rows, None, store, [recorder])
    assert [step for step, _ in recorder.steps] == [1, 2, 3]
    recorder = Recorder()
    train_stage(model_cfg, _stage(max_steps=3), fewer_rows, first, store, [recorder])
    assert [step for step, _ in recorder.steps] == [1, 2, 3]


def test_foreign_checkpoints_are_not_resumed(tmp_path, manifest, model_cfg) -> None:
    store = CheckpointStore(tmp_path / "s")
    with pytest.raises(KeyboardInterrupt):
        train_stage(model_cfg, _stage(max_steps=6, checkpoint_every=2), manifest, None, store, [Recorder(crash_at=3)])
    other = train_stage(model_cfg, _stage(max_steps=6, checkpoint_every=2, lr=5e-4), manifest, None, store)
    assert other["history"][0]["step"] == 1  # another lr: the unfinished checkpoint was not resumed


def test_bad_inputs_raise_typed_errors(tmp_path, manifest, model_cfg) -> None:
    store = CheckpointStore(tmp_path / "s")
    with pytest.raises(ConfigError, match="match no parameter"):
        train_stage(model_cfg, _stage(trainable=["image_projection"]), manifest, None, store)
    with pytest.raises(ConfigError, match="exceeds the 16 training images"):
        train_stage(model_cfg, _stage(batch_size=32), manifest, None, store)
    with pytest.raises(ConfigError, match="batch_size"):
        _stage(batch_size=1)
    with pytest.raises(ConfigError, match="unknown field"):
        StageConfig.from_dict({"name": "x", "learning_rate": 1.0})
    other_model = get_model_config("tiny-vit-bert", **{**TINY, "embed_dim": 8})
    init = {"format": "vlalign-checkpoint-v1", "model_config": {}, "stage_config": {"name": "prev"}, "step": 0,
            "completed": True, "model": build_model(other_model).state_dict()}
    with pytest.raises(CheckpointError, match="init checkpoint of stage 'prev'"):
        train_stage(model_cfg, _stage(max_steps=1), manifest, init, store)
    with pytest.raises(CheckpointError, match="not a vlalign-checkpoint-v1"):
        model_from_checkpoint({"format": "other"})


def test_save_is_atomic(tmp_path, monkeypatch) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"format": "vlalign-checkpoint-v1", "step": 1}, path)
    before = path.read_bytes()

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"format": "vlalign-checkpoint-v1", "step": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


def test_optimizer_groups_and_schedule(model_cfg) -> None:
    model = build_model(model_cfg)
    exempt = no_decay_names(model)
    assert {"logit_scale", "image_tower.pos_embed", "image_tower.cls_token"} <= exempt
    assert "image_proj.weight" not in exempt
    assert all(name in exempt for name, p in model.named_parameters() if name.endswith(".bias") or "norm" in name.lower())
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.2)
    decay = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert optimizer.param_groups[0]["weight_decay"] == 0.2 and optimizer.param_groups[1]["weight_decay"] == 0.0
    assert id(model.image_proj.weight) in decay and id(model.logit_scale) not in decay

    schedule = WarmupCosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    values = [schedule(s) for s in range(15)]
    assert values[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert values[9] == pytest.approx(0.55)  # half-way through the cosine: (1 + 0.1) / 2
    assert values[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))


def test_tuned_defaults_are_complete_stage_configs() -> None:
    """The stage defaults of conf/base/parameters_training.yml set every StageConfig field; every recipe's stages
    (defaults + entry) are valid stage configs."""
    from vlalign_pipelines.recipes import resolve_stages

    conf = Path(__file__).resolve().parents[3] / "conf" / "base" / "parameters_training.yml"
    training = yaml.safe_load(conf.read_text(encoding="utf-8"))["training"]
    assert set(training["stage_defaults"]) == {f.name for f in fields(StageConfig)} - {"name"}
    assert training["stage_defaults"]["caption_langs"] == "auto"  # resolved from the corpus by the training node
    for recipe in training["recipes"]:
        for stage in resolve_stages(training, recipe):
            resolved = {**stage, "caption_langs": ["en", "zh"]}
            assert StageConfig.from_dict(resolved).to_dict() == resolved
    stages = resolve_stages(training, "clip")
    assert [s["name"] for s in stages] == ["stage1", "stage2"]
    assert stages[0]["trainable"] == ["image_proj", "text_proj", "logit_scale"] and stages[1]["trainable"] == ["all"]
