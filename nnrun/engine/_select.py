"""Selections (prompts x tokens) -> index tensors into a padded batch."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from nnrun.engine._batch import Batch
from nnrun.errors import RunError
from nnrun.spec import TokenSelection


@dataclass(frozen=True)
class TokenIndex:
    """Where a selection's values sit in a padded batch.

    `rows` are batch rows; `columns[i, k]` is the padded column of the k-th
    selected token of row `rows[i]`. Not every entry is real: rows select
    different numbers of tokens when the selection is ragged (`all`, slices),
    and while generating a token list keeps its slots but only the slot of
    the new token is real. `valid` marks the real entries; the others point
    at some valid column and are masked by the caller.
    """

    rows: torch.Tensor  # (R,)
    columns: torch.Tensor  # (R, K)
    valid: torch.Tensor  # (R, K) bool
    ragged: bool
    full: bool = False  # every entry is real (nothing to mask)
    # (a, b) when every row of the batch, in order, selects columns a..b-1: the values
    # are then a slice, cheaper to take than a gather.
    span: tuple[int, int] | None = None

    # Derived tensors are computed once: an index is reused batch after batch (see
    # `token_index`), and each tensor op costs about what a tiny model's layer does.
    @cached_property
    def counts(self) -> torch.Tensor:
        """(R,) how many entries of each row are real."""
        return self.valid.sum(dim=1)

    @cached_property
    def row_column(self) -> torch.Tensor:
        """(R, 1) `rows` as a column, to index (batch, tokens, ...) values with `columns`."""
        return self.rows[:, None]

    def valid_entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) batch rows and (N,) columns of the real (non-padding) entries."""
        valid = self.valid
        return self.rows[:, None].expand_as(self.columns)[valid], self.columns[valid]

    def to(self, device: torch.device) -> TokenIndex:
        """The same index on `device`: under a device map a site's value may live on
        another device than the batch, and indexing needs both on one."""
        if self.rows.device == device:
            return self
        return TokenIndex(
            self.rows.to(device),
            self.columns.to(device),
            self.valid.to(device),
            self.ragged,
            self.full,
            self.span,
        )

    def fit(self, value_tokens: int, input_tokens: int, what: str) -> TokenIndex:
        """Shift columns for a value that covers only the last `value_tokens` inputs.

        During generation transformers computes logits for the last position
        only, the prompt pass included: `lm_head` gives (batch, 1, vocab) for a
        (batch, width) input. With left padding that column is every prompt's
        last token, so `tokens: -1` still works there.
        """
        shift = input_tokens - value_tokens
        if shift == 0:
            return self
        if shift < 0 or bool((self.columns[self.valid] < shift).any()):
            raise RunError(
                f"{what}: the value there covers only the last {value_tokens} of "
                f"{input_tokens} positions (during generation only the last position gets "
                f"logits); select tokens: -1"
            )
        columns = (self.columns - shift).clamp(min=0)
        return TokenIndex(self.rows, columns, self.valid, self.ragged, self.full)


def token_index(
    batch: Batch,
    prompts: frozenset[str] | None,
    tokens: TokenSelection,
    *,
    what: str,
    include_aux: bool = False,
    step: int = 0,
    cache: dict[tuple, TokenIndex | None] | None = None,
) -> TokenIndex | None:
    """Index tensors for the prompts and tokens an action selects in this batch.

    At step 0 (the prompt pass) columns index the padded prompt batch. At a
    generation step k >= 1 the model sees one new token per row, the prompt's
    own position `length + k - 1`: a row selects column 0 when the selection,
    resolved over the `length + k` tokens so far, contains that position
    (`all` and `-1` do; positions inside the prompt do not), else nothing. A
    token list keeps one slot per listed position, so the new token lands in
    the slot of the entry that named it (`[0, -1]`: slot 1).

    Returns None when no prompt of the batch is selected. `what` names the
    action for error messages ("save 'resid'", "edits[2]"). `cache` keeps indices
    for batches that come back (a plan's inline rows, run again in a notebook loop
    or by a sweep): this Python work costs more than a tiny model's forward pass,
    and index tensors are never changed in place, so a cached one is handed out again.
    """
    if cache is None:
        return _token_index(batch, prompts, tokens, what, include_aux, step)
    key = _cache_key(batch, prompts, tokens, include_aux, step)
    if key not in cache:
        if len(cache) >= _CACHED_INDICES:
            cache.pop(next(iter(cache)))
        cache[key] = _token_index(batch, prompts, tokens, what, include_aux, step)
    return cache[key]


