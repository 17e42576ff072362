"""Sweeps and metrics: points packed into shared batch rows give what each point gives alone.

A sweep spec is one file of points; nnrun packs (point, prompt) pairs into batch rows,
shares rows that do not depend on a variable, and writes one HDF5 file whose datasets
lead with the sweep axes. These tests check the packing against the oracle of running
every point on its own (and metrics against plain transformers logits), resume after an
interruption without recomputing, isolated failures, and the bad input of issue 7.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

import nnrun
from nnrun._run import cached_model
from nnrun.spec import SpecError, check_spec, load_spec, validate_spec

NNRUN = Path(sys.executable).with_name("nnrun")
RTOL, ATOL = 1e-4, 1e-5  # packed (padded, batched) against one point alone, float32

PROMPTS = {
    "clean": "The capital of France is",
    "corrupt": "The capital of Germany is",
    "love": "I love it",
}


def sweep_spec(tiny: Path, **extra: Any) -> dict[str, Any]:
    """Layer x position patching plus steering from another prompt, with metrics."""
    spec = {
        "nnrun": 1,
        "model": {"path": str(tiny)},
        "batch_size": 4,
        "prompts": dict(PROMPTS),
        "sweep": {"layer": {"range": [0, 3]}, "pos": [2, 4, -1]},
        "edits": [
            {
                "at": "model.layers.${layer}.output",
                "prompts": ["corrupt"],
                "tokens": "${pos}",
                "set": {"from": "clean"},
            },
            {
                "at": "model.layers.${layer}.mlp.output",
                "prompts": ["clean"],
                "tokens": "all",
                "add": {"from": "love", "tokens": [-1]},
                "alpha": 0.5,
            },
        ],
        "save": {
            "resid": {"at": "model.layers.${layer}.output", "tokens": [-1]},
            "logits": {"at": "output", "tokens": [-1], "prompts": ["corrupt"]},
        },
        "metrics": {
            "ld": {"logit_diff": [" Paris", " Berlin"], "prompts": ["corrupt"]},
            "p": {"prob": " Paris"},
            "lp": {"logprob": " Paris", "prompts": ["clean"]},
            "logit": {"logit": " Paris"},
            "rank": {"rank": " Paris"},
            "kl": {"kl": "clean", "prompts": ["corrupt"]},
        },
    }
    spec.update(extra)
    return spec


def assert_same(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert a.shape == b.shape, (what, a.shape, b.shape)
    if a.dtype.kind in "iub":
        np.testing.assert_array_equal(a, b, err_msg=what)
    else:
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=True, err_msg=what)


def each_point_alone(spec: dict[str, Any], out: Path, tmp_path: Path) -> None:
    """Every save and metric of a packed sweep equals the same point run on its own."""
    packed = nnrun.load(out)
    loaded = check_spec(spec)
    for point in loaded.points():
        alone = nnrun.run({**point.data, "output": str(tmp_path / f"p{point.index}.h5")})
        for name in packed:
            assert_same(
                packed.array(name)[point.coords], alone.array(name), f"{name} {point.label}"
            )
        for name in packed.metric_names:
            assert_same(
                packed.metric(name)[point.coords], alone.metric(name), f"{name} {point.label}"
            )
        if packed.generation():
            with h5py.File(out) as f, h5py.File(alone.path) as g:
                np.testing.assert_array_equal(
                    f["generation/ids"][point.coords], g["generation/ids"][()]
                )


# -- the spec: points, variables, validation ------------------------------------------


def test_grid_and_zip_points() -> None:
    base = {"nnrun": 1, "prompts": {"a": "x ${w}"}, "save": {"s": {"at": "m.${layer}.output"}}}
    grid = load_spec({**base, "sweep": {"layer": {"range": [0, 6, 2]}, "w": ["u", "v"]}})
    assert grid.sweep.shape == (3, 2) and grid.sweep.dims == ("layer", "w")
    points = grid.points()
    assert [p.values for p in points[:3]] == [
        {"layer": 0, "w": "u"},
        {"layer": 0, "w": "v"},
        {"layer": 2, "w": "u"},
    ]
    assert points[3].coords == (1, 1) and points[3].label == "layer=2, w=v"
    assert points[3].data["save"]["s"]["at"] == "m.2.output"
    assert points[3].data["prompts"]["a"] == "x v" and "sweep" not in points[3].data
    # the template keeps the variables; the stored spec says what was swept
    assert grid.data["save"]["s"]["at"] == "m.${layer}.output"
    zipped = load_spec({**base, "sweep": {"layer": [1, 2], "w": ["u", "v"]}, "sweep_mode": "zip"})
    assert zipped.sweep.dims == ("point",) and zipped.sweep.shape == (2,)
    assert [p.values for p in zipped.points()] == [{"layer": 1, "w": "u"}, {"layer": 2, "w": "v"}]


def test_typed_values_and_overrides() -> None:
    spec = {
        "nnrun": 1,
        "prompts": {"a": "x"},
        "sweep": {"coef": [0.5, 2], "layer": [1, 2]},
        "edits": [{"at": "model.layers.${layer}.output", "add": 1, "alpha": "${coef}"}],
    }
    points = load_spec(spec).points()
    assert [p.data["edits"][0]["alpha"] for p in points] == [0.5, 0.5, 2, 2]  # numbers, not text
    narrowed = load_spec(spec, ["sweep.layer=[2]", "coef=3"])
    assert narrowed.sweep.shape == (1, 1)
    assert narrowed.points()[0].values == {"coef": 3, "layer": 2}


def test_validation_names_the_point_and_checks_each_value_once() -> None:
    spec = {
        "nnrun": 1,
        "prompts": {"a": "x"},
        "sweep": {"layer": {"range": [0, 30]}, "pos": [1, "2:x", 3]},
        "edits": [{"at": "model.layers.${layer}.output", "tokens": "${pos}", "zero": True}],
    }
    (issue,) = validate_spec(load_spec(spec))
    assert issue.path == "edits[0].tokens"
    assert issue.message.startswith("pos=2:x: ") and "slice" in issue.message


@pytest.mark.parametrize(
    ("sweep", "extra", "path", "fragment"),
    [
        ({"layer": {"range": [3, 3]}}, {}, "sweep.layer.range", "is empty"),
        ({"layer": {"range": [0, 9, 0]}}, {}, "sweep.layer.range", "must not be 0"),
        ({"layer": []}, {}, "sweep.layer", "empty"),
        ({"layer": [1, 1]}, {}, "sweep.layer", "more than once"),
        ({"layer": [1, 2], "pos": [1]}, {"sweep_mode": "zip"}, "sweep", "same length"),
        ({"layer": [1]}, {"vars": {"layer": 2}}, "sweep.layer", "also declared under vars"),
        ({"seed": [1], "layer": [1]}, {}, "sweep.seed", "top-level key"),
        ({"layer": [1]}, {"output": "runs/x-${layer}.h5"}, "output", "one file"),
        ({"layer": [1]}, {"sweep_mode": "diagonal"}, "sweep_mode", "grid, zip"),
        ({"layer": {"range": [0, 2_000_000]}}, {}, "sweep.layer.range", "too many"),
    ],
)
def test_bad_sweeps_are_one_clear_error(
    sweep: dict[str, Any], extra: dict[str, Any], path: str, fragment: str
) -> None:
    spec = {
        "nnrun": 1,
        "prompts": {"a": "x"},
        "sweep": sweep,
        "save": {"s": {"at": "model.layers.${layer}.output"}},
        **extra,
    }
    issues = validate_spec(load_spec(spec))
    assert [i.path for i in issues] == [path], issues
    assert fragment in issues[0].message


def test_undefined_variable_and_unused_variable() -> None:
    spec = {
        "nnrun": 1,
        "prompts": {"a": "x"},
        "sweep": {"layer": [1], "unused": [1, 2]},
        "save": {"s": {"at": "model.layers.${layr}.output"}},
    }
    loaded = load_spec(spec)
    (issue,) = validate_spec(loaded)
    assert issue.path == "save.s.at" and "did you mean 'layer'" in issue.message
    # layer is unused too: the typo left it without a use
    assert [w.path for w in loaded.warnings] == ["sweep.layer", "sweep.unused"]
    assert all("used nowhere" in w.message for w in loaded.warnings)


def test_validate_cli_shows_warnings(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(
        "nnrun: 1\nprompts: {a: x}\nsweep: {layer: [1, 2], unused: [3]}\n"
        "save: {s: {at: 'model.layers.${layer}.output'}}\n"
    )
    proc = subprocess.run([str(NNRUN), "validate", str(spec)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "warning" in proc.stderr and "unused" in proc.stderr and "used nowhere" in proc.stderr


@pytest.mark.parametrize(
    ("metric", "path", "fragment"),
    [
        ({"prob": " Paris", "logit": 3}, "metrics.m", "2 kinds"),
        ({"prompts": ["a"]}, "metrics.m", "no kind"),
        ({"probb": " Paris"}, "metrics.m.probb", "did you mean 'prob'"),
        ({"kl": "nope"}, "metrics.m.kl", "unknown prompt 'nope'"),
        ({"logit_diff": [" Paris"]}, "metrics.m.logit_diff", "at least 2"),
        ({"prob": " Paris", "step": 1}, "metrics.m.step", "needs a generate"),
        ({"prob": ""}, "metrics.m.prob", ""),
    ],
)
def test_bad_metrics_at_validate(metric: dict[str, Any], path: str, fragment: str) -> None:
    spec = {"nnrun": 1, "prompts": {"a": "x"}, "metrics": {"m": metric}}
    issues = validate_spec(load_spec(spec))
    assert [i.path for i in issues] == [path], issues
    assert fragment in issues[0].message


def test_validate_a_sweep_is_fast() -> None:
    """A 40 x 200 grid is checked without expanding 8,000 schema validations."""
    import time

    spec = {
        "nnrun": 1,
        "prompts": {"a": "x", "b": "y"},
        "sweep": {"layer": {"range": [0, 40]}, "pos": {"range": [0, 200]}},
        "edits": [{"at": "model.layers.${layer}.output", "tokens": "${pos}", "set": {"from": "a"}}],
        "metrics": {"m": {"prob": " x", "prompts": ["b"]}},
    }
    started = time.perf_counter()
    assert validate_spec(load_spec(spec)) == []
    assert time.perf_counter() - started < 10  # about 1 s on a busy 2-core machine


# -- packing ---------------------------------------------------------------------------


def test_packed_sweep_equals_each_point_alone(tiny_llama: Path, tmp_path: Path) -> None:
    spec = sweep_spec(tiny_llama)
    out = tmp_path / "sweep.h5"
    results = nnrun.run(spec, output=out)
    assert results.status == "complete" and results.failed_points() == {}
    assert results.axes("resid") == ["layer", "pos", "prompt", "token", "hidden"]
    assert results["resid"].shape == (3, 3, 3, 1, 32)
    assert results.axes("ld") == ["layer", "pos", "prompt"] and results.metric("ld").shape == (
        3,
        3,
        1,
    )
    assert results.metric("rank").dtype == np.int64
    assert results.coords("ld") == {"layer": [0, 1, 2], "pos": [2, 4, -1]}
    each_point_alone(spec, out, tmp_path)


def test_packing_shares_rows_that_no_variable_touches(tiny_llama: Path) -> None:
    from nnrun.compile import compile_plan

    model = cached_model({"path": str(tiny_llama)})
    spec = {
        "nnrun": 1,
        "model": {"path": str(tiny_llama)},
        "prompts": {"clean": PROMPTS["clean"], "corrupt": PROMPTS["corrupt"]},
        "sweep": {"layer": {"range": [0, 3]}, "pos": [3, 4]},
        "edits": [
            {
                "at": "model.layers.${layer}.output",
                "prompts": ["corrupt"],
                "tokens": "${pos}",
                "set": {"from": "clean"},
            }
        ],
        "metrics": {"ld": {"logit_diff": [" Paris", " Berlin"], "prompts": ["corrupt"]}},
    }
    plan = compile_plan(check_spec(spec), model.model, model.tokenizer)
    keys = [row.key for row in plan.rows]
    assert keys[0] == "clean" and len(keys) == 1 + 6  # one clean row serves all six points
    assert all(row.sources == ("clean",) for row in plan.rows[1:])
    for info in plan.points:
        assert dict(info.rows)["clean"] == "clean"
    # each point's edit acts on that point's row only
    edits = [e for site in plan.sites for e in site.edits]
    assert len(edits) == 6 and all(len(e.prompts) == 1 for e in edits)


def test_metrics_match_plain_transformers(tiny_llama: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = sweep_spec(tiny_llama, edits=[], save={}, sweep={"unused": [1, 2]})
    results = nnrun.run(spec, output=tmp_path / "m.h5")
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    paris, berlin = (tok.encode(w, add_special_tokens=False)[0] for w in (" Paris", " Berlin"))
    last = {}
    with torch.no_grad():
        for pid, text in PROMPTS.items():
            last[pid] = model(**tok(text, return_tensors="pt")).logits[0, -1].double()
    prompts = list(PROMPTS)
    for point in range(2):
        for i, pid in enumerate(prompts):
            x = last[pid]
            assert math.isclose(
                results.metric("p")[point, i], torch.softmax(x, -1)[paris], rel_tol=1e-4
            )
            assert math.isclose(
                results.metric("logit")[point, i], x[paris], rel_tol=1e-4, abs_tol=1e-5
            )
            assert results.metric("rank")[point, i] == int((x > x[paris]).sum())
        ld = last["corrupt"][paris] - last["corrupt"][berlin]
        assert math.isclose(results.metric("ld")[point, 0], ld, rel_tol=1e-4, abs_tol=1e-5)
        lp = torch.log_softmax(last["clean"], -1)[paris]
        assert math.isclose(results.metric("lp")[point, 0], lp, rel_tol=1e-4)
        ref, own = torch.log_softmax(last["clean"], -1), torch.log_softmax(last["corrupt"], -1)
        kl = float((ref.exp() * (ref - own)).sum())
        assert math.isclose(results.metric("kl")[point, 0], kl, rel_tol=1e-3, abs_tol=1e-7)


def test_metrics_without_a_sweep_or_saves(tiny_gpt2: Path, tmp_path: Path) -> None:
    spec = {
        "nnrun": 1,
        "model": {"path": str(tiny_gpt2)},
        "prompts": {"a": "The capital of France is", "b": "One, two, three"},
        "metrics": {"p": {"prob": " Paris"}, "first": {"logit": 5, "token": 0}},
    }
    results = nnrun.run(spec, output=tmp_path / "m.h5")
    assert list(results) == [] and sorted(results.metric_names) == ["first", "p"]
    assert results.axes("p") == ["prompt"] and results.prompt_ids("p") == ["a", "b"]
    assert results.metric("p").shape == (2,) and np.all(results.metric("p") > 0)


def test_generation_sweep_equals_each_point_alone(tiny_llama: Path, tmp_path: Path) -> None:
    spec = {
        "nnrun": 1,
        "model": {"path": str(tiny_llama)},
        "prompts": {"a": "The capital of France is", "b": "I love it"},
        "generate": {"max_new_tokens": 4},
        "sweep": {"alpha": [0.0, 2.0, 8.0]},
        "edits": [
            {
                "at": "model.layers.1.output",
                "prompts": ["a"],
                "steps": "all",
                "add": {"from": "b", "tokens": [-1]},
                "alpha": "${alpha}",
            }
        ],
        "save": {"h": {"at": "model.layers.2.output", "tokens": [-1], "steps": "all"}},
        "metrics": {"p1": {"prob": " Paris", "step": 1}},
    }
    out = tmp_path / "gen.h5"
    results = nnrun.run(spec, output=out)
    assert results.axes("h") == ["alpha", "prompt", "step", "token", "hidden"]
    each_point_alone(spec, out, tmp_path)


def test_points_that_cannot_share_a_pass_run_in_groups(tiny_llama: Path, tmp_path: Path) -> None:
    spec = {
        "nnrun": 1,
        "model": {"path": str(tiny_llama), "dtype": "${dtype}"},
        "prompts": {"a": "The capital of France is"},
        "sweep": {"dtype": ["float32", "float64"], "n": [1, 2]},
        "generate": {"max_new_tokens": "${n}"},
        "save": {"h": {"at": "model.layers.0.output", "tokens": [-1], "steps": 0}},
    }
    report = nnrun.plan(spec)
    assert [g.points for g in report.groups] == [1, 1, 1, 1]
    assert "generate.max_new_tokens is 2" in report.groups[1].reason
    assert "model.dtype is float64" in report.groups[2].reason
    results = nnrun.run(spec, output=tmp_path / "g.h5")
    assert results.failed_points() == {}
    h = results.array("h")  # (dtype, n, prompt, step, token, hidden)
    assert h.shape[:4] == (2, 2, 1, 1)
    np.testing.assert_allclose(h[0], h[1], rtol=1e-5, atol=1e-6)  # float32 vs float64


# -- failures, resume, limits ----------------------------------------------------------


def test_a_failing_point_leaves_the_others_correct(tiny_llama: Path, tmp_path: Path) -> None:
    spec = {
        "nnrun": 1,
        "model": {"path": str(tiny_llama)},
        "batch_size": 8,
        "prompts": {"clean": PROMPTS["clean"], "corrupt": PROMPTS["corrupt"]},
        # layer 5 does not exist (compile); n=3 reads 2 tokens for a 3-token selection
        # (only found in the forward pass, so its batch is re-run point by point)
        "sweep": {"layer": [0, 5, 2], "n": [2, 3]},
        "edits": [
            {
                "at": "model.layers.${layer}.output",
                "prompts": ["corrupt"],
                "tokens": "0:${n}",
                "set": {"from": "clean", "tokens": [0, 1]},
            }
        ],
        "metrics": {"ld": {"logit_diff": [" Paris", " Berlin"], "prompts": ["corrupt"]}},
    }
    out = tmp_path / "f.h5"
    results = nnrun.run(spec, output=out)
    assert results.status == "complete"
    failed = results.failed_points()
    assert set(failed) == {"layer=0, n=3", "layer=5, n=2", "layer=5, n=3", "layer=2, n=3"}
    assert "model.layers.5 does not exist" in failed["layer=5, n=2"]
    assert "the model has 3" in failed["layer=5, n=2"] or "has 3 entries" in failed["layer=5, n=2"]
    assert "does not broadcast" in failed["layer=0, n=3"]
    ld = results.metric("ld")
    assert np.isnan(ld[1]).all() and np.isnan(ld[:, 1]).all()  # failed points stay NaN
    for layer_i, layer in ((0, 0), (2, 2)):
        point = {**spec, "sweep": {"layer": [layer], "n": [2]}}
        alone = nnrun.run(point, output=tmp_path / f"alone{layer}.h5")
        assert_same(ld[layer_i, 0], alone.metric("ld")[0, 0], f"layer={layer}")
    proc = subprocess.run(
        [str(NNRUN), "run", "-q", _write(tmp_path / "f.yaml", spec), "-o", str(tmp_path / "g.h5")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stderr
    assert "4 of 6 sweep points failed" in proc.stderr and "Traceback" not in proc.stderr
    shown = subprocess.run([str(NNRUN), "show", str(out)], capture_output=True, text=True)
    assert shown.returncode == 0 and "2 done, 4 failed of 6" in shown.stdout


def _write(path: Path, spec: dict[str, Any]) -> str:
    import yaml

    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


class PassCounter:
    """Counts forward passes of the cached model (a forward pre-hook on its root)."""

    def __init__(self, tiny: Path) -> None:
        self.model = cached_model({"path": str(tiny)}).model
        self.passes = 0
        self.rows = 0
        self.handle = self.model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.passes += 1
        self.rows += int(kwargs["input_ids"].shape[0])

    def close(self) -> None:
        self.handle.remove()


def test_resume_recomputes_nothing_already_done(tiny_llama: Path, tmp_path: Path) -> None:
    spec = sweep_spec(tiny_llama, batch_size=2, metrics={"p": {"prob": " Paris"}})
    del spec["edits"][1]  # patching only: 1 shared clean row + 9 corrupt rows + love
    spec["sweep"] = {"layer": {"range": [0, 3]}, "pos": [2, 4, -1]}
    out = tmp_path / "r.h5"
    full = nnrun.run(spec, output=tmp_path / "full.h5")

    def stop_after_two_batches(state: nnrun.RunProgress) -> None:
        if state.stage == "running" and state.rows_done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        nnrun.run(spec, output=out, progress=stop_after_two_batches)
    partial = tmp_path / "r.partial.h5"
    with h5py.File(partial) as f:
        assert f.attrs["status"] == "partial"
        done = int((f["sweep/status"][()] == 1).sum())
    assert 0 < done < 9
    counter = PassCounter(tiny_llama)
    try:
        resumed = nnrun.run(spec, output=out, resume=True)
    finally:
        counter.close()
    assert resumed.status == "complete" and not partial.exists()
    # only the rows of the points not yet done ran (plus shared/source rows they read)
    remaining = 9 - done
    assert counter.rows <= remaining + 2 * counter.passes, (counter.rows, counter.passes)
    assert counter.rows < 11
    for name in full.metric_names:
        assert_same(resumed.metric(name), full.metric(name), name)
    for name in full:
        assert_same(resumed.array(name), full.array(name), name)


def test_resume_refuses_a_changed_spec(tiny_llama: Path, tmp_path: Path) -> None:
    spec = sweep_spec(tiny_llama, batch_size=1)
    out = tmp_path / "c.h5"

    def stop(state: nnrun.RunProgress) -> None:
        if state.stage == "running" and state.rows_done >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        nnrun.run(spec, output=out, progress=stop)
    changed = {**spec, "sweep": {"layer": {"range": [0, 2]}, "pos": [2, 4, -1]}}
    with pytest.raises(nnrun.NnrunError, match=r"spec changed .*sweep\.layer"):
        nnrun.run(changed, output=out, resume=True)
    with pytest.raises(nnrun.NnrunError, match="no sweep"):
        nnrun.run(
            {k: v for k, v in spec.items() if k != "sweep"}
            | {"edits": [], "save": {}, "metrics": {}},
            output=out,
            resume=True,
        )
    with pytest.raises(nnrun.NnrunError, match="nothing to resume"):
        nnrun.run(spec, output=tmp_path / "never.h5", resume=True)


def test_sigterm_then_resume_from_the_cli(tiny_llama: Path, tmp_path: Path) -> None:
    import signal
    import time

    spec = sweep_spec(tiny_llama, batch_size=1)
    spec["sweep"] = {"layer": {"range": [0, 3]}, "pos": [-3, -2, -1], "coef": {"range": [1, 21]}}
    spec["edits"][1]["alpha"] = "${coef}"  # 180 points, each with rows of its own
    path = _write(tmp_path / "s.yaml", spec)
    out = tmp_path / "s.h5"
    proc = subprocess.Popen(
        [str(NNRUN), "run", "-q", path, "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    partial = tmp_path / "s.partial.h5"
    deadline = time.time() + 60
    while not partial.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(1.0)  # some points are written (the file is locked while open: wait, not read)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if out.exists():
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode != 0 and "Traceback" not in err
    assert not out.exists() and partial.exists()
    again = subprocess.run(
        [str(NNRUN), "run", "-q", path, "-o", str(out), "--resume"], capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    assert nnrun.load(out).status == "complete"
    full = nnrun.run(spec, output=tmp_path / "full.h5")
    for name in full.metric_names:
        assert_same(nnrun.load(out).metric(name), full.metric(name), name)


def test_a_big_grid_needs_yes(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nnrun._run as runner

    monkeypatch.setattr(runner, "CONFIRM_SWEEP_POINTS", 4)
    spec = sweep_spec(tiny_llama)
    with pytest.raises(nnrun.NnrunError, match=r"9 points and up to 27 batch rows.*--yes"):
        nnrun.run(spec, output=tmp_path / "big.h5")
    assert not list(tmp_path.iterdir())
    assert nnrun.run(spec, output=tmp_path / "big.h5", yes=True).status == "complete"


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"metrics": {"m": {"prob": " Parisian"}}}, r"is \d tokens: \[' Paris', "),
        ({"metrics": {"m": {"prob": 99999}}}, "outside the vocabulary"),
        ({"metrics": {"m": {"prob": " Paris", "token": 99}}}, "beyond prompt"),
    ],
)
def test_bad_metric_tokens_fail_before_any_file(
    tiny_llama: Path, tmp_path: Path, change: dict[str, Any], fragment: str
) -> None:
    spec = {
        "nnrun": 1,
        "model": {"path": str(tiny_llama)},
        "prompts": {"a": "The capital"},
        **change,
    }
    with pytest.raises(nnrun.NnrunError, match=fragment):
        nnrun.run(spec, output=tmp_path / "x.h5")
    assert not list(tmp_path.iterdir())


def test_metric_on_a_model_without_logits(tiny_bert: Path, tmp_path: Path) -> None:
    spec = {
        "nnrun": 1,
        "model": {"path": str(tiny_bert), "class": "AutoModel"},
        "prompts": {"a": "The capital"},
        "metrics": {"m": {"prob": 5}},
    }
    with pytest.raises(nnrun.CompileError, match="gives none.*AutoModelForMaskedLM"):
        nnrun.run(spec, output=tmp_path / "x.h5")


def test_one_model_load_per_process(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nnrun.models as models

    loads = []
    real = models.load_model

    def counting(*args: Any, **kwargs: Any) -> Any:
        loads.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "load_model", counting)
    nnrun.clear_cache()
    spec = sweep_spec(tiny_llama)
    for layer in (0, 1):
        nnrun.run(spec, [f"layer={layer}"], output=tmp_path / f"{layer}.h5")
    assert len(loads) == 1
    nnrun.run(spec, ["layer=2"], output=tmp_path / "x.h5", cache=False)
    assert len(loads) == 2
    nnrun.clear_cache()


def test_plot_draws_a_heatmap_and_a_line(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.h5"
    nnrun.run(sweep_spec(tiny_llama), output=out)
    picture = nnrun.plot(out, "ld", tmp_path / "ld.png")
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    grid = nnrun.sweep_grid(nnrun.load(out), "ld")
    assert grid.y.name == "layer" and grid.x.name == "pos"
    assert grid.x.ticks[1] == "4 ' Germany'"  # positions labelled with the edited prompt's tokens
    proc = subprocess.run(
        [str(NNRUN), "plot", str(out), "resid", "--prompt", "love", "-o", str(tmp_path / "r.svg")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r.svg").read_text().lstrip().startswith("<?xml")
    bad = subprocess.run([str(NNRUN), "plot", str(out), "nope"], capture_output=True, text=True)
    assert bad.returncode == 1 and "no metric or save 'nope'" in bad.stderr


def test_spec_error_for_a_sweep_names_the_file_line(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("nnrun: 1\nprompts: {a: x}\nsweep:\n  layer: {range: [4, 2]}\n")
    with pytest.raises(SpecError) as caught:
        check_spec(path)
    assert f"{path}:4: sweep.layer.range: range [4, 2] is empty" in str(caught.value)


def test_sweep_results_as_labelled_arrays(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.h5"
    results = nnrun.run(sweep_spec(tiny_llama), output=out)
    resid = results.to_xarray("resid")
    assert resid.dims == ("layer", "pos", "prompt", "token", "hidden")
    assert resid.coords["layer"].values.tolist() == [0, 1, 2]
    assert resid.coords["pos"].values.tolist() == [2, 4, -1]
    assert resid.coords["token_str"].values[:2, 0].tolist() == [" is", " is"]
    ld = results.to_xarray("ld")
    assert float(ld.sel(layer=1, pos=4, prompt="corrupt")) == results.metric("ld")[1, 1, 0]
    frame = results.metrics_frame()
    assert list(frame.columns[:3]) == ["layer", "pos", "prompt"]
    assert len(frame) == 9 * 3  # points x prompts
    row = frame[(frame.layer == 2) & (frame.pos == -1) & (frame.prompt == "corrupt")]
    assert float(row["ld"].iloc[0]) == pytest.approx(float(results.metric("ld")[2, 2, 0]))
    assert np.isnan(frame[frame.prompt == "love"]["ld"]).all()  # ld reads only corrupt


@pytest.mark.real
def test_packed_sweep_equals_each_point_alone_on_smollm2(smollm2_dir: Path, tmp_path: Path) -> None:
    """Layer x position patching plus steering on SmolLM2: packed rows vs points alone.

    Batched and single-prompt fp32 SmolLM2 differ by about 5e-6 relative (residuals
    reach several hundred), so values are compared relative to their scale; argmaxes
    of the saved logits must be identical.
    """
    spec = sweep_spec(smollm2_dir, batch_size=8)
    spec["model"] = {"path": str(smollm2_dir)}
    spec["sweep"] = {"layer": [3, 9], "pos": [3, -1]}
    spec["edits"][1]["at"] = "@layers.${layer}.mlp.output"
    out = tmp_path / "smol.h5"
    packed = nnrun.run(spec, output=out)
    assert packed.failed_points() == {}
    for point in check_spec(spec).points():
        alone = nnrun.run({**point.data, "output": str(tmp_path / f"p{point.index}.h5")})
        for name in packed:
            a, b = packed.array(name)[point.coords], alone.array(name)
            scale = float(np.abs(b).max())
            assert float(np.abs(a - b).max()) <= 1e-4 * scale + 1e-5, (name, point.label)
        np.testing.assert_array_equal(
            packed.array("logits")[point.coords].argmax(-1), alone.array("logits").argmax(-1)
        )
        for name in packed.metric_names:
            a, b = packed.metric(name)[point.coords], alone.metric(name)
            if name == "rank":
                np.testing.assert_array_equal(a, b)
                continue
            assert np.allclose(a, b, rtol=1e-4, atol=1e-5), (name, point.label, a, b)


def test_each_model_loads_once_however_the_sweep_is_ordered(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nnrun.models as models

    loads = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    nnrun.clear_cache()
    spec = {
        "nnrun": 1,
        "model": {"path": str(tiny_llama), "dtype": "${dtype}"},
        "prompts": {"a": "The capital of France is"},
        # the generation length changes fastest across groups, the model slowest
        "sweep": {"n": [1, 2], "dtype": ["float32", "float64"]},
        "generate": {"max_new_tokens": "${n}"},
        "metrics": {"p": {"prob": " Paris"}},
    }
    results = nnrun.run(spec, output=tmp_path / "o.h5")
    assert results.failed_points() == {} and len(loads) == 2
    nnrun.clear_cache()


def test_metric_tokens_from_a_prompt_file_field(tiny_llama: Path, tmp_path: Path) -> None:
    """A question/answer dataset: each prompt's probability of its own answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    records = [
        {"id": "fr", "text": "The capital of France is", "answer": " Paris", "foil": " Berlin"},
        {"id": "de", "text": "The capital of Germany is", "answer": " Berlin", "foil": " Paris"},
        {"id": "it", "text": "The capital of Italy is", "answer": " Rome", "foil": " Paris"},
    ]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = {
        "nnrun": 1,
        "model": {"path": str(tiny_llama)},
        "batch_size": 2,
        "prompts": {"file": str(data), "id_field": "id"},
        "metrics": {
            "p_answer": {"prob": {"field": "answer"}},
            "ld": {"logit_diff": [{"field": "answer"}, {"field": "foil"}]},
        },
    }
    results = nnrun.run(spec, output=tmp_path / "qa.h5")
    assert results.prompt_ids("p_answer") == ["fr", "de", "it"]
    assert results.prompt_meta()["answer"] == [" Paris", " Berlin", " Rome"]
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    for i, record in enumerate(records):
        with torch.no_grad():
            x = model(**tok(record["text"], return_tensors="pt")).logits[0, -1]
        answer, foil = (
            tok.encode(record[k], add_special_tokens=False)[0] for k in ("answer", "foil")
        )
        assert math.isclose(
            results.metric("p_answer")[i], torch.softmax(x, -1)[answer], rel_tol=1e-4
        )
        assert math.isclose(
            results.metric("ld")[i], x[answer] - x[foil], rel_tol=1e-4, abs_tol=1e-5
        )
    # A record without the field, an answer of several tokens, inline prompts: clear errors.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "text": "Hi", "answer": " Parisian"}) + "\n")
    with pytest.raises(nnrun.RunError, match=r"prompt 'x' field 'answer' is ' Parisian'.*tokens"):
        nnrun.run(
            {**spec, "prompts": {"file": str(bad), "id_field": "id"}}, output=tmp_path / "b.h5"
        )
    with pytest.raises(nnrun.CompileError, match="JSONL prompt file"):
        nnrun.run({**spec, "prompts": {"a": "Hi"}}, output=tmp_path / "c.h5")


def test_a_swept_literal_operand_is_each_points_own(tiny_llama: Path, tmp_path: Path) -> None:
    """`mul: ${alpha}` at one edit index: every point multiplies by its own alpha."""
    spec = {
        "nnrun": 1,
        "model": {"path": str(tiny_llama)},
        "batch_size": 8,
        "prompts": dict(PROMPTS),
        "sweep": {"alpha": [0.0, 2.0, -1.5]},
        "edits": [{"at": "model.layers.0.output", "mul": "${alpha}", "prompts": ["clean"]}],
        "save": {"h": {"at": "model.layers.0.output", "tokens": [-1]}},
    }
    swept = nnrun.run(spec, output=tmp_path / "sweep.h5").array("h")
    clean = list(PROMPTS).index("clean")
    for point, alpha in enumerate((0.0, 2.0, -1.5)):
        alone = {**spec, "edits": [{**spec["edits"][0], "mul": alpha}]}
        del alone["sweep"]
        one = nnrun.run(alone, output=tmp_path / f"{point}.h5").array("h")
        assert_same(swept[point], one, f"alpha={alpha}")
    assert np.abs(swept[1, clean]).max() > 0  # not the first point's zeros
