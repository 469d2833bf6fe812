"""Evaluation pipeline: the merged model on the test split (retrieval per language, compositional probe)
and the zero-shot set; the report and CLIP_benchmark result files."""

from kedro.pipeline import Pipeline, node, pipeline

from vlalign_pipelines.pipelines.validation.nodes import validate_zero_shot_set

from .nodes import build_probe_pairs, clip_benchmark_results, evaluate_model, write_report


def evaluation_nodes(checkpoint: str, params: str, prefix: str = "") -> list:
    """The evaluation nodes for ``checkpoint``; outputs and node names get ``prefix`` (``""`` or ``"evaluate."``)."""
    return [
        node(validate_zero_shot_set, inputs=["zero_shot_set", "params:validation"],
             outputs=[f"{prefix}zero_shot_clean_set", f"{prefix}zero_shot_quarantine"],
             name=f"{prefix}validate_zero_shot_set"),
        node(build_probe_pairs, inputs=["probe_source", "clean_manifest", params], outputs=f"{prefix}probe_pairs",
             name=f"{prefix}build_probe_pairs"),
        node(
            evaluate_model,
            inputs=[checkpoint, "clean_manifest", f"{prefix}zero_shot_clean_set", f"{prefix}probe_pairs", params],
            outputs=[f"{prefix}metrics", f"{prefix}evaluation_details"],
            name=f"{prefix}evaluate_model",
        ),
        node(write_report, inputs=[f"{prefix}evaluation_details", params], outputs=f"{prefix}report_files",
             name=f"{prefix}write_report"),
        node(clip_benchmark_results, inputs=[f"{prefix}metrics", params], outputs=f"{prefix}clip_benchmark",
             name=f"{prefix}clip_benchmark_results"),
    ]


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(evaluation_nodes("merged_checkpoint", "params:evaluation"))
