"""Where each run writes: one output folder per (environment, run name), simple paths for the default run.

These tests read the real configuration (no pipeline runs): every path the catalog or the parameters write
must sit under the run's folder, raw inputs stay shared, and dvc.yaml's outs are the default run's paths.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from vlalign.errors import ConfigError
from vlalign_pipelines.pipelines.training.pipeline import stage_names
from vlalign_pipelines.settings import (
    CONFIG_LOADER_ARGS, DEFAULT_RUN_DIR, RunConfigLoader, run_location, run_name_from,
)

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
RAW = "data/01_raw/"
# Catalog entries that read raw inputs (never written by a run).
INPUTS = {"raw_manifest", "zero_shot_set", "probe_source"}
ENVS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("base", "local"))


def load(env: str | None, run_name: str | None = None, conf: Path = CONF) -> tuple[dict, dict, dict]:
    runtime = {"run_name": run_name} if run_name else None
    loader = RunConfigLoader(str(conf), env, runtime, **CONFIG_LOADER_ARGS)
    return loader["catalog"], loader["parameters"], loader["globals"]


def data_paths(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """(where, path) for every string under ``value`` that names something in the project's data/ folder."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from data_paths(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from data_paths(item, f"{where}[{index}]")
    elif isinstance(value, str) and (value == "data" or value.startswith("data/")):
        yield where, value


def outputs_of(catalog: dict, params: dict) -> dict[str, str]:
    """Every path a run writes: catalog entries other than raw inputs, and path parameters."""
    found = {w: p for w, p in data_paths({k: v for k, v in catalog.items() if k not in INPUTS})}
    # the Kubernetes storage mapping names the shared data folder (where pods mount it), not an output
    paths = {k: v for k, v in params.items() if k != "kubernetes"}
    found.update({f"params:{w}": p for w, p in data_paths(paths) if not p.startswith(RAW)})
    return found


# ---------------------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------------------


def test_run_location_rule() -> None:
    assert run_location(None).run_dir == "data" and run_location(None).is_default
    assert run_location("local", "default").run_dir == DEFAULT_RUN_DIR
    assert run_location("local", "albef").run_dir == "data/runs/local/albef"
    assert run_location("flickr30k").run_dir == "data/runs/flickr30k/default"
    assert run_location("flickr30k", "b2").run_dir == "data/runs/flickr30k/b2"
    assert not run_location("flickr30k").is_default
    for bad_env, bad_name in [("../x", "default"), ("local", "a/b"), ("local", ".."), ("local", "has space")]:
        with pytest.raises(ConfigError, match="cannot name an output folder"):
            run_location(bad_env, bad_name)


def test_run_name_from_params_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLALIGN_RUN_NAME", raising=False)
    assert run_name_from(None) == "default"
    monkeypatch.setenv("VLALIGN_RUN_NAME", "from-env")
    assert run_name_from({}) == "from-env"
    assert run_name_from({"run_name": "from-params"}) == "from-params"
    assert run_name_from({"run_name": 7}) == "7"  # `--params run_name=7` arrives as an int


# ---------------------------------------------------------------------------------------------------------
# Every output path follows it, in every environment
# ---------------------------------------------------------------------------------------------------------


def test_default_run_keeps_the_simple_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLALIGN_RUN_NAME", raising=False)
    catalog, params, globals_ = load(None)
    assert globals_["run_dir"] == "data"
    assert catalog["clean_manifest"]["filepath"] == "data/03_primary/clean_manifest.parquet"
    assert catalog["{stage}.stage_dir"]["path"] == "data/06_models/{stage}"
    assert catalog["train_shards"]["path"] == "data/05_model_input/shards/train"
    assert catalog["metrics"]["dataset"]["filepath"] == "data/08_reporting/metrics.json"
    assert params["validation"]["quarantine_file"] == "data/04_quarantine/quarantine.csv"
    assert params["evaluation"]["report_dir"] == "data/08_reporting/report"
    assert params["evaluate"]["report_dir"] == "data/08_reporting/evaluate/report"


