"""Property-based fuzzing of everything that reads untrusted input.

Specs (mutated as data and as text, plus random overrides) go through `nnrun validate`,
and a sample through `nnrun run` on the tiny models; crafted HDF5 files go through
`nnrun show`, `nnrun diff` and `{file:}` operands. Every case must end in a clear
message (exit 0, 1 or 2), never an internal error, a traceback, a hang or code
execution. Fixed seeds (derandomize) and example counts keep the module within about
a minute; NNRUN_FUZZ_SCALE=10 runs ten times as many cases. Each test prints its
counts (pytest -s shows them) and fails on any internal error or hang.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import yaml
from fuzzing import (
    SENTINEL,
    Harness,
    crafted_h5,
    describe,
    gentle_spec,
    materialize,
    mutated_spec,
    mutated_text,
    overrides,
    to_text,
)
from helpers import REPO, one_torch_thread
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nnrun
from nnrun.errors import NnrunError

SCALE = float(os.environ.get("NNRUN_FUZZ_SCALE", "1"))
FUZZ = settings(
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=False,
    suppress_health_check=list(HealthCheck),
)


def _examples(n: int) -> int:
    return max(1, int(n * SCALE))


BASE_SPECS = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "specs").glob("*.yaml"))]
BASE_SPECS.append({"nnrun": 1, "prompts": ["hi"]})


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A working directory for the module; the sentinel a code-executing payload would create
    must never appear in it."""
    path = tmp_path_factory.mktemp("fuzz")
    cwd = os.getcwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(cwd)
    assert not (path / SENTINEL).exists(), "a spec or file executed code"


def _report(harness: Harness, name: str) -> None:
    print("\n" + harness.summary(name))
    assert not harness.failures, f"{harness.summary(name)}\n" + "\n\n".join(harness.failures[:5])


# -- validate ----------------------------------------------------------------------------


def test_validate_survives_mutated_specs(fuzz_dir: Path) -> None:
    harness = Harness(limit_s=20)
    path = fuzz_dir / "spec.yaml"

    @settings(FUZZ, max_examples=_examples(1000))
    @given(spec=mutated_spec(BASE_SPECS), fmt=st.sampled_from(["yaml", "json"]), sets=overrides())
    def case(spec: dict[str, Any], fmt: str, sets: list[str]) -> None:
        target = path.with_suffix("." + fmt)
        target.write_text(to_text(spec, fmt), encoding="utf-8", errors="surrogatepass")
        args = ["validate", str(target)]
        for s in sets:
            args += ["-s", s]
        harness.cli(args, f"validate {fmt} {describe(spec)} {sets}")

    case()
    _report(harness, "validate, mutated specs")


def test_validate_survives_damaged_text(fuzz_dir: Path) -> None:
    harness = Harness(limit_s=20)

    @settings(FUZZ, max_examples=_examples(700))
    @given(data=mutated_text(BASE_SPECS), suffix=st.sampled_from([".yaml", ".json", ".txt"]))
    def case(data: bytes, suffix: str) -> None:
        target = fuzz_dir / f"damaged{suffix}"
        target.write_bytes(data)
        harness.cli(["validate", str(target)], f"validate {suffix} {data[:300]!r}")

    case()
    _report(harness, "validate, damaged text")


def test_load_spec_survives_mutated_dicts() -> None:
    """The Python API takes dicts, which may hold what no file can (deep nesting, NaN keys)."""
    from nnrun.spec import SpecError, load_spec, validate_spec

    harness = Harness(limit_s=20)

    @settings(FUZZ, max_examples=_examples(400))
    @given(spec=mutated_spec(BASE_SPECS), sets=overrides())
    def case(spec: dict[str, Any], sets: list[str]) -> None:
        data = materialize(spec)

        def check() -> None:
            issues = validate_spec(load_spec(data, sets))
            if issues:  # a clean error: every issue a message with its path
                raise SpecError(issues)

        harness.call(
            check,
            f"load_spec {describe(spec)} {sets}",
            (NnrunError,),
        )

    case()
    _report(harness, "load_spec + validate_spec, dicts")


# -- run ---------------------------------------------------------------------------------


def _run_bases(tiny_gpt2: Path, tiny_llama: Path, workdir: Path) -> list[dict[str, Any]]:
    with h5py.File(workdir / "vec.h5", "w") as f:
        f["v"] = np.ones((32,), np.float32)
    (workdir / "p.jsonl").write_text(
        '{"text": "Hello there", "id": "a"}\n{"text": "Paris", "id": "b"}\n'
    )
    llama = {"path": str(tiny_llama)}
    return [
        {
            "nnrun": 1,
            "model": {"path": str(tiny_gpt2)},
            "prompts": {"a": "The capital of France is", "b": "Hi"},
            "save": {
                "resid": {"at": "transformer.h.*.output", "tokens": [-1]},
                "lens": {"at": "transformer.h.1.output", "apply": ["transformer.ln_f", "lm_head", {"topk": 3}]},
            },
            "edits": [{"at": "transformer.h.0.output", "tokens": [0], "add": [0.5]}],
        },
        {
            "nnrun": 1,
            "model": llama,
            "batch_size": 1,
            "prompts": {"clean": "The capital of France is", "corrupt": "The capital of Germany is"},
            "save": {"logits": {"at": "output", "tokens": -1}},
            "edits": [
                {"at": "model.layers.1.output", "prompts": ["corrupt"], "set": {"from": "clean"}},
                {"at": "model.layers.0.mlp.output", "noise": {"std": 0.1}},
            ],
        },
        {
            "nnrun": 1,
            "model": llama,
            "prompts": {"file": "p.jsonl", "id_field": "id"},
            "save": {"r": {"at": "model.layers.0.output", "tokens": "0:2", "steps": "all"}},
            "edits": [{"at": "model.layers.2.output", "add": {"file": "vec.h5", "dataset": "v"}}],
            "generate": {"max_new_tokens": 3},
        },
    ]  # fmt: skip


