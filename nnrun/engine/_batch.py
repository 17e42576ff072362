"""Prompts -> padded batches, with each prompt's own token positions kept."""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nnrun.compile.plan import PromptSource
from nnrun.errors import RunError
from nnrun.models._tokens import render_prompt


@dataclass
class Batch:
    """One micro-batch on the model's device.

    Prompts are padded to a common length `width`; `offsets[r]` is where
    prompt r's token 0 sits in its padded row, so position p of prompt r is
    column `offsets[r] + p` whichever side the padding is on.
    """

    ids: list[str]
    texts: list[str]
    token_ids: list[list[int]]
    input_ids: torch.Tensor  # (batch, width)
    attention_mask: torch.Tensor  # (batch, width)
    position_ids: torch.Tensor | None  # (batch, width); None when the model takes none
    lengths: torch.Tensor  # (batch,) on the device
    offsets: torch.Tensor  # (batch,) on the device
    # Rows carried only because other rows' edits read them (`from:`): they are
    # edited like any row but never saved or written as prompts of this batch.
    aux: list[bool]
    # The prompt id of each row (`ids` are row keys: a sweep's rows of one prompt
    # differ); noise is seeded by prompt id so that it does not depend on packing.
    prompts: list[str] | None = None
    # The tokenizer that made the rows: `tokens: {find: TEXT}` searches a prompt with it.
    tokenizer: Any = None
    # Each row's JSONL record (prompt files), for metrics that read a field of it.
    fields: list[dict[str, Any]] | None = None
    # `offsets` as a list on the host: selections are worked out without a device sync.
    offset_list: list[int] | None = None

    def __post_init__(self) -> None:
        if self.prompts is None:
            self.prompts = list(self.ids)

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])

    def model_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        return inputs


def iter_prompts(source: PromptSource, tokenizer: Any = None) -> Iterator[tuple[str, str]]:
    """Yield (id, text) pairs, streaming a file source line by line.

    Every line is checked as it is read: UTF-8, JSON, a string (or number, for
    ids) in the named fields, no NUL character, no id used twice. A file with no
    prompt at all is an error too, not an empty run. With `chat_template: true`
    each text of a file goes through the tokenizer's chat template as one user
    message (inline prompts were rendered by the compiler).
    """
    for prompt_id, text, _ in iter_prompt_records(source, tokenizer):
        yield prompt_id, text


