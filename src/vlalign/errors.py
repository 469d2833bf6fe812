"""Typed errors. Each message names the file, row or field, what was expected, and what to do."""


class VLAlignError(Exception):
    """Base class of every error vlalign raises on purpose."""


class DatasetFormatError(VLAlignError, ValueError):
    """A dataset file is missing, malformed, or does not follow its declared format."""


class ValidationFailedError(VLAlignError, RuntimeError):
    """Too many rows failed the data-validation expectations."""


class ConfigError(VLAlignError, ValueError):
    """A configuration value is missing or invalid."""


def dataclass_from_mapping(cls: type, data: dict | None, where: str, what: str = "field(s)") -> object:
    """``cls(**data)`` for a config dataclass, with unknown keys named (``{where}: unknown {what} [...]; allowed
    are [...]``) and constructor errors turned into :class:`ConfigError`."""
    import dataclasses

    data = dict(data or {})
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown {what} {unknown}; allowed are {sorted(allowed)}.")
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, VLAlignError):
            raise
        raise ConfigError(f"{where}: invalid {what} {data}: {exc}") from exc


class CheckpointError(VLAlignError, ValueError):
    """A checkpoint file is missing, corrupt, or of an unknown format."""


class IncompatibleCheckpointsError(CheckpointError):
    """Two checkpoints cannot be merged: their keys or shapes differ."""


class WeightsNotFoundError(VLAlignError, FileNotFoundError):
    """Local pretrained weights or vocab files were not found (vlalign never downloads them)."""


class LossInputError(VLAlignError, ValueError):
    """The tensors given to a loss function have the wrong shape, dtype, device or row offset."""


class RegistryError(VLAlignError, RuntimeError):
    """The model registry is not in the state an operation needs (e.g. a version that does not exist)."""


class KubernetesJobError(VLAlignError, RuntimeError):
    """A training stage submitted to Kubernetes failed, timed out, or could not be submitted or collected."""


# ---------------------------------------------------------------------------------------------------------
# Reporting: the short message the command-line tools print instead of a traceback
# ---------------------------------------------------------------------------------------------------------

#: Most lines of a report's body; the rest is in the log file.
MAX_REPORT_BODY_LINES = 14


def exception_chain(exc: BaseException):
    """``exc``, then its causes and contexts (``raise ... from``, or raised while handling one), each once."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [current.__cause__, current.__context__]


def find_vlalign_error(exc: BaseException) -> VLAlignError | None:
    """The first :class:`VLAlignError` in ``exc``'s chain (frameworks wrap ours, e.g. Kedro's DatasetError)."""
    return next((item for item in exception_chain(exc) if isinstance(item, VLAlignError)), None)


def _wrap(text: str, width: int, indent: str) -> list[str]:
    import textwrap

    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        lines += textwrap.wrap(
            paragraph, width=width, initial_indent=indent, subsequent_indent=indent,
            break_long_words=False, break_on_hyphens=False,
        ) or [indent]
    return lines


def format_report(
    title: str, detail: str, *, hint: str = "", footer: tuple[str, ...] = (), width: int | None = None,
    max_body_lines: int = MAX_REPORT_BODY_LINES,
) -> str:
    """A short failure report: the title line, the indented detail (cut at ``max_body_lines``), the hint, the footer.

    Lines are wrapped at ``width`` (default: the terminal width, 60 to 110 columns), never inside a word or
    a path, so at most about ``max_body_lines + 6`` lines come out.
    """
    import shutil

    width = width or min(max(shutil.get_terminal_size((100, 24)).columns, 60), 110)
    body = _wrap(detail, width, "  ")
    if len(body) > max_body_lines:
        body = body[: max_body_lines - 1] + [f"  ... ({len(body) - max_body_lines + 1} more lines in the log file)"]
    lines = _wrap(title, width, "") + body
    if hint:
        lines += _wrap(hint, width, "  ")
    return "\n".join(lines + list(footer))
