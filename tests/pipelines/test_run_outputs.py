"""Two environments and two run names, one after the other: each run's outputs stay intact (file hashes
and modification times).

Three real ``KedroSession`` runs of the whole default pipeline in a copied project, on the tiny `test`
dataset: environment `test`, then `test_b` (a copy of `test`, written by the test), then `test` again under
the run name `other`, given the way ``kedro run --params run_name=other`` gives it (a runtime parameter).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from conftest import run_dir


def hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by path relative to it."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*")) if path.is_file()
    }


def fingerprints(root: Path) -> dict[str, tuple[str, int]]:
    """(sha256, mtime in ns) of every file: training is seeded, so a rewrite can leave the bytes unchanged."""
    return {rel: (digest, (root / rel).stat().st_mtime_ns) for rel, digest in hashes(root).items()}


def run(project: Path, env: str, run_name: str | None = None) -> None:
    bootstrap_project(project)
    params = {"run_name": run_name} if run_name else None
    with KedroSession.create(project_path=project, env=env, runtime_params=params) as session:
        session.run()


def layout(folder: Path) -> set[str]:
    """Relative paths of a run's outputs, without the Data Docs pages (named after GX run ids)."""
    return {p for p in hashes(folder) if not p.startswith("08_reporting/data_docs/")}


@pytest.mark.slow
def test_runs_never_overwrite_each_other(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLALIGN_RUN_NAME", raising=False)
    shutil.copytree(project / "conf" / "test", project / "conf" / "test_b")
    data = project / "data"

    run(project, "test")
    first = fingerprints(data)
    first_dir = run_dir(project, "test")
    assert first_dir == data / "runs" / "test" / "default"
    expected = {
        "02_intermediate/validated_manifest.parquet", "03_primary/clean_manifest.parquet",
        "04_quarantine/quarantine.csv", "06_models/stage1/final.pt", "06_models/stage2/final.pt",
        "06_models/stage2/checkpoints/LATEST", "06_models/merged/merged.pt", "08_reporting/metrics.json",
        "08_reporting/merge_sweep.json", "08_reporting/validation_report.json", "08_reporting/report/report.md",
        "08_reporting/registered_model.json", "08_reporting/data_docs/index.html",
    }
    assert expected <= set(hashes(first_dir)), sorted(expected - set(hashes(first_dir)))
    assert (first_dir / "08_reporting" / "clip_benchmark").is_dir()

    run(project, "test_b")
    run(project, "test", run_name="other")

    after = fingerprints(data)
    changed = sorted(p for p, print_ in first.items() if after.get(p) != print_)
    assert not changed, f"files of the first run rewritten, changed or removed: {changed[:10]}"

    # the other two runs wrote the same set of outputs, each in its own folder
    for other in (run_dir(project, "test_b"), run_dir(project, "test", "other")):
        assert layout(other) == layout(first_dir), sorted(layout(other) ^ layout(first_dir))
        assert (other / "08_reporting" / "data_docs" / "index.html").is_file()
    assert run_dir(project, "test", "other") == data / "runs" / "test" / "other"
    # nothing went to the default run's simple paths; raw inputs are shared, in their own folder
    assert sorted(p.name for p in data.iterdir()) == ["01_raw", "runs"]
    assert sorted(p.name for p in (data / "01_raw").iterdir()) == ["demo_test"]
