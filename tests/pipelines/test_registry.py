"""How the pipelines are wired: namespaced training stages, the stage list from conf, the merge inputs,
and the one-way import rule (``vlalign`` never imports kedro)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlalign.errors import ConfigError

from vlalign_pipelines.pipelines.merge.pipeline import create_pipeline as create_merge_pipeline
from vlalign_pipelines.pipelines.training.pipeline import create_pipeline as create_training_pipeline
from vlalign_pipelines.pipelines.training.pipeline import stage_names

REPO = Path(__file__).resolve().parents[2]
LIBRARY = REPO / "src" / "vlalign"
STAGES = ["stage1", "stage2", "stage3"]


def _nodes_by_namespace(pipe) -> dict[str, object]:
    nodes = {}
    for node in pipe.nodes:
        assert node.namespace not in nodes, f"two nodes in namespace {node.namespace!r}"
        nodes[node.namespace] = node
    return nodes


# ------------------------------------------------------------------------------------------------
# Training stages
# ------------------------------------------------------------------------------------------------


def test_training_stages_are_namespaced_and_chained() -> None:
    nodes = _nodes_by_namespace(create_training_pipeline(stages=STAGES))
    assert list(nodes) == [None, *STAGES]  # the shard step, then the stages
    assert nodes[None].name == "write_training_shards" and nodes[None].outputs == ["train_shards"]

    for index, stage in enumerate(STAGES):
        node = nodes[stage]
        assert node.name == f"{stage}.train"
        assert node.outputs == [f"{stage}.final_checkpoint"]
        # the same training function, told which stage it is
        assert node.func.keywords == {"stage_name": stage}
        # shared inputs are not namespaced; the stage folder is per stage
        assert {"train_shards", "params:model", "params:training", "params:kubernetes", f"{stage}.stage_dir"} <= set(node.inputs)
        checkpoints = [name for name in node.inputs if name.endswith("final_checkpoint")]
        if index == 0:
            assert checkpoints == [], f"stage1 must start without an init checkpoint, got {checkpoints}"
        else:
            assert checkpoints == [f"{STAGES[index - 1]}.final_checkpoint"]


def test_training_pipeline_inputs_and_outputs() -> None:
    pipe = create_training_pipeline(stages=STAGES)
    assert pipe.inputs() == {
        "clean_manifest", "params:model", "params:training", "params:kubernetes", *(f"{s}.stage_dir" for s in STAGES)
    }
    # intermediate stage checkpoints are consumed inside the pipeline; only the last is a free output
    assert pipe.outputs() == {"stage3.final_checkpoint"}
    order = [node.namespace for node in pipe.nodes]  # topological order
    assert order == [None, *STAGES]


def test_single_stage_pipeline() -> None:
    shard, node = create_training_pipeline(stages=["only"]).nodes
    assert node.outputs == ["only.final_checkpoint"]
    assert not [name for name in node.inputs if name.endswith("final_checkpoint")]


# ------------------------------------------------------------------------------------------------
# Stage list from conf
# ------------------------------------------------------------------------------------------------


def test_stage_names_read_from_repo_conf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLALIGN_RECIPE", raising=False)
    conf = REPO / "conf"
    test = yaml.safe_load((conf / "test" / "parameters_training.yml").read_text(encoding="utf-8"))
    expected = [stage["name"] for stage in test["training"]["recipes"]["clip"]["stages"]]
    assert stage_names(conf_source=conf, env="test") == expected == ["stage1", "stage2"]


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")


def test_stage_names_follow_the_environment_and_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLALIGN_RECIPE", raising=False)
    conf = tmp_path / "conf"
    recipes = {"clip": {"stages": [{"name": "lit"}, {"name": "full"}]}, "other": {"stages": [{"name": "x"}]}}
    _write(conf / "base" / "parameters_training.yml", {"training": {"recipe": "clip", "recipes": recipes}})
    _write(conf / "wide" / "parameters_training.yml",
           {"training": {"recipes": {"clip": {"stages": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}}}})
    (conf / "local").mkdir()

    assert stage_names(conf_source=conf, env="wide") == ["a", "b", "c"]
    monkeypatch.delenv("KEDRO_ENV", raising=False)
    assert stage_names(conf_source=conf) == ["lit", "full"]  # default run env: local (no override)
    monkeypatch.setenv("KEDRO_ENV", "wide")
    assert stage_names(conf_source=conf) == ["a", "b", "c"]
    monkeypatch.setenv("VLALIGN_RECIPE", "other")  # what `kedro run --params training.recipe=other` sets
    assert stage_names(conf_source=conf) == ["x"]
    monkeypatch.setenv("VLALIGN_RECIPE", "nope")
    with pytest.raises(ConfigError, match=r"training.recipe='nope' is not defined; the recipes are \['clip', 'other'\]"):
        stage_names(conf_source=conf)


def test_recipe_stage_wiring_data_init_and_merge_pair() -> None:
    from vlalign_pipelines.recipes import plan, resolve_stages

    training = {"stage_defaults": {"lr": 0.1, "epochs": 2}, "recipes": {"r": {
        "stages": [{"name": "real"}, {"name": "synth", "data": "synthetic_shards", "lr": 0.01},
                   {"name": "fresh", "init": None}],
        "merge": {"theta1": "real", "theta2": "synth"}, "capfilt": {"after": "real"}}}}
    shape = plan(training, "r")
    assert [(s.name, s.data, s.init) for s in shape.stages] == [
        ("real", "train_shards", None), ("synth", "synthetic_shards", "real"), ("fresh", "train_shards", None)]
    assert shape.merge == ("real", "synth") and shape.sections == {"capfilt": {"after": "real"}}
    stages = resolve_stages(training, "r")
    assert stages[1] == {"name": "synth", "lr": 0.01, "epochs": 2}  # defaults + entry, wiring keys dropped
    bad = {"recipes": {"r": {"stages": [{"name": "a", "init": "b"}, {"name": "b"}]}}}
    with pytest.raises(ConfigError, match=r"stages\[0\].init='b': expected an earlier stage"):
        plan(bad, "r")


# ------------------------------------------------------------------------------------------------
# Merge
# ------------------------------------------------------------------------------------------------


def test_merge_consumes_the_last_two_stages() -> None:
    (node,) = create_merge_pipeline(stages=STAGES).nodes
    checkpoints = [name for name in node.inputs if name.endswith("final_checkpoint")]
    assert checkpoints == ["stage3.final_checkpoint", "stage2.final_checkpoint"]  # theta_last, theta_previous
    assert "merged_checkpoint" in node.outputs


def test_training_then_merge_is_connected() -> None:
    pipe = create_training_pipeline(stages=STAGES) + create_merge_pipeline(stages=STAGES)
    assert not {name for name in pipe.inputs() if name.endswith("final_checkpoint")}
    assert "merged_checkpoint" in pipe.outputs()


# ------------------------------------------------------------------------------------------------
# The library never imports kedro
# ------------------------------------------------------------------------------------------------


def _kedro_imports(path: Path, root: Path = REPO) -> list[str]:
    """``file:line: module`` for every absolute import of a kedro module in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        found += [f"{path.relative_to(root)}:{node.lineno}: {m}" for m in modules if m.split(".")[0] == "kedro"]
    return found


