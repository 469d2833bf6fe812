"""Retrain nodes: decide whether anything changed since the champion was trained, start from the champion or from
scratch, register only what was retrained, and say what happened."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from vlalign.errors import ConfigError
from vlalign.models import get_model_config
from vlalign.tracking.audit import AuditError, changed_inputs, changed_params, load_version_lineage
from vlalign.tracking.hashing import dvc_hash
from vlalign.tracking.lineage import model_files
from vlalign.tracking.registry import CHALLENGER, CHAMPION, registered_model_name
from vlalign.train.checkpoint import CheckpointRef
from vlalign_pipelines.pipelines.registration.nodes import gate_registered_model, register_merged_model
from vlalign_pipelines.pipelines.training.nodes import train_one_stage
from vlalign_pipelines.recipes import recipe_from, resolve_model, resolved_training

log = logging.getLogger(__name__)

INIT_MODES = ("scratch", "champion")
RETRAIN_FIELDS = ("init", "force", "compare_inputs", "compare_params", "ignore_params", "registered_model_name")


def _check(retrain: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(retrain) - set(RETRAIN_FIELDS))
    if unknown:
        raise ConfigError(f"retrain: unknown field(s) {unknown}; the fields are {list(RETRAIN_FIELDS)} "
                          "(conf/base/parameters_retrain.yml).")
    if retrain.get("init", "scratch") not in INIT_MODES:
        raise ConfigError(f"retrain.init={retrain.get('init')!r}; expected one of {list(INIT_MODES)}.")
    return retrain


def expected_model_name(registration: dict[str, Any], model: dict[str, Any], training: dict[str, Any],
                        evaluation: dict[str, Any], retrain: dict[str, Any]) -> str:
    """The registered model this run will register into (as registration derives it from the evaluated datasets)."""
    if retrain.get("registered_model_name"):
        return str(retrain["registered_model_name"])
    family = resolve_model(model, training, recipe_from(None))["name"]
    evaluated = {"retrieval": {"dataset": evaluation.get("retrieval_dataset")},
                 "zero_shot": {"dataset": evaluation.get("zero_shot_dataset")}}
    return registered_model_name(registration.get("registered_model_name"),
                                 registration.get("name_template", "vlalign-{model}-{datasets}"), family, evaluated)


def current_parameters(validation: dict[str, Any], model: dict[str, Any], training: dict[str, Any], merge: dict[str, Any],
                       evaluation: dict[str, Any], registration: dict[str, Any]) -> dict[str, Any]:
    """The parameter groups as the lineage records them (training resolved to its recipe's complete stages)."""
    return {"validation": validation, "model": model, "training": resolved_training(training, recipe_from(None)),
            "merge": merge, "evaluation": evaluation, "registration": registration}


def _compare_with(uri: str, current: dict[str, str], params: dict[str, Any], retrain: dict[str, Any]) -> dict[str, Any] | None:
    """What changed since the version ``uri`` was trained (None when there is no such version)."""
    try:
        with tempfile.TemporaryDirectory(prefix="vlalign-retrain-plan-") as tmp:
            version, lineage, _ = load_version_lineage(uri, tmp)
    except AuditError:
        return None
    input_changes, hashes = changed_inputs(lineage.get("inputs") or {}, current)
    param_changes = changed_params(lineage.get("params") or {}, params, retrain.get("compare_params", []),
                                   retrain.get("ignore_params", []))
    return {"version": int(version.version), "run_id": version.run_id, "tags": dict(version.tags or {}),
            "model_uri": f"models:/{version.name}/{version.version}", "hashes": hashes,
            "changes": {"inputs": input_changes, "params": param_changes}}


def plan_retrain(
    clean_manifest: pd.DataFrame,
    validation: dict[str, Any],
    model: dict[str, Any],
    training: dict[str, Any],
    merge: dict[str, Any],
    evaluation: dict[str, Any],
    registration: dict[str, Any],
    retrain: dict[str, Any],
) -> dict[str, Any]:
    """Retrain only when the data or the configuration changed since the champion was trained.

    Compares the DVC hashes of ``retrain.compare_inputs`` (read from ``registration.lineage.inputs``; the clean
    manifest was just written by validation) and of the model's pretrained files, and the parameter groups
    ``retrain.compare_params``, with the champion's lineage. When something changed but the newest version (alias
    ``challenger``) was already trained on exactly this data and configuration, and the gate kept it out, it is not
    trained again either. Returns the plan: ``run`` (bool), ``reason``, ``changes``, ``champion``, ``challenger``
    and the current hashes; the runner stops the pipeline when ``run`` is false.
    """
    retrain = _check(retrain)
    name = expected_model_name(registration, model, training, evaluation, retrain)
    gate = registration.get("gate") or {}
    plan: dict[str, Any] = {"run": True, "registered_model_name": name, "champion": None, "challenger": None,
                            "init": retrain.get("init", "scratch"), "forced": bool(retrain.get("force")),
                            "changes": {"inputs": [], "params": []}}
    lineage_inputs = (registration.get("lineage") or {}).get("inputs") or {}
    missing = [n for n in retrain.get("compare_inputs", []) if n not in lineage_inputs]
    if missing:
        raise ConfigError(f"retrain.compare_inputs names {missing}, which registration.lineage.inputs does not define "
                          f"(it has {sorted(lineage_inputs)}).")
    current = {n: lineage_inputs[n] for n in retrain.get("compare_inputs", [])}
    resolved_model = resolve_model(model, training, recipe_from(None))
    current.update(model_files(get_model_config(resolved_model["name"], **resolved_model.get("overrides", {})).to_dict()))
    params = current_parameters(validation, model, training, merge, evaluation, registration)
    compared = f"inputs {', '.join(current)} and parameters {', '.join(retrain.get('compare_params', []))}"
    champion = _compare_with(f"models:/{name}@{gate.get('champion_alias', CHAMPION)}", current, params, retrain)
    if champion is None:
        plan["reason"] = f"{name} has no champion to compare with: training"
        plan["inputs"] = {n: dvc_hash(p)["md5"] for n, p in current.items() if Path(p).exists()}
        log.info("retrain: %s", plan["reason"])
        return plan
    plan["champion"] = {k: champion[k] for k in ("version", "run_id", "model_uri")} | {"name": name}
    plan["inputs"], plan["changes"] = champion["hashes"], champion["changes"]
    changes = champion["changes"]["inputs"] + champion["changes"]["params"]
    if not changes:
        if plan["forced"]:
            plan["reason"] = f"nothing changed since champion v{champion['version']} ({compared}), but retrain.force is true"
        else:
            plan["run"] = False
            plan["reason"] = (f"nothing changed since champion v{champion['version']} of {name} was trained ({compared} "
                              "are identical): nothing to train, nothing registered")
        log.info("retrain: %s", plan["reason"])
        return plan
    plan["reason"] = (f"{len(changes)} change(s) since champion v{champion['version']} was trained: "
                      f"{'; '.join(changes[:6])}{' ...' if len(changes) > 6 else ''}")
    challenger = _compare_with(f"models:/{name}@{gate.get('challenger_alias', CHALLENGER)}", current, params, retrain)
    if challenger is not None and challenger["version"] != champion["version"]:
        plan["challenger"] = {k: challenger[k] for k in ("version", "run_id", "model_uri")} | {"name": name}
        if not (challenger["changes"]["inputs"] or challenger["changes"]["params"]) and not plan["forced"]:
            plan["run"] = False
            plan["reason"] = (f"{plan['reason']}; but v{challenger['version']} was already trained on exactly this data "
                              f"and configuration and the gate kept champion v{champion['version']} "
                              f"({challenger['tags'].get('gate.reason', 'no gate decision recorded')}): nothing to train, "
                              "nothing registered (set retrain.force: true to train anyway)")
    log.info("retrain: %s", plan["reason"])
    return plan


def fetch_init(retrain_plan: dict[str, Any], init_dir: str) -> dict[str, Any]:
    """With ``retrain.init: champion``, copy the champion's registered checkpoint into ``init_dir``; the stages that
    would start from fresh weights start from it. ``{"mode", "checkpoint", "model_uri"}``."""
    if retrain_plan.get("init") != "champion":
        return {"mode": "scratch", "checkpoint": None, "model_uri": None}
    champion = retrain_plan.get("champion")
    if not champion:
        log.info("retrain.init is champion, but there is no champion yet: training from scratch.")
        return {"mode": "scratch", "checkpoint": None, "model_uri": None}
    import mlflow

    base = champion["model_uri"]
    flavor = mlflow.models.Model.load(base).flavors.get("python_function", {})
    artifact = (flavor.get("artifacts") or {}).get("checkpoint")
    if not artifact:
        raise ConfigError(f"{base} has no checkpoint artifact to start from; set retrain.init: scratch.")
    target = Path(init_dir) / f"{champion['name']}-v{champion['version']}.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vlalign-init-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{artifact['path']}", dst_path=tmp)
        shutil.copyfile(local, target)
    log.info("retrain: stages that start fresh start from champion %s (%s)", base, target)
    return {"mode": "champion", "checkpoint": str(target), "model_uri": base}


