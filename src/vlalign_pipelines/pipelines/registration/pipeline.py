"""Registration pipeline: the merged model goes to the MLflow Model Registry with its lineage, and the
champion/challenger gate decides whether it takes the ``champion`` alias."""

from kedro.pipeline import Pipeline, node, pipeline

from .nodes import RUN_PARAMETERS, gate_registered_model, register_merged_model

#: What evaluation scored besides the clean manifest, recorded for `vlalign audit` (node argument -> dataset).
EVALUATED_INPUTS = {"zero_shot_set": "zero_shot_set", "zero_shot_quarantine": "zero_shot_quarantine",
                    "probe_source": "probe_source"}


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                register_merged_model,
                inputs={"checkpoint": "merged_checkpoint", "manifest": "clean_manifest", "metrics": "metrics",
                        "validation_report": "validation_report", **EVALUATED_INPUTS,
                        **{name: f"params:{name}" for name in RUN_PARAMETERS}},
                outputs="registered_model",
                name="register_merged_model",
            ),
            node(
                gate_registered_model,
                inputs=["registered_model", "params:registration"],
                outputs="gate_decision",
                name="gate_registered_model",
            ),
        ]
    )