def test_library_source_never_imports_kedro() -> None:
    files = sorted(LIBRARY.rglob("*.py"))
    assert len(files) > 10
    offenders = [hit for path in files for hit in _kedro_imports(path)]
    assert not offenders, "src/vlalign must not import kedro:\n" + "\n".join(offenders)


def test_kedro_import_scan_catches_an_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import os, kedro.io\n    from kedro.pipeline import node\n")
    hits = _kedro_imports(bad, root=tmp_path)
    assert [h.rsplit(": ", 1)[1] for h in hits] == ["kedro.io", "kedro.pipeline"]


def test_importing_the_library_loads_no_kedro_module(tmp_path: Path) -> None:
    code = (
        "import sys, importlib, pkgutil\n"
        "import vlalign, vlalign.models, vlalign.train, vlalign.eval, vlalign.merge, vlalign.data.formats\n"
        "assert not any(m.startswith('kedro') for m in sys.modules), sorted(m for m in sys.modules if m.startswith('kedro'))\n"
        # every other library module too
        "for info in pkgutil.walk_packages(vlalign.__path__, 'vlalign.'):\n"
        "    importlib.import_module(info.name)\n"
        "    loaded = sorted(m for m in sys.modules if m.startswith('kedro'))\n"
        "    assert not loaded, f'importing {info.name} loaded {loaded}'\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
