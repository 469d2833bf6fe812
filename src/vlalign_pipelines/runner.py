"""A Kedro runner that honours plan nodes (`kedro run --pipeline retrain` uses it; see vlalign_pipelines.cli).

A node tagged :data:`PLAN_TAG` returns a plan mapping with ``run`` true or false. :class:`PlannedRunner` runs that
node and everything it depends on first; when the plan says ``run: false`` it stops there and the rest of the
pipeline (training, merging, evaluation, registration in the ``retrain`` pipeline) does not run. Pipelines
without a plan node run exactly as with Kedro's ``SequentialRunner``.

Kedro has no conditional nodes, and a node cannot produce "nothing" for a dataset that is saved to disk; gating
at the runner keeps every node and catalog entry the same as in the default pipeline. A run with another runner
(``--runner``) still registers nothing when the plan says so (the retrain pipeline's registration node checks the
plan too), but it does the work.
"""

from __future__ import annotations

import logging
from typing import Any

from kedro.runner import SequentialRunner

log = logging.getLogger(__name__)

#: Tag of the node whose output decides whether the rest of the pipeline runs.
PLAN_TAG = "vlalign.plan"


class PlannedRunner(SequentialRunner):
    """``SequentialRunner``, except that the output of a :data:`PLAN_TAG` node may end the run early."""

    def _run(self, pipeline: Any, catalog: Any, hook_manager: Any = None, run_id: str | None = None) -> None:
        plans = [n for n in pipeline.nodes if PLAN_TAG in n.tags]
        if not plans:
            return super()._run(pipeline, catalog, hook_manager, run_id)
        if len(plans) > 1:
            raise ValueError(f"a pipeline may hold one node tagged {PLAN_TAG!r}; found {[n.name for n in plans]}.")
        plan_node = plans[0]
        head = pipeline.to_nodes(plan_node.name)
        super()._run(head, catalog, hook_manager, run_id)
        rest = pipeline - head
        if not rest.nodes:
            return None
        plan = catalog.load(plan_node.outputs[0])
        if plan.get("run", True):
            return super()._run(rest, catalog, hook_manager, run_id)
        log.info("%s: %s; %d node(s) not run: %s", plan_node.name, plan.get("reason", "nothing to do"), len(rest.nodes),
                 ", ".join(n.name for n in rest.nodes))
        return None
