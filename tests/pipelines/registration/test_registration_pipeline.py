"""The registration pipeline on an in-memory catalog with a real MLflow store (sqlite): a model version with
its lineage, the challenger alias on every version, champion per the gate, the decision as a dataset.

The checkpoints are freshly initialised tiny models (no training) written where conf/base says the stages
and the merge write them; the metrics are set by the test, so the gate's outcome is known in advance.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from mlflow.tracking import MlflowClient

from vlalign.data.demo import DemoConfig, generate_demo_dataset
from vlalign.data.formats import load_corpus
from vlalign.models import build_model, get_model_config
from vlalign.tracking.hashing import dvc_hash, weights_sha256
from vlalign.train import StageConfig, load_checkpoint, save_checkpoint
from vlalign.train.checkpoint import FORMAT
from vlalign_pipelines.pipelines.registration.nodes import RUN_PARAMETERS, lineage_outputs
from vlalign_pipelines.datasets import ZeroShotSetDataset
from vlalign_pipelines.pipelines.registration.pipeline import create_pipeline

REPO = Path(__file__).resolve().parents[3]
NAME = "vlalign-tiny-vit-bert-demo-flickr_demo-imagenet"


class KeptMemoryDataset(MemoryDataset):
    """A MemoryDataset the runner cannot release, so outputs can be inspected after a run."""

    def _release(self) -> None:
        pass


def write_checkpoint(path: Path, seed: int, stage: str) -> Path:
    torch.manual_seed(seed)
    cfg = get_model_config("tiny-vit-bert")
    ckpt = {"format": FORMAT, "model_config": cfg.to_dict(), "stage_config": StageConfig(name=stage).to_dict(),
            "model": build_model(cfg, load_pretrained=False).state_dict(), "step": 3, "completed": True,
            "inputs": {"train_rows_sha256": "rows", "init_weights_sha256": None}}
    return save_checkpoint(ckpt, path)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/ laid out as conf/base's catalog and registration parameters expect it."""
    root = tmp_path_factory.mktemp("registration")
    demo = generate_demo_dataset(root / "data" / "01_raw" / "demo", DemoConfig(n_train=8, n_val=2, n_test=4, zero_shot_per_class=1))
    manifest = load_corpus([{"json": demo / "flickr_demo" / "dataset_demo.json", "image_root": demo / "flickr_demo" / "images",
                             "lang": "en"}])
    (root / "data" / "03_primary").mkdir(parents=True)
    manifest.to_parquet(root / "data" / "03_primary" / "clean_manifest.parquet")
    write_checkpoint(root / "data" / "06_models" / "stage1" / "final.pt", 1, "stage1")
    write_checkpoint(root / "data" / "06_models" / "stage2" / "final.pt", 2, "stage2")
    write_checkpoint(root / "data" / "06_models" / "merged" / "merged.pt", 3, "stage2")
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite MLflow store for the module (creating its tables takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture()
def workdir(project: Path, store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(project)
    monkeypatch.setenv("VLALIGN_HASH_STATE_DIR", str(tmp_path / "hash-state"))
    uri = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("registration-tests")  # the active experiment of an earlier test is in another store
    yield project
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def parameters() -> dict[str, Any]:
    """conf/base's registration parameters (the globals references resolved as for the default run), and two
    training stages."""
    text = (REPO / "conf" / "base" / "parameters_registration.yml").read_text()
    assert "${globals:demo_root}" in text and "${globals:run_dir}" in text
    text = text.replace("${globals:demo_root}", "data/01_raw/demo").replace("${globals:run_dir}", "data")
    registration = yaml.safe_load(text)["registration"]
    registration["lineage"]["inputs"].pop("training_shards")  # this test writes no shards
    stages = [{"name": "stage1", "seed": 0}, {"name": "stage2", "seed": 1}]
    return {"registration": registration, "training": {"stages": stages}, "model": {"name": "tiny-vit-bert"},
            "validation": {}, "merge": {"betas": [0.0, 1.0]}, "evaluation": {"probe": {"seed": 4}}}


def metrics(manifest: pd.DataFrame, recall: float, acc1: float, data: str = "e" * 64) -> dict[str, Any]:
    test = manifest[manifest["split"] == "test"]
    return {
        "model": {"name": "tiny-vit-bert"},
        "retrieval": {"dataset": "demo-flickr", "metrics": {"mean_recall": recall, "image_retrieval_recall@1": recall / 2}},
        "zero_shot": {"dataset": "demo-imagenet", "metrics": {"acc1": acc1}},
        "evaluation_data": {
            "sha256": data, "datasets": "retrieval=demo-flickr, zero_shot=demo-imagenet",
            "blocks": {"retrieval": {"dataset": "demo-flickr", "split": "test", "language": "en",
                                     "n_images": int(test["image_id"].nunique()), "sha256": "1" * 64},
                       "zero_shot": {"dataset": "demo-imagenet", "language": "en", "sha256": "2" * 64}},
        },
    }


def run_registration(params: dict[str, Any], scores: dict[str, Any]) -> DataCatalog:
    """One registration in its own MLflow run (as kedro-mlflow opens one per `kedro run`)."""
    manifest = pd.read_parquet("data/03_primary/clean_manifest.parquet")
    zero_shot = ZeroShotSetDataset(root="data/01_raw/demo/imagenet_demo", classnames={"en": "classnames_en.txt"},
                                   templates={"en": "templates_en.txt"}).load()
    catalog = DataCatalog({
        "merged_checkpoint": KeptMemoryDataset(load_checkpoint("data/06_models/merged/merged.pt")),
        "clean_manifest": KeptMemoryDataset(manifest),
        "metrics": KeptMemoryDataset(scores),
        "validation_report": KeptMemoryDataset({"n_rows": len(manifest), "n_clean": len(manifest), "rejected_fraction": 0.0}),
        "zero_shot_set": KeptMemoryDataset(zero_shot),
        "zero_shot_quarantine": KeptMemoryDataset(pd.DataFrame({"image_path": [zero_shot["images"]["image_path"].iloc[0]]})),
        "probe_source": KeptMemoryDataset({}),
        **{f"params:{name}": KeptMemoryDataset(params[name]) for name in RUN_PARAMETERS},
        "registered_model": KeptMemoryDataset(),
        "gate_decision": KeptMemoryDataset(),
    })
    with mlflow.start_run():
        SequentialRunner().run(create_pipeline(), catalog)
    return catalog


def test_pipeline_wiring() -> None:
    pipe = create_pipeline()
    assert pipe.inputs() == {"merged_checkpoint", "clean_manifest", "metrics", "validation_report", "zero_shot_set",
                             "zero_shot_quarantine", "probe_source", *(f"params:{name}" for name in RUN_PARAMETERS)}
    assert pipe.outputs() == {"gate_decision"}
    assert [n.name for n in pipe.nodes] == ["register_merged_model", "gate_registered_model"]


def test_lineage_outputs_follow_the_stage_list() -> None:
    assert lineage_outputs(parameters()) == {"stage1": "data/06_models/stage1/final.pt",
                                             "stage2": "data/06_models/stage2/final.pt",
                                             "merged": "data/06_models/merged/merged.pt"}


def test_register_then_gate(workdir: Path) -> None:
    params = parameters()
    manifest = pd.read_parquet("data/03_primary/clean_manifest.parquet")
    client = MlflowClient()

    first = run_registration(params, metrics(manifest, 0.30, 0.50))
    registered, decision = first.load("registered_model"), first.load("gate_decision")
    assert registered["name"] == NAME and registered["version"] == "1"
    assert decision["outcome"] == "promote" and decision["champion"] == 1 and decision["challenger"] == 1

    # The version: evaluation tags for the gate, lineage tags, lineage.json stored with the model.
    version = client.get_model_version(NAME, "1")
    assert version.tags["eval.data_sha256"] == "e" * 64
    assert json.loads(version.tags["eval.metrics"])["retrieval.image_retrieval_recall@1"] == 0.15
    lineage = registered["lineage"]
    assert version.tags["weights_sha256"] == lineage["outputs"]["registered"]["weights_sha256"]
    assert version.tags["input.clean_manifest.md5"] == dvc_hash("data/03_primary/clean_manifest.parquet")["md5"]
    assert lineage["inputs"]["raw_data"]["md5"] == dvc_hash("data/01_raw/demo")["md5"]
    assert lineage["inputs"]["raw_data"]["md5"].endswith(".dir")
    for stage in ("stage1", "stage2"):
        path = f"data/06_models/{stage}/final.pt"
        assert lineage["outputs"][stage]["md5"] == dvc_hash(path)["md5"]
        assert lineage["outputs"][stage]["weights_sha256"] == weights_sha256(load_checkpoint(path)["model"])
    merged = load_checkpoint("data/06_models/merged/merged.pt")
    assert lineage["outputs"]["merged"]["weights_sha256"] == lineage["outputs"]["registered"]["weights_sha256"] \
        == weights_sha256(merged["model"])
    assert lineage["seeds"] == {"training.stages.stage1.seed": 0, "training.stages.stage2.seed": 1,
                                "evaluation.probe.seed": 4}
    assert set(lineage["params"]) == set(RUN_PARAMETERS)
    assert lineage["params"]["registration"]["gate"] == params["registration"]["gate"]
    assert lineage["training_data"]["images_outside_inputs"] == 0
    flavor = mlflow.models.Model.load(f"models:/{NAME}/1").flavors["python_function"]
    stored = mlflow.artifacts.download_artifacts(f"models:/{NAME}/1/{flavor['artifacts']['lineage']['path']}")
    assert json.loads(Path(stored).read_text())["outputs"] == lineage["outputs"]
    # What evaluation scored, for `vlalign audit`: the zero-shot images less the quarantined one. This test's
    # metrics carry made-up hashes, so the recorded inputs are marked unverified.
    stored = mlflow.artifacts.download_artifacts(f"models:/{NAME}/1/{flavor['artifacts']['evaluation_inputs']['path']}")
    evaluated = json.loads(Path(stored).read_text())
    assert evaluated["retrieval"] == {"retrieval": {"language": "en", "split": "test", "dataset": "demo-flickr"}}
    assert evaluated["zero_shot"]["language"] == "en"
    assert len(evaluated["zero_shot"]["images"]) == len(ZeroShotSetDataset(
        root="data/01_raw/demo/imagenet_demo", classnames={"en": "classnames_en.txt"},
        templates={"en": "templates_en.txt"}).load()["images"]) - 1
    assert lineage["evaluation_inputs"]["verified"] is False
    listings = mlflow.artifacts.download_artifacts(f"models:/{NAME}/1/{flavor['artifacts']['input_listings']['path']}")
    assert {e["relpath"] for e in json.loads(Path(listings).read_text())["raw_data"]} >= {"flickr_demo/dataset_demo.json"}

    # The run: the clean manifest and the evaluated split as dataset inputs, the decision as an artifact.
    run = client.get_run(version.run_id)
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"clean_manifest", "demo-flickr/test/en"}
    assert inputs["clean_manifest"].dataset.digest == lineage["inputs"]["clean_manifest"]["md5"]
    assert inputs["demo-flickr/test/en"].dataset.digest == "1" * 32
    assert "gate/decision-v1.json" in [a.path for a in client.list_artifacts(version.run_id, "gate")]

    # A worse challenger: registered, challenger alias, never champion.
    worse = run_registration(params, metrics(manifest, 0.29, 0.60)).load("gate_decision")
    assert worse["version"] == 2 and worse["outcome"] == "keep" and "worse" in worse["reason"]
    assert {k: int(v) for k, v in client.get_registered_model(NAME).aliases.items()} == {"champion": 1, "challenger": 2}

    # A better one takes the title.
    better = run_registration(params, metrics(manifest, 0.40, 0.49)).load("gate_decision")
    assert better["outcome"] == "promote" and better["champion"] == 3 and better["champion_version"] == 1
    assert client.get_model_version(NAME, "3").tags["gate.passed"] == "true"
    assert mlflow.pyfunc.load_model(f"models:/{NAME}@champion").metadata.run_id == client.get_model_version(NAME, "3").run_id


def test_fixed_name_and_missing_input(workdir: Path) -> None:
    params = parameters()
    manifest = pd.read_parquet("data/03_primary/clean_manifest.parquet")
    fixed = copy.deepcopy(params)
    fixed["registration"]["registered_model_name"] = "team-model"
    assert run_registration(fixed, metrics(manifest, 0.3, 0.5)).load("registered_model")["name"] == "team-model"
    broken = copy.deepcopy(params)
    broken["registration"]["lineage"]["inputs"]["raw_data"] = "data/01_raw/flickr30k"
    with pytest.raises(Exception, match=r"registration.lineage.inputs.raw_data: data/01_raw/flickr30k does not exist"):
        run_registration(broken, metrics(manifest, 0.3, 0.5))
