"""The champion/challenger gate and the MLflow registry operations around it.

Two parts:

1. A pure decision, :func:`decide`: the metrics of the current champion and of a challenger, a
   :class:`GateConfig`, and the identity of the data each was evaluated on, in; a :class:`GateDecision`
   (promote / keep / refuse, each metric's delta, the reason) out. :func:`plan_champion` replays the gate
   over every version of a registered model, in version order, and says which version holds the title.
2. The MLflow part: :func:`register_version` (a new version, created with its evaluation tags in one
   call), :func:`reconcile` (moves the ``champion`` and ``challenger`` aliases to what the plan says, safe
   when several registrations race) and :func:`apply_gate` (reconcile, then record and print the new
   version's decision as tags and an artifact on its run).

The gate, in order (:func:`decide`):

- The challenger's evaluation data must be the champion's (same content hash, see
  :func:`vlalign.tracking.hashing.evaluation_data_identity`); otherwise the challenger is *refused* and
  the reason names both hashes and datasets. Versions without the metrics the gate reads are refused too.
- With no champion yet, the challenger becomes champion (the first version).
- Every guard metric may drop by at most its ``max_drop``; a larger drop keeps the champion.
- **Ties**: when every primary metric is within ``tie_tolerance`` of the champion's, the versions tie.
  The incumbent keeps the title, unless the first tie-breaker metric that differs by more than
  ``tie_tolerance`` is better for the challenger (then it is promoted; if it is worse, the champion stays).
- Otherwise every primary metric must improve by at least its ``min_improvement`` (a metric within
  ``tie_tolerance`` counts as unchanged). Any primary metric that got worse keeps the champion, so a worse
  challenger is never promoted.

Concurrency: MLflow has no compare-and-set for aliases, so the champion is never decided from "the alias
as I read it". It is a deterministic function of the set of versions (their metrics and data hashes are
tags written atomically with each version): :func:`plan_champion` replays the gate over them in version
order. :func:`reconcile` lists the versions, writes the aliases the plan gives, lists again, and repeats
while the set of versions changed or an alias differs from the plan. Whichever process writes last has
listed after the last version was created, so the aliases end on the plan of the complete set, whatever
the interleaving (argument in docs/design/registry.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from vlalign.errors import ConfigError, RegistryError

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"

#: Model-version tags written when a version is created (read back by the gate).
TAG_EVAL_SHA256 = "eval.data_sha256"  # content hash of the evaluated data
TAG_EVAL_DATASETS = "eval.datasets"  # "retrieval=demo-flickr, zero_shot=demo-imagenet, ..."
TAG_EVAL_METRICS = "eval.metrics"  # JSON {"<block>.<metric>": value}
#: Set this tag (any reason text) on a version to take it out of the competition (rollback).
TAG_WITHDRAWN = "gate.withdrawn"
#: Prefix of the decision tags written on a version.
GATE_TAG_PREFIX = "gate."

OUTCOMES = ("promote", "keep", "refuse")


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrimaryMetric:
    """A metric that decides: the challenger must improve on it."""

    metric: str  # "<block>.<metric>" of metrics.json, e.g. "retrieval.mean_recall"
    min_improvement: float = 0.0  # the least gain over the champion that counts (absolute, >= 0)
    higher_is_better: bool = True  # False for errors (e.g. zero_shot.ece)


@dataclass(frozen=True)
class GuardMetric:
    """A metric that may not get much worse, whatever the primary metrics do."""

    metric: str  # "<block>.<metric>" of metrics.json, e.g. "zero_shot.acc1"
    max_drop: float = 0.0  # the largest loss against the champion allowed (absolute, >= 0)
    higher_is_better: bool = True  # False for errors


@dataclass(frozen=True)
class TieBreaker:
    """A metric consulted, in order, only when the primary metrics tie."""

    metric: str  # "<block>.<metric>" of metrics.json
    higher_is_better: bool = True  # False for errors


@dataclass(frozen=True)
class GateConfig:
    """The champion/challenger gate (``registration.gate`` in conf/base/parameters_registration.yml)."""

    primary: tuple[PrimaryMetric, ...]  # every one must improve by at least its min_improvement
    guards: tuple[GuardMetric, ...] = ()  # each may drop by at most its max_drop
    tie_breakers: tuple[TieBreaker, ...] = ()  # on a tie: the first that differs decides; none -> incumbent stays
    tie_tolerance: float = 1e-9  # |challenger - champion| <= this counts as equal (absolute)
    champion_alias: str = CHAMPION  # alias of the version that holds the title
    challenger_alias: str = CHALLENGER  # alias of the newest version

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "registration.gate") -> GateConfig:
        """Build from the parameters dict, naming ``where`` and the field on any error."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping with `primary` (and optionally `guards`, `tie_breakers`).")
        known = {"primary", "guards", "tie_breakers", "tie_tolerance", "champion_alias", "challenger_alias"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; the gate has the fields {sorted(known)}.")
        primary = tuple(_metric_rule(PrimaryMetric, item, f"{where}.primary[{i}]") for i, item in
                        enumerate(_as_list(data.get("primary"), f"{where}.primary")))
        if not primary:
            raise ConfigError(f"{where}.primary: name at least one metric, e.g. `primary: [{{metric: retrieval.mean_recall}}]`.")
        guards = tuple(_metric_rule(GuardMetric, item, f"{where}.guards[{i}]") for i, item in
                       enumerate(_as_list(data.get("guards"), f"{where}.guards")))
        breakers = tuple(_metric_rule(TieBreaker, item, f"{where}.tie_breakers[{i}]") for i, item in
                         enumerate(_as_list(data.get("tie_breakers"), f"{where}.tie_breakers")))
        tolerance = _non_negative(data.get("tie_tolerance", 1e-9), f"{where}.tie_tolerance")
        aliases = {k: str(data.get(k, default)) for k, default in (("champion_alias", CHAMPION), ("challenger_alias", CHALLENGER))}
        if aliases["champion_alias"] == aliases["challenger_alias"]:
            raise ConfigError(f"{where}: champion_alias and challenger_alias must differ.")
        return cls(primary=primary, guards=guards, tie_breakers=breakers, tie_tolerance=tolerance, **aliases)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (round-trips through :meth:`from_dict`)."""
        return asdict(self)

    def sha256(self) -> str:
        """Hash of the configuration, recorded with each decision."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def metric_names(self) -> list[str]:
        """Every metric the gate reads, primary first."""
        names = [m.metric for m in (*self.primary, *self.guards, *self.tie_breakers)]
        return list(dict.fromkeys(names))


def _as_list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list of metrics, got {type(value).__name__}.")
    return list(value)


def _non_negative(value: Any, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number >= 0, got {value!r}.") from None
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"{where}: expected a number >= 0, got {value!r}.")
    return number


def _metric_rule(cls: type, item: Any, where: str) -> Any:
    """A PrimaryMetric / GuardMetric / TieBreaker from ``"block.metric"`` or a mapping of its fields."""
    if isinstance(item, str):
        item = {"metric": item}
    if not isinstance(item, Mapping):
        raise ConfigError(f"{where}: expected a metric name or a mapping with `metric`, got {item!r}.")
    allowed = set(cls.__dataclass_fields__)
    unknown = sorted(set(item) - allowed)
    if unknown or "metric" not in item:
        raise ConfigError(f"{where}: fields {sorted(item)}; expected `metric` and optionally {sorted(allowed - {'metric'})}.")
    metric = str(item["metric"])
    if "." not in metric:
        raise ConfigError(f"{where}.metric: {metric!r}; expected '<block>.<metric>' of metrics.json, e.g. 'retrieval.mean_recall'.")
    values: dict[str, Any] = {"metric": metric}
    for key in ("min_improvement", "max_drop"):
        if key in item:
            values[key] = _non_negative(item[key], f"{where}.{key}")
    if "higher_is_better" in item:
        if not isinstance(item["higher_is_better"], bool):
            raise ConfigError(f"{where}.higher_is_better: expected true or false, got {item['higher_is_better']!r}.")
        values["higher_is_better"] = item["higher_is_better"]
    return cls(**values)


# ------------------------------------------------------------------------------------------------
# The decision (pure)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalData:
    """Identity of the data a version was evaluated on."""

    sha256: str | None  # content hash of everything evaluated (None: not recorded)
    datasets: str = ""  # human-readable names, e.g. "retrieval=demo-flickr, zero_shot=demo-imagenet"


@dataclass
class MetricDelta:
    """One metric of the gate, champion against challenger."""

    metric: str  # "<block>.<metric>"
    role: str  # "primary" | "guard" | "tie_breaker"
    champion: float | None  # the champion's value (None: no champion)
    challenger: float | None  # the challenger's value
    delta: float | None  # challenger - champion
    gain: float | None  # delta in the metric's good direction (> 0: the challenger is better)
    threshold: float | None  # min_improvement (primary) or max_drop (guard)
    ok: bool | None  # whether this metric lets the challenger through (None: not judged)


@dataclass
class GateDecision:
    """What the gate decided for one challenger."""

    outcome: str  # "promote" (it takes the title) | "keep" (the champion stays) | "refuse" (not comparable)
    reason: str  # one sentence saying why
    deltas: list[MetricDelta] = field(default_factory=list)  # every gate metric, in config order
    tie: bool = False  # the primary metrics tied
    challenger_version: int | None = None  # filled by the registry part
    champion_version: int | None = None  # the version compared against (None: none)

    @property
    def passed(self) -> bool:
        """True when the challenger takes the title."""
        return self.outcome == "promote"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return {"outcome": self.outcome, "passed": self.passed, "reason": self.reason, "tie": self.tie,
                "challenger_version": self.challenger_version, "champion_version": self.champion_version,
                "deltas": [asdict(d) for d in self.deltas]}

    def tags(self) -> dict[str, str]:
        """The decision as model-version tags (``gate.*``)."""
        tags = {
            f"{GATE_TAG_PREFIX}outcome": self.outcome,
            f"{GATE_TAG_PREFIX}passed": str(self.passed).lower(),
            f"{GATE_TAG_PREFIX}reason": self.reason,
            f"{GATE_TAG_PREFIX}tie": str(self.tie).lower(),
            f"{GATE_TAG_PREFIX}compared_with": str(self.champion_version) if self.champion_version is not None else "none",
        }
        for d in self.deltas:
            if d.delta is not None:
                tags[f"{GATE_TAG_PREFIX}delta.{_tag_safe(d.metric)}"] = f"{d.delta:+.6g}"
        return tags


def _tag_safe(name: str) -> str:
    """Metric names as tag keys: MLflow refuses ``@`` (``recall@5`` -> ``recall_at_5``)."""
    return re.sub(r"[^\w.\-/ ]", "_", name.replace("@", "_at_"))


def _value(metrics: Mapping[str, Any], name: str) -> float | None:
    value = metrics.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _fmt(x: float) -> str:
    return f"{x:+.4g}"


def decide(
    champion_metrics: Mapping[str, Any] | None,
    challenger_metrics: Mapping[str, Any],
    gate: GateConfig,
    *,
    champion_data: EvalData | None = None,
    challenger_data: EvalData | None = None,
) -> GateDecision:
    """Decide whether a challenger takes the title from the champion (rules: module docstring).

    Args:
        champion_metrics: the champion's flat metrics ``{"<block>.<metric>": value}``; None when there is
            no champion yet.
        challenger_metrics: the challenger's flat metrics.
        gate: the gate configuration.
        champion_data: identity of the champion's evaluation data.
        challenger_data: identity of the challenger's evaluation data; a challenger without one is refused.

    Returns:
        A :class:`GateDecision`; ``outcome`` is ``promote``, ``keep`` or ``refuse``.
    """
    tol = gate.tie_tolerance
    if challenger_data is None or not challenger_data.sha256:
        return GateDecision("refuse", "the challenger has no evaluation-data hash (eval.data_sha256); it cannot be "
                            "compared with any version. Register it from a run of the evaluation pipeline.")
    missing = [m.metric for m in gate.primary if _value(challenger_metrics, m.metric) is None]
    if missing:
        return GateDecision("refuse", f"the challenger has no value for the primary metric(s) {missing}; it cannot "
                            "compete. Evaluate it on the blocks the gate reads, or change registration.gate.primary.")
    if champion_metrics is None:
        deltas = [MetricDelta(m.metric, "primary", None, _value(challenger_metrics, m.metric), None, None,
                              m.min_improvement, None) for m in gate.primary]
        return GateDecision("promote", f"first version evaluated on this data ({challenger_data.datasets}; sha256 "
                            f"{challenger_data.sha256}): it becomes champion.", deltas)
    if champion_data is None or champion_data.sha256 != challenger_data.sha256:
        champ = champion_data or EvalData(None)
        return GateDecision(
            "refuse",
            f"evaluation data differs: the champion was evaluated on {champ.datasets or 'unknown data'} (sha256 "
            f"{champ.sha256}), the challenger on {challenger_data.datasets} (sha256 {challenger_data.sha256}). "
            "Versions evaluated on different data never compete; register under another name "
            "(registration.registered_model_name) or withdraw the old versions.",
        )

    deltas: list[MetricDelta] = []
    problems: list[str] = []

    def compare(metric: str, higher: bool, role: str, threshold: float | None) -> MetricDelta | None:
        old, new = _value(champion_metrics, metric), _value(challenger_metrics, metric)
        if old is None and new is None and role != "primary":
            deltas.append(MetricDelta(metric, role, None, None, None, None, threshold, None))
            return None  # measured by neither version: does not apply
        if old is None or new is None:
            problems.append(f"{metric} ({'champion' if old is None else 'challenger'} has no value)")
            return None
        delta = new - old
        gain = delta if higher else -delta
        if abs(gain) <= tol:
            gain = 0.0
        entry = MetricDelta(metric, role, old, new, delta, gain, threshold, None)
        deltas.append(entry)
        return entry

    primary = [(m, compare(m.metric, m.higher_is_better, "primary", m.min_improvement)) for m in gate.primary]
    guards = [(g, compare(g.metric, g.higher_is_better, "guard", g.max_drop)) for g in gate.guards]
    breakers = [(b, compare(b.metric, b.higher_is_better, "tie_breaker", None)) for b in gate.tie_breakers]
    if problems:
        return GateDecision("refuse", f"cannot compare on {', '.join(problems)}; both versions need every gate "
                            "metric. Re-evaluate the older version or change registration.gate.", deltas)

    failed_guards = []
    for rule, entry in guards:
        if entry is None:
            continue
        entry.ok = -entry.gain <= rule.max_drop + tol
        if not entry.ok:
            failed_guards.append(f"guard {rule.metric} dropped by {-entry.gain:.4g} (max_drop {rule.max_drop:g})")

    tie = all(entry.gain == 0.0 for _, entry in primary)
    if tie:
        for _, entry in primary:
            entry.ok = False
        verdict, why = "keep", "no tie-breaker differs: the incumbent keeps the title"
        for rule, entry in breakers:
            if entry is None or entry.gain == 0.0:
                continue
            entry.ok = entry.gain > 0
            verdict = "promote" if entry.ok else "keep"
            why = (f"tie-breaker {rule.metric} is {'better' if entry.ok else 'worse'} by {_fmt(entry.delta)}: "
                   f"{'the challenger takes the title' if entry.ok else 'the incumbent keeps the title'}")
            break
        if not gate.tie_breakers:
            why = "no tie-breaker is configured: the incumbent keeps the title"
        if failed_guards and verdict == "promote":
            verdict, why = "keep", f"{why}, but {'; '.join(failed_guards)}"
        names = ", ".join(m.metric for m in gate.primary)
        return GateDecision(verdict, f"tie on {names} (|delta| <= {tol:g}); {why}.", deltas, tie=True)

    short = []
    for rule, entry in primary:
        entry.ok = entry.gain >= rule.min_improvement - tol and (entry.gain > 0 or rule.min_improvement <= tol)
        if entry.gain < 0:
            short.append(f"{rule.metric} is worse by {_fmt(entry.delta)}")
        elif not entry.ok:
            short.append(f"{rule.metric} improved by {_fmt(entry.gain)}, below min_improvement {rule.min_improvement:g}")
    if short or failed_guards:
        return GateDecision("keep", f"the champion stays: {'; '.join(short + failed_guards)}.", deltas)
    gains = ", ".join(f"{rule.metric} {_fmt(entry.delta)} (min_improvement {rule.min_improvement:g})"
                      for rule, entry in primary)
    guard_text = "; guards within limits" if gate.guards else ""
    return GateDecision("promote", f"improves {gains}{guard_text}.", deltas)


def flat_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``{"<block>.<metric>": value}`` from a metrics.json dict (blocks that hold a ``metrics`` mapping)."""
    flat = {}
    for block, body in metrics.items():
        if isinstance(body, Mapping) and isinstance(body.get("metrics"), Mapping):
            for name, value in body["metrics"].items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    flat[f"{block}.{name}"] = float(value)
    return flat


# ------------------------------------------------------------------------------------------------
# The plan over all versions (pure)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionInfo:
    """What the gate needs to know about one registered version (read from its tags)."""

    version: int  # the version number
    metrics: Mapping[str, float]  # flat metrics (eval.metrics tag)
    data: EvalData  # evaluation-data identity (eval.data_sha256 / eval.datasets tags)
    withdrawn: str | None = None  # the gate.withdrawn tag's text: out of the competition
    run_id: str | None = None  # the run the version was logged from


@dataclass
class ChampionPlan:
    """The aliases a registered model should have, and each version's decision."""

    champion: int | None  # the version that holds the title (None: no eligible version)
    challenger: int | None  # the newest version that is not withdrawn
    decisions: dict[int, GateDecision]  # version -> its decision when it was the challenger


def plan_champion(versions: Sequence[VersionInfo], gate: GateConfig) -> ChampionPlan:
    """Replay the gate over ``versions`` in version order: each one challenges the champion of the versions
    before it. A deterministic function of the set of versions, whoever computes it and whenever."""
    ordered = sorted(versions, key=lambda v: v.version)
    decisions: dict[int, GateDecision] = {}
    champion: VersionInfo | None = None
    for info in ordered:
        if info.withdrawn is not None:
            decision = GateDecision("refuse", f"withdrawn from the competition ({TAG_WITHDRAWN}: {info.withdrawn}).")
        elif champion is None:
            decision = decide(None, info.metrics, gate, challenger_data=info.data)
        else:
            decision = decide(champion.metrics, info.metrics, gate, champion_data=champion.data, challenger_data=info.data)
            decision.champion_version = champion.version
            if decision.outcome == "refuse":
                decision.reason = f"compared with champion v{champion.version}: {decision.reason}"
        decision.challenger_version = info.version
        decisions[info.version] = decision
        if decision.passed:
            champion = info
    active = [v.version for v in ordered if v.withdrawn is None]
    return ChampionPlan(champion.version if champion else None, max(active) if active else None, decisions)


# ------------------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------------------


def evaluation_datasets(metrics: Mapping[str, Any]) -> list[str]:
    """Dataset names of the evaluated blocks, in block order, each once."""
    blocks = (metrics.get("evaluation_data") or {}).get("blocks") or {
        k: v for k, v in metrics.items() if isinstance(v, Mapping) and "dataset" in v}
    return list(dict.fromkeys(str(b["dataset"]) for b in blocks.values() if b.get("dataset")))


def registered_model_name(configured: str | None, template: str, model: str, metrics: Mapping[str, Any]) -> str:
    """The registered model's name: ``configured`` when set, else ``template`` filled in.

    Placeholders: ``{model}`` (the model config's name, its family), ``{dataset}`` (the retrieval
    benchmark's dataset) and ``{datasets}`` (every evaluated dataset, joined by ``_``). Characters MLflow
    model names and URIs do not take are replaced by ``-``.
    """
    if configured:
        name = str(configured)
    else:
        datasets = evaluation_datasets(metrics)
        retrieval = (metrics.get("retrieval") or {}).get("dataset") or (datasets[0] if datasets else "unknown")
        try:
            name = template.format(model=model, dataset=retrieval, datasets="_".join(datasets) or "unknown")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"registration.name_template {template!r}: {exc!r}; placeholders are {{model}}, "
                              "{dataset} and {datasets}.") from None
    clean = re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-.")
    if not clean:
        raise ConfigError(f"registration: registered model name {name!r} is empty after removing characters MLflow refuses.")
    return clean