def test_run_survives_mutated_specs(tiny_gpt2: Path, tiny_llama: Path, fuzz_dir: Path) -> None:
    bases = _run_bases(tiny_gpt2, tiny_llama, fuzz_dir)
    harness = Harness(limit_s=60)
    counter = iter(range(10**9))

    @settings(FUZZ, max_examples=_examples(100))
    @given(spec=st.one_of(gentle_spec(bases), gentle_spec(bases), mutated_spec(bases)))
    def case(spec: dict[str, Any]) -> None:
        out = fuzz_dir / "runs" / f"r{next(counter)}.h5"
        data = materialize(spec)
        harness.call(
            lambda: nnrun.run(data, output=out),
            f"run {describe(spec, 400)}",
            (NnrunError,),
        )

    with one_torch_thread():
        case()
    _report(harness, "run, mutated specs on tiny models")


# -- crafted HDF5 files ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def evil_dir(tmp_path_factory: pytest.TempPathFactory, fuzz_dir: Path) -> Path:
    """A model/tokenizer directory whose code would create the sentinel if it were ever run
    (in fuzz_dir, whose teardown fails the module if it is there)."""
    path = tmp_path_factory.mktemp("evil")
    payload = f"open({str(fuzz_dir / SENTINEL)!r}, 'w').close()\n"
    for module in ("tokenization_evil", "modeling_evil", "configuration_evil"):
        (path / f"{module}.py").write_text(payload)
    auto = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
        "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None],
    }
    (path / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": auto}))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "EvilTokenizer", "auto_map": auto})
    )
    return path


@pytest.fixture(scope="module")
def good_h5(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("good") / "good.h5"
    with one_torch_thread():
        nnrun.run(
            {
                "nnrun": 1,
                "model": {"path": str(tiny_gpt2)},
                "prompts": {"a": "The capital of France is", "b": "Hi"},
                "save": {"s0": {"at": "transformer.h.*.output"}, "logits": {"at": "output", "tokens": -1}},
                "generate": {"max_new_tokens": 2},
            },
            output=out,
        )  # fmt: skip
    return out


def test_show_and_diff_survive_crafted_files(fuzz_dir: Path, evil_dir: Path, good_h5: Path) -> None:
    harness = Harness(limit_s=30)
    path = fuzz_dir / "crafted.h5"
    other = fuzz_dir / "crafted2.h5"

    @settings(FUZZ, max_examples=_examples(100))
    @given(write=crafted_h5(), write2=crafted_h5())
    def case(write: Any, write2: Any) -> None:
        for p in (path, other):
            p.unlink(missing_ok=True)
        write(path, evil_dir)
        write2(other, evil_dir)
        harness.cli(["show", str(path)], "show crafted")
        harness.cli(["diff", str(good_h5), str(path)], "diff good crafted")
        harness.cli(["diff", str(path), str(other), "--json"], "diff crafted crafted2")
        harness.cli(["diff", str(path), str(path), "--only", "saves"], "diff crafted itself")

    case()
    _report(harness, "show and diff, crafted HDF5 files")


def test_file_operands_survive_crafted_files(
    fuzz_dir: Path, evil_dir: Path, tiny_gpt2: Path
) -> None:
    harness = Harness(limit_s=60)
    counter = iter(range(10**9))

    @settings(FUZZ, max_examples=_examples(30))
    @given(write=crafted_h5(), name=st.sampled_from(["saves/s0", "saves/s1", "saves/logits", "saves/dangling", "saves/ext", "saves", "prompts/text", "saves/grp", "x"]))  # fmt: skip
    def case(write: Any, name: str) -> None:
        i = next(counter)
        path = fuzz_dir / f"operand{i}.h5"
        write(path, evil_dir)
        spec = {
            "nnrun": 1,
            "model": {"path": str(tiny_gpt2)},
            "prompts": {"a": "The capital of France is"},
            "save": {"x": {"at": "transformer.h.0.output", "tokens": [-1]}},
            "edits": [
                {"at": "transformer.h.0.output", "add": {"file": str(path), "dataset": name}}
            ],
        }
        harness.call(
            lambda: nnrun.run(spec, output=fuzz_dir / "ops" / f"o{i}.h5"),
            f"operand {name} in crafted file {i}",
            (NnrunError,),
        )

    with one_torch_thread():
        case()
    _report(harness, "{file:} operands, crafted HDF5 files")


def test_evil_directory_is_never_imported(evil_dir: Path, fuzz_dir: Path, tmp_path: Path) -> None:
    """A spec that names a directory with custom model code, without trust_remote_code."""
    with pytest.raises(NnrunError, match="could not load|trust_remote_code"):
        nnrun.run(
            {"nnrun": 1, "model": {"path": str(evil_dir)}, "prompts": ["hi"]},
            output=tmp_path / "x.h5",
        )
    assert not (fuzz_dir / SENTINEL).exists()
    shutil.rmtree(tmp_path, ignore_errors=True)
