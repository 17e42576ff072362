"""Stage 5: HDF5 output files, written atomically and read back."""

from nnrun.store._background import BackgroundWriter
from nnrun.store._diff import DatasetDiff, DiffReport, diff
from nnrun.store._inputs import changed_inputs, input_files
from nnrun.store._lock import claim_output
from nnrun.store._paths import output_path, partial_path
from nnrun.store._provenance import provenance
from nnrun.store._reader import Results, load
from nnrun.store._summary import describe_saves, top_next_tokens
from nnrun.store._view import padded_shape, padded_values
from nnrun.store._writer import FORMAT_VERSION, OutputWriter, SweepLayout, read_partial

__all__ = [
    "FORMAT_VERSION",
    "BackgroundWriter",
    "DatasetDiff",
    "DiffReport",
    "OutputWriter",
    "Results",
    "SweepLayout",
    "changed_inputs",
    "claim_output",
    "describe_saves",
    "diff",
    "input_files",
    "load",
    "output_path",
    "padded_shape",
    "padded_values",
    "partial_path",
    "provenance",
    "read_partial",
    "top_next_tokens",
]
