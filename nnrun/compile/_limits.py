"""What a valid spec may still ask that a model cannot do, found before any prompt runs.

- A prompt (plus the tokens to generate) longer than the model's positions would end
  in an index error deep inside its embedding.
- An edit of a model's token ids (the root `input`, or an embedding's input) would feed
  floats or out-of-range ids to the embedding.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from nnrun.errors import CompileError, RunError

# transformers config names for the number of positions a model was built for.
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len")


def max_positions(model: nn.Module) -> int | None:
    """How many positions the model takes (None when its config does not say)."""
    config = getattr(model, "config", None)
    for key in _POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def positions_problem(
    prompt_id: str, length: int, limit: int | None, new_tokens: int
) -> str | None:
    """Why a prompt of `length` tokens does not fit, or None."""
    if limit is None or length + new_tokens <= limit:
        return None
    if new_tokens:
        return (
            f"prompt '{prompt_id}' has {length} tokens and generate.max_new_tokens is "
            f"{new_tokens}, {length + new_tokens} positions in all, but the model takes at most "
            f"{limit} positions"
        )
    return (
        f"prompt '{prompt_id}' has {length} tokens, but the model takes at most {limit} positions"
    )


def check_prompt_lengths(
    prompts: Any, tokenizer: Any, model: nn.Module, generate: dict[str, Any] | None
) -> None:
    """Inline prompts that do not fit the model's positions: a CompileError naming the first."""
    limit = max_positions(model)
    if prompts.inline is None or tokenizer is None or limit is None:
        return
    new_tokens = int(generate["max_new_tokens"]) if generate else 0
    ids = [p for p, _ in prompts.inline]
    encoded = tokenizer([t for _, t in prompts.inline], add_special_tokens=True)["input_ids"]
    for prompt_id, tokens in zip(ids, encoded):
        problem = positions_problem(prompt_id, len(tokens), limit, new_tokens)
        if problem:
            raise CompileError(f"prompts.{prompt_id}: {problem}")


def check_batch_lengths(
    ids: list[str], lengths: list[int], limit: int | None, new_tokens: int
) -> None:
    """The same check for streamed prompts, batch by batch (a RunError)."""
    for prompt_id, length in zip(ids, lengths):
        problem = positions_problem(prompt_id, length, limit, new_tokens)
        if problem:
            raise RunError(problem)


def check_edit_site(model: nn.Module, module: str, port: str, label: str, path: str) -> None:
    """Refuse an edit whose value is token ids (integers an embedding looks up)."""
    if port != "input":
        return
    target = model if module == "" else model.get_submodule(module)
    if module == "" or isinstance(target, nn.Embedding):
        raise CompileError(
            f"{path}: {label} is the model's token ids, which an edit cannot change; edit the "
            "embedding's output instead (the input of the first layer)"
        )
