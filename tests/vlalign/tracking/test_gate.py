"""The champion/challenger decision and the replay over all versions, without MLflow."""

from __future__ import annotations

import itertools
import random

import pytest

from vlalign.errors import ConfigError
from vlalign.tracking.registry import (
    EvalData,
    GateConfig,
    GuardMetric,
    PrimaryMetric,
    TieBreaker,
    VersionInfo,
    decide,
    flat_metrics,
    plan_champion,
    registered_model_name,
)

DATA = EvalData("a" * 64, "retrieval=demo-flickr, zero_shot=demo-imagenet")
OTHER = EvalData("b" * 64, "retrieval=flickr30k, zero_shot=demo-imagenet")
R, Z, ECE = "retrieval.mean_recall", "zero_shot.acc1", "zero_shot.ece"


def gate(**overrides) -> GateConfig:
    base = {"primary": [{"metric": R, "min_improvement": 0.01}],
            "guards": [{"metric": Z, "max_drop": 0.02}],
            "tie_breakers": [Z]}
    return GateConfig.from_dict({**base, **overrides})


def run(champion, challenger, g=None, champion_data=DATA, challenger_data=DATA):
    return decide(champion, challenger, g or gate(), champion_data=champion_data, challenger_data=challenger_data)


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


def test_config_from_params_and_round_trip() -> None:
    g = GateConfig.from_dict({"primary": [R, {"metric": "zero_shot.acc5", "min_improvement": 0.02}],
                              "guards": [{"metric": ECE, "max_drop": 0.01, "higher_is_better": False}],
                              "tie_breakers": [{"metric": Z}], "tie_tolerance": 0.001})
    assert g.primary == (PrimaryMetric(R), PrimaryMetric("zero_shot.acc5", 0.02))
    assert g.guards == (GuardMetric(ECE, 0.01, False),)
    assert g.tie_breakers == (TieBreaker(Z),)
    assert g.tie_tolerance == 0.001
    assert GateConfig.from_dict(g.to_dict()) == g
    assert g.sha256() == GateConfig.from_dict(g.to_dict()).sha256() != gate().sha256()
    assert g.metric_names() == [R, "zero_shot.acc5", ECE, Z]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, "registration.gate.primary: name at least one metric"),
        ({"primary": []}, "registration.gate.primary: name at least one metric"),
        ({"primary": R}, "registration.gate.primary: expected a list"),
        ({"primary": [{"metric": R, "min_improvement": -0.1}]}, "registration.gate.primary[0].min_improvement"),
        ({"primary": [{"metric": R, "min_improvment": 0.1}]}, "registration.gate.primary[0]: fields"),
        ({"primary": ["mean_recall"]}, "registration.gate.primary[0].metric: 'mean_recall'"),
        ({"primary": [R], "guards": [{"metric": Z, "max_drop": "a lot"}]}, "registration.gate.guards[0].max_drop"),
        ({"primary": [{"metric": R, "higher_is_better": "yes"}]}, "registration.gate.primary[0].higher_is_better"),
        ({"primary": [R], "tie_tolerance": -1}, "registration.gate.tie_tolerance"),
        ({"primary": [R], "champion_alias": "x", "challenger_alias": "x"}, "must differ"),
        ({"primary": [R], "threshold": 1}, "unknown field(s) ['threshold']"),
    ],
)
def test_config_errors_name_the_field(params: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        GateConfig.from_dict(params)
    assert expected in str(info.value)


# ------------------------------------------------------------------------------------------------
# First version, data identity, missing metrics
# ------------------------------------------------------------------------------------------------


def test_first_version_becomes_champion() -> None:
    decision = decide(None, {R: 0.1, Z: 0.2}, gate(), challenger_data=DATA)
    assert decision.outcome == "promote" and decision.passed
    assert "first version" in decision.reason and DATA.sha256 in decision.reason
    assert decision.deltas[0].challenger == 0.1 and decision.deltas[0].champion is None


def test_version_without_data_hash_or_primary_metric_is_refused() -> None:
    assert decide(None, {R: 0.5}, gate(), challenger_data=EvalData(None)).outcome == "refuse"
    refused = decide(None, {Z: 0.5}, gate(), challenger_data=DATA)
    assert refused.outcome == "refuse" and R in refused.reason


def test_different_evaluation_data_is_refused_with_both_hashes() -> None:
    decision = run({R: 0.30, Z: 0.5}, {R: 0.90, Z: 0.9}, challenger_data=OTHER)
    assert decision.outcome == "refuse" and not decision.passed
    for text in (DATA.sha256, OTHER.sha256, "demo-flickr", "flickr30k", "never compete"):
        assert text in decision.reason
    assert decision.deltas == []  # nothing was compared


def test_metric_missing_on_one_side_is_refused_and_on_both_sides_skipped() -> None:
    g = gate(guards=[{"metric": Z, "max_drop": 0.02}, {"metric": "retrieval_zh.mean_recall", "max_drop": 0.02}])
    skipped = run({R: 0.30, Z: 0.5}, {R: 0.35, Z: 0.5}, g)  # neither measured retrieval_zh
    assert skipped.outcome == "promote"
    zh = next(d for d in skipped.deltas if d.metric == "retrieval_zh.mean_recall")
    assert zh.ok is None and zh.delta is None
    one_sided = run({R: 0.30, Z: 0.5}, {R: 0.35, Z: 0.5, "retrieval_zh.mean_recall": 0.3}, g)
    assert one_sided.outcome == "refuse" and "retrieval_zh.mean_recall (champion has no value)" in one_sided.reason
    nan = run({R: 0.30, Z: 0.5}, {R: float("nan"), Z: 0.5})
    assert nan.outcome == "refuse"


# ------------------------------------------------------------------------------------------------
# Primary metrics, minimum improvement, direction
# ------------------------------------------------------------------------------------------------


def test_better_by_at_least_min_improvement_is_promoted() -> None:
    decision = run({R: 0.300, Z: 0.5}, {R: 0.310, Z: 0.5})  # exactly the minimum (float noise tolerated)
    assert decision.outcome == "promote"
    primary = decision.deltas[0]
    assert primary.role == "primary" and primary.delta == pytest.approx(0.01) and primary.ok is True
    assert "retrieval.mean_recall +0.01" in decision.reason


def test_improvement_below_minimum_keeps_the_champion() -> None:
    decision = run({R: 0.300, Z: 0.5}, {R: 0.309, Z: 0.5})
    assert decision.outcome == "keep"
    assert "below min_improvement 0.01" in decision.reason
    assert decision.deltas[0].ok is False


def test_worse_primary_keeps_the_champion() -> None:
    decision = run({R: 0.30, Z: 0.5}, {R: 0.29, Z: 0.9})
    assert decision.outcome == "keep" and "worse by -0.01" in decision.reason


def test_lower_is_better_primary() -> None:
    g = GateConfig.from_dict({"primary": [{"metric": ECE, "higher_is_better": False, "min_improvement": 0.01}]})
    assert run({ECE: 0.10}, {ECE: 0.08}, g).outcome == "promote"
    assert run({ECE: 0.10}, {ECE: 0.12}, g).outcome == "keep"
    assert run({ECE: 0.10}, {ECE: 0.095}, g).outcome == "keep"  # better, not by enough


def test_every_primary_metric_must_meet_its_minimum() -> None:
    g = GateConfig.from_dict({"primary": [{"metric": R, "min_improvement": 0.0}, {"metric": Z, "min_improvement": 0.0}]})
    assert run({R: 0.3, Z: 0.5}, {R: 0.4, Z: 0.5}, g).outcome == "promote"  # one better, one unchanged
    assert run({R: 0.3, Z: 0.5}, {R: 0.4, Z: 0.49}, g).outcome == "keep"  # one worse
    strict = GateConfig.from_dict({"primary": [{"metric": R, "min_improvement": 0.05}, {"metric": Z, "min_improvement": 0.05}]})
    kept = run({R: 0.3, Z: 0.5}, {R: 0.4, Z: 0.5}, strict)
    assert kept.outcome == "keep" and "zero_shot.acc1 improved by +0, below min_improvement 0.05" in kept.reason
    assert run({R: 0.3, Z: 0.5}, {R: 0.4, Z: 0.6}, strict).outcome == "promote"


# ------------------------------------------------------------------------------------------------
# Guards
# ------------------------------------------------------------------------------------------------


def test_guard_drop_within_limit_passes_beyond_it_keeps() -> None:
    assert run({R: 0.30, Z: 0.50}, {R: 0.40, Z: 0.48}).outcome == "promote"  # -0.02 == max_drop
    decision = run({R: 0.30, Z: 0.50}, {R: 0.40, Z: 0.47})
    assert decision.outcome == "keep"
    assert "guard zero_shot.acc1 dropped by 0.03 (max_drop 0.02)" in decision.reason
    guard = next(d for d in decision.deltas if d.role == "guard")
    assert guard.ok is False and guard.delta == pytest.approx(-0.03)


def test_lower_is_better_guard() -> None:
    g = GateConfig.from_dict({"primary": [R], "guards": [{"metric": ECE, "max_drop": 0.01, "higher_is_better": False}]})
    assert run({R: 0.3, ECE: 0.10}, {R: 0.4, ECE: 0.105}, g).outcome == "promote"
    assert run({R: 0.3, ECE: 0.10}, {R: 0.4, ECE: 0.12}, g).outcome == "keep"  # calibration got worse


# ------------------------------------------------------------------------------------------------
# Ties
# ------------------------------------------------------------------------------------------------


def test_tie_without_tie_breaker_keeps_the_incumbent() -> None:
    g = gate(tie_breakers=[])
    decision = run({R: 0.30, Z: 0.5}, {R: 0.30, Z: 0.9}, g)
    assert decision.tie and decision.outcome == "keep"
    assert "no tie-breaker is configured: the incumbent keeps the title" in decision.reason


def test_tie_breaker_decides_a_tie() -> None:
    better = run({R: 0.30, Z: 0.50}, {R: 0.30, Z: 0.52})
    assert better.tie and better.outcome == "promote" and "tie-breaker zero_shot.acc1 is better" in better.reason
    worse = run({R: 0.30, Z: 0.50}, {R: 0.30, Z: 0.49})
    assert worse.tie and worse.outcome == "keep" and "the incumbent keeps the title" in worse.reason
    same = run({R: 0.30, Z: 0.50}, {R: 0.30, Z: 0.50})
    assert same.tie and same.outcome == "keep" and "no tie-breaker differs" in same.reason


def test_first_differing_tie_breaker_decides() -> None:
    g = gate(tie_breakers=[Z, "zero_shot.acc5"])
    assert run({R: 0.3, Z: 0.5, "zero_shot.acc5": 0.8}, {R: 0.3, Z: 0.5, "zero_shot.acc5": 0.9}, g).outcome == "promote"
    assert run({R: 0.3, Z: 0.5, "zero_shot.acc5": 0.8}, {R: 0.3, Z: 0.4, "zero_shot.acc5": 0.9}, g).outcome == "keep"


def test_tie_tolerance_defines_a_tie() -> None:
    g = gate(tie_tolerance=0.001, tie_breakers=[])
    assert run({R: 0.3000, Z: 0.5}, {R: 0.3008, Z: 0.5}, g).tie
    assert not run({R: 0.3000, Z: 0.5}, {R: 0.3020, Z: 0.5}, g).tie


def test_tie_breaker_win_still_needs_the_guards() -> None:
    g = gate(tie_breakers=["zero_shot.acc5"])
    decision = run({R: 0.3, Z: 0.5, "zero_shot.acc5": 0.8}, {R: 0.3, Z: 0.4, "zero_shot.acc5": 0.9}, g)
    assert decision.tie and decision.outcome == "keep" and "guard zero_shot.acc1 dropped" in decision.reason


# ------------------------------------------------------------------------------------------------
# Invariants over many random cases
# ------------------------------------------------------------------------------------------------


def test_a_worse_challenger_is_never_promoted() -> None:
    """Random champions/challengers under random gates: promotion implies no primary got worse, every guard
    held, and either every primary met its minimum or the tie rule promoted on a strictly better tie-breaker."""
    rng = random.Random(0)
    grid = [0.0, 0.1, 0.2, 0.3, 0.30001, 0.31, 0.5]
    promoted = kept = 0
    for _ in range(3000):
        g = GateConfig.from_dict({
            "primary": [{"metric": R, "min_improvement": rng.choice([0.0, 0.01, 0.1])},
                        *([{"metric": "zero_shot.acc5", "min_improvement": 0.0}] if rng.random() < 0.5 else [])],
            "guards": [{"metric": Z, "max_drop": rng.choice([0.0, 0.05])}],
            "tie_breakers": rng.choice([[], [Z], ["zero_shot.acc5", Z]]),
            "tie_tolerance": rng.choice([1e-9, 1e-3]),
        })
        old = {k: rng.choice(grid) for k in (R, Z, "zero_shot.acc5")}
        new = {k: rng.choice(grid) for k in (R, Z, "zero_shot.acc5")}
        decision = decide(old, new, g, champion_data=DATA, challenger_data=DATA)
        assert decision.outcome in ("promote", "keep")
        tol = g.tie_tolerance
        if decision.passed:
            promoted += 1
            for rule in g.primary:
                assert new[rule.metric] >= old[rule.metric] - tol, (old, new, g)
            for guard in g.guards:
                assert old[guard.metric] - new[guard.metric] <= guard.max_drop + tol, (old, new, g)
            if decision.tie:
                assert g.tie_breakers and any(new[b.metric] > old[b.metric] + tol for b in g.tie_breakers)
            else:
                for rule in g.primary:
                    assert new[rule.metric] - old[rule.metric] >= rule.min_improvement - tol
        else:
            kept += 1
    assert promoted > 300 and kept > 300  # both outcomes were exercised


# ------------------------------------------------------------------------------------------------
# Replay over all versions
# ------------------------------------------------------------------------------------------------


def v(version: int, recall: float, data: EvalData = DATA, acc: float = 0.5, withdrawn: str | None = None) -> VersionInfo:
    return VersionInfo(version, {R: recall, Z: acc}, data, withdrawn)


def test_plan_follows_the_gate_in_version_order() -> None:
    versions = [v(1, 0.30), v(2, 0.35), v(3, 0.32), v(4, 0.30, OTHER), v(5, 0.355)]
    plan = plan_champion(versions, gate())
    assert plan.champion == 2 and plan.challenger == 5
    outcomes = {n: d.outcome for n, d in plan.decisions.items()}
    assert outcomes == {1: "promote", 2: "promote", 3: "keep", 4: "refuse", 5: "keep"}  # 5: +0.005 < min 0.01
    assert plan.decisions[4].reason.startswith("compared with champion v2: evaluation data differs")
    assert plan.decisions[3].champion_version == 2 and plan.decisions[1].champion_version is None


def test_plan_does_not_depend_on_listing_order() -> None:
    versions = [v(1, 0.30), v(2, 0.35), v(3, 0.50), v(4, 0.40), v(5, 0.20, OTHER)]
    plans = {plan_champion(list(order), gate()).champion for order in itertools.permutations(versions)}
    assert plans == {3}


def test_concurrent_pairs_end_on_the_better_one() -> None:
    """Two challengers registered after champion v1, whatever their numbering: the better one ends champion."""
    for first, second in ((0.35, 0.40), (0.40, 0.35)):
        plan = plan_champion([v(1, 0.30), v(2, first), v(3, second)], gate())
        assert plan.champion == (2 if first > second else 3)


def test_withdrawn_versions_leave_the_competition() -> None:
    versions = [v(1, 0.30), v(2, 0.35), v(3, 0.40, withdrawn="bad labels")]
    plan = plan_champion(versions, gate())
    assert plan.champion == 2 and plan.challenger == 2
    assert plan.decisions[3].outcome == "refuse" and "bad labels" in plan.decisions[3].reason


def test_first_comparable_version_founds_the_benchmark() -> None:
    versions = [VersionInfo(1, {R: 0.9}, EvalData(None)), v(2, 0.30), v(3, 0.35)]
    plan = plan_champion(versions, gate())
    assert plan.decisions[1].outcome == "refuse" and plan.champion == 3


def test_empty_registry_has_no_champion() -> None:
    plan = plan_champion([], gate())
    assert plan.champion is None and plan.challenger is None and plan.decisions == {}


# ------------------------------------------------------------------------------------------------
# Helpers: metric flattening, tags, names
# ------------------------------------------------------------------------------------------------


def test_flat_metrics_and_decision_tags() -> None:
    metrics = {"model": {"name": "x"}, "retrieval": {"metrics": {"image_retrieval_recall@5": 0.5, "mean_recall": 0.4}},
               "zero_shot": {"metrics": {"acc1": 0.2}}, "evaluation_data": {"sha256": "abc"}}
    assert flat_metrics(metrics) == {"retrieval.image_retrieval_recall@5": 0.5, "retrieval.mean_recall": 0.4,
                                     "zero_shot.acc1": 0.2}
    g = GateConfig.from_dict({"primary": ["retrieval.image_retrieval_recall@5"]})
    tags = decide({"retrieval.image_retrieval_recall@5": 0.4}, {"retrieval.image_retrieval_recall@5": 0.5}, g,
                  champion_data=DATA, challenger_data=DATA).tags()
    assert tags["gate.outcome"] == "promote" and tags["gate.passed"] == "true"
    assert tags["gate.delta.retrieval.image_retrieval_recall_at_5"] == "+0.1"
    assert all("@" not in key for key in tags)


def test_registered_model_name() -> None:
    metrics = {"retrieval": {"dataset": "demo-flickr"},
               "evaluation_data": {"blocks": {"retrieval": {"dataset": "demo-flickr"}, "retrieval_zh": {"dataset": "demo-flickr"},
                                              "zero_shot": {"dataset": "demo-imagenet"}}}}
    assert registered_model_name(None, "vlalign-{model}-{datasets}", "tiny-vit-bert", metrics) == \
        "vlalign-tiny-vit-bert-demo-flickr_demo-imagenet"
    assert registered_model_name(None, "{model}@{dataset}", "tiny vit", metrics) == "tiny-vit-demo-flickr"
    assert registered_model_name("my-model", "{model}", "tiny-vit-bert", metrics) == "my-model"
    with pytest.raises(ConfigError, match="registration.name_template"):
        registered_model_name(None, "{family}", "tiny-vit-bert", metrics)


def test_only_concurrent_alias_writes_are_tolerated() -> None:
    """The tracking server's alias write is read-then-insert: the loser of two first writes gets the database's
    uniqueness error, which reconcile absorbs (it re-reads and writes again); any other error still raises."""
    from mlflow.exceptions import MlflowException, RestException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, RESOURCE_DOES_NOT_EXIST

    from vlalign.tracking.registry import is_alias_write_conflict

    lost_race = RestException({"error_code": "BAD_REQUEST", "message": "(sqlite3.IntegrityError) UNIQUE constraint "
                               "failed: registered_model_aliases.workspace, registered_model_aliases.name"})
    assert is_alias_write_conflict(lost_race)
    assert is_alias_write_conflict(MlflowException("alias gone", error_code=RESOURCE_DOES_NOT_EXIST))
    assert not is_alias_write_conflict(MlflowException("permission denied", error_code=PERMISSION_DENIED))
    assert not is_alias_write_conflict(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad version"}))
