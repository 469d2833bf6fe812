"""The CapFilt pipeline (recipes with a ``capfilt`` section, e.g. ``blip``)."""

from .pipeline import capfilt_pipeline, create_pipeline

__all__ = ["capfilt_pipeline", "create_pipeline"]
