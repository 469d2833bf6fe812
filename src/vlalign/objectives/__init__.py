"""Training objectives, chosen per stage by name (see :mod:`vlalign.objectives.registry`)."""

from vlalign.objectives.base import Objective, ObjectiveContext
from vlalign.objectives.registry import build_objective, list_objectives, objective_options, register_objective

__all__ = ["Objective", "ObjectiveContext", "build_objective", "list_objectives", "objective_options",
           "register_objective"]
