"""The researcher's tools: nnrun tokens / init / modules / show --decode, specs from stdin,
shell completion, chat templates, token positions chosen by text, and docs/cli.md."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import NNRUN, REPO, one_torch_thread, write_yaml
from typer.testing import CliRunner

import nnrun
from nnrun.cli import app
from nnrun.errors import NnrunError, RunError

runner = CliRunner(env={"COLUMNS": "250"})
FRANCE, GERMANY = "The capital of France is", "The capital of Germany is"


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def _tok(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# -- tokens: {find: TEXT} ------------------------------------------------------------------


def test_find_selects_the_tokens_of_a_text(tiny_llama: Path, tmp_path: Path) -> None:
    tok = _tok(tiny_llama)
    ids = tok(GERMANY)["input_ids"]
    pos = [tok.decode([i]) for i in ids].index(" Germany")
    spec = {
        "nnrun": 1,
        "model": {"path": str(tiny_llama)},
        "prompts": {"clean": FRANCE, "corrupt": GERMANY},
        "save": {
            "by_text": {
                "at": "@layers.1.output",
                "tokens": {"find": " Germany"},
                "prompts": ["corrupt"],
            },
            "by_pos": {"at": "@layers.1.output", "tokens": [pos], "prompts": ["corrupt"]},
            "patched": {"at": "@layers.2.output", "tokens": [-1]},
        },
        "edits": [
            {
                "at": "@layers.1.output",
                "prompts": ["corrupt"],
                "tokens": {"find": " Germany"},
                "set": {"from": "clean", "tokens": {"find": " France"}},
            }
        ],
    }
    by_text = nnrun.run(spec, output=tmp_path / "text.h5")
    assert torch.equal(by_text["by_text"], by_text["by_pos"])
    # The same patch written with positions gives the same result.
    spec["edits"][0].update(tokens=[pos], set={"from": "clean"})
    by_pos = nnrun.run(spec, output=tmp_path / "pos.h5")
    assert torch.equal(by_text["patched"], by_pos["patched"])
    assert by_text.to_xarray("by_text").attrs["tokens"] == "{find: ' Germany'}"


@pytest.mark.parametrize(
    ("find", "fragment"),
    [
        (
            {"find": " Italy"},
            "in prompt 'clean' ('The capital of France is'), ' Italy' does not occur",
        ),
        ({"find": "i"}, "occurs 2 times in the prompt; add occurrence: first or last"),
    ],
)
def test_find_absent_or_ambiguous_names_the_prompt(
    find: dict, fragment: str, tiny_llama: Path, tmp_path: Path
) -> None:
    spec = {
        "nnrun": 1,
        "model": {"path": str(tiny_llama)},
        "prompts": {"clean": FRANCE},
        "save": {"x": {"at": "output", "tokens": find}},
    }
    with pytest.raises(RunError, match="save 'x'") as info:
        nnrun.run(spec, output=tmp_path / "x.h5")
    assert fragment in str(info.value)
    assert not (tmp_path / "x.h5").exists()  # caught before the run starts


def test_find_occurrence_first_and_last(tiny_gpt2: Path, tmp_path: Path) -> None:
    text = "Paris is a city in France, and Paris is"
    spec = {
        "nnrun": 1,
        "model": {"path": str(tiny_gpt2)},
        "prompts": {"p": text},
        "save": {
            "first": {"at": "@embed.output", "tokens": {"find": "Paris", "occurrence": "first"}},
            "last": {"at": "@embed.output", "tokens": {"find": "Paris", "occurrence": "last"}},
            "all": {"at": "@embed.output"},
        },
    }
    r = nnrun.run(spec, output=tmp_path / "x.h5")
    tok = _tok(tiny_gpt2)
    strings = [tok.decode([i]) for i in tok(text)["input_ids"]]
    # The first "Paris" starts the text and is two tokens here; the last is " Paris".
    assert strings[:2] == ["Par", "is"] and strings.count(" Paris") == 1
    last = strings.index(" Paris")
    assert r.lengths("first").tolist() == [2] and r.lengths("last").tolist() == [1]
    assert torch.equal(r["first"][0], r["all"][0, :2])
    assert torch.equal(r["last"][0, 0], r["all"][0, last])


# -- nnrun tokens --------------------------------------------------------------------------


def test_tokens_prints_positions_and_selections(tiny_llama: Path, tmp_path: Path) -> None:
    spec = write_yaml(
        tmp_path / "s.yaml",
        {
            "nnrun": 1,
            "model": {"path": str(tiny_llama)},
            "prompts": {"clean": FRANCE, "corrupt": GERMANY},
            "save": {"c": {"at": "output", "tokens": {"find": " France"}, "prompts": ["clean"]}},
            "edits": [{"at": "@layers.0.output", "tokens": -1, "zero": True}],
        },
    )
    result = runner.invoke(app, ["tokens", str(spec)])
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    ids = _tok(tiny_llama)(FRANCE)["input_ids"]
    clean = [r for r in rows if r[0] == "clean"]
    assert [int(r[1]) for r in clean] == list(range(len(ids)))
    assert [int(r[2]) for r in clean] == list(range(-len(ids), 0))
    assert [int(r[3]) for r in clean] == ids
    assert clean[4][4] == "' France'" and clean[4][5] == "save c"
    assert clean[-1][5] == "edits[0]"
    corrupt = [r for r in rows if r[0] == "corrupt"]
    assert corrupt[4][4] == "' Germany'" and corrupt[4][5] == ""  # save c is clean-only


def test_tokens_reads_a_spec_from_stdin(tiny_gpt2: Path) -> None:
    text = yaml.safe_dump({"nnrun": 1, "model": {"path": str(tiny_gpt2)}, "prompts": ["Hi there"]})
    result = runner.invoke(app, ["tokens", "-"], input=text)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].startswith("p0\t0\t-")


# -- chat templates ------------------------------------------------------------------------

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny Llama whose tokenizer has a (made-up) chat template."""
    out = tmp_path_factory.mktemp("chat-llama")
    for f in tiny_llama.iterdir():
        shutil.copy(f, out / f.name)
    tok = _tok(out)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(out)
    return out


