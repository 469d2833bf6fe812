"""The validation pipeline on an in-memory catalog: clean data, a few bad rows, too many bad rows.

The pipeline runs with kedro's ``SequentialRunner`` on a ``DataCatalog`` of ``MemoryDataset``s; the
raw manifest comes from a tiny generated demo dataset and the parameters from
conf/base/parameters_validation.yml (with the paths pointed at the test's temporary folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from kedro.io import DataCatalog, DatasetError, MemoryDataset
from kedro.runner import SequentialRunner

from vlalign.data.demo import DemoConfig, generate_demo_dataset
from vlalign.data.formats import load_corpus
from vlalign.errors import ValidationFailedError
from vlalign_pipelines.pipelines.validation.pipeline import create_pipeline

REPO = Path(__file__).resolve().parents[3]
DATASETS = ("raw_manifest", "validated_manifest", "quarantine", "validation_report", "clean_manifest")


class KeptMemoryDataset(MemoryDataset):
    """A MemoryDataset the runner cannot release, so intermediate outputs can be inspected after a run."""

    def _release(self) -> None:
        pass


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> pd.DataFrame:
    config = DemoConfig(n_train=12, n_val=4, n_test=4, zero_shot_per_class=1)
    flickr = generate_demo_dataset(tmp_path_factory.mktemp("demo") / "data", config) / "flickr_demo"
    return load_corpus([
        {"json": flickr / "dataset_demo.json", "image_root": flickr / "images", "lang": "en"},
        {"json": flickr / "dataset_demo_zh.json", "image_root": flickr / "images", "lang": "zh"},
    ])


@pytest.fixture()
def params(tmp_path: Path) -> dict[str, Any]:
    """The project's validation parameters, with the paths moved into ``tmp_path``."""
    params = yaml.safe_load((REPO / "conf" / "base" / "parameters_validation.yml").read_text())["validation"]
    params["data_docs_dir"] = str(tmp_path / "data_docs")
    params["quarantine_file"] = str(tmp_path / "04_quarantine" / "quarantine.csv")
    return params


def make_catalog(raw_manifest: pd.DataFrame, params: dict[str, Any]) -> DataCatalog:
    """An in-memory catalog with the pipeline's inputs; parameters are entries named ``params:<key>``."""
    catalog = DataCatalog({name: KeptMemoryDataset() for name in DATASETS})
    catalog["raw_manifest"] = KeptMemoryDataset(raw_manifest)
    catalog["params:validation"] = KeptMemoryDataset(params)
    return catalog


def run_validation(raw_manifest: pd.DataFrame, params: dict[str, Any]) -> DataCatalog:
    """Run the validation pipeline; return the catalog holding every dataset it read and wrote."""
    catalog = make_catalog(raw_manifest, params)
    SequentialRunner().run(create_pipeline(), catalog)
    return catalog


def _caption_rows(manifest: pd.DataFrame, lang: str, n: int) -> list[int]:
    """Positions of ``n`` rows with ``lang`` captions, spread over the manifest."""
    positions = (manifest["lang"] == lang).to_numpy().nonzero()[0]
    return [int(p) for p in positions[:: max(1, len(positions) // n)][:n]]


def test_pipeline_reads_raw_manifest_and_params() -> None:
    pipe = create_pipeline()
    assert pipe.inputs() == {"raw_manifest", "params:validation"}
    assert pipe.outputs() == {"clean_manifest", "quarantine"}
    # the threshold gate runs after the quarantine table exists
    order = [n.name for n in pipe.nodes]
    assert order.index("validate_corpus") < order.index("gate_clean_rows")


def test_clean_data_passes_untouched(manifest, params) -> None:
    catalog = run_validation(manifest, params)

    clean = catalog.load("clean_manifest")
    pd.testing.assert_frame_equal(clean, manifest.reset_index(drop=True))
    assert catalog.load("quarantine").empty
    report = catalog.load("validation_report")
    assert report["n_rows"] == report["n_clean"] == len(manifest)
    assert report["n_quarantined"] == 0
    assert all(info["success"] for info in report["expectations"].values())
    assert (Path(params["data_docs_dir"]) / "index.html").is_file()


def test_few_bad_rows_are_quarantined(manifest, params) -> None:
    raw = manifest.copy()
    short_en, bad_char_en = _caption_rows(raw, "en", 2)
    (short_zh,) = _caption_rows(raw, "zh", 1)
    raw.loc[short_en, "caption"] = "red circle."
    raw.loc[bad_char_en, "caption"] = raw.loc[bad_char_en, "caption"] + " \ufffd"
    raw.loc[short_zh, "caption"] = "红色。"
    expected = {
        raw.loc[short_en, "caption_id"]: "caption_min_words_en",
        raw.loc[bad_char_en, "caption_id"]: "caption_no_bad_characters",
        raw.loc[short_zh, "caption_id"]: "caption_min_han_chars_zh",
    }
    assert len(expected) / len(raw) <= params["config"]["max_rejected_fraction"]

    catalog = run_validation(raw, params)

    quarantine = catalog.load("quarantine")
    assert dict(zip(quarantine["caption_id"], quarantine["failed_expectations"])) == expected
    assert quarantine["reason"].str.len().gt(0).all()
    clean = catalog.load("clean_manifest")
    assert not set(clean["caption_id"]) & set(expected)
    kept = raw[~raw["caption_id"].isin(expected)].reset_index(drop=True)
    pd.testing.assert_frame_equal(clean, kept)
    report = catalog.load("validation_report")
    assert report["n_quarantined"] == 3 and report["within_threshold"]
    failed = {name for name, info in report["expectations"].items() if not info["success"]}
    assert failed == set(expected.values())


def test_too_many_bad_rows_fail_the_run(manifest, params) -> None:
    raw = manifest.copy()
    bad = _caption_rows(raw, "en", 20)
    raw.loc[bad, "caption"] = "red."
    assert len(bad) / len(raw) > params["config"]["max_rejected_fraction"]

    catalog = make_catalog(raw, params)
    with pytest.raises(ValidationFailedError) as caught:
        SequentialRunner().run(create_pipeline(), catalog)

    message = str(caught.value)
    assert "caption_min_words_en: 20 rows" in message
    assert params["quarantine_file"] in message
    assert f"{len(bad)} of {len(raw)} rows" in message
    # the quarantine table was saved before the gate failed, so the file the message names gets written
    assert sorted(catalog.load("quarantine")["caption_id"]) == sorted(raw.loc[bad, "caption_id"])
    with pytest.raises(DatasetError):
        catalog.load("clean_manifest")  # nothing reached the clean layer
