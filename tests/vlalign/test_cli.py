"""The `vlalign` command: each subcommand does its job and prints what it did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlalign.cli import build_parser, main
from vlalign.models import build_model, get_model_config
from vlalign.train import StageConfig, save_checkpoint
from vlalign.train.checkpoint import FORMAT


def test_models_lists_every_named_config(capsys: pytest.CaptureFixture) -> None:
    assert main(["models"]) == 0
    assert set(capsys.readouterr().out.split()) >= {"tiny-vit-bert", "efficientnet-lite0-minilm"}


def test_demo_writes_the_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "demo"
    config = {"n_train": 4, "n_val": 2, "n_test": 2, "zero_shot_per_class": 1}
    assert main(["demo", "--root", str(root), "--config", json.dumps(config)]) == 0
    data = json.loads((root / "flickr_demo" / "dataset_demo.json").read_text())
    assert len(data["images"]) == 8
    assert str(root) in capsys.readouterr().out


def test_checkpoint_describes_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = get_model_config("tiny-vit-bert")
    model = build_model(cfg, load_pretrained=False)
    path = save_checkpoint({"format": FORMAT, "model_config": cfg.to_dict(), "stage_config": StageConfig(name="s").to_dict(),
                            "model": model.state_dict(), "step": 7, "completed": True}, tmp_path / "c.pt")
    assert main(["checkpoint", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 7 and summary["stage_config"]["name"] == "s"
    assert summary["parameters"] == sum(t.numel() for t in model.state_dict().values())


def test_help_names_the_subcommands() -> None:
    text = build_parser().format_help()
    assert all(name in text for name in ("demo", "models", "checkpoint"))
    with pytest.raises(SystemExit):
        main([])


# ------------------------------------------------------------------------------------------------
# Expected failures: a short message and exit status 1; the traceback goes to a log file
# ------------------------------------------------------------------------------------------------


def test_expected_failure_prints_a_short_message(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLALIGN_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.delenv("VLALIGN_VERBOSE", raising=False)
    missing = tmp_path / "nope.pt"
    assert main(["checkpoint", str(missing)]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0] == "Error: vlalign checkpoint failed (CheckpointError):"
    assert str(missing) in err and len(lines) <= 20 and "Traceback" not in err
    (log,) = (tmp_path / "logs").iterdir()
    assert f"Full traceback: {log}" in err
    assert "Traceback (most recent call last)" in log.read_text() and "CheckpointError" in log.read_text()


def test_verbose_prints_the_traceback_too(tmp_path: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLALIGN_LOG_DIR", str(tmp_path / "logs"))
    bad = json.dumps({"n_train": 0})
    assert main(["--verbose", "demo", "--root", str(tmp_path / "d"), "--config", bad]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ConfigError: DemoConfig.n_train=0" in err
    assert "Error: vlalign demo failed (ConfigError):" in err
    monkeypatch.setenv("VLALIGN_VERBOSE", "1")
    assert main(["demo", "--root", str(tmp_path / "d"), "--config", bad]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_unexpected_errors_keep_their_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vlalign.data.demo

    def broken(*args, **kwargs):
        raise KeyError("a bug, not a vlalign error")

    monkeypatch.setattr(vlalign.data.demo, "generate_demo_dataset", broken)
    with pytest.raises(KeyError, match="a bug"):  # not a vlalign error: raised as is
        main(["demo", "--root", str(tmp_path / "d")])


def test_loss_bench_prints_time_and_peak_memory_as_json(capsys) -> None:
    import json

    from vlalign.cli import main

    assert main(["loss-bench", "--n", "128", "--d", "16", "--loss", "siglip", "--impl", "tiled", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 128 and result["impl_resolved"] == "tiled" and result["seconds"] > 0
    assert result["peak_bytes"] >= 0 and result["loss_value"] == result["loss_value"]


def test_train_help_documents_every_input(capsys) -> None:
    from vlalign.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--spec", "--model", "--stage", "--data", "--init", "--out", "--set-stage", "--set-model"):
        assert flag in text
