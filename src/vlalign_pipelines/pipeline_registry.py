"""Project pipelines.

``__default__`` runs everything: validation -> training stages -> merge -> evaluation -> registration.
Each part also runs alone, e.g. ``kedro run --pipeline training``.
"""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline


def register_pipelines() -> dict[str, Pipeline]:
    pipelines = find_pipelines(raise_errors=True)
    order = ["validation", "training", "merge", "evaluation", "registration"]
    # `kedro run --pipeline X` makes kedro import only X's module, so the default may be incomplete then.
    if all(name in pipelines for name in order):
        pipelines["__default__"] = sum((pipelines[name] for name in order), Pipeline([]))
    return pipelines
