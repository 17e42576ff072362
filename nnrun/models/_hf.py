"""Small wrappers around transformers: quiet loading, the Auto-class allow-list, GGUF."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nnrun.errors import ModelError

# Spec names -> transformers attribute. The spec value is only ever a key into this
# table, so a spec cannot make nnrun look up arbitrary attributes of transformers.
AUTO_CLASS_NAMES: tuple[str, ...] = (
    "AutoModelForCausalLM",
    "AutoModel",
    "AutoModelForMaskedLM",
    "AutoModelForSeq2SeqLM",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
)


def auto_class(name: str) -> Any:
    """Return the transformers Auto class for an allow-listed spec name."""
    if name not in AUTO_CLASS_NAMES:
        raise ModelError(
            f"model.class {name!r} is not supported; use one of: {', '.join(AUTO_CLASS_NAMES)}"
        )
    import transformers

    table = {
        "AutoModelForCausalLM": transformers.AutoModelForCausalLM,
        "AutoModel": transformers.AutoModel,
        "AutoModelForMaskedLM": transformers.AutoModelForMaskedLM,
        "AutoModelForSeq2SeqLM": transformers.AutoModelForSeq2SeqLM,
        "AutoModelForSequenceClassification": transformers.AutoModelForSequenceClassification,
        "AutoModelForTokenClassification": transformers.AutoModelForTokenClassification,
    }
    return table[name]


def one_line(exc: BaseException, limit: int = 400) -> str:
    """The exception as one line of text, for a ModelError message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide transformers' progress bars while loading; warnings and errors still show.

    The GGUF reader uses tqdm directly instead of transformers' switchable tqdm, so
    it is pointed at the switchable one for the duration.
    """
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf_utils = None
    original_tqdm = None
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils  # type: ignore[no-redef]

        original_tqdm = getattr(gguf_utils, "tqdm", None)
        if original_tqdm is not None:
            gguf_utils.tqdm = hf_logging.tqdm
    except ImportError:  # older/newer transformers without that module: nothing to hide
        gguf_utils = None
    try:
        yield
    finally:
        if gguf_utils is not None and original_tqdm is not None:
            gguf_utils.tqdm = original_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


def require_gguf_support() -> None:
    """Raise a ModelError with the install command when GGUF loading cannot work."""
    missing = [pkg for pkg in ("gguf", "accelerate") if importlib.util.find_spec(pkg) is None]
    if missing:
        raise ModelError(
            f"loading a GGUF file needs the {' and '.join(missing)} package(s): "
            f"pip install {' '.join(missing)}"
        )


def clear_quantizer(model: Any) -> None:
    """Forget that the model came from a quantized GGUF file.

    transformers dequantizes GGUF tensors into plain ones while loading but keeps the
    quantizer around, which blocks save_pretrained and marks the model as quantized.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            del config.quantization_config


def load_gguf(cls: Any, file: Path, **kwargs: Any) -> Any:
    """Load a model from a GGUF file (dequantized to plain tensors)."""
    require_gguf_support()
    with quiet_loading():
        model = cls.from_pretrained(str(file.parent), gguf_file=file.name, **kwargs)
    clear_quantizer(model)
    return model


def load_gguf_tokenizer(file: Path, **kwargs: Any) -> Any:
    """Load the tokenizer embedded in a GGUF file."""
    require_gguf_support()
    from transformers import AutoTokenizer

    with quiet_loading():
        return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name, **kwargs)
