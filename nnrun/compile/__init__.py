"""Stage 3: compile a validated spec against a model's module tree into a Plan."""

from nnrun.compile._compile import compile_plan, compile_point
from nnrun.compile._describe import PlanRow, describe_plan
from nnrun.compile._groups import PointGroup, group_points
from nnrun.compile._pack import pack_points, point_sha256
from nnrun.compile._probe import (
    SiteInfo,
    backward_bytes,
    cached_probe,
    model_device,
    probe_sites,
    shape_of,
    value_shape,
)
from nnrun.compile._resolve import ResolvedLocation, resolve_location
from nnrun.compile.plan import (
    ApplyStep,
    EditAction,
    HookSite,
    MetricAction,
    MetricLayout,
    Plan,
    PointInfo,
    PromptRow,
    PromptSource,
    SaveAction,
    SaveLayout,
    SiteActions,
)

__all__ = [
    "ApplyStep",
    "EditAction",
    "HookSite",
    "MetricAction",
    "MetricLayout",
    "Plan",
    "PlanRow",
    "PointGroup",
    "PointInfo",
    "PromptRow",
    "PromptSource",
    "ResolvedLocation",
    "SaveAction",
    "SaveLayout",
    "SiteActions",
    "SiteInfo",
    "backward_bytes",
    "cached_probe",
    "compile_plan",
    "compile_point",
    "describe_plan",
    "group_points",
    "model_device",
    "pack_points",
    "point_sha256",
    "probe_sites",
    "resolve_location",
    "shape_of",
    "value_shape",
]
