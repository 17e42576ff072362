"""Stage 5: HDF5 output files, written atomically and read back."""

from nnrun.store._provenance import provenance
from nnrun.store._reader import Results, load
from nnrun.store._writer import (
    FORMAT_VERSION,
    OutputWriter,
    SweepLayout,
    partial_path,
    read_partial,
)

__all__ = [
    "FORMAT_VERSION",
    "OutputWriter",
    "Results",
    "SweepLayout",
    "load",
    "partial_path",
    "provenance",
    "read_partial",
]
