"""Audit pipeline: ``kedro run --pipeline audit --params audit.model_uri=models:/<name>@champion`` (the same checks as
``vlalign audit``; ``--params audit.retrain=true`` retrains every stage on CPU too). Not part of ``__default__``."""

from kedro.pipeline import Pipeline, node, pipeline

from .nodes import audit_model_version, enforce_audit


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline([
        node(audit_model_version, inputs="params:audit", outputs=["audit_report", "audit_report_md"],
             name="audit_model_version"),
        node(enforce_audit, inputs="audit_report", outputs=None, name="enforce_audit"),
    ])
