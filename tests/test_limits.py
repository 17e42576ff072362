"""Each class of bad input found by fuzzing gets one clear message, at the earliest stage.

Spec values: numbers past 64 bits or the stated limits, NaN/inf, deep nesting, lone
surrogates, NUL, variable chains and blow-ups (validate, no model). Against a model:
prompts longer than its positions, edits of token ids, apply steps that need more than
the value (compile / before any prompt runs). Prompt files and `{file:}` operands that
are not what they claim. Module paths that try to reach Python internals.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from helpers import one_torch_thread, write_jsonl
from transformers import AutoModelForCausalLM

import nnrun
from nnrun.errors import CompileError, NnrunError, RunError
from nnrun.spec import SpecError, load_spec, validate_spec


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def _issues(source: Any, overrides: tuple[str, ...] = ()) -> list[str]:
    return [f"{i.path}: {i.message}" for i in validate_spec(load_spec(source, overrides))]


HUGE = "9" * 5000


# -- spec values (validate) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"seed: {HUGE}", "seed: an integer with 5000 digits is out of range"),
        ("seed: 18446744073709551616", "seed: an integer with 20 digits is out of range"),
        ("seed: 9223372036854775808", "seed: an integer with 19 digits is out of range"),
        ("batch_size: 100000", "batch_size: must be at most 65536, got 100000"),
        ("batch_size: 100000000000000000000", "batch_size: an integer with 21 digits"),
        ("generate: {max_new_tokens: 1000000000}", "generate.max_new_tokens: must be at most 100000"),
        ("generate: {max_new_tokens: 3, temperature: .nan}", "generate.temperature: must be a finite number, not nan"),
        ("generate: {max_new_tokens: 3, top_p: .inf}", "generate.top_p: must be a finite number, not inf"),
        ("edits: [{at: output, clamp: {max: -.inf}}]", "edits[0].clamp.max: must be a finite number, not -inf"),
        ("edits: [{at: output, tokens: [99999999999999999999], zero: true}]", "edits[0].tokens[0]: an integer with 20 digits"),
        ('description: "a\\0b"', "description: contains a NUL character"),
        ('prompts2: {a: "x"}', "prompts2: unknown key 'prompts2'"),
    ],
)  # fmt: skip
def test_numbers_and_text_no_stage_could_handle(text: str, expected: str) -> None:
    issues = _issues(f"nnrun: 1\nprompts: {{a: hi}}\n{text}\n")
    assert any(issue.startswith(expected) for issue in issues), issues


def test_huge_numbers_in_json_and_overrides(tmp_path: Path) -> None:
    json_file = tmp_path / "s.json"
    json_file.write_text('{"nnrun": 1, "prompts": {"a": "hi"}, "seed": ' + HUGE + "}")
    assert _issues(json_file)[0].startswith("seed: an integer with 5000 digits")
    assert _issues({"nnrun": 1, "prompts": ["hi"]}, (f"seed={HUGE}",))[0].startswith(
        "seed: an integer with 5000 digits is out of range"
    )
    assert _issues({"nnrun": 1, "prompts": ["hi"], "seed": 10**5000})[0].startswith(
        "seed: an integer with about 5001 digits"
    )


def test_nul_and_lone_surrogates_in_prompts(tmp_path: Path) -> None:
    for prompt in ("a\x00b", "bad \ud800 text"):
        issues = _issues({"nnrun": 1, "prompts": {"a": prompt}})
        assert len(issues) == 1 and issues[0].startswith("prompts.a: contains a"), issues
    json_file = tmp_path / "s.json"  # JSON escapes may spell a lone surrogate; YAML's may not
    json_file.write_text('{"nnrun": 1, "prompts": {"a": "x \\udc80"}}')
    assert "lone surrogate ('\\udc80')" in _issues(json_file)[0]
    assert "a key contains a NUL" in _issues({"nnrun": 1, "prompts": {"a\x00": "x"}})[0]


def test_deep_nesting_is_refused_without_recursion_errors(tmp_path: Path) -> None:
    deep: Any = 1
    for _ in range(20_000):  # far past Python's recursion limit
        deep = [deep]
    issues = _issues({"nnrun": 1, "prompts": ["hi"], "description": deep})
    assert issues[0].startswith("description" + "[0]" * 48)
    assert "nested more than 48 levels deep" in issues[0]
    text = "nnrun: 1\nprompts: [hi]\nvars:\n" + "".join(
        "  " * (i + 1) + f"k{i}:\n" for i in range(60)
    )
    assert "nested more than 48 levels deep" in " ".join(_issues(text + "  " * 61 + "x: 1\n"))
    json_file = tmp_path / "deep.json"
    json_file.write_text('{"nnrun": 1, "prompts": ["hi"], "d": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(SpecError, match="nested too deeply"):
        load_spec(json_file)


def test_variable_chains_and_blow_ups_are_refused_quickly() -> None:
    chain = "nnrun: 1\nprompts: {a: '${v0}'}\nvars:\n" + "".join(
        f"  v{i}: '${{v{i + 1}}}'\n" for i in range(3000)
    )
    start = time.monotonic()
    issues = _issues(chain + "  v3000: x\n")
    assert len(issues) == 1 and "refer to each other more than 50 levels deep" in issues[0]
    doubling = "nnrun: 1\nprompts: {a: '${v0}'}\nvars:\n  v30: abcdefgh\n" + "".join(
        f"  v{i}: '${{v{i + 1}}}${{v{i + 1}}}'\n" for i in range(30)
    )
    issues = _issues(doubling)
    assert len(issues) == 1 and "over 1,000,000 characters" in issues[0]
    assert time.monotonic() - start < 5
    within = "nnrun: 1\nprompts: {a: '${v0}'}\nvars:\n  v10: ab\n" + "".join(
        f"  v{i}: '${{v{i + 1}}}${{v{i + 1}}}'\n" for i in range(10)
    )
    assert _issues(within) == []
    assert load_spec(within).data["prompts"]["a"] == "ab" * 1024


# -- against a model (compile, before any prompt) -------------------------------------------


def _run(model: Path, tmp_path: Path, **spec: Any) -> Any:
    base = {"nnrun": 1, "model": {"path": str(model)}, "prompts": {"a": "Hi there"}}
    return nnrun.run({**base, **spec}, output=tmp_path / "out.h5")


def _nothing_written(tmp_path: Path) -> None:
    assert not list(tmp_path.glob("out*.h5")), list(tmp_path.iterdir())


def test_prompt_longer_than_the_models_positions(tiny_gpt2: Path, tmp_path: Path) -> None:
    long = "the cat sat on the mat " * 40  # GPT-2 tiny: 128 positions
    with pytest.raises(CompileError) as caught:
        _run(tiny_gpt2, tmp_path, prompts={"short": "Hi", "long": long})
    message = str(caught.value)
    assert message.startswith("prompts.long: prompt 'long' has ")
    assert "tokens, but the model takes at most 128 positions" in message
    with pytest.raises(CompileError, match=r"generate.max_new_tokens is 100, \d+ positions in all"):
        _run(tiny_gpt2, tmp_path, prompts={"p": "Hi " * 40}, generate={"max_new_tokens": 100})
    _nothing_written(tmp_path)
    source = write_jsonl(tmp_path / "p.jsonl", [{"text": "Hi"}, {"text": long}])
    with pytest.raises(RunError, match="prompt '1' has .* at most 128 positions"):
        _run(tiny_gpt2, tmp_path, prompts={"file": str(source)})


@pytest.mark.parametrize("at", ["input", "model.embed_tokens.input"])
def test_edits_of_token_ids_are_refused(at: str, tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(CompileError, match="token ids, which an edit cannot change"):
        _run(tiny_llama, tmp_path, edits=[{"at": at, "add": 5}])
    _nothing_written(tmp_path)


@pytest.mark.parametrize("step", ["model.layers.0", "model.rotary_emb"])
def test_apply_modules_that_need_more_than_the_value(
    step: str, tiny_llama: Path, tmp_path: Path
) -> None:
    with pytest.raises(RunError) as caught:
        _run(tiny_llama, tmp_path, save={"x": {"at": "model.layers.1.output", "apply": [step]}})
    message = str(caught.value)
    assert message.startswith(f"save 'x': apply: running {step} (")
    assert "apply takes modules that map one tensor to one tensor" in message
    _nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("at", "model.__class__.output"),
        ("at", "model.layers.0.__init__.output"),
        ("at", "__dict__.output"),
        ("apply", "__import__"),
        ("apply", "model.__class__"),
        ("apply", "model.layers.0.forward"),
    ],
)
def test_python_internals_are_never_reached(
    where: str, value: str, tiny_llama: Path, tmp_path: Path
) -> None:
    save = {"at": "model.layers.0.output"}
    save[where] = value if where == "at" else [value]
    with pytest.raises(NnrunError, match="no module"):
        _run(tiny_llama, tmp_path, save={"x": save})
    _nothing_written(tmp_path)


def test_trust_remote_code_is_false_unless_the_spec_says_so() -> None:
    spec = load_spec({"nnrun": 1, "prompts": ["hi"], "model": {"path": "m"}})
    assert spec.data["model"]["trust_remote_code"] is False
    assert "trust_remote_code: false" in spec.text


# -- prompt files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "id_field", "expected"),
    [
        ([{"text": None}], None, r"p.jsonl:1: field 'text' must be a non-empty string, not null"),
        ([{"text": "a"}, {"text": 5}], None, r"p.jsonl:2: field 'text' .* not the number 5"),
        ([{"text": ["a"]}], None, "not a list"),
        ([{"text": "a", "id": "x"}, {"text": "b"}], "id", r"p.jsonl:2: no field 'id' \(prompts.id_field\)"),
        ([{"text": "a", "id": "x"}, {"text": "b", "id": "x"}], "id", r"p.jsonl:2: prompt id 'x' is already used on line 1"),
        ([{"text": "a", "id": None}], "id", "field 'id' must be a non-empty string or an integer, not null"),
        ([{"text": "a\x00b"}], None, r"p.jsonl:1: field 'text' contains a NUL character"),
        ([{"text": "ok", "id": "a\x00"}], "id", "field 'id' contains a NUL character"),
        ([], None, r"holds no prompts \(it is empty or only blank lines\)"),
    ],
)  # fmt: skip
def test_prompt_files_that_are_not_what_they_claim(
    lines: list[Any], id_field: str | None, expected: str, tiny_gpt2: Path, tmp_path: Path
) -> None:
    source = write_jsonl(tmp_path / "p.jsonl", lines)
    prompts = {"file": str(source), **({"id_field": id_field} if id_field else {})}
    with pytest.raises(RunError, match=expected):
        _run(tiny_gpt2, tmp_path, prompts=prompts)
    _nothing_written(tmp_path)  # every line is checked before the output file is opened


def test_prompt_files_with_bad_bytes_or_escapes(tiny_gpt2: Path, tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_bytes(b"fine\nnot \xff utf-8\n")
    with pytest.raises(RunError, match=r"p.txt:2: not UTF-8 text \(byte 0xff at column 5\)"):
        _run(tiny_gpt2, tmp_path, prompts={"file": str(tmp_path / "p.txt")})
    (tmp_path / "p.jsonl").write_text('{"text": "x \\ud800"}\n')
    with pytest.raises(RunError, match=r"p.jsonl:1: field 'text' contains a lone surrogate"):
        _run(tiny_gpt2, tmp_path, prompts={"file": str(tmp_path / "p.jsonl")})
    _nothing_written(tmp_path)


# -- {file:} operands -----------------------------------------------------------------------


@pytest.fixture
def operands(tmp_path: Path) -> Path:
    path = tmp_path / "ops.h5"
    with h5py.File(path, "w") as f:
        f["scalar"] = np.float32(0.5)
        f["big_endian"] = np.full(32, 0.25, dtype=">f8")
        f["ints"] = np.ones(32, dtype=np.int16)
        f.create_dataset("strings", data=np.array(["a"], dtype=object), dtype=h5py.string_dtype())
        f["compound"] = np.zeros(2, dtype=[("a", "i4"), ("b", "f8")])
        f.create_dataset("vlen", (2,), dtype=h5py.vlen_dtype(np.float32))
        f.create_dataset("refs", (1,), dtype=h5py.ref_dtype)
        f.create_dataset("empty", data=h5py.Empty("f"))
        f["complex"] = np.ones(32, dtype=np.complex64)
        f.create_dataset("huge", shape=(2**40,), dtype="f4", chunks=(1024,))
        f["dangling"] = h5py.SoftLink("/nowhere")
        f.create_group("group")
    return path


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        ("strings", "has dtype object, not numbers"),
        ("compound", "has dtype .*, not numbers"),
        ("vlen", "has dtype object, not numbers"),
        ("refs", "has dtype object, not numbers"),
        ("empty", r"is empty \(no dataspace\)"),
        ("complex", "holds complex numbers; an operand must be real"),
        ("huge", "1,099,511,627,776 values"),
        ("dangling", "no dataset 'dangling'"),
        ("group", "no dataset 'group'"),
    ],
)
def test_file_operands_that_are_not_numeric_arrays(
    dataset: str, expected: str, operands: Path, tiny_gpt2: Path, tmp_path: Path
) -> None:
    edit = {"at": "transformer.h.0.output", "add": {"file": str(operands), "dataset": dataset}}
    with pytest.raises(RunError, match=expected):
        _run(tiny_gpt2, tmp_path, save={"x": {"at": "output"}}, edits=[edit])
    _nothing_written(tmp_path)


def test_numeric_operands_of_any_real_dtype_work(
    operands: Path, tiny_gpt2: Path, tmp_path: Path
) -> None:
    """Scalars, big-endian floats and integers are values like any other (checked by hand)."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_gpt2)("Hi there", return_tensors="pt")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    hook = model.transformer.h[0].register_forward_hook(lambda m, a, out: out + 0.5 + 0.25 + 1)
    with torch.inference_mode():
        expected = model(ids).logits[0, -1]  # (vocab,)
    hook.remove()
    edits = [
        {"at": "transformer.h.0.output", "add": {"file": str(operands), "dataset": name}}
        for name in ("scalar", "big_endian", "ints")
    ]
    results = _run(tiny_gpt2, tmp_path, save={"x": {"at": "output", "tokens": -1}}, edits=edits)
    assert torch.allclose(results["x"][0, 0], expected, atol=1e-5)


