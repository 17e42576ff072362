"""Selections (prompts x tokens) -> index tensors into a padded batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nnrun.engine._batch import Batch
from nnrun.errors import RunError
from nnrun.spec import TokenSelection


@dataclass(frozen=True)
class TokenIndex:
    """Where a selection's values sit in a padded batch.

    `rows` are batch rows; `columns[i, k]` is the padded column of the k-th
    selected token of row `rows[i]`. Rows select different numbers of tokens
    when the selection is ragged (`all`, slices): `counts[i]` says how many
    are real, the rest repeat a valid column and are masked by the caller.
    """

    rows: torch.Tensor  # (R,)
    columns: torch.Tensor  # (R, K)
    counts: torch.Tensor  # (R,)
    ragged: bool

    def valid_entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) batch rows and (N,) columns of the real (non-padding) entries."""
        valid = self.valid
        return self.rows[:, None].expand_as(self.columns)[valid], self.columns[valid]

    @property
    def valid(self) -> torch.Tensor:
        """(R, K) bool: which entries are real tokens rather than padding."""
        k = torch.arange(self.columns.shape[1], device=self.columns.device)
        return k[None, :] < self.counts[:, None]


def token_index(
    batch: Batch,
    prompts: frozenset[str] | None,
    tokens: TokenSelection,
    *,
    what: str,
    include_aux: bool = False,
) -> TokenIndex | None:
    """Index tensors for the prompts and tokens an action selects in this batch.

    Returns None when no prompt of the batch is selected. `what` names the
    action for error messages ("save 'resid'", "edits[2]").
    """
    rows: list[int] = []
    positions: list[list[int]] = []
    lengths = batch.lengths.tolist()
    offsets = batch.offsets.tolist()
    for row, prompt_id in enumerate(batch.ids):
        if prompts is not None and prompt_id not in prompts:
            continue
        if batch.aux[row] and not include_aux:
            continue
        try:
            own = tokens.resolve(lengths[row])
        except IndexError:
            raise RunError(
                f"{what}: tokens {tokens} is beyond prompt '{prompt_id}', "
                f"which has {lengths[row]} tokens (valid: 0..{lengths[row] - 1} or "
                f"-{lengths[row]}..-1)"
            ) from None
        rows.append(row)
        positions.append([offsets[row] + p for p in own])
    if not rows:
        return None
    width = max(len(p) for p in positions)
    ragged = tokens.kind != "list"
    if width == 0:
        raise RunError(f"{what}: tokens {tokens} selects no token of the prompts")
    # Pad short rows with their first column; `counts` marks them as padding.
    columns = [p + [p[0] if p else 0] * (width - len(p)) for p in positions]
    device = batch.input_ids.device
    return TokenIndex(
        rows=torch.tensor(rows, device=device),
        columns=torch.tensor(columns, device=device),
        counts=torch.tensor([len(p) for p in positions], device=device),
        ragged=ragged,
    )

