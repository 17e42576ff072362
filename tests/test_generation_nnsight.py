"""Generation against the nnsight 0.8.1 oracle: tiny Llama and the real SmolLM2-135M.

nnsight runs as a reference only (never an nnrun dependency): `TransformersModel(dir,
task="text-generation", tokenizer=dir, dispatch=True)`, `model.generate(...)` as a
tracing context, `for step in tracer.iter[0:N]` for per-step access and
`tracer.barrier(2)` to hand a value from one invoke to another. Both tools left-pad a
batch with the tokenizer's pad token, so nnrun's batch and nnsight's are the same.

SmolLM2 results are compared relatively: its residuals reach several hundred and
batched fp32 results move by ~5e-6 of that. The generation specs in specs/ run here
through the CLI's `run` command (typer's CliRunner, in-process) on the builtin SmolLM2.
"""

from __future__ import annotations

import functools
import itertools
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

import nnrun
from nnrun.spec import check_spec, load_spec
from nnrun.store import Results

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"

PROMPTS = {
    "clean": "The capital of France is",
    "short": "Hi",
    "long": "The Eiffel Tower is in the city of",
}
LOVE = [
    "I love you, you are wonderful",
    "Love is the most beautiful feeling",
    "I adore my friends and they adore me",
]
HATE = [
    "I hate you, you are awful",
    "Hate is the most ugly feeling",
    "I despise my enemies and they despise me",
]

_run_ids = itertools.count()

# -- helpers ----------------------------------------------------------------------------


@functools.cache
def oracle(path: str) -> Any:
    import nnsight

    return nnsight.TransformersModel(path, task="text-generation", tokenizer=path, dispatch=True)


def run_api(tmp_path: Path, spec: dict[str, Any]) -> Results:
    spec = {"nnrun": 1, "name": "generation-oracle", **spec}
    return nnrun.run(spec, output=tmp_path / f"api{next(_run_ids)}.h5")


def run_cli(tmp_path: Path, spec: Path, *overrides: str) -> Results:
    """`nnrun run SPEC -s ... -o OUT` (the CLI command, in-process), from the repository root."""
    from typer.testing import CliRunner

    from nnrun.cli import app

    out = tmp_path / f"cli{next(_run_ids)}.h5"
    args = ["run", str(spec.relative_to(ROOT)), "-o", str(out)]
    for o in overrides:
        args += ["-s", o]
    cwd = Path.cwd()
    os.chdir(ROOT)  # relative paths in a spec start at the current directory
    try:
        done = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    finally:
        os.chdir(cwd)
    assert done.exit_code == 0, f"{done.output}\n{done.exception!r}"
    return nnrun.load(out)


def generated(results: Results) -> list[list[int]]:
    with h5py.File(results.path, "r") as f:
        ids, lengths = f["generation/ids"][()], f["generation/length"][()]
    return [list(map(int, r[:n])) for r, n in zip(ids, lengths)]


