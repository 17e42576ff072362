"""Compiling without running: execution order, the one-pass rule, `nnrun plan`, `nnrun modules`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import pytest
from helpers import write_jsonl, write_yaml
from typer.testing import CliRunner

import nnrun
from nnrun.cli import app
from nnrun.compile import compile_plan, describe_plan
from nnrun.errors import CompileError
from nnrun.models import load_model
from nnrun.spec import check_spec

runner = CliRunner()
PROMPTS = {"clean": "The capital of France is", "corrupt": "The capital of Germany is"}


def _spec(model_dir: Path, **extra: Any) -> dict[str, Any]:
    return {"nnrun": 1, "model": {"path": str(model_dir)}, "prompts": dict(PROMPTS), **extra}


def _compile(model_dir: Path, spec: dict[str, Any]):
    loaded = load_model({"path": str(model_dir)})
    return compile_plan(check_spec(spec), loaded.model, loaded.tokenizer)


def test_sites_follow_the_real_execution_order(tiny_llama: Path) -> None:
    """Sites are ranked by a probe pass, not by registration order."""
    spec = _spec(
        tiny_llama,
        save={
            "late": {"at": "lm_head.output", "tokens": -1},
            "rope": {"at": "model.rotary_emb.output[0]", "tokens": -1},
            "early": {"at": "model.layers.0.output", "tokens": -1},
        },
    )
    plan = _compile(tiny_llama, spec)
    labels = [s.site.label for s in plan.sites]
    # Llama registers rotary_emb after the layers but runs it before them.
    assert labels == ["model.rotary_emb.output", "model.layers.0.output", "lm_head.output"]
    assert [s.site.order for s in plan.sites] == sorted(s.site.order for s in plan.sites)
    assert set(plan.modules) == {"model.rotary_emb", "model.layers.0", "lm_head"}


def test_a_source_that_runs_later_is_rejected_naming_the_first_site(tiny_llama: Path) -> None:
    spec = _spec(
        tiny_llama,
        edits=[
            {
                "at": "model.layers.0.output",
                "prompts": ["corrupt"],
                "set": {"from": "clean", "at": "model.layers.2.output"},
            }
        ],
    )
    with pytest.raises(CompileError) as caught:
        _compile(tiny_llama, spec)
    message = str(caught.value)
    assert "edits[0]" in message
    assert "model.layers.0.output runs first" in message


def test_an_earlier_source_is_captured_and_carried(tiny_llama: Path) -> None:
    spec = _spec(
        tiny_llama,
        batch_size=1,
        edits=[
            {
                "at": "model.layers.1.output",
                "prompts": ["corrupt"],
                "tokens": [0],
                "add": {"from": "clean", "at": "model.embed_tokens.output"},
            }
        ],
    )
    plan = _compile(tiny_llama, spec)
    assert plan.source_prompts == ("clean",)
    (embed,) = [s for s in plan.sites if s.site.module == "model.embed_tokens"]
    assert embed.captures == ((),)
    rows = describe_plan(plan)
    assert [r.site for r in rows] == ["model.embed_tokens.output", "model.layers.1.output"]
    assert rows[0].action.startswith("capture")
    assert "from 'clean' at model.embed_tokens.output" in rows[1].action
    assert rows[1].prompts == "corrupt" and rows[1].tokens == "0"


def test_plan_estimate_matches_the_run(tiny_llama: Path, tmp_path: Path) -> None:
    """`nnrun plan` predicts each dataset's shape and size without running the prompts."""
    spec = _spec(
        tiny_llama,
        save={
            "resid": {"at": "model.layers.*.output", "tokens": [-1]},
            "embed": {"at": "model.embed_tokens.output"},
            "lens": {"at": "model.layers.1.output", "tokens": -1, "apply": ["lm_head", "softmax"]},
        },
        output=str(tmp_path / "out.h5"),
    )
    report = nnrun.plan(spec)
    results = nnrun.run(spec)
    _matches(report, results)
    assert report.save_layouts == {"resid": "padded", "embed": "packed", "lens": "padded"}
    assert report.prompt_count == 2 and report.batches == 1 and report.passes == 1


def _matches(report: Any, results: nnrun.Results, name: str = "") -> None:
    """Each save's estimate is its shape as read back and its bytes as stored; an estimate
    marked as an upper bound is never below the run."""
    with h5py.File(results.path) as f:
        assert set(report.save_shapes) == {
            s
            for s in results
            if s in f["saves"]
            and "save" in f["saves"][s].attrs
            and f["saves"][s].attrs["save"] == s
        }, name
        for save, shape in report.save_shapes.items():
            stored = f["saves"][save].nbytes
            if report.save_exact[save]:
                assert shape == tuple(results[save].shape), (name, save)
                assert report.save_bytes[save] == stored, (name, save)
            else:
                assert len(shape) == len(results[save].shape), (name, save)
                assert all(a >= b for a, b in zip(shape, results[save].shape)), (name, save)
                assert report.save_bytes[save] >= stored, (name, save)


