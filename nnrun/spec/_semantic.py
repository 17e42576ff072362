"""Checks the schema cannot express (or expresses with poor messages).

Each check looks only at values of the right type: wrong types are the schema's to report.
Paths in ``covered`` already carry a schema issue; syntax checks skip them so that one
mistake gives one issue.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from ._constants import (
    DIFFERENTIABLE_METRICS,
    EDIT_OPS,
    METRIC_KINDS,
    MODEL_SOURCES,
    VALUE_OPS,
)
from ._devices import is_device_name
from ._location import Location, parse_location
from ._messages import did_you_mean, one_of_words, show
from ._paths import join_path
from ._select import parse_step_selection, parse_token_selection

Issues = list[tuple[str, str]]


def _steps(steps: Any, total: int) -> list[int] | None:
    """The steps a selection resolves to, or None when it names a step past the end."""
    try:
        return steps.resolve(total)
    except IndexError:
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Checker:
    def __init__(self, data: dict[str, Any], covered: set[str]):
        self.data = data
        self.covered = covered
        self.out: Issues = []
        prompts = data.get("prompts")
        # Prompt ids are only known up front when the prompts are written in the spec.
        self.ids: list[str] | None = (
            [k for k in prompts if isinstance(k, str)]
            if isinstance(prompts, dict) and "file" not in prompts
            else None
        )
        generate = data.get("generate")
        self.has_generate = "generate" in data
        max_new = generate.get("max_new_tokens") if isinstance(generate, dict) else None
        self.max_new_tokens = max_new if _is_int(max_new) and max_new >= 1 else None
        self.has_backward = "backward" in data
        # Saves that read a gradient (grad ports, attribution): backward needs one.
        self.gradient_readers = 0

    def add(self, path: str, message: str) -> None:
        self.out.append((path, message))

    # -- single values -------------------------------------------------------------

    def location(self, value: Any, path: str) -> Location | None:
        if isinstance(value, str) and path not in self.covered:
            try:
                return parse_location(value)
            except ValueError as exc:
                self.add(path, str(exc))
        return None

    def no_grad_port(self, value: Any, path: str, what: str) -> None:
        """Edits and loss sites read or change the forward pass: no gradient port there."""
        found = self.location(value, path)
        if found is not None and found.is_grad:
            port = "input" if found.port == "input.grad" else "output"
            plain = str(replace(found, port=port))
            self.add(
                path,
                f"{what} reads the forward pass, and {found.port} is a gradient port (saves only); "
                f"use {plain}",
            )

    def apply(self, ops: Any, path: str) -> None:
        """Standard names among apply's modules (@ln_final, @lm_head) must be known ones."""
        if not isinstance(ops, list):
            return
        for i, op in enumerate(ops):
            where = join_path(path, i)
            if isinstance(op, str) and op.startswith("@") and where not in self.covered:
                try:
                    parse_location(f"{op}.output")
                except ValueError as exc:
                    self.add(where, str(exc).replace(f"{op}.output", op))

    def prompt_id(self, value: Any, path: str) -> None:
        if self.ids is not None and isinstance(value, str) and value not in self.ids:
            message = f"unknown prompt {value!r}{did_you_mean(value, self.ids)}"
            self.add(path, f"{message} (prompts: {', '.join(self.ids)})")

    def prompt_ids(self, value: Any, path: str) -> None:
        if isinstance(value, list):
            for i, item in enumerate(value):
                self.prompt_id(item, join_path(path, i))

    def tokens(self, value: Any, path: str) -> None:
        if value is not None and path not in self.covered:
            try:
                parse_token_selection(value)
            except ValueError as exc:
                self.add(path, str(exc))

    def steps(self, value: Any, path: str) -> None:
        if value is None or path in self.covered:
            return
        try:
            selection = parse_step_selection(value)
        except ValueError as exc:
            self.add(path, str(exc))
            return
        if selection.kind == "all":
            return
        if not self.has_generate:
            wanted = (
                selection.resolve(1) if selection.kind == "slice" else list(selection.positions)
            )
            if selection.kind == "slice" and not wanted or any(p != 0 for p in wanted):
                self.add(
                    path,
                    f"{show(value)} needs a generate: section "
                    "(without it there is only step 0, the prompt pass)",
                )
            return
        if self.max_new_tokens is None:
            return  # generate itself is broken; the schema reports that
        n = self.max_new_tokens
        if selection.kind == "list":
            beyond = [p for p in selection.positions if p >= n]
            if beyond:
                self.add(
                    path,
                    f"step {beyond[0]} is past the last step: generate.max_new_tokens is {n}, "
                    f"so steps run from 0 to {n - 1}",
                )
        elif not selection.resolve(n):
            self.add(
                path,
                f"{show(value)} selects no step: generate.max_new_tokens is {n}, "
                f"so steps run from 0 to {n - 1}",
            )

    def file(self, value: Any, path: str, what: str) -> bool:
        if not isinstance(value, str) or not value:
            return False
        if not os.path.isfile(value):  # os.path: False, not an error, for a name too long
            # Relative paths in a spec are relative to the directory nnrun runs in.
            self.add(path, f"{what} {value!r} not found (relative to {os.getcwd()})")
            return False
        return True

    # -- sections ------------------------------------------------------------------

    def prompts(self) -> None:
        prompts = self.data.get("prompts")
        if not isinstance(prompts, dict):
            return
        if "file" in prompts:
            file = prompts["file"]
            if self.file(file, "prompts.file", "prompt file"):
                suffix = Path(file).suffix.lower()
                if suffix not in (".jsonl", ".txt"):
                    self.add(
                        "prompts.file",
                        f"prompt files are .jsonl (one JSON object per line) or .txt "
                        f"(one prompt per line), not {suffix or 'a file without suffix'}",
                    )
            return
        for pid, text in prompts.items():
            if isinstance(text, str) and text and not text.strip():
                self.add(join_path("prompts", pid), f"prompt {pid!r} is only whitespace")

    def model(self) -> None:
        model = self.data.get("model")
        if not isinstance(model, dict):
            return
        sources = [k for k in MODEL_SOURCES if k in model]
        if len(sources) > 1:
            self.add(
                "model",
                f"give only one of path, id, gguf, builtin; found {one_of_words(sources, 'and')}",
            )
        if "device" in model and "device_map" in model:
            self.add(
                "model.device_map",
                "device_map places the model over devices itself; remove device (or device_map)",
            )
        self.placement(model)

    def placement(self, model: dict[str, Any]) -> None:
        """device_map's devices, and the keys that only mean something beside it."""
        device_map = model.get("device_map")
        for key in ("max_memory", "offload_folder"):
            if key in model and device_map is None:
                self.add(
                    f"model.{key}",
                    f"{key} only applies to a device_map; add device_map: auto (or remove {key})",
                )
        if isinstance(device_map, dict):
            for module, device in device_map.items():
                where = join_path("model.device_map", str(module))
                if where not in self.covered and not is_device_name(device, map_value=True):
                    self.add(
                        where,
                        f"{show(device)} is not a device; use cpu, disk, cuda:N or a GPU number",
                    )
            if "disk" in device_map.values() and not model.get("offload_folder"):
                self.add(
                    "model.offload_folder",
                    "device_map puts modules on disk, so it needs a folder for their weights: "
                    "add offload_folder: DIR",
                )
            if "max_memory" in model:
                self.add(
                    "model.max_memory",
                    "max_memory guides device_map: auto, balanced or sequential; a mapping "
                    "module -> device places modules itself (remove max_memory)",
                )
        memory = model.get("max_memory")
        if isinstance(memory, dict):
            for device in memory:
                if not is_device_name(device, map_value=False):
                    self.add(
                        join_path("model.max_memory", str(device)),
                        f"{show(device)} is not a device; use cpu, disk, cuda:N or a GPU number",
                    )

    def generate(self) -> None:
        generate = self.data.get("generate")
        if not isinstance(generate, dict):
            return
        lo, hi = generate.get("min_new_tokens"), generate.get("max_new_tokens")
        if _is_int(lo) and _is_int(hi) and lo > hi:
            self.add(
                "generate.min_new_tokens", f"min_new_tokens {lo} is more than max_new_tokens {hi}"
            )

    def saves(self) -> None:
        saves = self.data.get("save")
        if not isinstance(saves, dict):
            return
        for name, save in saves.items():
            if not isinstance(save, dict):
                continue
            base = join_path("save", name)
            found = self.location(save.get("at"), join_path(base, "at"))
            self.apply(save.get("apply"), join_path(base, "apply"))
            self.prompt_ids(save.get("prompts"), join_path(base, "prompts"))
            self.tokens(save.get("tokens"), join_path(base, "tokens"))
            self.steps(save.get("steps"), join_path(base, "steps"))
            self.gradient_save(save, found, base)

    def gradient_save(self, save: dict[str, Any], found: Location | None, base: str) -> None:
        """A save of a gradient (grad port) or an attribution needs backward:."""
        attribution = save.get("attribution")
        grad = found is not None and found.is_grad
        if grad or attribution is not None:
            self.gradient_readers += 1
        if grad and not self.has_backward:
            self.add(
                join_path(base, "at"),
                f"{found.port} is a gradient: it needs a backward: section that names the loss "
                "(e.g. backward: {metric: NAME})",
            )
        if grad and save.get("before_edits") is True:
            self.add(
                join_path(base, "before_edits"),
                "a gradient is that of the value the model goes on with (after the edits); "
                "before_edits does not apply to it",
            )
        if not isinstance(attribution, dict):
            return
        where = join_path(base, "attribution")
        if not self.has_backward:
            self.add(
                where,
                "attribution multiplies by a gradient: it needs a backward: section that names "
                "the loss (e.g. backward: {metric: NAME})",
            )
        if grad:
            self.add(
                join_path(base, "at"),
                "attribution reads the forward value and its gradient itself: write the site's "
                f"{'input' if found.port == 'input.grad' else 'output'} port, not {found.port}",
            )
        if save.get("apply"):
            self.add(
                join_path(base, "apply"),
                "attribution is already one number per token (summed over the last axis): "
                "it takes no apply",
            )
        if save.get("before_edits") is True:
            self.add(join_path(base, "before_edits"), "attribution does not take before_edits")
        self.prompt_id(attribution.get("from"), join_path(where, "from"))
        self.tokens(attribution.get("tokens"), join_path(where, "tokens"))

    def value(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            return
        if "from" in value:
            self.prompt_id(value["from"], join_path(path, "from"))
            if "at" in value:
                self.no_grad_port(value["at"], join_path(path, "at"), "a value from another prompt")
            if "tokens" in value:
                self.tokens(value["tokens"], join_path(path, "tokens"))
        elif "file" in value:
            self.file(value["file"], join_path(path, "file"), "file")

    def edits(self) -> None:
        edits = self.data.get("edits")
        if not isinstance(edits, list):
            return
        known = set(EDIT_OPS) | {"at", "prompts", "tokens", "steps", "alpha"}
        for i, edit in enumerate(edits):
            if not isinstance(edit, dict):
                continue
            base = join_path("edits", i)
            self.no_grad_port(edit.get("at"), join_path(base, "at"), "an edit")
            self.prompt_ids(edit.get("prompts"), join_path(base, "prompts"))
            self.tokens(edit.get("tokens"), join_path(base, "tokens"))
            self.steps(edit.get("steps"), join_path(base, "steps"))
            ops = [op for op in EDIT_OPS if op in edit]
            if not ops:
                # A misspelt op (`mull`) is already reported as an unknown key with its fix.
                typos = [k for k in edit if k not in known and did_you_mean(k, EDIT_OPS)]
                if not typos:
                    self.add(
                        base,
                        f"edit has no operation; use exactly one of {', '.join(EDIT_OPS)}",
                    )
            elif len(ops) > 1:
                self.add(
                    base,
                    f"edit has {len(ops)} operations ({one_of_words(ops, 'and')}); "
                    "use exactly one per edit",
                )
            if "alpha" in edit and "add" not in edit:
                self.add(
                    join_path(base, "alpha"), "alpha only goes with add (it scales the added value)"
                )
            for op in VALUE_OPS:
                if op in edit:
                    self.value(edit[op], join_path(base, op))
                    self.source_step(edit, edit[op], join_path(base, op))
            if "heads" in edit and edit.get("skip") is True:
                self.add(
                    join_path(base, "heads"),
                    "skip replaces the whole module output by its input; it cannot act on heads",
                )
            ablate = edit.get("mean_ablate")
            if isinstance(ablate, dict):
                self.prompt_ids(
                    ablate.get("over"), join_path(join_path(base, "mean_ablate"), "over")
                )
            clamp = edit.get("clamp")
            if isinstance(clamp, dict):
                lo, hi = clamp.get("min"), clamp.get("max")
                if (
                    isinstance(lo, int | float)
                    and isinstance(hi, int | float)
                    and not isinstance(lo, bool)
                    and not isinstance(hi, bool)
                    and lo > hi
                ):
                    self.add(join_path(base, "clamp"), f"min {lo} is greater than max {hi}")

    def metrics(self) -> None:
        metrics = self.data.get("metrics")
        if not isinstance(metrics, dict):
            return
        for name, metric in metrics.items():
            if not isinstance(metric, dict):
                continue
            base = join_path("metrics", name)
            kinds = [k for k in METRIC_KINDS if k in metric]
            if not kinds:
                typos = [k for k in metric if did_you_mean(k, METRIC_KINDS)]
                if not typos:
                    self.add(
                        base, f"metric has no kind; use exactly one of {', '.join(METRIC_KINDS)}"
                    )
            elif len(kinds) > 1:
                self.add(
                    base,
                    f"metric has {len(kinds)} kinds ({one_of_words(kinds, 'and')}); "
                    "use exactly one per metric",
                )
            self.prompt_ids(metric.get("prompts"), join_path(base, "prompts"))
            if isinstance(metric.get("kl"), str):
                self.prompt_id(metric["kl"], join_path(base, "kl"))
            step = metric.get("step")
            if _is_int(step) and step > 0:
                if not self.has_generate:
                    self.add(
                        join_path(base, "step"),
                        f"step {step} needs a generate: section "
                        "(without it there is only step 0, the prompt pass)",
                    )
                elif self.max_new_tokens is not None and step >= self.max_new_tokens:
                    n = self.max_new_tokens
                    self.add(
                        join_path(base, "step"),
                        f"step {step} is past the last step: generate.max_new_tokens is {n}, "
                        f"so steps run from 0 to {n - 1}",
                    )

    def source_step(self, edit: dict[str, Any], value: Any, path: str) -> None:
        """`{from: P, step: S}`: S must exist and run no later than every step the edit runs.

        Without `step:` a source read across generation steps follows the source's own
        new tokens (its value at the step being edited); that is often not what was meant,
        so it gets a warning (see `source_step_warnings`).
        """
        if not isinstance(value, dict) or "from" not in value or "step" not in value:
            return
        step = value["step"]
        where = join_path(path, "step")
        if not _is_int(step) or step == 0:
            return  # 'same', 0, or a wrong type the schema reports
        if not self.has_generate:
            self.add(
                where, f"step {step} needs a generate: section (without it there is only step 0)"
            )
            return
        if self.max_new_tokens is not None and step >= self.max_new_tokens:
            n = self.max_new_tokens
            self.add(
                where,
                f"step {step} is past the last step: generate.max_new_tokens is {n}, "
                f"so steps run from 0 to {n - 1}",
            )
            return
        try:
            steps = parse_step_selection(edit.get("steps", "all"))
        except ValueError:
            return
        total = self.max_new_tokens or step + 1
        early = [s for s in _steps(steps, total) or [] if s < step]
        if early:
            self.add(
                where,
                f"the edit runs at step {early[0]}, before step {step} of '{value['from']}' "
                f'exists; give the edit steps: "{step}:" (or read an earlier step)',
            )

    def backward(self) -> None:
        backward = self.data.get("backward")
        if not isinstance(backward, dict):
            return
        if self.has_generate:
            self.add(
                "backward",
                "backward runs on one forward pass over the prompts, not on generation: "
                "remove generate: (or backward:)",
            )
        given = [k for k in ("metric", "loss") if k in backward]
        if len(given) != 1:
            found = f"; found {one_of_words(given, 'and')}" if given else ""
            self.add(
                "backward",
                "give exactly one loss: metric (a metric's name) or loss (a value at a site "
                f"reduced to one number per prompt){found}",
            )
        metric = backward.get("metric")
        metrics = self.data.get("metrics")
        if isinstance(metric, str):
            names = [k for k in metrics if isinstance(k, str)] if isinstance(metrics, dict) else []
            if metric not in names:
                known = (
                    f" (metrics: {', '.join(names)})" if names else " (the spec has no metrics:)"
                )
                self.add(
                    "backward.metric",
                    f"unknown metric {metric!r}{did_you_mean(metric, names)}{known}",
                )
            elif isinstance(metrics[metric], dict):
                kinds = [k for k in METRIC_KINDS if k in metrics[metric]]
                if kinds and kinds[0] not in DIFFERENTIABLE_METRICS:
                    self.add(
                        "backward.metric",
                        f"metric {metric!r} is a {kinds[0]}, a count with no gradient; "
                        f"use one of {', '.join(DIFFERENTIABLE_METRICS)}",
                    )
        loss = backward.get("loss")
        if isinstance(loss, dict):
            self.no_grad_port(loss.get("at"), "backward.loss.at", "the loss")
            self.apply(loss.get("apply"), "backward.loss.apply")
            self.prompt_ids(loss.get("prompts"), "backward.loss.prompts")
            self.tokens(loss.get("tokens"), "backward.loss.tokens")
        if self.gradient_readers == 0:
            self.add(
                "backward",
                "no save reads a gradient: add a save at a grad port (e.g. @layers.*.grad) or "
                "an attribution save, or remove backward:",
            )
        model = self.data.get("model")
        device_map = model.get("device_map") if isinstance(model, dict) else None
        if isinstance(device_map, dict) and "disk" in device_map.values():
            self.add(
                "model.device_map",
                "backward keeps activations for the gradient; weights offloaded to disk are "
                "not supported with backward: place every module on a device (or remove backward:)",
            )

    def sweep_mode(self) -> None:
        if "sweep_mode" in self.data and "sweep" not in self.data:
            self.add("sweep_mode", "sweep_mode needs a sweep: section")


def semantic_issues(data: dict[str, Any], covered: set[str]) -> Issues:
    """All semantic problems of a (resolved) spec as (path, message) pairs."""
    checker = _Checker(data, covered)
    checker.prompts()
    checker.model()
    checker.generate()
    checker.saves()
    checker.edits()
    checker.metrics()
    checker.backward()
    checker.sweep_mode()
    return checker.out


def source_step_warnings(data: dict[str, Any]) -> Issues:
    """Edits that read another prompt across generation steps without saying which step.

    `{from: love}` at `steps: all` reads love's value at each step being edited, so the
    vector follows love's own new tokens; `step: 0` keeps love's prompt-pass value and
    `step: same` says the drift is meant. Either silences this.
    """
    generate = data.get("generate")
    edits = data.get("edits")
    if not isinstance(generate, dict) or not isinstance(edits, list):
        return []
    out: Issues = []
    for i, edit in enumerate(edits):
        if not isinstance(edit, dict):
            continue
        try:
            steps = parse_step_selection(edit.get("steps", "all"))
        except ValueError:
            continue
        total = generate.get("max_new_tokens")
        if not _is_int(total) or total < 1 or _steps(steps, total) in ([0], None):
            continue  # the prompt pass only (or a broken spec): no other step to read
        for op in VALUE_OPS:
            value = edit.get(op)
            if isinstance(value, dict) and "from" in value and "step" not in value:
                out.append(
                    (
                        join_path(join_path(join_path("edits", i), op), "from"),
                        f"reads prompt {show(value['from'])} at each generation step the edit "
                        "runs, so the value changes with the tokens that prompt generates; "
                        "add step: 0 for its prompt-pass value, or step: same if that is meant",
                    )
                )
    return out