@pytest.mark.parametrize("env", ENVS)
@pytest.mark.parametrize("run_name", [None, "other"])
def test_every_output_is_under_the_run_folder(env: str, run_name: str | None, monkeypatch) -> None:
    monkeypatch.delenv("VLALIGN_RUN_NAME", raising=False)
    catalog, params, globals_ = load(env, run_name)
    run_dir = f"data/runs/{env}/{run_name or 'default'}"
    assert globals_["run_dir"] == run_dir and globals_["run_env"] == env
    outputs = outputs_of(catalog, params)
    # validation, models, reports and the evaluate pipeline's outputs: all of them are there
    assert len(outputs) >= 16, sorted(outputs)
    stray = {w: p for w, p in outputs.items() if not p.startswith(run_dir + "/")}
    assert not stray, f"outputs outside {run_dir}: {stray}"
    # raw inputs are read where they are
    assert all(p.startswith(RAW) for _, p in data_paths({k: catalog[k] for k in INPUTS & set(catalog)}))


def test_an_environment_that_sets_nothing_cannot_collide(tmp_path: Path, monkeypatch) -> None:
    """A new, empty environment gets its own folder: it cannot write into the default run's."""
    monkeypatch.delenv("VLALIGN_RUN_NAME", raising=False)
    conf = tmp_path / "conf"
    shutil.copytree(CONF / "base", conf / "base")
    (conf / "local").mkdir()
    (conf / "mine").mkdir()
    default = outputs_of(*load(None, conf=conf)[:2])
    mine = outputs_of(*load("mine", conf=conf)[:2])
    assert set(default) == set(mine)
    assert all(mine[w] == default[w].replace("data/", "data/runs/mine/default/", 1) for w in default)


def test_an_environment_cannot_set_the_run_folder(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(CONF / "base", conf / "base")
    (conf / "local").mkdir()
    (conf / "sneaky").mkdir()
    (conf / "sneaky" / "globals.yml").write_text("run_dir: data\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"sneaky/globals.yml: sets \['run_dir'\]"):
        load("sneaky", conf=conf)


def test_each_loader_resolves_with_its_own_run_folder() -> None:
    """The pipeline registry creates a second loader mid-session; the session's catalog must not follow it."""
    session_loader = RunConfigLoader(str(CONF), "test", {"run_name": "b"}, **CONFIG_LOADER_ARGS)
    RunConfigLoader(str(CONF), None, None, **CONFIG_LOADER_ARGS)["parameters"]  # what stage_names does
    assert session_loader["catalog"]["clean_manifest"]["filepath"] == "data/runs/test/b/03_primary/clean_manifest.parquet"
    assert stage_names(conf_source=CONF, env="test") == ["stage1", "stage2"]


# ---------------------------------------------------------------------------------------------------------
# dvc.yaml describes the default run
# ---------------------------------------------------------------------------------------------------------


def _dvc_paths() -> dict[str, str]:
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    found = {}
    for stage_name, stage in dvc["stages"].items():
        for kind in ("outs", "metrics"):
            for item in stage.get(kind, []):
                path = next(iter(item)) if isinstance(item, dict) else item
                found[path] = f"{stage_name}.{kind}"
    return found


def test_dvc_outs_are_the_default_run_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLALIGN_RUN_NAME", raising=False)
    monkeypatch.delenv("KEDRO_ENV", raising=False)
    catalog, params, _ = load(None)
    stages = stage_names(conf_source=CONF)
    written = set()
    # written only by the recipes (`recipes`) or pipelines (`pipelines`) that an entry's metadata names
    not_default = {name for name, entry in catalog.items() if isinstance(entry, dict)
                   and {"recipes", "pipelines"} & set(((entry.get("metadata") or {}).get("vlalign") or {}))}
    assert {"capfilt_shards", "synthetic_shards", "retrain_plan", "audit_report"} <= not_default
    for where, path in outputs_of(catalog, params).items():
        if where.startswith(("evaluate.", "params:evaluate.")):
            continue  # the evaluate pipeline is not a DVC stage
        if any(where == name or where.startswith(name + ".") for name in not_default):
            continue  # never written by the default run
        written |= {path.replace("{stage}", s) for s in stages} if "{stage}" in path else {path}
    dvc = {p: where for p, where in _dvc_paths().items() if not p.startswith(RAW)}

    def covered(path: str, by: set[str]) -> bool:
        return any(path == other or path.startswith(other + "/") or other.startswith(path + "/") for other in by)

    assert not [p for p in dvc if not covered(p, written)], "dvc.yaml outs that no default output matches"
    # every default output is tracked, except the Data Docs site (HTML, rebuilt by every validation run)
    untracked = [p for p in written if not covered(p, set(dvc))]
    assert untracked == ["data/08_reporting/data_docs"], untracked
