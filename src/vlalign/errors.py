"""Typed errors. Each message names the file, row or field, what was expected, and what to do."""


class VLAlignError(Exception):
    """Base class of every error vlalign raises on purpose."""


class DatasetFormatError(VLAlignError, ValueError):
    """A dataset file is missing, malformed, or does not follow its declared format."""


class ValidationFailedError(VLAlignError, RuntimeError):
    """Too many rows failed the data-validation expectations."""


class ConfigError(VLAlignError, ValueError):
    """A configuration value is missing or invalid."""


class CheckpointError(VLAlignError, ValueError):
    """A checkpoint file is missing, corrupt, or of an unknown format."""


class IncompatibleCheckpointsError(CheckpointError):
    """Two checkpoints cannot be merged: their keys or shapes differ."""


class WeightsNotFoundError(VLAlignError, FileNotFoundError):
    """Local pretrained weights or vocab files were not found (vlalign never downloads them)."""


class RegistryError(VLAlignError, RuntimeError):
    """The model registry is not in the state an operation needs (e.g. a version that does not exist)."""
