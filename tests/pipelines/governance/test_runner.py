"""PlannedRunner: a plan node may end a run early; the retrain nodes never register when the plan says no (whatever
runner ran them). Small in-memory pipelines, no training."""

from __future__ import annotations

from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline, node
from kedro.runner import SequentialRunner

from vlalign_pipelines.pipelines.retrain.nodes import gate_retrained_model, register_retrained_model
from vlalign_pipelines.runner import PLAN_TAG, PlannedRunner


class Kept(MemoryDataset):
    def _release(self) -> None:
        pass


def build(calls: list[str]) -> Pipeline:
    def source() -> int:
        calls.append("source")
        return 1

    def plan(x: int, go: bool) -> dict:
        calls.append("plan")
        return {"run": go, "reason": "said so"}

    def work(x: int, p: dict) -> int:
        calls.append("work")
        return x + 1

    def other() -> int:  # independent of the plan: still after it, so it is gated too
        calls.append("other")
        return 2

    return Pipeline([node(source, None, "x", name="source"), node(plan, ["x", "params:go"], "plan", name="plan", tags=[PLAN_TAG]),
                     node(work, ["x", "plan"], "y", name="work"), node(other, None, "z", name="other")])


def catalog(go: bool) -> DataCatalog:
    return DataCatalog({"params:go": Kept(go), "x": Kept(), "plan": Kept(), "y": Kept(), "z": Kept()})


def test_plan_stops_the_rest_of_the_pipeline() -> None:
    calls: list[str] = []
    stopped = catalog(False)
    PlannedRunner().run(build(calls), stopped)
    assert calls == ["source", "plan"] and stopped.load("plan") == {"run": False, "reason": "said so"}
    calls.clear()
    going = catalog(True)
    PlannedRunner().run(build(calls), going)
    assert calls[:2] == ["source", "plan"] and sorted(calls[2:]) == ["other", "work"] and going.load("y") == 2
    calls.clear()
    SequentialRunner().run(build(calls), catalog(False))  # Kedro's runner knows no plans
    assert sorted(calls) == ["other", "plan", "source", "work"]


def test_pipelines_without_a_plan_run_as_with_the_sequential_runner() -> None:
    calls: list[str] = []
    pipe = Pipeline([n for n in build(calls).nodes if n.name in ("source", "other")])
    PlannedRunner().run(pipe, catalog(False))
    assert sorted(calls) == ["other", "source"]


def test_retrain_registers_nothing_when_the_plan_says_so() -> None:
    plan = {"run": False, "reason": "nothing changed since champion v1"}
    record = register_retrained_model(plan, {"mode": "scratch", "checkpoint": None}, {"init": "scratch"})
    assert record == {"registered": False, "reason": "nothing changed since champion v1"}
    decision = gate_retrained_model(record, {"gate": {"primary": ["retrieval.mean_recall"]}})
    assert decision == {"outcome": "skipped", "passed": False, "reason": "nothing changed since champion v1"}
