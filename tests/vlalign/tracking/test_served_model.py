"""The registered embedding model is logged from code, not pickled, and serves what the library computes.

One version is registered with the real MLflow (sqlite store and artifacts in a temporary folder) from a freshly
initialised tiny model (no training): the tests check the stored files and the served embeddings.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from vlalign.data.tokenizers import tokenize
from vlalign.models import build_model, build_tokenizer_for, build_transform, get_model_config
from vlalign.tracking.mlflow import SERVED_MODEL_CODE, VLAlignEmbedder, register_model
from vlalign.train import StageConfig, load_checkpoint, model_from_checkpoint, save_checkpoint
from vlalign.train.checkpoint import FORMAT

PICKLE_PROTO = 0x80  # first byte of a pickle stream of protocol 2 or later (what pickle/cloudpickle write)
TEXTS = ["a small red circle on the left", "two blue squares", "a green triangle above a yellow star"]


def png(seed: int) -> bytes:
    """A 40x30 noise image as PNG bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A version of a tiny model registered in a sqlite-backed MLflow in a temporary folder."""
    root = tmp_path_factory.mktemp("served-model")
    torch.manual_seed(0)
    cfg = get_model_config("tiny-vit-bert")
    model = build_model(cfg, load_pretrained=False)
    ckpt = {"format": FORMAT, "model_config": cfg.to_dict(), "stage_config": StageConfig(name="tiny").to_dict(),
            "model": model.state_dict(), "step": 0, "completed": True}
    checkpoint = save_checkpoint(ckpt, root / "tiny.pt")
    with pytest.MonkeyPatch.context() as patch:
        uri = f"sqlite:///{root / 'mlflow.db'}"
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.create_experiment("served", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            record = register_model(checkpoint, "vlalign-served", png(0))
        local = Path(mlflow.artifacts.download_artifacts(record["model_uri"], dst_path=str(root / "download")))
        yield {**record, "checkpoint": checkpoint, "local": local}
        mlflow.set_tracking_uri(None)


def test_the_version_holds_no_pickle_and_loads_only_packaged_code(registered: dict, monkeypatch) -> None:
    local: Path = registered["local"]
    flavor = mlflow.models.Model.load(str(local)).flavors["python_function"]
    checkpoint = local / flavor["artifacts"]["checkpoint"]["path"]
    files = sorted(p for p in local.rglob("*") if p.is_file())
    for path in files:
        assert path.suffix not in {".pkl", ".pickle"}, f"{path.relative_to(local)} is a pickle file"
        if path == checkpoint:
            # Excluded from the header check: our own torch checkpoint. torch.save writes a zip archive (it starts
            # with "PK", not 0x80) whose data.pkl only torch.load(weights_only=True) reads (vlalign's loaders).
            assert zipfile.is_zipfile(path) and path.read_bytes() == registered["checkpoint"].read_bytes()
            continue
        assert path.read_bytes()[:1] != bytes([PICKLE_PROTO]), f"{path.relative_to(local)} starts like a pickle"
    assert checkpoint in files and (local / "served_model.py") in files and (local / "MLmodel") in files
    # A model from code: MLflow runs the stored copy of served_model.py (our file, byte for byte), no pickle,
    # and no code_paths copy of the package shadows the installed vlalign.
    assert "python_model" not in flavor and flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert Path(flavor["model_code_path"]).name == "served_model.py" and flavor.get("code") is None
    assert (local / "served_model.py").read_bytes() == SERVED_MODEL_CODE.read_bytes()
    assert not (local / "code").exists()
    # Loading works with pickle deserialization forbidden, and the model is the installed package's class.
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    served = mlflow.pyfunc.load_model(registered["model_uri"])
    assert type(served.unwrap_python_model()) is VLAlignEmbedder


def test_the_loaded_version_embeds_as_the_library_does(registered: dict) -> None:
    images = [png(1), png(2)]
    frame = pd.DataFrame({"text": [TEXTS[0], None, TEXTS[1], None, TEXTS[2]],
                          "image": [None, images[0], None, images[1], None]})
    served = mlflow.pyfunc.load_model(registered["model_uri"]).predict(frame)  # (5, D)

    model = model_from_checkpoint(load_checkpoint(registered["checkpoint"])).eval()
    cfg = model.config
    transform = build_transform(cfg, train=False)
    with torch.no_grad():
        batch = tokenize(build_tokenizer_for(cfg), TEXTS, cfg.text.context_length)
        texts = model.encode_text(batch["input_ids"], batch["attention_mask"])  # (3, D)
        pixels = torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])  # (2, 3, H, W)
        pictures = model.encode_image(pixels)  # (2, D)
    assert served.dtype == np.float32 and served.shape == (5, cfg.embed_dim)
    # Same weights, same inputs, same batches (all texts, then all images) and same CPU kernels in one process,
    # but reached through MLflow's loader and a second model instance: allow float32 rounding on unit vectors.
    tolerance = {"rtol": 0.0, "atol": 1e-6}
    torch.testing.assert_close(torch.from_numpy(served[[0, 2, 4]]), texts, **tolerance)
    torch.testing.assert_close(torch.from_numpy(served[[1, 3]]), pictures, **tolerance)
    assert torch.linalg.vector_norm(torch.from_numpy(served), dim=1).sub(1).abs().max() < 1e-5
    assert not torch.allclose(texts[0], texts[1], atol=1e-3)  # the embeddings differ per input (not a constant)
