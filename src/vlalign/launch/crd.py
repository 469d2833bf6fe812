"""Strict offline validation of the Kubeflow Trainer custom resources we render or ship.

``kubernetes_validate`` knows only the built-in kinds. For ``TrainJob`` (and the runtimes and ``JobSet``) the
schema is derived from the typed models of ``kubeflow-trainer-api`` 2.3.0, the release we render for, and made
strict: every object rejects unknown fields (``additionalProperties: false``), optional fields may be absent but
never null, ``apiVersion`` and ``kind`` are fixed. The models themselves drop unknown fields silently, so
:func:`validate_custom_resource` also checks that a round trip through them changes nothing. CEL rules of the real
CRDs are not checked.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import jsonschema

API_VERSION = "trainer.kubeflow.org/v1alpha1"
JOBSET_API_VERSION = "jobset.x-k8s.io/v1alpha2"
PINNED_PACKAGE = "kubeflow-trainer-api==2.3.0"  # the release the schema and the renderer follow


def _models() -> dict[tuple[str, str], type]:
    from kubeflow_trainer_api import models as m

    return {
        (API_VERSION, "TrainJob"): m.TrainerV1alpha1TrainJob,
        (API_VERSION, "TrainingRuntime"): m.TrainerV1alpha1TrainingRuntime,
        (API_VERSION, "ClusterTrainingRuntime"): m.TrainerV1alpha1ClusterTrainingRuntime,
        (JOBSET_API_VERSION, "JobSet"): m.JobsetV1alpha2JobSet,
    }


def known_kinds() -> list[tuple[str, str]]:
    """(apiVersion, kind) pairs this module validates."""
    return sorted(_models())


def _strict(node: Any) -> Any:
    """Close every object schema, drop the null alternative of optional fields, and drop defaults."""
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {k: _strict(v) for k, v in node.items() if k not in ("default", "title")}
    any_of = node.get("anyOf")
    if any_of and {"type": "null"} in any_of:
        rest = [alt for alt in any_of if alt != {"type": "null"}]
        node.pop("anyOf")
        node.update(rest[0] if len(rest) == 1 else {"anyOf": rest})
    if node.get("type") == "object" and "properties" in node:
        node.setdefault("additionalProperties", False)
    return node


@functools.cache
def schema_for(api_version: str, kind: str) -> dict:
    """The strict JSON schema of one custom resource kind."""
    model = _models()[(api_version, kind)]
    schema = model.model_json_schema(by_alias=True)
    defs = schema.get("$defs", {})
    # Quantity is a oneOf(float, str) wrapper model in the generated code; on the wire it is a string or a number.
    defs["IoK8sApimachineryPkgApiResourceQuantity"] = {"type": ["string", "number"]}
    schema = _strict(schema)
    schema["properties"]["apiVersion"] = {"const": api_version}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    schema["properties"]["metadata"] = {
        "allOf": [schema["properties"]["metadata"], {"required": ["name"]}]
    }
    return schema


class CustomResourceError(ValueError):
    """A custom resource does not match its (strict) schema."""


def validate_custom_resource(obj: dict) -> str:
    """Validate ``obj`` strictly; returns ``"<apiVersion>/<kind>"``. Raises :class:`CustomResourceError`."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key not in _models():
        raise CustomResourceError(f"no schema for {key[0]}/{key[1]}; known: {[f'{a}/{k}' for a, k in known_kinds()]}")
    where = f"{key[1]} {obj.get('metadata', {}).get('name')!r}"
    errors = sorted(jsonschema.Draft202012Validator(schema_for(*key)).iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        path = "/".join(str(p) for p in first.absolute_path) or "(top)"
        raise CustomResourceError(f"{where} at {path}: {first.message} ({len(errors)} error(s); schema of {PINNED_PACKAGE})")
    model = _models()[key]
    round_trip = model.from_dict(copy.deepcopy(obj)).to_dict()
    if round_trip != obj:
        raise CustomResourceError(f"{where}: changes in a round trip through {model.__name__} ({PINNED_PACKAGE}); "
                                  "a field is unknown to that release or has the wrong type.")
    return f"{key[0]}/{key[1]}"
