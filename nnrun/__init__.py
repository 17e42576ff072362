"""nnrun: declarative experiments on neural-network internals.

A spec (YAML or JSON) names a model, prompts, what to save and what to edit;
`nnrun.run` validates it, compiles it into a Plan, runs it with PyTorch hooks
and writes one self-describing HDF5 file.

>>> import nnrun
>>> results = nnrun.run("examples/demo.yaml")     # doctest: +SKIP
>>> results["resid"].shape, results.axes("resid") # doctest: +SKIP

Importing nnrun is cheap: torch, h5py and numpy load only when a function
that needs them is first used, so `nnrun validate` stays fast.
"""

from importlib import import_module
from typing import Any

from nnrun.errors import CompileError, Interrupted, ModelError, NnrunError, OutputError, RunError

__version__ = "0.1.0"

# Public name -> module that defines it, imported on first access.
_LAZY = {
    "run": "nnrun.api",
    "plot": "nnrun._plot",
    "reproduce": "nnrun._reproduce",
    "sweep_grid": "nnrun.store._grid",
    "clear_cache": "nnrun.api",
    "RunProgress": "nnrun.api",
    "plan": "nnrun.api",
    "module_tree": "nnrun.api",
    "describe_saves": "nnrun.api",
    "top_next_tokens": "nnrun.api",
    "Results": "nnrun.store",
    "load": "nnrun.store",
    "diff": "nnrun.store",
    "DiffReport": "nnrun.store",
    "SpecError": "nnrun.spec",
    "check_spec": "nnrun.spec",
    "load_spec": "nnrun.spec",
    "validate_spec": "nnrun.spec",
}

__all__ = [
    "CompileError",
    "Interrupted",
    "ModelError",
    "NnrunError",
    "OutputError",
    "RunError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nnrun' has no attribute '{name}'")
