"""What nnrun records about a loaded model: LoadedModel, ModelInfo and their hashes."""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".bin", ".gguf", ".pt")

# Bytes read from each end of a weights file for the fingerprint. Reading whole files
# would cost seconds to minutes for big checkpoints; the ends already differ between
# any two differently trained (or seeded) models.
_SAMPLE_BYTES = 1 << 20

# Config keys that describe where, how or by what a config was loaded or saved, not the
# computation: "architectures" is only written by save_pretrained (a GGUF file has none),
# and the class actually used is recorded in ModelInfo.model_class.
_VOLATILE_CONFIG_KEYS: tuple[str, ...] = (
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "architectures",
)


@dataclass
class ModelInfo:
    """Plain provenance values about a loaded model (they go into the output file)."""

    source: str  # "path" | "id" | "gguf" | "builtin"
    name: str  # what the spec said
    resolved_path: str  # the local directory or file actually loaded
    revision: str | None
    config_sha256: str
    weights_files_sha256: str
    model_class: str
    dtype: str
    device: str  # "cpu", "cuda:0", ... or "device_map" when accelerate placed it

    def as_attrs(self) -> dict[str, str]:
        """Flat string dict for HDF5 attributes; keys are prefixed ``model_``."""
        return {
            f"model_{key}": "" if value is None else str(value)
            for key, value in asdict(self).items()
        }


@dataclass
class LoadedModel:
    """A model ready for hooks: eval mode, on its device(s), gradients off; the tokenizer has a pad token."""

    model: torch.nn.Module
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    info: ModelInfo
    # Modules the class added whose weights were not in the checkpoint (randomly
    # initialised), e.g. an LM head on an encoder-only checkpoint.
    new_modules: tuple[str, ...] = ()


def config_sha256(config: Any) -> str:
    """sha256 of the model config as sorted-key JSON.

    Keys that record the load location, the transformers version, the dtype asked for
    at load time or the saving class are left out, so the same model hashes the same
    from any directory or format (dtype and class are recorded separately in ModelInfo).
    """
    data = json.loads(config.to_json_string(use_diff=False))
    for key in _VOLATILE_CONFIG_KEYS:
        data.pop(key, None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def weight_files(location: Path) -> list[Path]:
    """The weight files of a checkpoint directory, or the file itself (GGUF)."""
    if location.is_file():
        return [location]
    if not location.is_dir():
        return []
    return sorted(
        (p for p in location.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()),
        key=lambda p: p.name,
    )


def weights_files_sha256(location: Path) -> str:
    """sha256 over the sorted weight files' names, sizes and a sample of their bytes.

    The sample (the first and last MiB of each file) makes two checkpoints of the same
    architecture but different weights hash differently, at a cost that does not grow
    with the model size.
    """
    digest = hashlib.sha256()
    for path in weight_files(location):
        size = path.stat().st_size  # follows hub-cache symlinks to the blob
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as fh:
            digest.update(fh.read(_SAMPLE_BYTES))
            if size > 2 * _SAMPLE_BYTES:
                fh.seek(size - _SAMPLE_BYTES)
            digest.update(fh.read(_SAMPLE_BYTES))
    return digest.hexdigest()


# The ModelInfo of each model load_model returned, while the model lives: later stages
# that get only the module (the compiler's probe cache) look its provenance up here.
_INFOS: weakref.WeakKeyDictionary[Any, ModelInfo] = weakref.WeakKeyDictionary()


def remember_info(model: Any, info: ModelInfo) -> None:
    _INFOS[model] = info


def info_of(model: Any) -> ModelInfo | None:
    """The ModelInfo of a model loaded by `load_model` (None for one built elsewhere)."""
    return _INFOS.get(model)