def iter_prompt_records(
    source: PromptSource, tokenizer: Any = None
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """`iter_prompts` with each prompt's whole JSONL record ({} for other prompts)."""
    if source.inline is not None:
        for prompt_id, text in source.inline:
            yield prompt_id, text, {}
        return
    for prompt_id, text, record in _records(source):
        if source.chat_template:
            text = render_prompt(prompt_id, text, tokenizer, chat_template=True)
        yield prompt_id, text, record


def iter_prompt_meta(source: PromptSource) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (id, extra fields) per prompt of a JSONL file: every field but the text and id.

    Inline prompts and .txt files have none. The writer keeps them under /prompts/meta.
    """
    if source.inline is not None or Path(source.file or "").suffix != ".jsonl":
        return
    for prompt_id, _, record in _records(source):
        extra = {k: v for k, v in record.items() if k not in (source.field, source.id_field)}
        yield prompt_id, extra


def _records(source: PromptSource) -> Iterator[tuple[str, str, dict[str, Any]]]:
    path = Path(source.file or "")
    if not os.path.isfile(path):  # os.path: False, not an error, for a name too long
        raise RunError(f"prompts.file: no such file '{path}'")
    count = 0
    seen: dict[str, int] = {}
    skipped = 0
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if source.limit is not None and count >= source.limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RunError(
                    f"{path}:{line_no}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                    f"{e.start + 1}); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            if skipped < source.skip:
                skipped += 1
                continue
            prompt_id, text, record = _parse_line(path, line_no, line, source)
            if prompt_id in seen:
                raise RunError(
                    f"{path}:{line_no}: prompt id {prompt_id!r} is already used on line "
                    f"{seen[prompt_id]}; ids must be unique"
                )
            seen[prompt_id] = line_no
            count += 1
            yield prompt_id, text, record
    if count == 0:
        raise RunError(f"prompts.file: {path} holds no prompts (it is empty or only blank lines)")


def count_prompts(source: PromptSource) -> int:
    """How many prompts the source holds; reading a file this way checks every line."""
    if source.inline is not None:
        return len(source.inline)
    return sum(1 for _ in _records(source))


def _parse_line(
    path: Path, line_no: int, line: str, source: PromptSource
) -> tuple[str, str, dict[str, Any]]:
    """(id, text, the whole JSON record) of one line; every field is checked."""
    where = f"{path}:{line_no}"
    if path.suffix != ".jsonl":
        return str(line_no - 1), _checked_text(line.rstrip("\r\n"), where, "the prompt"), {}
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        reason = e.msg if isinstance(e, json.JSONDecodeError) else "nested or sized beyond reason"
        raise RunError(f"{where}: not valid JSON ({reason})") from None
    if not isinstance(record, dict):
        raise RunError(f'{where}: expected a JSON object such as {{"text": "..."}}')
    if source.field not in record:
        raise RunError(f"{where}: no field '{source.field}' (set prompts.field)")
    text = record[source.field]
    if not isinstance(text, str) or not text.strip():
        raise RunError(
            f"{where}: field '{source.field}' must be a non-empty string, not {_json_kind(text)}"
        )
    text = _checked_text(text, where, f"field '{source.field}'")
    if not source.id_field:
        return str(line_no - 1), text, record
    if source.id_field not in record:
        raise RunError(
            f"{where}: no field '{source.id_field}' (prompts.id_field); every line needs an id"
        )
    prompt_id = record[source.id_field]
    if isinstance(prompt_id, int) and not isinstance(prompt_id, bool):
        prompt_id = str(prompt_id)
    if not isinstance(prompt_id, str) or not prompt_id:
        raise RunError(
            f"{where}: field '{source.id_field}' must be a non-empty string or an integer, not "
            f"{_json_kind(prompt_id)}"
        )
    return _checked_text(prompt_id, where, f"field '{source.id_field}'"), text, record


def _checked_text(text: str, where: str, what: str) -> str:
    """`text` unless it holds a NUL or a lone surrogate (from a JSON \\ud800 escape)."""
    if "\x00" in text:
        raise RunError(f"{where}: {what} contains a NUL character (\\u0000)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RunError(
            f"{where}: {what} contains a lone surrogate ({ascii(text[e.start])}), which is "
            "not valid Unicode text"
        ) from None
    return text


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else repr(value)
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value}"
    return "a list" if isinstance(value, list) else "an object"


def takes_position_ids(model: torch.nn.Module) -> bool:
    """Whether the model's forward accepts explicit position ids."""
    own = model.__dict__.get("forward")
    if own is not None:  # wrapped on the instance (accelerate's device-map hooks)
        return "position_ids" in inspect.signature(own).parameters
    return _class_takes_position_ids(type(model))


@functools.cache
def _class_takes_position_ids(cls: type) -> bool:
    # inspect.signature costs more than a tiny model's forward pass: once per class.
    return "position_ids" in inspect.signature(cls.forward).parameters


def make_batch(
    prompts: list[tuple[str, str]],
    tokenizer,
    device: torch.device,
    *,
    left_pad: bool,
    aux: list[bool] | None = None,
    prompt_ids: list[str] | None = None,
) -> Batch:
    """Tokenize and pad prompts into one batch.

    Left padding (used whenever the model takes position ids) keeps every
    prompt's last token in the last column, which generation needs; explicit
    position ids then make padded rows compute exactly what they would alone.
    `prompts` pairs are (row key, text); `prompt_ids` gives each row's prompt id
    when row keys differ from them (sweep points).
    """
    ids = [p for p, _ in prompts]
    texts = [t for _, t in prompts]
    token_ids = [list(t) for t in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    for prompt_id, toks in zip(ids, token_ids):
        if not toks:
            raise RunError(f"prompt '{prompt_id}' has no tokens after tokenization")
    lengths = [len(t) for t in token_ids]
    width = max(lengths)
    pad = tokenizer.pad_token_id
    # Rows built as lists and converted once: per-row tensor writes cost more than a
    # small model's forward pass.
    offsets = [width - n if left_pad else 0 for n in lengths]
    rows, masks, positions = [], [], []
    for toks in token_ids:
        fill = [pad] * (width - len(toks))
        rows.append(fill + toks if left_pad else toks + fill)
        ones, zeros = [1] * len(toks), [0] * (width - len(toks))
        masks.append(zeros + ones if left_pad else ones + zeros)
        if left_pad:  # explicit positions: 0 on the padding, then 0, 1, ... on the prompt
            positions.append(zeros + list(range(len(toks))))
    host = torch.tensor([rows, masks, positions or masks])  # ids, mask, positions: (3, B, W)
    counts = torch.tensor([lengths, offsets])  # (2, batch)
    if device.type != "cpu":
        host, counts = host.to(device), counts.to(device)
    return Batch(
        ids=ids,
        texts=texts,
        token_ids=token_ids,
        input_ids=host[0],
        attention_mask=host[1],
        position_ids=host[2] if left_pad else None,
        lengths=counts[0],
        offsets=counts[1],
        aux=aux or [False] * len(ids),
        prompts=prompt_ids,
        tokenizer=tokenizer,
        offset_list=offsets,
    )