def test_plan_estimates_every_shipped_spec(
    spec_runs: dict[str, tuple[Path, list[str], Path]],
) -> None:
    """For every spec in specs/ and examples/: `nnrun plan` against the file `nnrun run` wrote."""
    for name, (spec, overrides, out) in spec_runs.items():
        report = nnrun.plan(spec, overrides)
        _matches(report, nnrun.load(out), name)
        generate = check_spec(spec, overrides).data.get("generate")
        if generate:
            assert report.passes == generate["max_new_tokens"], name


def test_plan_estimates_ragged_tokens_generation_and_prompt_files(
    tiny_llama: Path, tmp_path: Path
) -> None:
    texts = ["Hi", "The capital of France is", "When Mary and John went to the store, John gave"]
    source = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts])
    for prompts, generate in (
        ({"file": str(source)}, None),
        (dict(PROMPTS), {"max_new_tokens": 3}),
    ):
        spec = _spec(
            tiny_llama,
            prompts=prompts,
            save={
                "all": {"at": "model.layers.*.output"},
                "padded": {"at": "model.layers.1.output", "tokens": "1:", "layout": "padded"},
                "last": {"at": "output", "tokens": -1},
            },
            output=str(tmp_path / "o.h5"),
            **({"generate": generate} if generate else {}),
        )
        report = nnrun.plan(spec)
        results = nnrun.run(spec, overwrite=True)
        _matches(report, results)
        assert not any(report.save_exact.values())  # a file, or generation: upper bounds
        if generate:
            assert report.passes == 3
            assert report.save_shapes["last"][1] == 3  # (prompt, step, token, vocab)
    result = runner.invoke(
        app, ["plan", str(write_yaml(tmp_path / "s.yaml", spec))], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "3 forward passes per batch (generation)" in result.stdout
    assert "<= " in result.stdout and "packed" in result.stdout


def test_plan_cli_prints_sites_actions_and_size(tiny_llama: Path, tmp_path: Path) -> None:
    spec = _spec(
        tiny_llama,
        save={"resid": {"at": "model.layers.*.output", "tokens": [-1]}},
        edits=[{"at": "model.layers.1.mlp.output", "prompts": ["corrupt"], "zero": True}],
    )
    path = write_yaml(tmp_path / "s.yaml", spec)
    result = runner.invoke(app, ["plan", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in ("model.layers.1.mlp.output", "edit edits[0] (zero)", "save resid [layer 2]"):
        assert text in out
    assert "2 prompts in 1 batch(es)" in out
    assert "768 bytes" in out  # 2 prompts x 3 layers x 1 token x 32 floats x 4 bytes
    assert not (tmp_path / "runs").exists()  # planning writes nothing


def test_modules_lists_paths_with_shapes(tiny_llama: Path, tmp_path: Path) -> None:
    # --all: every layer on its own line (by default they collapse to model.layers.{0..2}).
    result = runner.invoke(app, ["modules", str(tiny_llama), "--all"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = {
        line.strip("│ ").split()[0]: line for line in result.stdout.splitlines() if "model" in line
    }
    # "The capital of France is" -> <s> + 5 tokens with the tiny Llama tokenizer.
    ids = load_model({"path": str(tiny_llama)}).tokenizer("The capital of France is")["input_ids"]
    assert f"(1, {len(ids)}, 32)" in lines["model.layers.0"]
    assert "(does not run)" in lines["model.layers"]
    assert "LlamaDecoderLayer" in lines["model.layers.2"]


def test_modules_takes_a_spec_and_uses_its_first_prompt(tiny_gpt2: Path, tmp_path: Path) -> None:
    spec = write_yaml(
        tmp_path / "s.yaml", {"nnrun": 1, "model": {"path": str(tiny_gpt2)}, "prompts": {"a": "Hi"}}
    )
    result = runner.invoke(app, ["modules", str(spec), "--depth", "2"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "transformer.h" in result.stdout
    assert "transformer.h.0 " not in result.stdout  # deeper than --depth 2
    assert "'Hi'" in result.stdout


def test_skip_with_mismatched_shapes_fails_at_compile(tiny_llama: Path) -> None:
    spec = _spec(tiny_llama, edits=[{"at": "model.layers.0.mlp.up_proj.output", "skip": True}])
    with pytest.raises(CompileError) as caught:
        _compile(tiny_llama, spec)
    message = str(caught.value)
    assert "edits[0] (skip)" in message
    assert "(1, 2, 32)" in message and "(1, 2, 64)" in message


@pytest.mark.parametrize(
    "edit",
    [
        {"at": "model.layers.1.output", "prompts": ["corrupt"], "tokens": [-1], "add": [1.0] * 7},
        {"at": "model.layers.1.output", "tokens": [0, -1], "mul": [[1.0] * 32] * 3},
    ],
)
def test_operand_shape_mismatch_fails_before_any_file(
    tiny_llama: Path, tmp_path: Path, edit: dict[str, Any]
) -> None:
    out = tmp_path / "x.h5"
    with pytest.raises(nnrun.RunError) as caught:
        nnrun.run(_spec(tiny_llama, edits=[edit], output=str(out)))
    assert "does not broadcast to the selection's shape" in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # not even a .partial.h5
