"""The retrain pipeline (scheduled retraining)."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