# How many selections a plan keeps worked out (see `token_index`'s cache).
_CACHED_INDICES = 64


def _cache_key(
    batch: Batch, prompts: frozenset[str] | None, tokens: TokenSelection, aux: bool, step: int
) -> tuple:
    # Everything the index depends on: row ids only where the selection names rows,
    # texts only where a `find` reads them (so batches of streamed prompts of the same
    # lengths share one entry).
    texts = tuple(batch.texts) if tokens.kind == "find" else None
    lengths = tuple(len(t) for t in batch.token_ids)
    offsets = tuple(batch.offset_list or batch.offsets.tolist())
    device = batch.input_ids.device
    return (
        None if prompts is None else tuple(batch.ids),
        lengths,
        offsets,
        tuple(batch.aux),
        prompts,
        tokens,
        aux,
        step,
        texts,
        device,
    )


def _token_index(
    batch: Batch,
    prompts: frozenset[str] | None,
    tokens: TokenSelection,
    what: str,
    include_aux: bool,
    step: int,
) -> TokenIndex | None:
    rows: list[int] = []
    positions: list[list[int | None]] = []  # None: a slot with no real token
    lengths = [len(t) for t in batch.token_ids]
    offsets = batch.offset_list or batch.offsets.tolist()
    for row, prompt_id in enumerate(batch.ids):
        if prompts is not None and prompt_id not in prompts:
            continue
        if batch.aux[row] and not include_aux:
            continue
        find = _finder(batch, row)
        try:
            own = tokens.resolve(lengths[row], find)
        except IndexError:
            raise RunError(
                f"{what}: tokens {tokens} is beyond prompt '{prompt_id}', "
                f"which has {lengths[row]} tokens (valid: 0..{lengths[row] - 1} or "
                f"-{lengths[row]}..-1)"
            ) from None
        except LookupError as e:
            raise RunError(
                f"{what}: tokens {tokens}: in prompt '{prompt_id}' "
                f"({batch.texts[row]!r}), {e.args[0].removesuffix(' in the prompt')}"
            ) from None
        rows.append(row)
        if step == 0:
            positions.append([offsets[row] + p for p in own])
            continue
        seen = lengths[row] + step  # tokens so far; the newest is being processed
        newest = [p == seen - 1 for p in tokens.resolve(seen, find)]
        if tokens.kind == "list":
            positions.append([0 if is_new else None for is_new in newest])
        else:
            positions.append([0] if any(newest) else [])
    if not rows:
        return None
    width = max(len(p) for p in positions)
    ragged = tokens.kind != "list" or step > 0
    if width == 0:
        if step > 0:
            width = 1  # nothing selected at this step: one masked column per row
        else:
            raise RunError(f"{what}: tokens {tokens} selects no token of the prompts")
    # Short rows and empty slots point at column 0 and are marked not valid.
    columns = [[0 if c is None else c for c in p] + [0] * (width - len(p)) for p in positions]
    valid = [[c is not None for c in p] + [False] * (width - len(p)) for p in positions]
    device = batch.input_ids.device
    full = all(all(v) for v in valid)
    span = None
    first = columns[0]
    if (
        full
        and step == 0
        and rows == list(range(batch.size))
        and all(c == first for c in columns)
        and first == list(range(first[0], first[0] + len(first)))
    ):
        span = (first[0], first[0] + len(first))
    return TokenIndex(
        rows=torch.tensor(rows, device=device),
        columns=torch.tensor(columns, device=device),
        valid=torch.tensor(valid, device=device),
        ragged=ragged,
        full=full,
        span=span,
    )


def _finder(batch: Batch, row: int):
    """`find(text, occurrence)` over one prompt of the batch, for `tokens: {find: ...}`."""
    from nnrun.models._tokens import find_tokens

    def find(needle: str, occurrence: str | None) -> list[int]:
        if batch.tokenizer is None:
            raise LookupError("no tokenizer to search the prompt with")
        return find_tokens(
            batch.tokenizer, batch.texts[row], batch.token_ids[row], needle, occurrence
        )

    return find