def train_from_init(train_data: Any, stage_dir: str, model: dict[str, Any], training: dict[str, Any],
                    kubernetes: dict[str, Any], retrain_init: dict[str, Any], *, stage_name: str) -> CheckpointRef:
    """A stage the recipe starts from fresh weights: from the champion's checkpoint when ``retrain_init`` has one."""
    init = CheckpointRef(retrain_init["checkpoint"]) if retrain_init.get("checkpoint") else None
    return train_one_stage(train_data, stage_dir, model, training, kubernetes, init, stage_name=stage_name)


def register_retrained_model(retrain_plan: dict[str, Any], retrain_init: dict[str, Any], retrain: dict[str, Any],
                             **inputs: Any) -> dict[str, Any]:
    """Register the retrained model like the default pipeline does, with the champion checkpoint it started from as a
    lineage input; registers nothing when the plan says nothing changed (whatever runner ran the pipeline)."""
    if not retrain_plan.get("run", True):
        return {"registered": False, "reason": retrain_plan.get("reason")}
    extra = {"init_checkpoint": retrain_init["checkpoint"]} if retrain_init.get("checkpoint") else {}
    record = register_merged_model(**inputs, retrain={**retrain, "started_from": retrain_init.get("model_uri")},
                                   extra_inputs=extra)
    return {"registered": True, **record}


