"""`nnrun reproduce`: every output the suite writes re-runs to the same bytes on CPU.

Also: a tampered file (a value, a prompt text) is caught and named; changed inputs
and a stored trust_remote_code are refused; the same spec run twice (noise edits,
sampled generation) gives byte-identical datasets; and the CI recipe in examples/ci/
works as its script says.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

import nnrun
from nnrun.errors import NnrunError

ROOT = Path(__file__).resolve().parents[1]
NNRUN = Path(sys.executable).with_name("nnrun")


def test_every_spec_output_reproduces_exactly(spec_outputs: dict[str, Path]) -> None:
    assert len(spec_outputs) >= 12
    for name, path in spec_outputs.items():
        report = nnrun.reproduce(path)
        bad = [(d.name, d.verdict) for d in report.diff.datasets if not d.ok]
        assert report.exit_code == 0, (name, bad, report.notes)
        assert (report.rtol, report.atol) == (0.0, 0.0)  # CPU: exact by default


def _noisy_sampled_spec(tiny: Path) -> dict[str, Any]:
    return {
        "nnrun": 1,
        "model": {"path": str(tiny)},
        "seed": 7,
        "prompts": {"a": "The capital of France is", "b": "I love it"},
        "generate": {"max_new_tokens": 4, "do_sample": True, "temperature": 1.5},
        "edits": [{"at": "model.layers.1.output", "noise": {"std": 0.5}, "steps": "all"}],
        "save": {"h": {"at": "model.layers.2.output", "tokens": -1, "steps": "all"}},
        "metrics": {"p": {"prob": " Paris"}},
    }


def _datasets(path: Path) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    with h5py.File(path, "r") as f:

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset) and obj.dtype.kind != "O":
                found[name] = np.ascontiguousarray(obj[()]).tobytes()

        f.visititems(visit)
    return found


def test_noise_and_sampling_give_the_same_bytes_twice(tiny_llama: Path, tmp_path: Path) -> None:
    spec = _noisy_sampled_spec(tiny_llama)
    a = nnrun.run(spec, output=tmp_path / "a.h5")
    b = nnrun.run(spec, output=tmp_path / "b.h5")
    assert _datasets(a.path) == _datasets(b.path)
    assert a.generation() == b.generation()
    other = nnrun.run({**spec, "seed": 8}, output=tmp_path / "c.h5")
    assert _datasets(other.path)["saves/h"] != _datasets(a.path)["saves/h"]  # the seed matters
    # A sweep over the seed reproduces too, point by point.
    swept = {**spec, "seed": "${s}", "sweep": {"s": [7, 8]}}
    c = nnrun.run(swept, output=tmp_path / "d.h5")
    assert nnrun.reproduce(c.path).exit_code == 0
    np.testing.assert_array_equal(c.array("h")[0], a.array("h"))


def test_deterministic_key_runs_and_changes_nothing_on_cpu(
    tiny_llama: Path, tmp_path: Path
) -> None:
    import torch

    spec = _noisy_sampled_spec(tiny_llama)
    before = torch.are_deterministic_algorithms_enabled()
    a = nnrun.run({**spec, "deterministic": True}, output=tmp_path / "a.h5")
    assert torch.are_deterministic_algorithms_enabled() == before  # restored afterwards
    b = nnrun.run(spec, output=tmp_path / "b.h5")
    np.testing.assert_array_equal(a.array("h"), b.array("h"))
    assert "deterministic: true" in a.attrs["spec"]


def test_a_tampered_file_fails_naming_the_dataset(
    spec_outputs: dict[str, Path], tmp_path: Path
) -> None:
    value = tmp_path / "value.h5"
    shutil.copy(spec_outputs["logit-lens"], value)
    with h5py.File(value, "r+") as f:
        ds = f["saves/logits"]
        data = ds[()]
        data[0, 0, 7] += 0.5
        ds[...] = data
    report = nnrun.reproduce(value)
    assert report.exit_code == 1
    (bad,) = [d for d in report.diff.datasets if not d.ok]
    assert bad.name == "/saves/logits" and bad.worst == (0, 0, 7)
    text = tmp_path / "text.h5"
    shutil.copy(spec_outputs["logit-lens"], text)
    with h5py.File(text, "r+") as f:
        f["prompts/text"][0] = "The capital of Spain is"
    proc = subprocess.run(
        [str(NNRUN), "reproduce", "-q", str(text)], capture_output=True, text=True
    )
    assert proc.returncode == 1, proc.stderr
    assert "prompts/text" in proc.stdout and "differs" in proc.stdout


def test_reproduce_reports_overrides_and_refuses_changed_inputs(
    spec_outputs: dict[str, Path], tiny_llama: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "model"
    shutil.copytree(tiny_llama, copy)
    proc = subprocess.run(
        [str(NNRUN), "reproduce", "-q", str(spec_outputs["demo"]), "-s", f"model.path={copy}"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"overrides: -s model.path={copy}" in proc.stderr and "reproduced" in proc.stdout
    # steering.yaml read a vector from a file: change the file and reproduce refuses.
    steering = spec_outputs["steering"]
    vector = Path(nnrun.load(steering).attrs["inputs"].split('"file": "')[1].split('"')[0])
    moved = tmp_path / "vector.h5"
    shutil.copy(vector, moved)
    try:
        with h5py.File(vector, "r+") as f:
            f["saves/vector"][0, 0, 0] += 1.0
        with pytest.raises(NnrunError, match="inputs differ.*--allow-changed-inputs"):
            nnrun.reproduce(steering)
        report = nnrun.reproduce(steering, allow_changed_inputs=True)
        assert report.exit_code == 1 and any("input changed" in n for n in report.notes)
    finally:
        shutil.copy(moved, vector)
    assert nnrun.reproduce(steering).exit_code == 0


def test_reproduce_refuses_stored_remote_code(
    spec_outputs: dict[str, Path], tmp_path: Path
) -> None:
    path = tmp_path / "trusting.h5"
    shutil.copy(spec_outputs["demo"], path)
    with h5py.File(path, "r+") as f:
        spec = f.attrs["spec"]
        spec = spec.decode() if isinstance(spec, bytes) else spec
        f.attrs["spec"] = spec.replace("trust_remote_code: false", "trust_remote_code: true")
    with pytest.raises(NnrunError, match="--trust-remote-code"):
        nnrun.reproduce(path)
    proc = subprocess.run([str(NNRUN), "reproduce", str(path)], capture_output=True, text=True)
    assert proc.returncode == 1 and "--trust-remote-code" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_reproduce_of_a_file_without_a_spec(tmp_path: Path) -> None:
    bare = tmp_path / "bare.h5"
    with h5py.File(bare, "w") as f:
        f.create_group("saves")
    proc = subprocess.run([str(NNRUN), "reproduce", str(bare)], capture_output=True, text=True)
    assert proc.returncode == 1 and "stores no spec" in proc.stderr


@pytest.mark.real
def test_ci_recipe_script_reproduces_the_committed_output(tmp_path: Path) -> None:
    """examples/ci/reproduce.sh as CI runs it: the committed SmolLM2 output reproduces."""
    env = {**os.environ, "NNRUN": str(NNRUN)}
    proc = subprocess.run(
        ["bash", str(ROOT / "examples" / "ci" / "reproduce.sh")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "reproduced" in proc.stdout
    committed = ROOT / "examples" / "ci" / "patching.h5"
    assert committed.stat().st_size < 200_000  # a few KB to commit, not the activations


@pytest.mark.real
def test_smollm2_runs_twice_to_the_same_bytes(smollm2_dir: Path, tmp_path: Path) -> None:
    spec = _noisy_sampled_spec(smollm2_dir)
    spec["model"] = {"path": str(smollm2_dir)}
    spec["edits"][0]["at"] = "model.layers.10.output"
    spec["save"]["h"]["at"] = "model.layers.20.output"
    a = nnrun.run(spec, output=tmp_path / "a.h5")
    b = nnrun.run(spec, output=tmp_path / "b.h5")
    assert _datasets(a.path) == _datasets(b.path)
    assert nnrun.reproduce(a.path).exit_code == 0
