"""Device maps: a model placed by accelerate gives what the plain load gives.

The maps put some modules on the CPU and others on disk (`offload_folder`): accelerate's
AlignDevicesHook then keeps those weights on the `meta` device and moves them in for
each forward, which is the path a model bigger than its GPU takes. Every save, edit op,
`{from:}` value, noise draw, metric, `apply:` module and generated token must come out as
the plain load gives them (allclose; token ids equal). On a machine with CUDA the same
runs split across cuda:0 and the CPU.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from helpers import assert_same_output, h5_str, one_torch_thread

import nnrun
from nnrun.compile import model_device
from nnrun.compile._probe import module_device
from nnrun.models import load_model
from nnrun.models._load import placement_kwargs
from nnrun.spec import SpecError, check_spec

# Role -> module, per architecture (three layers, width 32).
MODULES = {
    "llama": {
        "layer": "model.layers",
        "attn": "self_attn",
        "mlp": "mlp",
        "down": "mlp.down_proj",
        "norm": "model.norm",
    },
    "gpt2": {
        "layer": "transformer.h",
        "attn": "attn",
        "mlp": "mlp",
        "down": "mlp.c_proj",
        "norm": "transformer.ln_f",
    },
}
# Weights on the CPU and on disk, alternating, the embeddings and the head on disk.
MAPS = {
    "llama": {
        "model.embed_tokens": "disk",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "cpu",
        "model.norm": "disk",
        "lm_head": "disk",
    },
    "gpt2": {
        "transformer.wte": "disk",
        "transformer.wpe": "cpu",
        "transformer.drop": "cpu",
        "transformer.h.0": "disk",
        "transformer.h.1": "cpu",
        "transformer.h.2": "disk",
        "transformer.ln_f": "cpu",
        "lm_head": "disk",
    },
}
PROMPTS = {
    "clean": "The capital of France is",
    "corrupt": "The capital of Germany is",
    "short": "Hi",
    "long": "The Eiffel Tower is in the city of",
}


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def everything(arch: str, tiny: Path, operand: Path) -> dict[str, Any]:
    """Every edit op, cross-prompt values, noise, saves with apply, metrics, generation."""
    m = MODULES[arch]
    layer = lambda i, rest="output": f"{m['layer']}.{i}.{rest}"  # noqa: E731
    direction = [float((-1) ** i) for i in range(32)]
    return {
        "nnrun": 1,
        "model": {"path": str(tiny), "device": "cpu"},
        "batch_size": 3,
        "prompts": dict(PROMPTS),
        "generate": {"max_new_tokens": 3},
        "edits": [
            {"at": layer(1), "prompts": ["corrupt"], "tokens": [-2], "set": {"from": "clean"}},
            {
                "at": layer(0),
                "prompts": ["short"],
                "add": {"file": str(operand), "dataset": "v"},
                "alpha": 0.5,
            },
            {"at": layer(1, f"{m['mlp']}.output"), "prompts": ["long"], "mul": 0.5},
            {
                "at": layer(0, f"{m['attn']}.output[0]"),
                "prompts": ["clean"],
                "tokens": [0],
                "zero": True,
            },
            {"at": layer(2), "prompts": ["long"], "noise": {"std": 0.2}, "steps": "all"},
            {
                "at": layer(2, f"{m['mlp']}.output"),
                "prompts": ["corrupt"],
                "mean_ablate": {"over": ["clean", "long"]},
            },
            {"at": layer(1), "prompts": ["clean"], "project_out": direction},
            {
                "at": layer(0, f"{m['down']}.input"),
                "prompts": ["short"],
                "clamp": {"min": -0.1, "max": 0.1},
            },
            {"at": layer(2, m["mlp"] + ".output"), "prompts": ["short"], "skip": True},
        ],
        "save": {
            "resid": {"at": f"{m['layer']}.*.output", "steps": "all"},
            "lens": {
                "at": f"{m['layer']}.*.output",
                "tokens": [-1],
                "apply": [m["norm"], "lm_head", "log_softmax", {"topk": 3}],
            },
            "attn": {"at": layer(0, f"{m['attn']}.output[0]"), "tokens": [0, -1]},
            "down_in": {"at": layer(0, f"{m['down']}.input"), "tokens": [-1]},
        },
        "metrics": {
            "p": {"prob": " Paris"},
            "kl": {"kl": "clean", "prompts": ["corrupt", "long"]},
        },
    }


def mapped(spec: dict[str, Any], device_map: Any, folder: Path) -> dict[str, Any]:
    out = copy.deepcopy(spec)
    del out["model"]["device"]
    out["model"]["device_map"] = device_map
    out["model"]["offload_folder"] = str(folder)
    return out


@pytest.fixture
def operand(tmp_path: Path) -> Path:
    path = tmp_path / "operand.h5"
    with h5py.File(path, "w") as f:
        f["v"] = np.linspace(-1, 1, 32, dtype=np.float32)
    return path


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dict_map_with_disk_offload_equals_plain_load(
    arch: str, request: pytest.FixtureRequest, tmp_path: Path, operand: Path
) -> None:
    tiny = request.getfixturevalue(f"tiny_{arch}")
    spec = everything(arch, tiny, operand)
    plain = nnrun.run(spec, output=tmp_path / "plain.h5", cache=False)
    placed = nnrun.run(
        mapped(spec, MAPS[arch], tmp_path / "offload"), output=tmp_path / "mapped.h5", cache=False
    )
    # The spec text differs (device vs device_map); every dataset must not.
    assert_same_output(plain.path, placed.path, skip=frozenset({"spec", "spec_sha256"}))
    assert placed.generation() == plain.generation()
    for name in plain:  # not a comparison of empty files
        assert np.isfinite(plain.array(name)).any(), name
    assert np.isfinite(plain.metric("kl")).all()
    assert h5_str(placed.attrs["model_device"]).startswith('device_map {"')
    assert '"disk"' in h5_str(placed.attrs["model_device"])
    assert placed.attrs["device"] == "cpu"  # where inputs went: not `meta`


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dict_map_across_cuda_and_cpu_equals_one_gpu(
    tiny_llama: Path, tmp_path: Path, operand: Path
) -> None:
    """Layer 1, the norm and the head offloaded to the CPU, executed on cuda:0."""
    spec = everything("llama", tiny_llama, operand)
    spec["model"]["device"] = "cuda:0"
    placement = {
        k: ("cpu" if k in ("model.layers.1", "model.norm", "lm_head") else 0) for k in MAPS["llama"]
    }
    plain = nnrun.run(spec, output=tmp_path / "plain.h5", cache=False)
    placed = nnrun.run(
        mapped(spec, placement, tmp_path / "offload"), output=tmp_path / "mapped.h5", cache=False
    )
    assert placed.generation() == plain.generation()
    assert_same_output(
        plain.path, placed.path, rtol=1e-4, atol=1e-5, skip=frozenset({"spec", "spec_sha256"})
    )


def test_strategy_map_with_max_memory_spills_to_disk(tiny_llama: Path, tmp_path: Path) -> None:
    spec = {
        "path": str(tiny_llama),
        "device_map": "sequential",
        "max_memory": {"cpu": "200KB"},
        "offload_folder": str(tmp_path / "offload"),
    }
    loaded = load_model(spec)
    placement = loaded.model.hf_device_map
    assert placement["model.embed_tokens"] == "cpu" and placement["lm_head"] == "disk"
    # Inputs go where accelerate executes the model; an offloaded module runs there too.
    assert model_device(loaded.model) == torch.device("cpu")
    assert loaded.model.lm_head.weight.device.type == "meta"
    assert module_device(loaded.model.lm_head) == torch.device("cpu")


def test_placement_arguments_as_accelerate_takes_them(tmp_path: Path) -> None:
    spec = {
        "device_map": {"model.layers.0": "cuda:1", "model.layers.1": "1", "lm_head": "disk"},
        "max_memory": {"cuda:0": "20GiB", "1": "10GiB", "cpu": "64GiB"},
        "offload_folder": "~/offload",
    }
    got = placement_kwargs(spec)
    assert got["device_map"] == {"model.layers.0": 1, "model.layers.1": 1, "lm_head": "disk"}
    assert got["max_memory"] == {0: "20GiB", 1: "10GiB", "cpu": "64GiB"}
    assert got["offload_folder"] == str(Path("~/offload").expanduser())
    assert placement_kwargs({"device": "cpu"}) == {}
    assert placement_kwargs({"device_map": "auto"}) == {"device_map": "auto"}


@pytest.mark.parametrize(
    ("model", "path", "message"),
    [
        (
            {"device_map": {"lm_head": "disk"}},
            "model.offload_folder",
            "puts modules on disk, so it needs a folder",
        ),
        ({"device": "cpu", "max_memory": {"cpu": "1GiB"}}, "model.max_memory", "only applies"),
        ({"offload_folder": "off"}, "model.offload_folder", "only applies to a device_map"),
        (
            {"device_map": {"lm_head": "gpu1"}},
            "model.device_map.lm_head",
            "'gpu1' is not a device",
        ),
        (
            {"device_map": {"lm_head": "cpu"}, "max_memory": {"cpu": "1GiB"}},
            "model.max_memory",
            "places modules itself",
        ),
        (
            {"device_map": "auto", "max_memory": {"gpu": "1GiB"}},
            "model.max_memory.gpu",
            "'gpu' is not a device",
        ),
        (
            {"device_map": "auto", "max_memory": {"cpu": "lots"}},
            "model.max_memory.cpu",
            "is not a memory size",
        ),
    ],
)
def test_placement_mistakes_are_spec_errors(model: dict[str, Any], path: str, message: str) -> None:
    spec = {"nnrun": 1, "model": {"builtin": "smollm2-135m-instruct", **model}, "prompts": ["a"]}
    with pytest.raises(SpecError) as caught:
        check_spec(spec)
    issues = [(i.path, i.message) for i in caught.value.issues]
    assert any(p == path and message in m for p, m in issues), issues


def test_good_placements_validate() -> None:
    base = {"nnrun": 1, "prompts": ["a"]}
    for model in (
        {"device_map": "auto", "max_memory": {"0": "20GiB", "cpu": 1000000}},
        {"device_map": {"model.layers.0": 0, "lm_head": "disk"}, "offload_folder": "off"},
        {"device_map": "balanced_low_0"},
    ):
        check_spec({**base, "model": model})


# -- SmolLM2 ---------------------------------------------------------------------------------


def smollm2_spec(model: dict[str, Any]) -> dict[str, Any]:
    return {
        "nnrun": 1,
        "model": model,
        "prompts": {"clean": PROMPTS["clean"], "corrupt": PROMPTS["corrupt"]},
        "generate": {"max_new_tokens": 4},
        "edits": [
            {
                "at": "model.layers.8.output",
                "prompts": ["corrupt"],
                "tokens": [3],
                "set": {"from": "clean"},
            },
            {"at": "model.layers.20.mlp.output", "prompts": ["clean"], "noise": {"std": 0.5}},
        ],
        "save": {
            "resid": {"at": "model.layers.*.output", "tokens": [-1]},
            "lens": {
                "at": "model.layers.25.output",
                "tokens": [-1],
                "apply": ["model.norm", "lm_head", "softmax", {"topk": 5}],
            },
        },
        "metrics": {"p_paris": {"prob": " Paris"}},
    }


def smollm2_map(first: Any, rest: Any) -> dict[str, Any]:
    """Embeddings (tied to lm_head) and layers 10-19 on `rest`, the others on `first`."""
    placed: dict[str, Any] = {"model.embed_tokens": rest, "lm_head": rest}
    placed.update({"model.rotary_emb": first, "model.norm": first})
    placed.update({f"model.layers.{i}": rest if 10 <= i < 20 else first for i in range(30)})
    return placed


@pytest.mark.real
def test_smollm2_with_layers_on_disk_equals_plain_load(smollm2_dir: Path, tmp_path: Path) -> None:
    spec = smollm2_spec({"path": str(smollm2_dir), "device": "cpu"})
    plain = nnrun.run(spec, output=tmp_path / "plain.h5", cache=False)
    placed = nnrun.run(
        mapped(spec, smollm2_map("cpu", "disk"), tmp_path / "offload"),
        output=tmp_path / "mapped.h5",
        cache=False,
    )
    assert plain.generation() == placed.generation()
    assert plain.generation()["clean"].startswith(" Paris")
    assert_same_output(plain.path, placed.path, skip=frozenset({"spec", "spec_sha256"}))


@pytest.mark.real
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_smollm2_across_cuda_and_cpu_equals_one_gpu(smollm2_dir: Path, tmp_path: Path) -> None:
    """Layers 10-19 and the embeddings offloaded to the CPU (moved to cuda:0 per forward)."""
    spec = smollm2_spec({"path": str(smollm2_dir), "device": "cuda:0"})
    plain = nnrun.run(spec, output=tmp_path / "plain.h5", cache=False)
    placed = nnrun.run(
        mapped(spec, smollm2_map(0, "cpu"), tmp_path / "offload"),
        output=tmp_path / "mapped.h5",
        cache=False,
    )
    assert plain.generation() == placed.generation()
    for name in plain:
        np.testing.assert_allclose(placed.array(name), plain.array(name), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(placed.metric("p_paris"), plain.metric("p_paris"), rtol=1e-4)


def test_the_scaling_docs_placements_validate() -> None:
    import re

    doc = (Path(__file__).resolve().parents[1] / "docs" / "scaling.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", doc, re.DOTALL) if "device_map" in b]
    assert len(blocks) >= 2
    for block in blocks:
        loaded = check_spec("nnrun: 1\nprompts: [a]\n" + block)
        assert loaded.data["model"]["device_map"]