def gate_retrained_model(registered_model: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The gate for the new version (the champion moves only when it passes); nothing when nothing was registered."""
    if not registered_model.get("registered", True):
        return {"outcome": "skipped", "passed": False, "reason": registered_model.get("reason")}
    return gate_registered_model(registered_model, params)


def summarise_retrain(retrain_plan: dict[str, Any], gate_decision: dict[str, Any]) -> dict[str, Any]:
    """One record (and one log line) of what the retrain did: why it trained, the new version, the gate's verdict."""
    summary = {"plan": retrain_plan, "registered_version": gate_decision.get("version"),
               "outcome": gate_decision.get("outcome"), "passed": gate_decision.get("passed"),
               "reason": gate_decision.get("reason"), "champion": gate_decision.get("champion")}
    if gate_decision.get("outcome") == "skipped":
        log.info("retrain: nothing registered (%s)", gate_decision.get("reason"))
    elif gate_decision.get("passed"):
        log.info("retrain: registered %s v%s; gate PASS: it is the champion now (%s)", gate_decision["registered_model"],
                 gate_decision["version"], gate_decision["reason"])
    else:
        log.info("retrain: registered %s v%s; gate FAIL (%s): the champion stays v%s: %s",
                 gate_decision["registered_model"], gate_decision["version"], gate_decision["outcome"],
                 gate_decision.get("champion"), gate_decision["reason"])
    return summary
