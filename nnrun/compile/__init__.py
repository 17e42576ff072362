"""Stage 3: compile a validated spec against a model's module tree into a Plan."""

from nnrun.compile._compile import compile_plan
from nnrun.compile._describe import PlanRow, describe_plan
from nnrun.compile._probe import SiteInfo, model_device, probe_sites, shape_of, value_shape
from nnrun.compile._resolve import ResolvedLocation, resolve_location
from nnrun.compile.plan import (
    ApplyStep,
    EditAction,
    HookSite,
    Plan,
    PromptSource,
    SaveAction,
    SaveLayout,
    SiteActions,
)

__all__ = [
    "ApplyStep",
    "EditAction",
    "HookSite",
    "Plan",
    "PlanRow",
    "PromptSource",
    "ResolvedLocation",
    "SaveAction",
    "SaveLayout",
    "SiteActions",
    "SiteInfo",
    "model_device",
    "probe_sites",
    "shape_of",
    "value_shape",
    "compile_plan",
    "describe_plan",
    "resolve_location",
]
