"""Objectives are chosen per stage by name (``objective: clip``) from this registry; options are validated
against each objective's options dataclass. Adding an objective never requires touching the training loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vlalign.errors import ConfigError, dataclass_from_mapping
from vlalign.objectives.base import Objective, ObjectiveContext


@dataclass(frozen=True)
class ObjectiveEntry:
    """A registered objective."""

    name: str  # the value of StageConfig.objective
    cls: type[Objective]  # cls(options, context)
    options: type  # dataclass of StageConfig.objective_options


_OBJECTIVES: dict[str, ObjectiveEntry] = {}


def register_objective(name: str, options: type) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator registering an :class:`Objective` subclass (constructed as ``cls(options, context)``)."""

    def decorate(cls: type[Objective]) -> type[Objective]:
        if name in _OBJECTIVES and _OBJECTIVES[name].cls is not cls:
            raise ConfigError(f"objective {name!r} is registered twice ({_OBJECTIVES[name].cls} and {cls}).")
        _OBJECTIVES[name] = ObjectiveEntry(name, cls, options)
        return cls

    return decorate


def _load_builtin() -> None:
    import vlalign.objectives.clip  # noqa: F401  (registers "clip")
    import vlalign.objectives.albef  # noqa: F401  (registers "albef" and "blip")
    import vlalign.objectives.daa  # noqa: F401  (registers "daa")
    import vlalign.objectives.siglip  # noqa: F401  (registers "siglip")


def list_objectives() -> list[str]:
    """Names of the registered objectives."""
    _load_builtin()
    return sorted(_OBJECTIVES)


def objective_options(name: str, options: dict[str, Any] | None) -> Any:
    """``options`` validated against objective ``name``'s options dataclass."""
    _load_builtin()
    if name not in _OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; registered objectives are {sorted(_OBJECTIVES)}.")
    return dataclass_from_mapping(_OBJECTIVES[name].options, options, f"objective {name!r}", "objective_options")


def build_objective(name: str, options: dict[str, Any] | None, context: ObjectiveContext | None = None) -> Objective:
    """The objective ``name`` with its validated ``options``."""
    parsed = objective_options(name, options)
    return _OBJECTIVES[name].cls(parsed, context or ObjectiveContext())
