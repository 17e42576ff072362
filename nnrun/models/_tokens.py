"""Tokenizer helpers: per-token strings, where each token sits in its text, and an
offline tokenizer for an output file (for decoding saved token ids)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nnrun.errors import NnrunError


def token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token decoded on its own (`" Paris"`), as tools that print tokens show them."""
    return [tokenizer.decode([int(i)]) for i in ids]


def token_spans(tokenizer: Any, text: str, ids: list[int]) -> list[tuple[int, int]]:
    """The character span [start, end) of `text` that each token of `ids` covers.

    Fast tokenizers report offsets; for others the spans come from decoding growing
    prefixes. Special tokens (BOS, [CLS]) cover nothing: (start, start).
    """
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        if list(encoded["input_ids"]) == list(ids):
            special = set(getattr(tokenizer, "all_special_ids", []))
            return [
                (s, s) if i in special else (s, e)
                for i, (s, e) in zip(ids, encoded["offset_mapping"])
            ]
    spans, done = [], 0
    for k in range(len(ids)):
        prefix = tokenizer.decode(ids[: k + 1], skip_special_tokens=True)
        end = max(done, min(len(text), len(prefix)))
        spans.append((done, end))
        done = end
    return spans


def find_tokens(
    tokenizer: Any, text: str, ids: list[int], needle: str, occurrence: str | None
) -> list[int]:
    """The positions of the tokens that cover `needle` in `text`.

    `occurrence` is "first", "last" or None (the text must occur exactly once).
    Raises LookupError with a one-line reason when it is absent or ambiguous.
    """
    starts, at = [], text.find(needle)
    while at != -1:
        starts.append(at)
        at = text.find(needle, at + 1)
    if not starts:
        raise LookupError(f"{needle!r} does not occur in the prompt")
    if len(starts) > 1 and occurrence is None:
        raise LookupError(
            f"{needle!r} occurs {len(starts)} times in the prompt; add occurrence: first or last"
        )
    start = starts[-1] if occurrence == "last" else starts[0]
    end = start + len(needle)
    spans = token_spans(tokenizer, text, ids)
    # Tokens that overlap the match: a token with a leading space (" France") covers it
    # whether the tokenizer counts that space in its offsets or not.
    found = [k for k, (s, e) in enumerate(spans) if s < end and e > start]
    if not found:
        raise LookupError(f"no token covers {needle!r} in the prompt")
    return found


def offline_tokenizer(attrs: dict[str, Any]) -> Any:
    """The tokenizer of the run that wrote an output file, from local files only.

    Uses the spec's `model.tokenizer` when it named one, else the model the run loaded
    (`model_resolved_path`); never runs code from the model directory and never goes
    to the network. Raises NnrunError when it cannot be loaded.
    """
    import yaml

    from nnrun.models._hf import load_gguf_tokenizer, one_line, quiet_loading

    spec = yaml.safe_load(str(attrs.get("spec", ""))) or {}
    model = spec.get("model") if isinstance(spec, dict) else None
    named = model.get("tokenizer") if isinstance(model, dict) else None
    source = str(named or attrs.get("model_resolved_path") or "")
    if not source:
        raise NnrunError("the file does not say which model wrote it (no model_resolved_path)")
    path = Path(source).expanduser()
    try:
        from transformers import AutoTokenizer

        if path.is_file() and path.suffix.lower() == ".gguf":
            return load_gguf_tokenizer(path)
        with quiet_loading():
            return AutoTokenizer.from_pretrained(
                source, trust_remote_code=False, local_files_only=True
            )
    except Exception as exc:
        raise NnrunError(
            f"cannot load the tokenizer of this run from {source} (local files only): "
            f"{one_line(exc)}"
        ) from None


def render_prompt(prompt_id: str, value: Any, tokenizer: Any, chat_template: bool) -> str:
    """A prompt's text: plain text as it is, or rendered by the tokenizer's chat template.

    `value` is a string or `{chat: [{role: user, content: ...}, ...]}`; with
    `chat_template` a plain string becomes one user message. The text ends where the
    assistant's reply starts, so the model's next token begins its answer.
    """
    if isinstance(value, dict) and "chat" in value:
        messages = [dict(m) for m in value["chat"]]
    elif chat_template:
        messages = [{"role": "user", "content": str(value)}]
    else:
        return str(value)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise NnrunError(
            f"prompt '{prompt_id}' asks for a chat template, but this model's tokenizer has "
            "none; write the prompt as text"
        )
    try:
        text = str(
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )
    except Exception as exc:  # jinja template errors: roles the template rejects, ...
        raise NnrunError(f"prompt '{prompt_id}': the chat template failed: {exc}") from None
    # Templates start with the BOS token as text; a tokenizer that adds BOS itself would
    # then give two.
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        first = tokenizer("x", add_special_tokens=True)["input_ids"][:1]
        if first == [tokenizer.bos_token_id]:
            text = text[len(bos) :]
    return text
