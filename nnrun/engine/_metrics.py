"""Metrics: one number per row from its next-token logits, computed on the device."""

from __future__ import annotations

import torch

from nnrun.errors import RunError


def compute_metric(
    kind: str,
    logits: torch.Tensor,  # (R, V)
    token_ids: torch.Tensor,  # (R, k) the tokens each row reads (k = 2 for logit_diff)
    reference: torch.Tensor | None = None,  # (1, V): kl's reference row
) -> torch.Tensor:
    """(R,) values of one metric; float32 (int64 for rank), whatever the model's dtype.

    prob / logprob / logit / rank read one token; logit_diff is logit(target) -
    logit(foil); kl is KL(reference || row) in nats over the whole vocabulary. Rank 0
    is the most likely token; ties count in the token's favour. Each row has its own
    tokens (`{field: answer}` metrics read a different answer per prompt).
    """
    x = logits.float()
    if kind == "kl":
        if reference is None:
            raise RunError("metric kl: no reference row")
        ref = torch.log_softmax(reference.float(), dim=-1)  # (1, V)
        own = torch.log_softmax(x, dim=-1)  # (R, V)
        return (ref.exp() * (ref - own)).sum(dim=-1)
    ids = token_ids.to(x.device)
    if kind == "logit_diff":
        picked = x.gather(1, ids)  # (R, 2)
        return picked[:, 0] - picked[:, 1]
    token = ids[:, :1]  # (R, 1)
    if kind == "logit":
        return x.gather(1, token)[:, 0]
    if kind == "prob":
        return torch.softmax(x, dim=-1).gather(1, token)[:, 0]
    if kind == "logprob":
        return torch.log_softmax(x, dim=-1).gather(1, token)[:, 0]
    if kind == "rank":
        return (x > x.gather(1, token)).sum(dim=-1)
    raise RunError(f"unknown metric kind '{kind}'")
