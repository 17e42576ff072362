"""Multi-token generation: nnrun against plain transformers `generate` with forward hooks.

Fast tier, tiny seeded models, fp32 on CPU. Every reference runs the plain
transformers model on the same left-padded batch nnrun builds (pad = the
tokenizer's EOS, as nnrun picks it) and records, with a forward hook, what one
site gives at every forward call of `model.generate`: call 0 is the prompt pass
(step 0), call k the pass over the k-th new token (step k).

The generation specs in specs/ run here on tiny Llama through a model override;
tests/test_generation_nnsight.py runs them on SmolLM2 against nnsight.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import nnrun
from nnrun.spec import SpecError, check_spec
from nnrun.store import Results

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
NNRUN = Path(sys.executable).with_name("nnrun")
RTOL, ATOL = 1e-4, 1e-5
N = 5  # new tokens

# Different lengths, the shortest in the middle: every row but one is left-padded.
PROMPTS: dict[str, str] = {
    "clean": "The capital of France is",
    "short": "Hi",
    "long": "The Eiffel Tower is in the city of",
}
LAST = {"llama": "model.layers[-1].output", "gpt2": "transformer.h[-1].output"}
LAYER = {"llama": "model.layers", "gpt2": "transformer.h"}
EMBED = {"llama": "model.embed_tokens.output", "gpt2": "transformer.wte.output"}
HIDDEN = 32

# -- helpers ----------------------------------------------------------------------------

_run_ids = itertools.count()


def run_spec(tmp_path: Path, spec: Mapping[str, Any] | Path, overrides: Iterable[str] = ()):
    """Run a dict spec (format line added) or a spec file into a fresh file under tmp_path."""
    if isinstance(spec, Mapping):
        spec = {"nnrun": 1, "name": "generation", **spec}
    out = tmp_path / f"run{next(_run_ids)}.h5"
    return nnrun.run(spec, overrides=list(overrides), output=out)


def generation(results: Results) -> dict[str, Any]:
    """/generation of an output file: ids (-1 padded), length and text per prompt."""
    with h5py.File(results.path, "r") as f:
        group = f["generation"]
        return {
            "ids": group["ids"][()],
            "length": group["length"][()],
            "text": [t.decode() if isinstance(t, bytes) else t for t in group["text"][()]],
        }


def rows(gen: Mapping[str, Any]) -> list[list[int]]:
    """Each prompt's new token ids, cut at its length."""
    return [list(map(int, ids[:n])) for ids, n in zip(gen["ids"], gen["length"])]


def tiny(arch: str, request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"tiny_{arch}")


