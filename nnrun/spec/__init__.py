"""Loading and validating nnrun specs (format 1).

This package must stay light: it imports only the standard library, PyYAML and
jsonschema (never torch, transformers, numpy or h5py) so that ``nnrun validate`` answers
in well under half a second.
"""

from __future__ import annotations

from ._defaults import is_prompt_file
from ._issues import SpecError, SpecIssue, format_issue
from ._load import LoadedSpec, load_spec
from ._location import Location, SliceSel, Wildcard, parse_location
from ._paths import format_path, parse_path
from ._record import with_output
from ._schema import load_schema, schema_path
from ._select import StepSelection, TokenSelection, parse_step_selection, parse_token_selection
from ._sweep import Sweep, SweepAxis, SweepPoint, point_label
from ._validate import check_spec, validate_spec

__all__ = [
    "LoadedSpec",
    "Location",
    "SliceSel",
    "SpecError",
    "SpecIssue",
    "StepSelection",
    "Sweep",
    "SweepAxis",
    "SweepPoint",
    "TokenSelection",
    "Wildcard",
    "check_spec",
    "format_issue",
    "format_path",
    "is_prompt_file",
    "load_schema",
    "load_spec",
    "parse_location",
    "parse_path",
    "parse_step_selection",
    "parse_token_selection",
    "point_label",
    "schema_path",
    "validate_spec",
    "with_output",
]
