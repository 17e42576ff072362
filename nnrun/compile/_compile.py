"""Compile a validated spec against a model's module tree into a Plan."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from torch import nn

from nnrun.compile._heads import is_pattern, resolve_heads
from nnrun.compile._limits import check_edit_site, check_prompt_lengths
from nnrun.compile._pack import pack_points
from nnrun.compile._probe import cached_probe, value_shape
from nnrun.compile._resolve import ResolvedLocation, resolve_location
from nnrun.compile.plan import (
    ApplyStep,
    Backward,
    EditAction,
    FileValue,
    Heads,
    HookSite,
    LiteralValue,
    MetricAction,
    MetricLayout,
    Operand,
    Plan,
    PromptSource,
    PromptValue,
    SaveAction,
    SaveLayout,
    SiteActions,
)
from nnrun.errors import CompileError
from nnrun.models._tokens import render_prompt
from nnrun.spec import LoadedSpec, is_prompt_file, parse_step_selection, parse_token_selection
from nnrun.spec._constants import METRIC_KINDS
from nnrun.spec._semantic import source_step_warnings

NAMED_OPS = ("softmax", "log_softmax", "argmax", "norm", "mean", "sum", "float")
EDIT_OPS = ("set", "add", "mul", "zero", "noise", "mean_ablate", "project_out", "clamp", "skip")
_SITE_KEY = tuple[str, str]


def compile_plan(spec: LoadedSpec, model: nn.Module, tokenizer: Any = None) -> Plan:
    """Turn a validated spec into a Plan for this model.

    Sites are ordered by the model's real execution order, found by a
    two-token probe pass (see `probe_sites`); no prompt is run. A spec with a
    sweep compiles every point and packs them into one plan (see `pack_points`);
    the first point that does not compile raises, naming the point.

    >>> plan = compile_plan(check_spec("specs/logit-lens.yaml"), model)  # doctest: +SKIP
    >>> [s.site.label for s in plan.sites]                               # doctest: +SKIP
    ['model.layers.0.output', ..., 'output']
    """
    compiled = []
    for point in spec.points():
        try:
            compiled.append((point, compile_point(point.data, model, tokenizer)))
        except CompileError as e:
            if not point.label:
                raise
            raise CompileError(f"{point.label}: {e}") from None
    return pack_points(compiled, spec_text=spec.text)


def compile_point(data: dict[str, Any], model: nn.Module, tokenizer: Any = None) -> Plan:
    """Compile one resolved spec (a sweep point's, or a spec without a sweep).

    The result names prompts by id; `pack_points` turns one or more of these into
    the plan the engine runs.
    """
    probed = cached_probe(model, tokenizer)
    order = {key: info.rank for key, info in probed.items()}
    saves_at: dict[_SITE_KEY, list[SaveAction]] = defaultdict(list)
    edits_at: dict[_SITE_KEY, list[EditAction]] = defaultdict(list)
    captures_at: dict[_SITE_KEY, set[tuple[int, ...]]] = defaultdict(set)
    layouts: list[SaveLayout] = []
    sources: list[str] = []
    grad_sites: list[tuple[str, ResolvedLocation]] = []  # (spec path, forward site)
    generate = data.get("generate")
    max_steps = int(generate["max_new_tokens"]) if generate else 1

    def ranked(site: ResolvedLocation, what: str) -> int:
        rank = order.get((site.module, site.port))
        if rank is None:
            children = [n for n, _ in model.get_submodule(site.module).named_children()]
            hint = "the module exists but the model never calls it"
            if children:
                hint = (
                    f"it is a container the model never calls; its children run: use "
                    f"{site.module}.{children[0]}.{site.port} or {site.module}.*.{site.port}"
                )
            raise CompileError(f"{what}: {site.label} never runs in the forward pass ({hint})")
        return rank

    current = str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "")
    patterns: list[str] = []  # saves that read attention weights
    for name, save in data.get("save", {}).items():
        path = f"save.{name}"
        sites, layered = resolve_location(model, save["at"], spec_path=f"{path}.at")
        prompts = _prompt_ids(save.get("prompts", "all"))
        tokens = parse_token_selection(save.get("tokens", "all"))
        steps = parse_step_selection(save.get("steps", "all"))
        apply = _apply_steps(model, save.get("apply", []), f"{path}.apply")
        kind = _save_kind(model, save, sites[0], path)
        if kind == "pattern":
            patterns.append(name)
            if generate and steps.resolve(max_steps) != [0]:
                raise CompileError(
                    f"{path}: attention weights are saved from the prompt pass only (later "
                    f"steps attend over a growing cache); give it steps: 0"
                )
            if save.get("layout") == "packed":
                raise CompileError(
                    f"{path}.layout: an attention pattern is stored padded (its key axis is "
                    "as ragged as its query axis); use layout: auto or padded"
                )
        heads = None
        own = None
        for layer, site in enumerate(sites):
            forward = _forward_site(site)
            ranked(forward, f"{path}.at")
            own = value_shape(
                probed[(forward.module, forward.port)].shape,
                site.indices,
                root=site.module == "",
            )
            if "heads" in save:
                heads = resolve_heads(
                    model, site, save["heads"], own[-1] if own else None, f"{path}.heads"
                )
            source = None
            if kind == "attribution":
                value = save["attribution"]
                sources.append(str(value["from"]))
                source = PromptValue(
                    prompt=str(value["from"]),
                    module=forward.module,
                    port=forward.port,
                    indices=site.indices,
                    tokens=None
                    if value.get("tokens") is None
                    else parse_token_selection(value["tokens"]),
                )
            saves_at[(forward.module, forward.port)].append(
                SaveAction(
                    name=name,
                    layer=layer,
                    indices=site.indices,
                    prompts=_frozen(prompts),
                    tokens=tokens,
                    steps=steps,
                    apply=apply,
                    before_edits=bool(save.get("before_edits", False)),
                    kind=kind,
                    heads=heads,
                    source=source,
                )
            )
            if kind in ("grad", "attribution"):
                grad_sites.append((path, forward))
        layouts.append(
            SaveLayout(
                name=name,
                at=save["at"],
                sites=tuple(s.label for s in sites),
                layered=layered,
                prompts=prompts,
                tokens=tokens,
                apply=apply,
                steps=tuple(steps.resolve(max_steps)) if generate else None,
                layout=save.get("layout", "auto"),
                value_shape=_layout_shape(kind, own, heads),
                kind=kind,
                heads=heads,
            )
        )

    for index, edit in enumerate(data.get("edits", [])):
        path = f"edits[{index}]"
        sites, _ = resolve_location(model, edit["at"], spec_path=f"{path}.at")
        op = next(k for k in EDIT_OPS if k in edit)
        params = _params(op, edit[op])
        sources += params.get("over", [])
        for site in sites:
            check_edit_site(model, site.module, site.port, site.label, f"{path}.at")
            target_rank = ranked(site, f"{path}.at")
            shape = probed[(site.module, site.port)].shape
            if op == "skip":
                _check_skip(site, shape, probed.get((site.module, "input")), path)
            operand = _operand(model, op, edit[op], site, f"{path}.{op}", bool(generate))
            if isinstance(operand, PromptValue):
                sources.append(operand.prompt)
                source = ResolvedLocation(operand.module, operand.port, operand.indices)
                if ranked(source, f"{path}.{op}.at") > target_rank:
                    raise CompileError(
                        f"{path}: reads prompt '{operand.prompt}' at {source.label} to edit "
                        f"{site.label}, but {site.label} runs first. nnrun runs one forward "
                        f"pass per batch and does not plan a second one: read the source at "
                        f"{site.label} or at a site that runs before it"
                    )
                if operand.key != (site.module, site.port, site.indices):
                    captures_at[(operand.module, operand.port)].add(operand.indices)
            own = value_shape(shape, site.indices, root=site.module == "")
            heads = None
            if "heads" in edit:
                if is_pattern(model, site):
                    raise CompileError(
                        f"{path}.heads: {site.label} holds attention weights the module returns "
                        "after using them, so editing them changes nothing downstream; edit "
                        "a head's output at the attention output projection's input instead"
                    )
                heads = resolve_heads(
                    model, site, edit["heads"], own[-1] if own else None, f"{path}.heads"
                )
                own = (len(heads.selected), heads.dim)
            edits_at[(site.module, site.port)].append(
                EditAction(
                    index=index,
                    op=op,
                    operand=operand,
                    params=params,
                    alpha=float(edit.get("alpha", 1.0)),
                    indices=site.indices,
                    prompts=_frozen(_prompt_ids(edit.get("prompts", "all"))),
                    tokens=parse_token_selection(edit.get("tokens", "all")),
                    steps=parse_step_selection(edit.get("steps", "all")),
                    value_shape=own,
                    heads=heads,
                )
            )

    metric_actions, metric_layouts = _metrics(data, model, tokenizer, probed, bool(generate))
    if metric_actions:
        saves_at.setdefault(("", "output"), [])
        sources += [m.reference for m in metric_actions if m.reference is not None]
    backward = None
    if data.get("backward"):
        backward, loss = _backward(data, model, probed, ranked, grad_sites)
        if loss is not None:
            site, action = loss
            saves_at[(site.module, site.port)].append(action)
    warnings = [f"{path}: {message}" for path, message in source_step_warnings(data)]
    attn_implementation = None
    if patterns and current != "eager":
        asked = data.get("model", {}).get("attn_implementation")
        if asked is not None:
            raise CompileError(
                f"save.{patterns[0]}: attention weights are returned only by eager attention, "
                f"and model.attn_implementation is {asked}; set attn_implementation: eager"
            )
        attn_implementation = "eager"
        warnings.append(
            f"save {', '.join(patterns)} reads attention weights, which {current or 'this'} "
            "attention does not return: this run uses eager attention (set "
            "model.attn_implementation: eager to say so in the spec)"
        )
    prompt_source = _prompt_source(data["prompts"], tokenizer, bool(data.get("chat_template")))
    check_prompt_lengths(prompt_source, tokenizer, model, generate)
    if sources and prompt_source.inline is None:
        raise CompileError(
            "edits and attribution saves read other prompts' values (from:, "
            "mean_ablate.over), which needs inline prompts: a streamed prompts.file cannot "
            "name its sources"
        )
    keys = sorted(set(saves_at) | set(edits_at) | set(captures_at), key=lambda k: order[k])
    sites = tuple(
        SiteActions(
            site=HookSite(module=m, port=p, order=order[(m, p)]),
            saves=tuple(saves_at.get((m, p), ())),
            edits=tuple(edits_at.get((m, p), ())),
            captures=tuple(sorted(captures_at.get((m, p), ()))),
            metrics=tuple(metric_actions) if (m, p) == ("", "output") else (),
        )
        for m, p in keys
    )
    return Plan(
        name=data["name"],
        seed=int(data.get("seed", 0)),
        batch_size=int(data.get("batch_size", 8)),
        output=Path(data["output"]),
        model=dict(data.get("model", {})),
        prompts=prompt_source,
        sites=sites,
        saves=tuple(layouts),
        spec_text="",
        generate=dict(generate) if generate else None,
        source_prompts=tuple(dict.fromkeys(sources)),
        metrics=tuple(metric_layouts),
        deterministic=bool(data.get("deterministic", False)),
        prompt_ids=None
        if prompt_source.inline is None
        else tuple(p for p, _ in prompt_source.inline),
        warnings=tuple(warnings),
        backward=backward,
        attn_implementation=attn_implementation,
    )


def _forward_site(site: ResolvedLocation) -> ResolvedLocation:
    """The hook site of a location: a gradient port is read where its value is."""
    port = {"grad": "output", "input.grad": "input"}.get(site.port, site.port)
    return ResolvedLocation(site.module, port, site.indices)


def _save_kind(model: nn.Module, save: dict[str, Any], site: ResolvedLocation, path: str) -> str:
    """What a save reads: value, grad, pattern or attribution (see SAVE_KINDS)."""
    if site.port in ("grad", "input.grad"):
        if not site.module and site.port == "input.grad":
            raise CompileError(
                f"{path}.at: the model's input is token ids, which have no gradient; read "
                "the gradient at the embeddings' output instead (@embed.grad)"
            )
        if is_pattern(model, site):
            raise CompileError(
                f"{path}.at: gradients of attention weights are not supported; save the "
                "gradient at the attention output projection's input (per head, with heads:)"
            )
        return "grad"
    if save.get("attribution") is not None:
        if is_pattern(model, site):
            raise CompileError(f"{path}.attribution: attention weights take no attribution")
        return "attribution"
    return "pattern" if is_pattern(model, site) else "value"


def _layout_shape(
    kind: str, own: tuple[int, ...] | None, heads: Heads | None
) -> tuple[int, ...] | None:
    """A save's own axes as stored (before apply): heads split, attribution summed."""
    if kind == "pattern" or own is None:
        return None  # (head, query, key): the key axis is as long as each batch
    if heads is not None:
        own = (*own[:-1], len(heads.selected), heads.dim)
    return own[:-1] if kind == "attribution" else own


def _backward(
    data: dict[str, Any],
    model: nn.Module,
    probed: Any,
    ranked: Any,
    grad_sites: list[tuple[str, ResolvedLocation]],
) -> tuple[Backward, tuple[ResolvedLocation, SaveAction] | None]:
    """The plan's backward pass, and the loss action at a site (None for a metric loss).

    Every saved gradient must be one the loss can depend on: a site that runs after the
    loss is read gets none, so it is refused here rather than saved as nothing.
    """
    spec = data["backward"]
    _check_offload(model)
    reduce = str(spec.get("reduce", "sum"))
    metric = spec.get("metric")
    if metric is not None:
        metric_spec = data.get("metrics", {}).get(metric, {})
        prompts = _prompt_ids(metric_spec.get("prompts", "all"))
        loss_site = ResolvedLocation("", "output", ())
        label = f"metric {metric} (at the model's output)"
        action = None
    else:
        loss = spec["loss"]
        sites, layered = resolve_location(model, loss["at"], spec_path="backward.loss.at")
        if layered or len(sites) != 1:
            raise CompileError(
                f"backward.loss.at: the loss must be read at one site, not '{loss['at']}' "
                f"({len(sites)} sites)"
            )
        loss_site = sites[0]
        ranked(loss_site, "backward.loss.at")
        prompts = _prompt_ids(loss.get("prompts", "all"))
        tokens = parse_token_selection(loss.get("tokens", "all"))
        apply = _apply_steps(model, loss.get("apply", []), "backward.loss.apply")
        own = value_shape(
            probed[(loss_site.module, loss_site.port)].shape,
            loss_site.indices,
            root=loss_site.module == "",
        )
        label = loss_site.label
        action = SaveAction(
            name="backward.loss",
            layer=0,
            indices=loss_site.indices,
            prompts=_frozen(prompts),
            tokens=tokens,
            steps=parse_step_selection(0),
            apply=apply,
            before_edits=False,
            kind="loss",
        )
    loss_rank = ranked(loss_site, "backward")
    for path, site in grad_sites:
        if ranked(site, path) > loss_rank:
            raise CompileError(
                f"{path}.at: the loss ({label}) is computed before {site.label} runs, so it "
                f"cannot depend on it: the gradient there would be None. Save gradients at "
                f"sites that run before the loss"
            )
    plan = Backward(
        metric=None if metric is None else str(metric),
        reduce=reduce,
        prompts=prompts,
        at="" if metric is not None else label,
        value_shape=None if metric is not None else own,
    )
    return plan, None if action is None else (loss_site, action)


def _check_offload(model: nn.Module) -> None:
    """Refuse backward on a model whose device map offloads weights (to cpu or disk).

    Offloaded weights are brought in for each module's forward and dropped after it;
    a backward pass would hold every one of them until it ends, which defeats the
    offload, and it is not checked on such a setup. Every module on an accelerator (or
    the whole model on the CPU) is fine.
    """
    placed = getattr(model, "hf_device_map", None)
    if not isinstance(placed, dict):
        return
    devices = {str(d) for d in placed.values()}
    offloaded = sorted(
        name
        for name, device in placed.items()
        if str(device) == "disk" or (str(device) == "cpu" and devices - {"cpu", "disk"})
    )
    if offloaded:
        raise CompileError(
            f"backward: model.device_map offloads {', '.join(offloaded[:3])}"
            f"{' ...' if len(offloaded) > 3 else ''} to cpu or disk, which backward does not "
            "support (the backward pass would keep every offloaded weight in memory); place "
            "every module on a device, or remove backward:"
        )


def _check_skip(site: ResolvedLocation, shape: Any, module_input: Any, path: str) -> None:
    """`skip` hands the module's input on as its output: the two shapes must match."""
    output = shape
    for i in site.indices:
        output = output[i] if isinstance(output, tuple) and not isinstance(output[0], int) else None
    given = None if module_input is None else module_input.shape
    if site.port != "output" or given is None or output != given:
        raise CompileError(
            f"{path} (skip) at {site.label}: skip passes {site.module or 'the model'}'s input "
            f"through as its output, but in a probe pass its input has shape {given} and its "
            f"output{''.join(f'[{i}]' for i in site.indices)} shape {output}; skip needs the "
            f"two to match (e.g. skip a whole block, or an attention output[0])"
        )


def _prompt_ids(selection: Any) -> tuple[str, ...] | None:
    if selection in (None, "all"):
        return None
    return tuple(str(p) for p in selection)


def _frozen(ids: tuple[str, ...] | None) -> frozenset[str] | None:
    return None if ids is None else frozenset(ids)


def _apply_steps(model: nn.Module, ops: list[Any], path: str) -> tuple[ApplyStep, ...]:
    steps = []
    for i, op in enumerate(ops):
        where = f"{path}[{i}]"
        if isinstance(op, dict):
            ((name, arg),) = op.items()
            steps.append(ApplyStep(kind="op", name=str(name), arg=int(arg)))
        elif op in NAMED_OPS:
            steps.append(ApplyStep(kind="op", name=op))
        else:
            # A module path without a port: that module runs ad hoc on the saved value.
            sites, layered = resolve_location(model, f"{op}.output", spec_path=where)
            if layered or len(sites) != 1:
                raise CompileError(f"{where}: '{op}' must name exactly one module")
            steps.append(ApplyStep(kind="module", name=sites[0].module))
        if steps[-1].name == "topk" and i != len(ops) - 1:
            raise CompileError(f"{where}: topk gives values and indices, so it must come last")
    return tuple(steps)


def _params(op: str, value: Any) -> dict[str, Any]:
    if op == "noise":
        return {"std": float(value["std"])}
    if op == "mean_ablate":
        return {"over": [str(p) for p in value["over"]]}
    if op == "clamp":
        return {"min": value.get("min"), "max": value.get("max")}
    return {}


def _operand(
    model: nn.Module, op: str, value: Any, site: ResolvedLocation, path: str, generating: bool
) -> Operand | None:
    if op not in ("set", "add", "mul", "project_out"):
        return None
    if isinstance(value, dict) and "from" in value:
        source = site
        if value.get("at"):
            found, layered = resolve_location(model, value["at"], spec_path=f"{path}.at")
            if layered or len(found) != 1:
                raise CompileError(f"{path}.at: a source must be one site, not '{value['at']}'")
            source = found[0]
        tokens = value.get("tokens")
        step = value.get("step", "same")
        return PromptValue(
            prompt=str(value["from"]),
            module=source.module,
            port=source.port,
            indices=source.indices,
            tokens=None if tokens is None else parse_token_selection(tokens),
            # Without generation there is one step: "same" and 0 are the same thing.
            step=int(step) if generating and step != "same" else None,
        )
    if isinstance(value, dict) and "file" in value:
        return FileValue(file=str(value["file"]), dataset=str(value["dataset"]))
    return LiteralValue(data=value)


def _prompt_source(prompts: Any, tokenizer: Any, chat_template: bool) -> PromptSource:
    if is_prompt_file(prompts):
        return PromptSource(
            file=prompts["file"],
            field=prompts.get("field") or "text",
            id_field=prompts.get("id_field"),
            limit=prompts.get("limit"),
            chat_template=chat_template,
        )
    # Chat prompts ({chat: [...]}, or every prompt with chat_template: true) become the
    # text the model's chat template makes of them.
    return PromptSource(
        inline=tuple(
            (str(k), render_prompt(str(k), v, tokenizer, chat_template)) for k, v in prompts.items()
        )
    )


def _metrics(
    data: dict[str, Any], model: nn.Module, tokenizer: Any, probed: Any, generating: bool
) -> tuple[list[MetricAction], list[MetricLayout]]:
    """The spec's metrics as actions at the root output and their output layouts."""
    metrics = data.get("metrics") or {}
    if not metrics:
        return [], []
    root = probed.get(("", "output"))
    logits = value_shape(root.shape, (), root=True) if root is not None else None
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is None or not logits:
        raise CompileError(
            f"metrics read next-token logits, but {type(model).__name__} "
            f"(model.class: {data.get('model', {}).get('class')}) gives none (its output is "
            f"hidden states); load a class with a head, e.g. model.class: "
            f"AutoModelForCausalLM or AutoModelForMaskedLM"
        )
    vocab = logits[-1]
    actions, layouts = [], []
    for name, metric in metrics.items():
        path = f"metrics.{name}"
        kind = next(k for k in METRIC_KINDS if k in metric)
        refs = [] if kind == "kl" else metric[kind] if kind == "logit_diff" else [metric[kind]]
        where = (
            [f"{path}.logit_diff[{i}]" for i in range(2)]
            if kind == "logit_diff"
            else [f"{path}.{kind}"]
        )
        fields = tuple(r.get("field") if isinstance(r, dict) else None for r in refs)
        if any(fields) and not is_prompt_file(data.get("prompts")):
            raise CompileError(
                f"{path}: {{field: ...}} reads each prompt's token from its record in a JSONL "
                "prompt file (prompts: {file: data.jsonl}); these prompts are written inline"
            )
        token_ids: tuple[int, ...] = tuple(
            -1 if name else _token_id(tokenizer, ref, vocab, w)
            for ref, name, w in zip(refs, fields, where)
        )
        position = int(metric.get("token", -1))
        step = int(metric.get("step", 0))
        if step > 0 and position != -1:
            raise CompileError(
                f"{path}.token: at generation step {step} the model reads only the newest "
                f"token, so a metric there needs token: -1 (got {position})"
            )
        prompts = _prompt_ids(metric.get("prompts", "all"))
        actions.append(
            MetricAction(
                key=name,
                kind=kind,
                token_ids=token_ids,
                prompts=_frozen(prompts),
                tokens=parse_token_selection(position),
                step=step,
                reference=str(metric["kl"]) if kind == "kl" else None,
                fields=fields if any(fields) else (),
            )
        )
        layouts.append(
            MetricLayout(
                name=name,
                kind=kind,
                prompts=prompts,
                key=name,
                dtype="int64" if kind == "rank" else "float32",
            )
        )
    return actions, layouts


def _token_id(tokenizer: Any, token: Any, vocab: int, path: str) -> int:
    """A metric's token: an id, or a string that must encode to exactly one token."""
    if isinstance(token, int) and not isinstance(token, bool):
        if not 0 <= token < vocab:
            raise CompileError(
                f"{path}: token id {token} is outside the vocabulary (0..{vocab - 1})"
            )
        return token
    ids = tokenizer.encode(str(token), add_special_tokens=False)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise CompileError(
            f"{path}: {token!r} is {len(ids)} tokens: {pieces!r}; a metric needs exactly one "
            f"token (try one of these pieces, or give a token id)"
        )
    return int(ids[0])
