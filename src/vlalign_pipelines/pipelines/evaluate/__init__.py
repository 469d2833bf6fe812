"""The evaluate pipeline: benchmark any registered model version or checkpoint."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
