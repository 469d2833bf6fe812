"""The audit pipeline: `vlalign audit` as a Kedro pipeline."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