def new_ids(model: Any, ids: torch.Tensor, n: int) -> list[list[int]]:
    """The new tokens of nnsight's `tracer.result` (prompt + completion), cut after EOS."""
    eos = model.pipeline.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    out = []
    for row in ids[:, -n:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        out.append(row[:end])
    return out


def nnsight_generate(
    model: Any,
    texts: list[str],
    n: int,
    *,
    steer: tuple[int, torch.Tensor] | None = None,
) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy generation traced by nnsight: new ids and the last layer at the last position.

    `steer=(layer, vector)` adds the vector to that layer's output at every step.
    Returns (ids, hidden) with hidden (batch, n, hidden_size).
    """
    with model.generate(texts, max_new_tokens=n, do_sample=False) as tracer:
        hidden = list().save()
        for _ in tracer.iter[0:n]:
            if steer is not None:
                layer, vector = steer
                model.model.layers[layer].output = model.model.layers[layer].output + vector
            hidden.append(model.model.layers[-1].output[:, -1].save())
        ids = tracer.result.save()
    assert len(hidden) == n
    return new_ids(model, ids, n), torch.stack(list(hidden), dim=1)


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """Each vector (last axis) within `rel` of the reference, relative to its norm."""
    err = (got.double() - want.double()).norm(dim=-1)
    scale = want.double().norm(dim=-1).clamp_min(1e-12)
    worst = float((err / scale).max())
    assert worst < rel, f"largest relative difference {worst:.3g} >= {rel:g}"


# -- generated ids and per-step hidden states -------------------------------------------


@pytest.mark.parametrize(
    ("which", "n", "rel"),
    [("tiny_llama", 5, 1e-5), ("smollm2_dir", 4, 1e-4)],
    ids=["tiny-llama", "smollm2"],
)
def test_generation_and_per_step_saves_equal_nnsight(which, n, rel, request, tmp_path):
    path = request.getfixturevalue(which)
    model = oracle(str(path))
    want_ids, want_hidden = nnsight_generate(model, list(PROMPTS.values()), n)
    assert all(len(w) == n for w in want_ids)  # no EOS: every step is real
    results = run_api(
        tmp_path,
        {
            "model": {"path": str(path)},
            "prompts": dict(PROMPTS),
            "generate": {"max_new_tokens": n, "do_sample": False},
            "save": {"last": {"at": "model.layers[-1].output", "tokens": -1, "steps": "all"}},
        },
    )
    assert generated(results) == want_ids
    got = results["last"]  # (prompt, step, token, hidden)
    assert tuple(got.shape[:3]) == (3, n, 1)
    assert_rel_close(got[:, :, 0], want_hidden, rel)


# -- the nnsight README examples as specs, through the CLI on SmolLM2 ---------------------


def test_spec_nnsight_generation_equals_readme_code(smollm2_dir, tmp_path):
    spec = SPECS / "nnsight-generation.yaml"
    data = check_spec(spec).data
    (text,) = data["prompts"].values()
    n = data["generate"]["max_new_tokens"]
    model = oracle(str(smollm2_dir))
    with model.generate(text, max_new_tokens=n) as tracer:
        hidden_states = list().save()
        for _ in tracer.iter[0:n]:
            hidden_states.append(model.model.layers[-1].output.save())
        ids = tracer.result.save()
    results = run_cli(tmp_path, spec)
    assert generated(results) == new_ids(model, ids, n)
    assert model.tokenizer.decode(generated(results)[0][0]) == " Paris"
    (name,) = list(results)
    got, lengths = results[name], results.lengths(name)
    width = hidden_states[0].shape[1]
    assert lengths.tolist() == [[width] + [1] * (n - 1)]
    assert_rel_close(got[0, 0, :width], hidden_states[0][0], 1e-4)
    for step in range(1, n):
        assert hidden_states[step].shape[1] == 1
        assert_rel_close(got[0, step, :1], hidden_states[step][0], 1e-4)
        assert torch.isnan(got[0, step, 1:]).all()


def test_spec_cross_prompt_generation_equals_readme_code(smollm2_dir, tmp_path):
    spec = SPECS / "nnsight-generation-cross-prompt.yaml"
    data = check_spec(spec).data
    (source, text_a), (target, text_b) = data["prompts"].items()
    n = data["generate"]["max_new_tokens"]
    model = oracle(str(smollm2_dir))
    assert len(model.tokenizer(text_a)["input_ids"]) == len(model.tokenizer(text_b)["input_ids"])
    with model.generate(max_new_tokens=n, do_sample=False) as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(text_a):
            embeddings = model.model.embed_tokens.output
            barrier()
            ids_a = tracer.result.save()
        with tracer.invoke(text_b):
            barrier()
            model.model.embed_tokens.output = embeddings
            ids_b = tracer.result.save()
    want = new_ids(model, ids_a, n) + new_ids(model, ids_b, n)
    unedited, _ = nnsight_generate(model, [text_b], n)
    assert want[0] == want[1] != unedited[0]  # b continues like a, not like itself
    results = run_cli(tmp_path, spec)
    assert generated(results) == want
    assert [model.tokenizer.decode(w[:1]) for w in want] == [" Paris", " Paris"]
    assert model.tokenizer.decode(unedited[0][:1]) == " Rome"


def test_steering_spec_with_difference_of_means_equals_nnsight(smollm2_dir, tmp_path):
    spec = SPECS / "steering-generation.yaml"
    n = 5  # fewer new tokens than the spec's, to keep the real tier quick
    # 1. The vector: mean layer-L residual (last token) of love prompts minus hate prompts.
    layer = int(load_spec(spec).data["vars"]["layer"])  # not validated: no source yet
    prompts = {f"love_{i}": t for i, t in enumerate(LOVE)}
    prompts |= {f"hate_{i}": t for i, t in enumerate(HATE)}
    means = run_api(
        tmp_path,
        {
            "model": {"path": str(smollm2_dir)},
            "prompts": prompts,
            "save": {"resid": {"at": f"model.layers.{layer}.output", "tokens": -1}},
        },
    )
    resid = means.array("resid")[:, 0]  # (6, 576)
    assert means.prompt_ids("resid") == list(prompts)
    vector = resid[: len(LOVE)].mean(axis=0) - resid[len(LOVE) :].mean(axis=0)
    source = tmp_path / "love-minus-hate.h5"
    with h5py.File(source, "w") as f:
        f["saves/vector"] = vector.reshape(1, 1, -1).astype(np.float32)

    # 2. nnrun through the CLI, and nnsight adding alpha * vector at every step.
    overrides = [f"source={source}", f"generate.max_new_tokens={n}"]
    data = check_spec(spec, overrides).data
    texts, alpha = list(data["prompts"].values()), float(data["vars"]["alpha"])
    results = run_cli(tmp_path, spec, *overrides)
    model = oracle(str(smollm2_dir))
    steer = alpha * torch.from_numpy(vector).float()
    want, _ = nnsight_generate(model, texts, n, steer=(layer, steer))
    plain, _ = nnsight_generate(model, texts, n)
    assert want != plain  # the steering changes the continuations
    assert generated(results) == want
