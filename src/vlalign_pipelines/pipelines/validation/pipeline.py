"""Validation pipeline: raw corpus -> great-expectations suite -> clean manifest + quarantine."""

from kedro.pipeline import Pipeline, node, pipeline

from .nodes import gate_clean_rows, validate_corpus


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                validate_corpus,
                inputs=["raw_manifest", "params:validation"],
                outputs=["validated_manifest", "quarantine", "validation_report"],
                name="validate_corpus",
            ),
            node(
                gate_clean_rows,
                inputs=["validated_manifest", "validation_report", "params:validation"],
                outputs="clean_manifest",
                name="gate_clean_rows",
            ),
        ]
    )