def test_chat_prompts_use_the_template(chat_llama: Path, tmp_path: Path) -> None:
    tok = _tok(chat_llama)
    messages = [{"role": "user", "content": "Where is Paris?"}]
    want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want = want.removeprefix(tok.bos_token)  # the tokenizer adds <s> itself: not twice
    spec = {
        "nnrun": 1,
        "model": {"path": str(chat_llama)},
        "prompts": {"chat": {"chat": messages}, "plain": "Where is Paris?"},
        "save": {"last": {"at": "output", "tokens": -1}},
    }
    r = nnrun.run(spec, output=tmp_path / "a.h5")
    assert r.prompts() == {"chat": want, "plain": "Where is Paris?"}
    ids = tok(want)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1
    r2 = nnrun.run({**spec, "chat_template": True}, output=tmp_path / "b.h5")
    assert r2.prompts() == {"chat": want, "plain": want}  # every prompt as a user turn
    torch.testing.assert_close(r2["last"][0], r2["last"][1])
    with torch.no_grad():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(chat_llama).eval()
        logits = model(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(r["last"][0, 0], logits, atol=2e-5, rtol=1e-4)


def test_chat_template_on_a_prompt_file(chat_llama: Path, tmp_path: Path) -> None:
    from helpers import write_jsonl

    file = write_jsonl(tmp_path / "p.jsonl", [{"text": "Hi"}, {"text": "Where is Rome?"}])
    spec = {
        "nnrun": 1,
        "model": {"path": str(chat_llama)},
        "chat_template": True,
        "prompts": {"file": str(file)},
        "save": {"last": {"at": "output", "tokens": -1}},
    }
    r = nnrun.run(spec, output=tmp_path / "a.h5")
    assert list(r.prompts().values()) == [
        "<|user|>Hi\n<|assistant|>",
        "<|user|>Where is Rome?\n<|assistant|>",
    ]


def test_chat_without_a_template_is_a_clear_error(tiny_llama: Path, tmp_path: Path) -> None:
    spec = {
        "nnrun": 1,
        "model": {"path": str(tiny_llama)},
        "prompts": {"q": {"chat": [{"role": "user", "content": "Hi"}]}},
    }
    with pytest.raises(NnrunError, match="prompt 'q' asks for a chat template, but"):
        nnrun.run(spec, output=tmp_path / "x.h5")


# -- nnrun modules -------------------------------------------------------------------------


def test_modules_piped_is_plain_collapsed_and_greppable(tiny_llama: Path) -> None:
    result = runner.invoke(app, ["modules", str(tiny_llama)])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    rows = {line.split("\t")[0]: line.split("\t") for line in lines}
    assert "│" not in result.stdout and "…" not in result.stdout  # plain, never cut
    # path, standard, class, input shape, output shape
    assert rows["model.layers.{0..2}"][1:3] == ["@layers.{0..2}", "LlamaDecoderLayer"]
    assert rows["model.layers.{0..2}.self_attn"][1] == "@layers.{0..2}.attn"
    assert rows["model.layers.{0..2}.mlp.down_proj"][3:] == ["(1, 6, 64)", "(1, 6, 32)"]
    assert rows["model.norm"][1] == "@ln_final" and rows["lm_head"][1] == "@lm_head"
    assert rows["model.embed_tokens"][1] == "@embed"
    assert not any(p.startswith("model.layers.1") for p in rows)
    expanded = runner.invoke(app, ["modules", str(tiny_llama), "--all"]).stdout
    assert "model.layers.1.mlp.down_proj\t\tLinear" in expanded
    assert "model.layers.2.self_attn\t@layers.2.attn\t" in expanded
    grep = runner.invoke(app, ["modules", str(tiny_llama), "--grep", "norm"]).stdout
    paths = [line.split("\t")[0] for line in grep.splitlines() if not line.startswith("#")]
    assert paths == [
        "model.layers.{0..2}.input_layernorm",
        "model.layers.{0..2}.post_attention_layernorm",
        "model.norm",
    ]


def test_modules_class_option_and_random_head_note(tiny_bert: Path) -> None:
    result = runner.invoke(app, ["modules", str(tiny_bert), "--class", "AutoModelForMaskedLM"])
    assert result.exit_code == 0, result.output
    assert "BertForMaskedLM" in result.stdout
    assert "with random weights (not in the checkpoint)" in result.stderr
    assert "cls.predictions.transform" in result.stderr
    plain = runner.invoke(app, ["modules", str(tiny_bert), "--class", "AutoModel"])
    assert "random weights" not in plain.stderr
    assert "encoder.layer.{0..2}.attention\t@layers.{0..2}.attn" in plain.stdout


# -- nnrun init ----------------------------------------------------------------------------


def test_init_lists_and_copies_templates(tmp_path: Path) -> None:
    listed = runner.invoke(app, ["init"])
    assert listed.exit_code == 0, listed.output
    for name in ("logit-lens", "ablation", "steering"):
        assert name in listed.stdout
    assert "Decode every layer's residual stream" in listed.stdout
    out = tmp_path / "my.yaml"
    done = runner.invoke(app, ["init", "logit-lens", "-o", str(out)])
    assert done.exit_code == 0, done.output
    text = out.read_text()
    original = (REPO / "specs" / "logit-lens.yaml").read_text()
    assert text.splitlines()[1:] == original.splitlines()[1:]
    schema = Path(text.splitlines()[0].split("$schema=", 1)[1])
    assert schema.is_file() and schema.name == "nnrun-spec-1.schema.json"
    again = runner.invoke(app, ["init", "logit-lens", "-o", str(out)])
    assert isinstance(again.exception, NnrunError) and "exists" in str(again.exception)
    bad = runner.invoke(app, ["init", "logit-lense"])
    assert "did you mean 'logit-lens'?" in str(bad.exception)


def test_init_with_a_model_writes_its_real_paths(tiny_gpt2: Path, tmp_path: Path) -> None:
    out = tmp_path / "lens.yaml"
    done = runner.invoke(app, ["init", "logit-lens", "-o", str(out), "--model", str(tiny_gpt2)])
    assert done.exit_code == 0, done.output
    data = yaml.safe_load(out.read_text())
    assert data["model"] == {"path": str(tiny_gpt2)}
    assert data["save"]["lens"]["at"] == "transformer.h.*.output"
    assert data["save"]["lens"]["apply"][:2] == ["transformer.ln_f", "lm_head"]
    copied = nnrun.run(out, output=tmp_path / "a.h5")
    standard = nnrun.run(
        REPO / "specs" / "logit-lens.yaml",
        [f"model={{path: '{tiny_gpt2}'}}"],
        output=tmp_path / "b.h5",
    )
    assert torch.equal(copied["lens"], standard["lens"])
    first = tmp_path / "first.yaml"
    done = runner.invoke(app, ["init", "--model", str(tiny_gpt2), "-o", str(first)])
    assert done.exit_code == 0, done.output
    data = yaml.safe_load(first.read_text())
    assert data["save"]["resid"]["at"] == "transformer.h.*.output"
    assert "@ln_final        transformer.ln_f" in first.read_text()
    r = nnrun.run(first, output=tmp_path / "c.h5")
    assert r["resid"].shape == (1, 3, 1, 32) and r["lens"].shape == (1, 3, 1, 5)


# -- show, run - ---------------------------------------------------------------------------


def test_show_decodes_only_when_asked(tiny_gpt2: Path, tmp_path: Path) -> None:
    out = tmp_path / "lens.h5"
    nnrun.run(REPO / "specs" / "logit-lens.yaml", [f"model={{path: '{tiny_gpt2}'}}"], output=out)
    plain = runner.invoke(app, ["show", str(out)])
    assert plain.exit_code == 0, plain.output
    assert "decoded" not in plain.stdout and "top next tokens" not in plain.stdout
    assert "france" in plain.stdout and "'The capital of France is'" in plain.stdout
    decoded = runner.invoke(app, ["show", str(out), "--decode", "--spec"])
    assert decoded.exit_code == 0, decoded.output
    assert "lens decoded" in decoded.stdout and "top next tokens" in decoded.stdout
    assert "name: logit-lens" in decoded.stdout  # --spec
    r = nnrun.load(out)
    tok = _tok(tiny_gpt2)
    top = [tok.decode([i]) for i in r["lens.indices"][0, 2, 0].tolist()]
    row = next(
        line
        for line in decoded.stdout.splitlines()
        if line.startswith("│ france") and "│ 2 " in line
    )
    assert repr(top[0]) in row and f"{float(r['lens'][0, 2, 0, 0]):.3f}" in row


def test_show_never_loads_the_tokenizer_without_decode(
    tiny_gpt2: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "lens.h5"
    nnrun.run(REPO / "specs" / "logit-lens.yaml", [f"model={{path: '{tiny_gpt2}'}}"], output=out)
    from nnrun.models import _tokens

    def refuse(attrs):
        raise AssertionError("show loaded a tokenizer")

    monkeypatch.setattr(_tokens, "offline_tokenizer", refuse)
    assert runner.invoke(app, ["show", str(out)]).exit_code == 0


def test_run_reads_the_spec_from_stdin(tiny_gpt2: Path, tmp_path: Path) -> None:
    text = yaml.safe_dump(
        {
            "nnrun": 1,
            "model": {"path": str(tiny_gpt2)},
            "prompts": {"a": FRANCE},
            "save": {"top": {"at": "output", "tokens": -1, "apply": ["argmax"]}},
            "output": str(tmp_path / "stdin.h5"),
        }
    )
    result = runner.invoke(app, ["run", "-"], input=text)
    assert result.exit_code == 0, result.output
    r = nnrun.load(tmp_path / "stdin.h5")
    assert "top decoded" in result.stdout
    token = _tok(tiny_gpt2).decode([int(r["top"][0, 0])])
    assert repr(token) in result.stdout


# -- schema --write, completion, docs ------------------------------------------------------


def test_schema_write_copies_the_schema(tmp_path: Path) -> None:
    from nnrun.spec import schema_path

    result = runner.invoke(app, ["schema", "--write", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s" / schema_path().name).read_text() == schema_path().read_text()
    assert "yaml-language-server: $schema=nnrun-spec-1.schema.json" in result.stdout


def _complete(words: str, cwd: Path) -> list[str]:
    env = {**os.environ, "_NNRUN_COMPLETE": "complete_bash", "COMP_WORDS": words}
    env["COMP_CWORD"] = str(len(words.split()) - (0 if words.endswith(" ") else 1))
    done = subprocess.run([str(NNRUN)], env=env, cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_completion_of_templates_specs_and_save_names(tmp_path: Path) -> None:
    assert _complete("nnrun init logit", tmp_path) == ["logit-lens"]
    (tmp_path / "exp.yaml").write_text("nnrun: 1\n")
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "runs").mkdir()
    assert _complete("nnrun run ", tmp_path) == ["exp.yaml", "runs/"]
    assert _complete("nnrun validate e", tmp_path) == ["exp.yaml"]
    # Save names: any verb's output-file parameter followed by a name (nnrun plot OUT NAME).
    from nnrun._complete import complete_save

    out = tmp_path / "o.h5"
    import h5py

    with h5py.File(out, "w") as f:
        f.create_group("saves").create_dataset("lens", data=[1])
        f["saves"].create_dataset("logits", data=[1])
    ctx = SimpleNamespace(params={"output": out})
    assert complete_save(ctx, "l") == ["lens", "logits"]
    assert complete_save(ctx, "lo") == ["logits"]
    assert complete_save(SimpleNamespace(params={}), "") == []


def test_install_completion(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "SHELL": "/bin/bash"}
    # Typer finds the shell among the process's parents (typer 0.28 takes no shell name):
    # run it from bash, as a user would, whatever runs the tests. The `; exit` keeps bash
    # from replacing itself with nnrun (it does so for a lone command), so bash stays
    # nnrun's parent.
    done = subprocess.run(
        ["bash", "-c", f"'{NNRUN}' --install-completion; exit $?"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    installed = list((tmp_path / ".bash_completions").glob("nnrun*"))
    assert installed and "_NNRUN_COMPLETE" in installed[0].read_text()
    assert "nnrun" in (tmp_path / ".bashrc").read_text()


def test_cli_docs_are_current() -> None:
    from nnrun._docs import cli_markdown

    current = (REPO / "docs" / "cli.md").read_text()
    assert current == cli_markdown(), (
        "docs/cli.md is out of date: .venv/bin/python -m nnrun._docs > docs/cli.md"
    )


def test_every_docs_page_says_what_it_documents() -> None:
    for page in sorted((REPO / "docs").glob("*.md")):
        head = "\n".join(page.read_text().splitlines()[:8])
        assert "Documents:" in head, f"{page.name} does not say which command or spec it documents"


def test_show_imports_only_what_reading_a_file_needs(tiny_gpt2: Path, tmp_path: Path) -> None:
    """`nnrun show` opens fast because it never imports torch, transformers or the run's
    machinery (measured by what is imported, not by time, which the machine decides)."""
    out = tmp_path / "lens.h5"
    nnrun.run(REPO / "specs" / "logit-lens.yaml", [f"model={{path: '{tiny_gpt2}'}}"], output=out)
    code = (
        "import sys\n"
        "from nnrun.cli import app\n"
        f"code = app(['show', {str(out)!r}], standalone_mode=False)\n"
        "heavy = [m for m in ('torch', 'transformers', 'nnrun.api', 'nnrun.spec', 'yaml')"
        " if m in sys.modules]\n"
        "print('imported:', heavy)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert "save" in done.stdout  # it printed the file's saves
    assert done.stdout.splitlines()[-1] == "imported: []", done.stdout[-500:]


def test_show_gives_a_packed_save_its_padded_shape(tiny_gpt2: Path, tmp_path: Path) -> None:
    """The shape column is what `results[name]` gives back; the bytes are what is stored."""
    spec = {
        "nnrun": 1,
        "model": {"path": str(tiny_gpt2)},
        "prompts": {"a": FRANCE, "b": "Hi"},
        "sweep": {"k": [1, 2]},
        "edits": [{"at": "transformer.h.0.output", "mul": "${k}"}],
        "save": {"h": {"at": "transformer.h.1.output"}},  # tokens: all -> packed
    }
    results = nnrun.run(spec, output=tmp_path / "packed.h5")
    row = nnrun.describe_saves(results)["h"]
    tokens = int(results.lengths("h")[0].sum())  # one point's real tokens
    assert row["shape"] == f"{tuple(results['h'].shape)} (stored packed: {tokens:,} tokens)"
    hidden = results["h"].shape[-1]
    assert row["bytes"] == 2 * tokens * hidden * 4  # points x tokens x hidden x float32
    shown = runner.invoke(app, ["show", str(tmp_path / "packed.h5")], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "stored packed" in shown.stdout
