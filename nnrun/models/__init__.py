"""Load the model and tokenizer a spec names, and describe them for the output file.

Importing this package is cheap: torch and transformers are imported on first use.
"""

from __future__ import annotations

from nnrun.models._builtin import builtin_checkpoint, cache_dir
from nnrun.models._info import LoadedModel, ModelInfo
from nnrun.models._load import load_model

__all__ = ["LoadedModel", "ModelInfo", "builtin_checkpoint", "cache_dir", "load_model"]