# ------------------------------------------------------------------------------------------------
# MLflow
# ------------------------------------------------------------------------------------------------


def evaluation_tags(metrics: Mapping[str, Any]) -> dict[str, str]:
    """The tags a version needs to compete: evaluation-data hash, dataset names, flat metrics (JSON)."""
    data = metrics.get("evaluation_data") or {}
    tags = {TAG_EVAL_METRICS: json.dumps(flat_metrics(metrics), sort_keys=True)}
    if data.get("sha256"):
        tags[TAG_EVAL_SHA256] = str(data["sha256"])
        tags[TAG_EVAL_DATASETS] = str(data.get("datasets", ""))
    return tags


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def _client(client: Any = None) -> Any:
    if client is not None:
        return client
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def register_version(
    model_uri: str, name: str, tags: Mapping[str, str], run_id: str | None = None, client: Any = None,
    await_seconds: int = 300,
) -> Any:
    """Create a new version of ``name`` (and the registered model if needed), with ``tags`` written in the
    same call, so a version never exists without its evaluation tags.

    ``models:/<model_id>`` / ``runs:/`` URIs of logged models go through ``mlflow.register_model`` (which
    links the version to its logged model); any other artifact URI becomes the version's source as is,
    with ``run_id`` as its run.
    """
    from mlflow.exceptions import MlflowException

    tags = {k: str(v) for k, v in tags.items()}
    if model_uri.startswith(("models:/", "runs:/")):
        import mlflow

        return mlflow.register_model(model_uri, name, await_registration_for=await_seconds, tags=tags)
    client = _client(client)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.create_model_version(name, source=model_uri, run_id=run_id, tags=tags)


