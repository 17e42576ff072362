"""The Python API: the same functions the CLI verbs call.

>>> import nnrun
>>> results = nnrun.run("examples/demo.yaml", overrides=["batch_size=1"])   # doctest: +SKIP
>>> results["resid"].shape                                                  # doctest: +SKIP
torch.Size([2, 30, 1, 576])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from nnrun.spec import LoadedSpec, check_spec
from nnrun.store import Results, load

# (prompts done, prompts in total or None) after each micro-batch.
ProgressFn = Callable[[int, int | None], None]


def run(
    spec: str | Path | dict[str, Any] | LoadedSpec,
    overrides: Sequence[str] = (),
    *,
    output: str | Path | None = None,
    progress: ProgressFn | None = None,
    log: Callable[[str], None] | None = None,
) -> Results:
    """Validate, compile and execute a spec; write its output file; return its saves.

    `spec` is a path to a YAML/JSON file, a dict, or an already loaded spec.
    `overrides` are `key.path=value` strings, as `nnrun run -s` takes them.
    """
    from nnrun.compile import compile_plan
    from nnrun.engine import Engine, count_prompts
    from nnrun.models import load_model
    from nnrun.store import OutputWriter, provenance

    loaded = spec if isinstance(spec, LoadedSpec) else check_spec(spec, overrides)
    model = load_model(loaded.data["model"], progress=log)
    plan = compile_plan(loaded, model.model)
    if output is not None:
        plan = replace(plan, output=Path(output))
    engine = Engine(plan, model.model, model.tokenizer)
    attrs = provenance(plan.spec_text, plan.seed, model.info.as_attrs(), str(engine.device))
    total = count_prompts(plan.prompts)
    done = 0
    with OutputWriter(plan.output, attrs, plan.saves, sizes=_model_sizes(model.model)) as out:
        for result in engine.run():
            out.write(result)
            done += len(result.prompt_ids)
            if progress is not None:
                progress(done, total)
    return load(plan.output)


def _model_sizes(model: Any) -> dict[str, int]:
    config = getattr(model, "config", None)
    sizes = {}
    for label, key in (("vocab", "vocab_size"), ("hidden", "hidden_size")):
        value = getattr(config, key, None)
        if isinstance(value, int):
            sizes[label] = value
    return sizes


def describe_saves(results: Results) -> dict[str, dict[str, Any]]:
    """Axes, shape, dtype and size of every dataset under /saves."""
    import h5py

    rows: dict[str, dict[str, Any]] = {}
    with h5py.File(results.path, "r") as f:
        for name, ds in f["saves"].items():
            rows[name] = {
                "axes": ", ".join(results.axes(name)),
                "shape": str(tuple(ds.shape)),
                "dtype": str(ds.attrs.get("torch_dtype", ds.dtype)),
                "bytes": int(ds.size * ds.dtype.itemsize),
            }
    return rows


def top_next_tokens(results: Results, k: int = 5) -> dict[str, dict[str, list[tuple[str, float]]]]:
    """For saves of raw logits at one token: each prompt's top-k next tokens.

    Returns {save: {prompt id: [(token text, probability), ...]}}; saves that
    are not logits at a single position are skipped. The tokenizer is loaded
    from the model path recorded in the file.
    """
    import numpy as np

    found: dict[str, dict[str, list[tuple[str, float]]]] = {}
    candidates = [
        name for name in results
        if results.axes(name)[-1] == "vocab" and results.axes(name)[-2] == "token"
        and "." not in name
    ]
    path = results.attrs.get("model_resolved_path")
    if not candidates or not path:
        return found
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return found
    for name in candidates:
        logits = results.array(name)  # (prompt, token, vocab)
        if logits.shape[1] != 1:
            continue
        by_prompt = {}
        for prompt, row in zip(results.prompt_ids(name), logits[:, 0].astype(np.float64)):
            probs = np.exp(row - row.max())
            probs /= probs.sum()
            top = np.argsort(-probs)[:k]
            by_prompt[prompt] = [(tokenizer.decode([int(i)]), float(probs[i])) for i in top]
        found[name] = by_prompt
    return found