# -- nnrun show never loads what a file names ------------------------------------------------


def test_show_loads_no_tokenizer_from_a_path_in_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    import transformers

    from nnrun import cli

    path = tmp_path / "crafted.h5"
    with h5py.File(path, "w") as f:
        f.attrs["status"] = "complete"
        f.attrs["model_resolved_path"] = str(tmp_path)
        ds = f.create_dataset("saves/logits", data=np.zeros((1, 1, 8), np.float32))
        ds.attrs["axes"] = json.dumps(["prompt", "token", "vocab"])

    loaded: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        # Recorded, not only raised: show turns any tokenizer failure into "no table".
        loaded.append(args)
        raise AssertionError("nnrun show loaded a tokenizer named by the file")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr("sys.argv", ["nnrun", "show", str(path)])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 0
    assert "logits" in capsys.readouterr().out
    assert loaded == [], "nnrun show loaded a tokenizer named by the file"


def test_names_the_os_refuses_are_clear_errors(tmp_path: Path) -> None:
    """A name too long for the file system is "not found", not an OSError (fuzzing found it)."""
    long = "a" * 600
    with pytest.raises(NnrunError, match="does not exist"):
        nnrun.run(
            {"nnrun": 1, "model": {"path": long}, "prompts": ["hi"]}, output=tmp_path / "o.h5"
        )
    with pytest.raises(NnrunError, match="does not exist"):
        nnrun.run(
            {"nnrun": 1, "model": {"gguf": long + ".gguf"}, "prompts": ["hi"]},
            output=tmp_path / "o.h5",
        )
    issues = _issues(
        {
            "nnrun": 1,
            "prompts": {"file": long + ".jsonl"},
            "edits": [{"at": "output", "add": {"file": long + ".h5", "dataset": "v"}}],
        }
    )
    assert [i.split(":")[0] for i in issues] == ["prompts.file", "edits[0].add.file"]
    assert all("not found" in i for i in issues)


def test_show_refuses_to_read_labels_a_file_declares_by_the_billion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from nnrun import cli

    path = tmp_path / "huge.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("generation/text", shape=(2**40,), dtype="f4", chunks=(1024,))
    monkeypatch.setattr("sys.argv", ["nnrun", "show", str(path)])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 1
    assert "/generation/text in" in capsys.readouterr().err