@functools.cache
def plain(path: str) -> tuple[torch.nn.Module, Any]:
    """The plain transformers model (fp32, eval) and a left-padding tokenizer like nnrun's."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def plain_generate(
    path: Path,
    texts: list[str],
    *,
    site: str | None = None,
    edit: Callable[[torch.Tensor], torch.Tensor] | None = None,
    edit_site: str | None = None,
    eos: int | None = None,
    **kwargs: Any,
) -> tuple[list[list[int]], list[torch.Tensor], torch.Tensor]:
    """Greedy `generate` on a left-padded batch, with optional hooks.

    Returns each row's new ids (cut after its EOS), the full output of module
    `site` at every forward call, and the attention mask of the prompt batch.
    `edit` replaces the output of module `edit_site` at every forward call.
    """
    model, tokenizer = plain(str(path))
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    modules = dict(model.named_modules())
    seen: list[torch.Tensor] = []
    handles = []
    if edit is not None:
        handles.append(modules[edit_site].register_forward_hook(lambda m, a, out: edit(out)))
    if site is not None:
        handles.append(
            modules[site].register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
        )
    config = model.generation_config
    saved_eos = config.eos_token_id
    if eos is not None:
        config.eos_token_id = eos
    try:
        with torch.inference_mode():
            out = model.generate(
                **batch,
                max_new_tokens=kwargs.pop("max_new_tokens", N),
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                **kwargs,
            )
    finally:
        config.eos_token_id = saved_eos
        for h in handles:
            h.remove()
    stop = {config.eos_token_id if eos is None else eos}
    new = out[:, batch["input_ids"].shape[1] :].tolist()
    cut = [next((i + 1 for i, t in enumerate(r) if t in stop), len(r)) for r in new]
    return [r[:c] for r, c in zip(new, cut)], seen, batch["attention_mask"]


def last_per_step(seen: list[torch.Tensor]) -> torch.Tensor:
    """(batch, steps, hidden): the last position of every forward call."""
    return torch.stack([out[:, -1] for out in seen], dim=1)


def check_steps(got: torch.Tensor, want: torch.Tensor, made: list[int]) -> None:
    """got (R, S, 1, H) vs want (R, S', H): equal where a row was alive, NaN after."""
    for r, n in enumerate(made):
        torch.testing.assert_close(got[r, :n, 0], want[r, :n], rtol=RTOL, atol=ATOL)
        assert torch.isnan(got[r, n:]).all(), f"row {r}: steps from {n} on must be NaN"


def llama_spec(path: Path, **extra: Any) -> dict[str, Any]:
    return {"model": {"path": str(path)}, "prompts": dict(PROMPTS), **extra}


# -- greedy and sampled ids -------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_ids_equal_plain_generate(arch, request, tmp_path):
    path = tiny(arch, request)
    want, _, _ = plain_generate(path, list(PROMPTS.values()))
    results = run_spec(
        tmp_path, {**llama_spec(path), "generate": {"max_new_tokens": N, "do_sample": False}}
    )
    gen = generation(results)
    assert rows(gen) == want
    assert gen["length"].tolist() == [len(w) for w in want]
    _, tokenizer = plain(str(path))
    assert gen["text"] == [tokenizer.decode(w, skip_special_tokens=True) for w in want]
    with h5py.File(results.path, "r") as f:
        assert f["prompts/id"].asstr()[()].tolist() == list(PROMPTS)


def _sampled(tmp_path: Path, path: Path, seed: int) -> list[list[int]]:
    spec = llama_spec(
        path,
        seed=seed,
        generate={"max_new_tokens": 8, "do_sample": True, "temperature": 2.0, "top_k": 0},
    )
    return rows(generation(run_spec(tmp_path, spec)))


def test_sampling_is_seeded(tiny_llama, tmp_path):
    first = _sampled(tmp_path, tiny_llama, seed=0)
    assert _sampled(tmp_path, tiny_llama, seed=0) == first
    assert _sampled(tmp_path, tiny_llama, seed=1) != first
    greedy, _, _ = plain_generate(tiny_llama, list(PROMPTS.values()), max_new_tokens=8)
    assert first != greedy  # really sampled


def test_sampling_draws_like_plain_generate_after_manual_seed(tiny_llama, tmp_path):
    """Today's seeding: torch.manual_seed(seed) once, then generate batch after batch."""
    model, tokenizer = plain(str(tiny_llama))
    batch = tokenizer(list(PROMPTS.values()), return_tensors="pt", padding=True)
    torch.manual_seed(3)
    with torch.inference_mode():
        out = model.generate(
            **batch,
            max_new_tokens=8,
            do_sample=True,
            temperature=2.0,
            top_k=0,
            pad_token_id=tokenizer.pad_token_id,
        )
    want = out[:, batch["input_ids"].shape[1] :].tolist()
    assert _sampled(tmp_path, tiny_llama, seed=3) == want


# -- per-step saves ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_per_step_last_token_saves_equal_hook_reference(arch, request, tmp_path):
    path = tiny(arch, request)
    module = LAYER[arch] + "." + str(2)  # the last of three layers
    want_ids, seen, _ = plain_generate(path, list(PROMPTS.values()), site=module)
    assert len(seen) == N and all(len(w) == N for w in want_ids)  # no EOS here
    spec = llama_spec(
        path,
        generate={"max_new_tokens": N},
        save={
            "last": {"at": LAST[arch], "tokens": -1, "steps": "all"},
            "late": {"at": LAST[arch], "tokens": [-1], "steps": "2:"},
        },
    )
    results = run_spec(tmp_path, spec)
    assert rows(generation(results)) == want_ids
    want = last_per_step(seen)  # (3, N, 32)

    got = results["last"]
    assert results.axes("last") == ["prompt", "step", "token", "hidden"]
    assert tuple(got.shape) == (3, N, 1, HIDDEN)
    torch.testing.assert_close(got[:, :, 0], want, rtol=RTOL, atol=ATOL)
    assert results.lengths("last").tolist() == [[1] * N] * 3
    with h5py.File(results.path, "r") as f:
        assert f["axes/last/step"][()].tolist() == list(range(N))
        assert f["axes/late/step"][()].tolist() == list(range(2, N))

    late = results["late"]
    assert tuple(late.shape) == (3, N - 2, 1, HIDDEN)
    torch.testing.assert_close(late[:, :, 0], want[:, 2:], rtol=RTOL, atol=ATOL)


def test_prompt_position_is_saved_at_step_zero_only(tiny_llama, tmp_path):
    _, seen, mask = plain_generate(tiny_llama, list(PROMPTS.values()), site="model.layers.2")
    spec = llama_spec(
        tiny_llama,
        generate={"max_new_tokens": N},
        save={"p1": {"at": LAST["llama"], "tokens": [1], "steps": "all"}},
    )
    results = run_spec(tmp_path, spec)
    got = results["p1"]  # (prompt, step, token, hidden)
    assert tuple(got.shape) == (3, N, 1, HIDDEN)
    offsets = (mask.shape[1] - mask.sum(dim=1)).tolist()
    want = torch.stack([seen[0][r, offsets[r] + 1] for r in range(3)])
    torch.testing.assert_close(got[:, 0, 0], want, rtol=RTOL, atol=ATOL)
    assert torch.isnan(got[:, 1:]).all()
    assert results.lengths("p1").tolist() == [[1] + [0] * (N - 1)] * 3


def test_all_tokens_per_step_keep_the_prompt_then_one_new_token(tiny_llama, tmp_path):
    """tokens: all -> every prompt position at step 0, only the new token at later steps."""
    _, seen, mask = plain_generate(tiny_llama, list(PROMPTS.values()), site="model.layers.2")
    spec = llama_spec(
        tiny_llama,
        generate={"max_new_tokens": 3},
        save={"h": {"at": LAST["llama"], "tokens": "all"}},
    )
    results = run_spec(tmp_path, spec)
    got, lengths = results["h"], results.lengths("h")
    own = mask.sum(dim=1).tolist()
    assert lengths.tolist() == [[n, 1, 1] for n in own]
    assert got.shape[:3] == (3, 3, max(own))
    for r, n in enumerate(own):
        torch.testing.assert_close(got[r, 0, :n], seen[0][r, -n:], rtol=RTOL, atol=ATOL)
        assert torch.isnan(got[r, 0, n:]).all()
        for step in (1, 2):
            torch.testing.assert_close(got[r, step, 0], seen[step][r, -1], rtol=RTOL, atol=ATOL)
            assert torch.isnan(got[r, step, 1:]).all()


def test_layer_wildcard_and_logit_lens_per_step(tiny_llama, tmp_path):
    """(prompt, layer, step, token, ...) axes; the last layer's lens top-1 is the next token."""
    model, _ = plain(str(tiny_llama))
    refs = {}
    for layer in range(3):
        _, refs[layer], _ = plain_generate(
            tiny_llama, list(PROMPTS.values()), site=f"model.layers.{layer}"
        )
    want_ids, _, _ = plain_generate(tiny_llama, list(PROMPTS.values()))
    spec = llama_spec(
        tiny_llama,
        generate={"max_new_tokens": N},
        save={
            "resid": {"at": "model.layers.*.output", "tokens": -1},
            "lens": {
                "at": "model.layers[1:].output",
                "tokens": -1,
                "apply": ["model.norm", "lm_head", {"topk": 2}],
            },
        },
    )
    results = run_spec(tmp_path, spec)
    resid = results["resid"]
    assert results.axes("resid") == ["prompt", "layer", "step", "token", "hidden"]
    assert tuple(resid.shape) == (3, 3, N, 1, HIDDEN)
    for layer in range(3):
        want = last_per_step(refs[layer])
        torch.testing.assert_close(resid[:, layer, :, 0], want, rtol=RTOL, atol=ATOL)
    assert results.lengths("resid").tolist() == [[1] * N] * 3

    lens, top = results["lens"], results["lens.indices"]
    assert tuple(lens.shape) == tuple(top.shape) == (3, 2, N, 1, 2)
    with torch.inference_mode():
        logits = model.lm_head(model.model.norm(last_per_step(refs[2])))  # (3, N, vocab)
    torch.testing.assert_close(lens[:, 1, :, 0], logits.topk(2).values, rtol=RTOL, atol=ATOL)
    assert top[:, 1, :, 0, 0].tolist() == want_ids  # greedy: the top-1 token is the next token


def test_logits_at_a_prompt_position_during_generation_is_a_clear_error(tiny_llama, tmp_path):
    """generate computes logits for the last position only: other positions cannot be saved."""
    spec = llama_spec(
        tiny_llama,
        generate={"max_new_tokens": 2},
        save={"logits": {"at": "output", "tokens": "all"}},
    )
    with pytest.raises(nnrun.errors.RunError, match=r"save 'logits'.*select tokens: -1"):
        run_spec(tmp_path, spec)


def test_micro_batches_and_prompt_files_change_nothing(tiny_llama, tmp_path):
    """batch_size and a streamed prompt file give the same ids and saves; before_edits too."""
    before: list[torch.Tensor] = []

    def record_then_add(out: torch.Tensor) -> torch.Tensor:
        before.append(out[:, -1].clone())
        return out + 0.5

    want_ids, seen, mask = plain_generate(
        tiny_llama,
        list(PROMPTS.values()),
        site="model.layers.2",
        edit_site="model.layers.1",
        edit=record_then_add,
        max_new_tokens=3,
    )
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("".join(t + "\n" for t in PROMPTS.values()))
    spec = llama_spec(
        tiny_llama,
        generate={"max_new_tokens": 3},
        edits=[{"at": "model.layers.1.output", "add": 0.5}],
        save={
            "h": {"at": LAST["llama"], "tokens": "all"},
            "pre": {"at": "model.layers.1.output", "tokens": -1, "before_edits": True},
        },
    )
    runs = [
        run_spec(tmp_path, {**spec, "batch_size": 8}),
        run_spec(tmp_path, {**spec, "batch_size": 1}),
        run_spec(tmp_path, {**spec, "batch_size": 2, "prompts": {"file": str(prompt_file)}}),
    ]
    own = mask.sum(dim=1).tolist()
    for results in runs:
        assert rows(generation(results)) == want_ids
        assert results.lengths("h").tolist() == [[n, 1, 1] for n in own]
        h = results["h"]
        for r, n in enumerate(own):
            torch.testing.assert_close(h[r, 0, :n], seen[0][r, -n:], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(h[:, 1:, 0], last_per_step(seen)[:, 1:], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(
            results["pre"][:, :, 0], torch.stack(before, dim=1), rtol=RTOL, atol=ATOL
        )
    assert runs[2].prompt_ids("h") == ["0", "1", "2"]


def test_token_list_keeps_each_position_in_its_slot_at_later_steps(tiny_llama, tmp_path):
    """tokens [0, -1]: slot 0 is position 0 (step 0 only), slot 1 the newest token."""
    _, seen, mask = plain_generate(
        tiny_llama, list(PROMPTS.values()), site="model.layers.2", max_new_tokens=3
    )
    spec = llama_spec(
        tiny_llama,
        generate={"max_new_tokens": 3},
        save={"h": {"at": LAST["llama"], "tokens": [0, -1]}},
    )
    results = run_spec(tmp_path, spec)
    with h5py.File(results.path, "r") as f:
        assert f["axes/h/token"][()].tolist() == [0, -1]
    got = results["h"]  # (prompt, step, token, hidden)
    offsets = (mask.shape[1] - mask.sum(dim=1)).tolist()
    first = torch.stack([seen[0][r, offsets[r]] for r in range(3)])
    torch.testing.assert_close(got[:, 0, 0], first, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got[:, :, 1], last_per_step(seen), rtol=RTOL, atol=ATOL)
    assert torch.isnan(got[:, 1:, 0]).all()


def test_per_token_operand_of_a_token_list_during_generation(tiny_llama, tmp_path):
    """add [v0, v1] at tokens [0, -1]: v0 at position 0 (prompt pass), v1 at every newest token."""
    v = _steering_vector().view(1, HIDDEN) * torch.tensor([[1.0], [-1.0]])  # (2, 32)
    calls = itertools.count()
    _, tokenizer = plain(str(tiny_llama))
    batch = tokenizer(list(PROMPTS.values()), return_tensors="pt", padding=True)
    offsets = (batch["attention_mask"].shape[1] - batch["attention_mask"].sum(dim=1)).tolist()

    def add(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        if next(calls) == 0:
            for r, o in enumerate(offsets):
                out[r, o] += v[0]
        out[:, -1] += v[1]
        return out

    want, _, _ = plain_generate(
        tiny_llama, list(PROMPTS.values()), edit_site="model.layers.1", edit=add
    )
    spec = llama_spec(
        tiny_llama,
        generate={"max_new_tokens": N},
        edits=[{"at": "model.layers.1.output", "tokens": [0, -1], "add": v.tolist()}],
    )
    assert rows(generation(run_spec(tmp_path, spec))) == want


# -- EOS: ragged steps ------------------------------------------------------------------


@pytest.fixture(scope="module")
def eos_llama(tiny_llama, tmp_path_factory) -> tuple[Path, int, list[list[int]]]:
    """A copy of tiny Llama whose generation EOS is the 3rd token 'clean' generates greedily.

    Returns the directory, that token, and every prompt's greedy ids with the original EOS.
    """
    before, _, _ = plain_generate(tiny_llama, list(PROMPTS.values()), max_new_tokens=N + 1)
    eos = before[0][2]
    # Preconditions (the models are seeded, so these hold for good): 'clean' stops after
    # exactly 3 tokens and the other rows never reach that token.
    assert eos not in before[0][:2] and all(eos not in r for r in before[1:])
    path = tmp_path_factory.mktemp("eos-llama")
    shutil.copytree(tiny_llama, path, dirs_exist_ok=True)
    config = json.loads((path / "generation_config.json").read_text())
    config["eos_token_id"] = eos
    (path / "generation_config.json").write_text(json.dumps(config))
    return path, eos, before


@pytest.mark.parametrize("batch_size", [8, 1], ids=["one-batch", "one-prompt-per-batch"])
def test_eos_row_has_ragged_steps_padded_not_truncated(eos_llama, tmp_path, batch_size):
    path, eos, before = eos_llama
    want_ids, seen, _ = plain_generate(path, list(PROMPTS.values()), site="model.layers.2")
    assert want_ids == [before[0][:3], before[1][:N], before[2][:N]]
    made = [3, N, N]
    spec = {
        **llama_spec(path),
        "batch_size": batch_size,
        "generate": {"max_new_tokens": N},
        "save": {
            "last": {"at": LAST["llama"], "tokens": -1},
            "logits": {"at": "output", "tokens": -1, "steps": [0, 3, 4], "apply": ["argmax"]},
        },
    }
    results = run_spec(tmp_path, spec)
    gen = generation(results)
    assert gen["length"].tolist() == made
    assert rows(gen) == want_ids
    assert gen["ids"].shape == (3, N)
    assert gen["ids"][0, 3:].tolist() == [-1] * (N - 3)  # padded after EOS

    last = results["last"]
    assert tuple(last.shape) == (3, N, 1, HIDDEN)  # every step kept, none truncated
    check_steps(last, last_per_step(seen), made)
    lengths = results.lengths("last").tolist()
    assert lengths == [[1, 1, 1, 0, 0], [1] * N, [1] * N]

    # The argmax of the last-position logits at a step is the token that step made.
    top = results["logits"]  # (prompt, step, token) int, -1 where the row had stopped
    assert top.shape == (3, 3, 1)
    assert top[0, :, 0].tolist() == [want_ids[0][0], -1, -1]
    for r in (1, 2):
        assert top[r, :, 0].tolist() == [want_ids[r][s] for s in (0, 3, 4)]
    assert results.lengths("logits").tolist() == [[1, 0, 0], [1, 1, 1], [1, 1, 1]]


def test_min_new_tokens_keeps_a_row_past_its_eos(eos_llama, tmp_path):
    path, eos, _ = eos_llama
    want_ids, _, _ = plain_generate(path, list(PROMPTS.values()), min_new_tokens=N)
    assert all(len(w) == N for w in want_ids)
    spec = {**llama_spec(path), "generate": {"max_new_tokens": N, "min_new_tokens": N}}
    gen = generation(run_spec(tmp_path, spec))
    assert gen["length"].tolist() == [N, N, N]
    assert rows(gen) == want_ids
    assert eos not in gen["ids"][0].tolist()


@pytest.mark.parametrize(
    "batch_size",
    [8, 1],
    ids=["one-batch", "one-prompt-per-batch"],
)
def test_save_of_late_steps_keeps_rows_that_stopped_before_them(eos_llama, tmp_path, batch_size):
    """'clean' stops after 3 tokens: its row of a steps "3:" save is all NaN, lengths 0."""
    path, _, _ = eos_llama
    spec = {
        **llama_spec(path),
        "batch_size": batch_size,
        "generate": {"max_new_tokens": N},
        "save": {"late": {"at": LAST["llama"], "tokens": -1, "steps": "3:"}},
    }
    results = run_spec(tmp_path, spec)
    assert results.prompt_ids("late") == list(PROMPTS)
    assert tuple(results["late"].shape) == (3, N - 3, 1, HIDDEN)
    assert results.lengths("late").tolist() == [[0, 0], [1, 1], [1, 1]]
    assert torch.isnan(results["late"][0]).all()
    assert not torch.isnan(results["late"][1:]).any()


# -- models without position ids ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bloom(tmp_path_factory) -> Path:
    """A 3-layer Bloom (ALiBi, seed 0): its forward takes no position_ids."""
    import transformers
    from tiny_models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer("gpt2")
    config = transformers.BloomConfig(
        vocab_size=len(tokenizer),
        n_layer=3,
        hidden_size=HIDDEN,
        n_head=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bloom")
    transformers.BloomForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_greedy_ids_of_a_model_without_position_ids(tiny_bloom, tmp_path):
    texts = list(PROMPTS.values())
    want, _, _ = plain_generate(tiny_bloom, texts)  # left-padded, as transformers requires
    alone = [plain_generate(tiny_bloom, [t])[0][0] for t in texts]
    assert want == alone  # left padding is exact for Bloom
    results = run_spec(
        tmp_path,
        {
            "model": {"path": str(tiny_bloom)},
            "prompts": dict(PROMPTS),
            "generate": {"max_new_tokens": N},
        },
    )
    assert rows(generation(results)) == want


# -- edits during generation ------------------------------------------------------------


def _steering_vector(scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(HIDDEN, generator=torch.Generator().manual_seed(7))


def test_steering_add_every_step_equals_plain_hook(tiny_llama, tmp_path):
    v, alpha = _steering_vector(), 2.0
    texts = list(PROMPTS.values())
    unsteered, _, _ = plain_generate(tiny_llama, texts)
    want_ids, seen, _ = plain_generate(
        tiny_llama,
        texts,
        site="model.layers.2",
        edit_site="model.layers.1",
        edit=lambda out: out + alpha * v,
    )
    assert want_ids != unsteered  # the steering changes the continuation
    spec = llama_spec(
        tiny_llama,
        generate={"max_new_tokens": N, "do_sample": False},
        edits=[
            {
                "at": "model.layers.1.output",
                "steps": "all",
                "tokens": "all",
                "add": v.tolist(),
                "alpha": alpha,
            }
        ],
        save={"last": {"at": LAST["llama"], "tokens": -1}},
    )
    results = run_spec(tmp_path, spec)
    assert rows(generation(results)) == want_ids
    check_steps(results["last"], last_per_step(seen), [N] * 3)


@pytest.mark.parametrize(
    ("steps", "calls"),
    [(0, {0}), ("1:", set(range(1, N))), ([1, 3], {1, 3}), ("-2:", {N - 2, N - 1})],
)
def test_steering_at_some_steps_equals_hook_at_those_forward_calls(
    steps, calls, tiny_llama, tmp_path
):
    """An edit at steps S changes exactly the forward calls S of `generate` (call 0: prompt)."""
    v, alpha = _steering_vector(), 2.0
    counter = itertools.count()

    def at_calls(out: torch.Tensor) -> torch.Tensor:
        return out + alpha * v if next(counter) in calls else out

    want_ids, seen, _ = plain_generate(
        tiny_llama,
        list(PROMPTS.values()),
        site="model.layers.2",
        edit_site="model.layers.1",
        edit=at_calls,
    )
    spec = llama_spec(
        tiny_llama,
        generate={"max_new_tokens": N},
        edits=[{"at": "model.layers.1.output", "steps": steps, "add": v.tolist(), "alpha": alpha}],
        save={"last": {"at": LAST["llama"], "tokens": -1}},
    )
    results = run_spec(tmp_path, spec)
    assert rows(generation(results)) == want_ids
    check_steps(results["last"], last_per_step(seen), [N] * 3)


CROSS = {
    # Equal token lengths in both tiny tokenizers (11 with Llama's <s>, 10 for GPT-2).
    "eiffel": "The Eiffel Tower is in the city of",
    "colosseum": "The Colosseum is in the city of",
    "other": "When Mary and John went to the store, John gave",  # longer: both get padded
}


@pytest.mark.parametrize(
    ("arch", "batch_size"),
    [("llama", 8), ("llama", 1), ("gpt2", 8)],
    ids=["llama", "llama-bs1", "gpt2"],
)
@pytest.mark.parametrize("steps", [0, "all"])
def test_cross_prompt_embeddings_make_b_generate_as_a(arch, batch_size, steps, request, tmp_path):
    """With batch_size 1 the source prompt rides along as an auxiliary row of b's batch."""
    path = tiny(arch, request)
    _, tokenizer = plain(str(path))
    lengths = [len(tokenizer(t)["input_ids"]) for t in CROSS.values()]
    assert lengths[0] == lengths[1] < lengths[2]
    want, _, _ = plain_generate(path, list(CROSS.values()))
    assert want[0] != want[1]  # unedited, the two prompts continue differently
    spec = {
        "model": {"path": str(path)},
        "prompts": dict(CROSS),
        "batch_size": batch_size,
        "generate": {"max_new_tokens": N},
        "edits": [
            {
                "at": EMBED[arch],
                "prompts": ["colosseum"],
                "tokens": "all",
                "steps": steps,
                "set": {"from": "eiffel"},
            }
        ],
    }
    got = rows(generation(run_spec(tmp_path, spec)))
    assert got == [want[0], want[0], want[2]]


SOURCE_STEP = {"target": "The capital of France is", "love": "I like to read books"}


@pytest.mark.parametrize(
    ("step", "steps", "first"),
    [(0, "all", 0), ("same", "all", 0), (None, "all", 0), (2, "2:", 2), (0, "1:", 1)],
)
def test_source_step_selects_which_step_of_the_source_is_read(
    step, steps, first, tiny_llama, tmp_path
):
    """`add: {from: love, tokens: [-1], step: S}` adds love's value at step S at every step
    the edit runs (0: its prompt pass, a fixed vector); `step: same` (the default, also
    without `step:`) adds love's value at the step being edited, which follows the tokens
    love generates itself. The reference adds the same vectors with a plain hook."""
    alpha, layer = 2.0, "model.layers.1"
    _, love_seen, _ = plain_generate(tiny_llama, [SOURCE_STEP["love"]], site=layer)
    love = [out[0, -1] for out in love_seen]  # love's newest token at each forward call
    counter = itertools.count()

    def add(out: torch.Tensor) -> torch.Tensor:
        call = next(counter)
        if call < first:
            return out
        vector = love[call] if step in ("same", None) else love[step]
        return out + alpha * vector

    want, _, _ = plain_generate(tiny_llama, [SOURCE_STEP["target"]], edit_site=layer, edit=add)
    unsteered, _, _ = plain_generate(tiny_llama, [SOURCE_STEP["target"]])
    assert want != unsteered
    source: dict[str, Any] = {"from": "love", "tokens": [-1]}
    if step is not None:
        source["step"] = step
    spec = {
        "model": {"path": str(tiny_llama)},
        "prompts": dict(SOURCE_STEP),
        "generate": {"max_new_tokens": N},
        "edits": [
            {
                "at": f"{layer}.output",
                "prompts": ["target"],
                "steps": steps,
                "tokens": "all",
                "add": source,
                "alpha": alpha,
            }
        ],
    }
    loaded = check_spec({"nnrun": 1, **spec})
    warned = [w.path for w in loaded.warnings]
    assert warned == (["edits[0].add.from"] if step is None else [])
    got = rows(generation(run_spec(tmp_path, spec)))
    assert got[0] == want[0]


@pytest.mark.parametrize(
    ("edit", "path", "fragment"),
    [
        (
            {"steps": "all", "add": {"from": "b", "step": 2}},
            "edits[0].add.step",
            "the edit runs at step 0",
        ),
        (
            {"steps": "1:", "add": {"from": "b", "step": 3}},
            "edits[0].add.step",
            "past the last step",
        ),
        ({"steps": 0, "add": {"from": "b", "step": "later"}}, "edits[0].add.step", ""),
    ],
)
def test_bad_source_steps(edit, path, fragment):
    from nnrun.spec import load_spec, validate_spec

    spec = {
        "nnrun": 1,
        "prompts": {"a": "x", "b": "y"},
        "generate": {"max_new_tokens": 3},
        "edits": [{"at": "model.layers.0.output", **edit}],
    }
    issues = validate_spec(load_spec(spec))
    assert any(i.path == path and fragment in i.message for i in issues), issues
    del spec["generate"]
    spec["edits"][0] = {"at": "model.layers.0.output", "add": {"from": "b", "step": 1}}
    issues = validate_spec(load_spec(spec))
    assert [(i.path, "needs a generate: section" in i.message) for i in issues] == [
        ("edits[0].add.step", True)
    ]


def test_validate_warns_about_a_source_read_at_every_step(tmp_path):
    spec = tmp_path / "drift.yaml"
    spec.write_text(
        "nnrun: 1\nprompts: {a: x, love: I love it}\ngenerate: {max_new_tokens: 3}\n"
        "edits:\n  - at: model.layers.0.output\n    prompts: [a]\n"
        "    add: {from: love, tokens: [-1]}\n"
    )
    code, out = _validate(spec)
    assert code == 0
    assert "warning" in out and "edits[0].add.from" in out and "step: 0" in out


# -- the specs in specs/ on tiny Llama ---------------------------------------------------


def _model_override(path: Path) -> str:
    return f"model={{path: '{path}'}}"


def test_spec_nnsight_generation(tiny_llama, tmp_path):
    spec = SPECS / "nnsight-generation.yaml"
    results = run_spec(tmp_path, spec, [_model_override(tiny_llama)])
    loaded = check_spec(spec)
    text = next(iter(loaded.data["prompts"].values()))
    steps = loaded.data["generate"]["max_new_tokens"]
    want_ids, seen, _ = plain_generate(
        tiny_llama, [text], site="model.layers.2", max_new_tokens=steps
    )
    assert rows(generation(results)) == want_ids
    (name,) = list(results)
    got = results[name]  # (1, step, token, hidden): the whole prompt, then the new token
    n = seen[0].shape[1]
    assert results.lengths(name).tolist() == [[n] + [1] * (steps - 1)]
    torch.testing.assert_close(got[0, 0, :n], seen[0][0], rtol=RTOL, atol=ATOL)
    for step in range(1, steps):
        torch.testing.assert_close(got[0, step, 0], seen[step][0, -1], rtol=RTOL, atol=ATOL)


def test_spec_nnsight_generation_cross_prompt(tiny_llama, tmp_path):
    spec = SPECS / "nnsight-generation-cross-prompt.yaml"
    results = run_spec(tmp_path, spec, [_model_override(tiny_llama)])
    prompts = check_spec(spec).data["prompts"]
    source, target = list(prompts)
    _, tokenizer = plain(str(tiny_llama))
    assert len({len(tokenizer(t)["input_ids"]) for t in prompts.values()}) == 1
    steps = check_spec(spec).data["generate"]["max_new_tokens"]
    want, _, _ = plain_generate(tiny_llama, list(prompts.values()), max_new_tokens=steps)
    assert want[0] != want[1]
    assert rows(generation(results)) == [want[0], want[0]]


def test_spec_steering_generation(tiny_llama, tmp_path):
    spec = SPECS / "steering-generation.yaml"
    vector, layer = _steering_vector(), 1  # tiny Llama has three layers
    source = tmp_path / "vector.h5"
    with h5py.File(source, "w") as f:
        f["saves/vector"] = vector.numpy().reshape(1, 1, HIDDEN)  # as nnrun saves it
    overrides = [_model_override(tiny_llama), f"source={source}", f"layer={layer}"]
    data = check_spec(spec, overrides).data
    alpha, steps = float(data["vars"]["alpha"]), data["generate"]["max_new_tokens"]
    texts = list(data["prompts"].values())
    results = run_spec(tmp_path, spec, overrides)
    unsteered, _, _ = plain_generate(tiny_llama, texts, max_new_tokens=steps)
    want, seen, _ = plain_generate(
        tiny_llama,
        texts,
        max_new_tokens=steps,
        site=f"model.layers.{layer}",
        edit_site=f"model.layers.{layer}",
        edit=lambda out: out + alpha * vector,
    )
    assert want != unsteered
    assert rows(generation(results)) == want
    # The save sits after the edit: it records the steered residual.
    check_steps(results["resid"], last_per_step(seen), [len(w) for w in want])


def test_cli_run_with_a_one_step_logits_save(tiny_llama, tmp_path):
    """`nnrun run` prints its summary and exits 0 for a generating spec that saves logits."""
    from typer.testing import CliRunner

    from nnrun.cli import app

    spec = tmp_path / "next.yaml"
    spec.write_text(
        json.dumps(
            {
                **llama_spec(tiny_llama),
                "nnrun": 1,
                "generate": {"max_new_tokens": 3},
                "save": {"next": {"at": "output", "tokens": -1, "steps": 0}},
            }
        )
    )
    out = tmp_path / "next.h5"
    done = CliRunner().invoke(app, ["run", str(spec), "-o", str(out)], env={"COLUMNS": "200"})
    assert nnrun.load(out).status == "complete"
    assert done.exit_code == 0, f"{done.output}\n{done.exception!r}"


# -- bad input --------------------------------------------------------------------------

BAD_GENERATION = """\
nnrun: 1
prompts: {a: Hello}
generate: {max_new_tokens: 3, num_beams: 4}
save:
  h: {at: model.layers.0.output, steps: [1, 3]}
edits:
  - at: model.layers.0.output
    steps: 5
    zero: true
"""

BAD_NO_GENERATE = """\
nnrun: 1
prompts: {a: Hello}
save:
  first: {at: model.layers.0.output, steps: 0}
  every: {at: model.layers.0.output, steps: all}
  later: {at: model.layers.0.output, steps: "1:"}
edits:
  - at: model.layers.0.output
    steps: [0, 2]
    zero: true
"""


def _validate(*paths: Path) -> tuple[int, str]:
    env = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1"}
    done = subprocess.run(
        [str(NNRUN), "validate", *map(str, paths)], capture_output=True, text=True, env=env
    )
    return done.returncode, " ".join((done.stdout + done.stderr).split())


def test_validate_reports_generation_errors_with_paths(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_GENERATION)
    code, out = _validate(bad)
    assert code == 1
    assert "bad.yaml:3: generate.num_beams: unknown key 'num_beams'" in out
    assert "max_new_tokens" in out.split("generate.num_beams", 1)[1]  # lists what is allowed
    assert "bad.yaml:5: save.h.steps: step 3 is past the last step" in out
    assert "edits[0].steps" in out and "step 5" in out
    assert "3 errors" in out


def test_validate_rejects_later_steps_without_generate(tmp_path):
    bad = tmp_path / "nogen.yaml"
    bad.write_text(BAD_NO_GENERATE)
    code, out = _validate(bad)
    assert code == 1
    assert "save.later.steps" in out and "edits[0].steps" in out
    assert "needs a generate: section" in out
    assert "save.first" not in out and "save.every" not in out  # step 0 and all are fine
    assert "2 errors" in out


def test_generation_specs_validate():
    code, out = _validate(
        SPECS / "nnsight-generation.yaml", SPECS / "nnsight-generation-cross-prompt.yaml"
    )
    assert code == 0, out


@pytest.mark.parametrize(
    ("patch", "path", "words"),
    [
        ({"save": {"h": {"at": "output", "steps": 4}}}, "save.h.steps", "past the last step"),
        ({"generate": {"max_new_tokens": 4, "num_beams": 2}}, "generate.num_beams", "num_beams"),
        ({"generate": {"max_new_tokens": 0}}, "generate.max_new_tokens", ""),
        ({"generate": None, "save": {"h": {"at": "output", "steps": [0, 1]}}}, "save.h.steps", ""),
        (
            {"generate": {"max_new_tokens": 4, "min_new_tokens": 5}},
            "generate.min_new_tokens",
            "more than",
        ),
    ],
)
def test_api_rejects_bad_generation_input(patch, path, words, tmp_path):
    spec: dict[str, Any] = {
        "nnrun": 1,
        "prompts": {"a": "Hello"},
        "generate": {"max_new_tokens": 4},
        **patch,
    }
    if spec["generate"] is None:
        del spec["generate"]
    with pytest.raises(SpecError) as info:
        nnrun.run(spec, output=tmp_path / "never.h5")
    issues = info.value.issues
    assert [i.path for i in issues] == [path], issues
    assert words in issues[0].message
    assert not (tmp_path / "never.h5").exists()


def test_saved_arrays_have_nan_only_where_masked(tiny_llama, tmp_path):
    """The lengths axis says exactly which entries are real: no NaN inside, only NaN outside."""
    spec = llama_spec(
        tiny_llama,
        generate={"max_new_tokens": 3},
        save={"h": {"at": LAST["llama"], "tokens": "-2:"}},
    )
    results = run_spec(tmp_path, spec)
    data, lengths = results.array("h"), results.lengths("h")
    # "-2:" holds the prompt's last two tokens at step 0 and the new token after.
    assert lengths.tolist() == [[2, 1, 1]] * 3
    for r, s in np.ndindex(*lengths.shape):
        n = lengths[r, s]
        assert not np.isnan(data[r, s, :n]).any()
        assert np.isnan(data[r, s, n:]).all()