def read_versions(name: str, client: Any = None) -> list[VersionInfo]:
    """Every version of ``name`` with what the gate reads from its tags, in version order."""
    client = _client(client)
    found, token = [], None
    while True:
        page = client.search_model_versions(filter_string=f"name = '{name}'", page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            break
    infos = []
    for mv in found:
        if str(getattr(mv, "status", "READY")) not in ("READY", "ModelVersionStatus.READY"):
            continue
        tags = dict(mv.tags or {})
        try:
            metrics = json.loads(tags.get(TAG_EVAL_METRICS, "{}"))
        except json.JSONDecodeError:
            metrics = {}
        infos.append(VersionInfo(int(mv.version), metrics, EvalData(tags.get(TAG_EVAL_SHA256), tags.get(TAG_EVAL_DATASETS, "")),
                                 tags.get(TAG_WITHDRAWN), mv.run_id))
    return sorted(infos, key=lambda v: v.version)


def _aliases(name: str, client: Any) -> dict[str, int]:
    return {alias: int(version) for alias, version in (client.get_registered_model(name).aliases or {}).items()}


#: Server errors that mean another writer changed the same alias at the same moment (the tracking server's alias
#: write is read-then-insert: two first writes of one alias race to the INSERT, and the loser gets the database's
#: uniqueness error; a delete can find the alias already gone).
_ALIAS_CONFLICT = re.compile(r"UNIQUE constraint|IntegrityError|duplicate key|RESOURCE_ALREADY_EXISTS|"
                             r"RESOURCE_DOES_NOT_EXIST|already exists", re.IGNORECASE)


def is_alias_write_conflict(exc: Exception) -> bool:
    """True when ``exc`` (an MLflow error) says a concurrent writer touched the alias; :func:`reconcile` then
    re-reads the registry and writes again, so the conflict is harmless."""
    code = exc.get_error_code() if hasattr(exc, "get_error_code") else getattr(exc, "error_code", "")
    return _ALIAS_CONFLICT.search(f"{code} {exc}") is not None


def _set_alias(client: Any, name: str, alias: str, version: int | None, current: int | None) -> None:
    from mlflow.exceptions import MlflowException

    if version == current:
        return
    try:
        if version is None:
            client.delete_registered_model_alias(name, alias)
        else:
            client.set_registered_model_alias(name, alias, str(version))
    except MlflowException as exc:
        if not is_alias_write_conflict(exc):
            raise
        log.info("registry %s: alias %r was written concurrently (%s); reading the registry again", name, alias,
                 str(exc).splitlines()[0][:160])


@dataclass
class ReconcileResult:
    """The outcome of :func:`reconcile`."""

    plan: ChampionPlan  # the plan the aliases were set to
    aliases: dict[str, int]  # the aliases as read after the last write
    rounds: int  # list-write-list rounds it took
    converged: bool  # the last round saw no new version and the aliases as planned


def reconcile(
    name: str,
    gate: GateConfig,
    client: Any = None,
    max_rounds: int = 20,
    before_write: Callable[[ChampionPlan], None] | None = None,
) -> ReconcileResult:
    """Move the champion and challenger aliases of ``name`` to :func:`plan_champion`'s answer.

    Each round lists every version, plans, writes the aliases that differ from the plan, and lists again;
    it stops when neither the versions nor the aliases changed in between, so a write based on a stale
    listing (another registration created a version meanwhile) is corrected before returning.

    Args:
        before_write: called with the plan just before the aliases are written (a seam for tests that
            force an interleaving).
    """
    client = _client(client)
    plan, aliases = ChampionPlan(None, None, {}), {}
    for round_ in range(1, max_rounds + 1):
        versions = read_versions(name, client)
        plan = plan_champion(versions, gate)
        current = _aliases(name, client)
        if before_write is not None:
            before_write(plan)
        _set_alias(client, name, gate.champion_alias, plan.champion, current.get(gate.champion_alias))
        _set_alias(client, name, gate.challenger_alias, plan.challenger, current.get(gate.challenger_alias))
        after = read_versions(name, client)
        aliases = _aliases(name, client)
        same_versions = [(v.version, v.withdrawn, v.data.sha256) for v in after] == \
                        [(v.version, v.withdrawn, v.data.sha256) for v in versions]
        if same_versions and aliases.get(gate.champion_alias) == plan.champion and \
                aliases.get(gate.challenger_alias) == plan.challenger:
            return ReconcileResult(plan, aliases, round_, True)
        log.debug("registry %s changed during reconcile round %d; listing again", name, round_)
    log.warning("registry %s: aliases did not settle after %d rounds (versions still being registered?); "
                "the next registration reconciles again.", name, max_rounds)
    return ReconcileResult(plan, aliases, max_rounds, False)


def format_decision(record: Mapping[str, Any]) -> str:
    """The decision record as the lines printed to the log."""
    compared = record.get("champion_version")
    head = (f"gate {record['registered_model']} v{record['version']} vs "
            f"{'champion v' + str(compared) if compared is not None else 'no champion'}: "
            f"{'PASS' if record['passed'] else 'FAIL'} ({record['outcome']})")
    lines = [head]
    for d in record.get("deltas", []):
        if d["challenger"] is None and d["champion"] is None:
            lines.append(f"  {d['metric']:<40} {d['role']:<11} not measured by either version")
            continue
        old = "-" if d["champion"] is None else f"{d['champion']:.4f}"
        delta = "" if d["delta"] is None else f"  delta {d['delta']:+.4f}"
        limit = ""
        if d["threshold"] is not None:
            limit = f" ({'min_improvement' if d['role'] == 'primary' else 'max_drop'} {d['threshold']:g})"
        ok = "" if d["ok"] is None else ("  ok" if d["ok"] else "  not met")
        lines.append(f"  {d['metric']:<40} {d['role']:<11} {old} -> {d['challenger']:.4f}{delta}{limit}{ok}")
    lines.append(f"  reason: {record['reason']}")
    lines.append(f"  aliases now: {record['champion_alias']} -> v{record['champion']}, "
                 f"{record['challenger_alias']} -> v{record['challenger']}")
    return "\n".join(lines)


def apply_gate(name: str, version: int | str, gate: GateConfig, client: Any = None, **reconcile_kwargs: Any) -> dict[str, Any]:
    """Reconcile the aliases of ``name``, then record ``version``'s decision: ``gate.*`` tags on the version and
    ``gate/decision-v<N>.json`` in the version's run. :func:`format_decision` gives the printed form.

    Returns:
        The decision record: ``registered_model``, ``version``, ``outcome``, ``passed``, ``reason``, ``tie``,
        ``deltas``, ``champion_version`` (compared against), ``champion`` / ``challenger`` (the aliases
        after reconciling), ``gate`` (its config) and ``gate_sha256``, ``rounds``, ``converged``.
    """
    client = _client(client)
    version = int(version)
    result = reconcile(name, gate, client, **reconcile_kwargs)
    decision = result.plan.decisions.get(version)
    if decision is None:
        raise RegistryError(f"registered model {name!r} has no version {version} in READY state at "
                            f"{_tracking_uri()}; register it first (vlalign.tracking.registry.register_version).")
    record = {
        "registered_model": name,
        "version": version,
        **decision.to_dict(),
        "champion": result.plan.champion,
        "challenger": result.plan.challenger,
        "champion_alias": gate.champion_alias,
        "challenger_alias": gate.challenger_alias,
        "gate": gate.to_dict(),
        "gate_sha256": gate.sha256(),
        "rounds": result.rounds,
        "converged": result.converged,
    }
    tags = {**decision.tags(), f"{GATE_TAG_PREFIX}config_sha256": record["gate_sha256"]}
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    run_id = client.get_model_version(name, str(version)).run_id
    if run_id:
        client.log_dict(run_id, record, f"gate/decision-v{version}.json")
    log.debug("%s", format_decision(record))
    return record


def withdraw(name: str, version: int | str, reason: str, gate: GateConfig, client: Any = None) -> ReconcileResult:
    """Take a version out of the competition (a rollback): tag it ``gate.withdrawn`` and reconcile, so the
    title goes to the champion of the remaining versions."""
    client = _client(client)
    client.set_model_version_tag(name, str(version), TAG_WITHDRAWN, reason or "withdrawn")
    return reconcile(name, gate, client)
