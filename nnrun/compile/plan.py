"""The Plan: what the engine executes and what the store writes, as plain data.

A Plan is built by `compile_plan` from a validated spec and a model's module
tree. It can be printed and tested without running a forward pass.

Row model: one batch row (`PromptRow`) is one prompt as one or more sweep points
run it. Everything that acts on rows (saves, edits, metrics) names rows by key, never
by batch index, so micro-batching and extra source rows do not change the plan. A
row whose computation is the same at every point (the clean prompt of a patching
sweep) is one row shared by all of them; its key is the prompt id. Without a sweep
every row is shared and row keys are prompt ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnrun.spec import StepSelection, TokenSelection

ALL_PROMPTS = None  # a selection of prompts that is "every prompt in the run"

# row key -> ((point index, prompt slot), ...): where a row's values are written.
Targets = tuple[tuple[str, tuple[tuple[int, int], ...]], ...]


@dataclass(frozen=True)
class HookSite:
    """One place in the forward pass: a module and a port.

    `module` is the dotted name from `named_modules()` ("" is the model itself).
    `port` is "output" (a forward hook) or "input" (a forward pre-hook: the
    module's first positional input). `order` is the site's rank in the model's
    execution order; the engine fires sites in that order.
    """

    module: str
    port: str
    order: int

    @property
    def label(self) -> str:
        """The site as a user writes it, e.g. `model.layers.3.output`."""
        return f"{self.module}.{self.port}" if self.module else self.port


@dataclass(frozen=True)
class ApplyStep:
    """One step of a save's `apply:` chain: a module run ad hoc or a named op."""

    kind: str  # "module" | "op"
    name: str  # module path, or op name (softmax, topk, ...)
    arg: int | None = None  # k for topk


@dataclass(frozen=True)
class Heads:
    """A value's last axis split into attention heads, and the heads an action selects.

    `count` x `dim` is the last axis at the site (query heads at the output projection's
    input and the query projection; key/value heads at the key and value projections).
    For attention weights (batch, heads, query, key) `count` is the head axis.
    """

    count: int
    dim: int
    selected: tuple[int, ...]


# What a SaveAction reads: the value, its gradient (d loss / d value), an attention
# pattern, an attribution (source - value) . gradient, or the backward pass's loss.
SAVE_KINDS = ("value", "grad", "pattern", "attribution", "loss")


@dataclass(frozen=True)
class SaveAction:
    """Read the value at a site and keep the selected rows and tokens."""

    # The save's name (its dataset is /saves/<name>). Not called `save`: nnsight
    # adds a `save` attribute to every object, which dataclasses would take for
    # a default value.
    name: str
    layer: int  # index along the save's layer axis (0 without a wildcard)
    indices: tuple[int, ...]  # tuple indices after the port: output[0] -> (0,)
    prompts: frozenset[str] | None  # row keys; None = every row
    tokens: TokenSelection
    steps: StepSelection
    apply: tuple[ApplyStep, ...]
    before_edits: bool
    # The variant of the save this action feeds (see SaveLayout.key); sweep points whose
    # save reads another site or token are variants of one dataset.
    key: str = ""
    kind: str = "value"  # one of SAVE_KINDS
    heads: Heads | None = None  # split the last axis into heads and keep these
    # attribution: the prompt whose value would be patched in (its row key), same site.
    source: PromptValue | None = None

    @property
    def variant(self) -> str:
        return self.key or self.name


@dataclass(frozen=True)
class MetricAction:
    """Compute one number per selected row from the final logits (at the root output)."""

    key: str  # the metric variant (see MetricLayout.key)
    kind: str  # prob | logprob | logit | rank | logit_diff | kl
    token_ids: tuple[int, ...]  # the vocabulary ids it reads (two for logit_diff)
    prompts: frozenset[str] | None  # row keys; None = every row
    tokens: TokenSelection  # one position, in each row's own tokens
    step: int  # the generation step it reads (0: the prompt pass)
    reference: str | None = None  # kl: the row key of the reference distribution
    # Per token: None for a fixed id above, or a prompt-file field holding each
    # prompt's own token (`{field: answer}`; its id above is a placeholder, -1).
    fields: tuple[str | None, ...] = ()


@dataclass(frozen=True)
class LiteralValue:
    """A number or nested list written in the spec."""

    data: Any


@dataclass(frozen=True)
class PromptValue:
    """Another prompt's activation in the same run: `{from: clean, at: ..., tokens: ...}`."""

    prompt: str  # the row key of the source
    module: str
    port: str
    indices: tuple[int, ...]
    tokens: TokenSelection | None  # None: the edited positions, in the source prompt's tokens
    # While generating: the source's value at this step (None: at the step being edited).
    step: int | None = None

    @property
    def key(self) -> tuple[str, str, tuple[int, ...]]:
        return (self.module, self.port, self.indices)


@dataclass(frozen=True)
class FileValue:
    """A tensor read from an HDF5 file, e.g. a save of an earlier nnrun run."""

    file: str
    dataset: str


Operand = LiteralValue | PromptValue | FileValue


@dataclass(frozen=True)
class EditAction:
    """Change the value at a site, for the selected rows and tokens."""

    index: int  # position in the spec's `edits:` list (for messages)
    op: str  # set | add | mul | zero | noise | mean_ablate | project_out | clamp | skip
    operand: Operand | None  # the value of set/add/mul/project_out
    params: dict[str, Any]  # std (noise), over (mean_ablate), min/max (clamp)
    alpha: float
    indices: tuple[int, ...]
    prompts: frozenset[str] | None  # row keys; None = every row
    tokens: TokenSelection
    steps: StepSelection
    # The value's own axes at the site (after batch and tokens), from the probe
    # pass; lets a wrong operand shape fail before any prompt runs.
    value_shape: tuple[int, ...] | None = None
    heads: Heads | None = None  # act on these heads only

    @property
    def label(self) -> str:
        return f"edits[{self.index}] ({self.op})"


@dataclass(frozen=True)
class SiteActions:
    """Everything the plan does at one site, in the order it happens."""

    site: HookSite
    saves: tuple[SaveAction, ...] = ()
    edits: tuple[EditAction, ...] = ()
    # Tuple indices whose whole value is kept for the batch, because an edit at a
    # later site reads another prompt's value here.
    captures: tuple[tuple[int, ...], ...] = ()
    # Only at the root output, after its edits: metrics read the final logits.
    metrics: tuple[MetricAction, ...] = ()


@dataclass(frozen=True)
class SaveLayout:
    """How one save lands in the output file: /saves/<name>.

    Leading axes are `prompt`, then `layer` when the location has a wildcard or
    slice, then `token`; the tensor's own axes follow (known once data arrives).
    """

    name: str
    at: str  # the location as written in the spec
    sites: tuple[str, ...]  # resolved location for each layer, e.g. model.layers.0.output
    layered: bool  # True when `at` expands over several modules (a layer axis)
    # The selected prompt ids (None: every prompt). Rows land in run order, not
    # in this order; /axes/<name>/prompt labels them.
    prompts: tuple[str, ...] | None
    tokens: TokenSelection
    apply: tuple[ApplyStep, ...]
    # Generation steps on the step axis (None without `generate:`: no step axis).
    steps: tuple[int, ...] | None = None
    # The value's own axes at the site (after batch and tokens), from the probe
    # pass, before `apply`; None when the probe could not tell.
    value_shape: tuple[int, ...] | None = None
    # The variant this layout describes: the save name when every point saves the
    # same thing, else `name#i` (SaveAction.key matches it).
    key: str = ""
    # Where each row's values land: row key -> ((point index, prompt slot), ...).
    # None: rows are appended in run order (prompts streamed from a file).
    targets: Targets | None = None
    kind: str = "value"  # value | grad | pattern | attribution (SaveAction.kind)
    heads: Heads | None = None
    # How the store lays the token axis out: auto (packed when it is ragged), packed
    # (only real tokens, with per-prompt offsets) or padded.
    layout: str = "auto"

    @property
    def variant(self) -> str:
        return self.key or self.name

    @property
    def leading_axes(self) -> tuple[str, ...]:
        axes = ("prompt",) + (("layer",) if self.layered else ())
        axes += ("step",) if self.steps is not None else ()
        # A pattern is (head, query token, key token): its head axis comes before token.
        return axes + (("head",) if self.kind == "pattern" else ()) + ("token",)

    @property
    def token_axis(self) -> int:
        return len(self.leading_axes) - 1


@dataclass(frozen=True)
class MetricLayout:
    """How one metric lands in the output file: /metrics/<name>, axes (sweep..., prompt)."""

    name: str
    kind: str
    prompts: tuple[str, ...] | None  # the prompt ids on its prompt axis (None: all, in run order)
    key: str = ""  # the variant (MetricAction.key), as for SaveLayout
    targets: Targets | None = None
    dtype: str = "float32"  # int64 for rank

    @property
    def variant(self) -> str:
        return self.key or self.name


@dataclass(frozen=True)
class PromptRow:
    """One batch row: a prompt's text as one or more sweep points run it."""

    key: str  # unique in the plan; the prompt id when the row serves every point
    prompt: str  # the prompt id
    text: str
    # Rows this row's edits and metrics read (`from:`, mean_ablate over, kl): every
    # micro-batch that holds this row holds them too.
    sources: tuple[str, ...] = ()
    # The other fields of its JSONL record (a prompt file's `answer`, ...).
    fields: dict[str, Any] | None = field(default=None, hash=False, compare=False)


@dataclass(frozen=True)
class PointInfo:
    """One sweep point as the plan runs it (a run without a sweep has one, index 0)."""

    index: int  # flat index into the sweep's grid
    coords: tuple[int, ...]
    label: str  # "layer=3, pos=2"; "" without a sweep
    rows: tuple[tuple[str, str], ...]  # (prompt id, row key) for each of its prompts
    spec_sha256: str = ""  # hash of the point's resolved spec (resume matches on it)


@dataclass(frozen=True)
class PromptSource:
    """Where prompts come from: inline (id, text) pairs or a streamed file."""

    inline: tuple[tuple[str, str], ...] | None = None
    file: str | None = None
    field: str = "text"
    id_field: str | None = None
    limit: int | None = None
    # Render each text of a file through the tokenizer's chat template (one user turn).
    chat_template: bool = False
    # Prompts of the file passed over before the first one taken (`limit` counts after
    # them): a shard of a distributed run takes one window of the file.
    skip: int = 0


@dataclass(frozen=True)
class Backward:
    """The loss of a backward pass: a metric's values, or the `loss` action at a site.

    The loss of a batch is the sum over its rows of each row's loss (times
    1 / the number of prompts it is averaged over, with `reduce: mean`); rows never
    read each other's gradients through it, so each row gets its own gradient.
    """

    metric: str | None  # the metric's name (every variant of it), or None for a site loss
    reduce: str = "sum"  # sum | mean
    # The prompt ids the loss is averaged over (None: every prompt); only for `mean`.
    prompts: tuple[str, ...] | None = None
    # The loss site's label for messages ("" for a metric).
    at: str = ""
    # A site loss's own axes at the site (after batch and tokens), from the probe pass:
    # lets a loss that is not one number per token fail before any prompt runs.
    value_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Plan:
    """A compiled experiment: sites in execution order and output layout."""

    name: str
    seed: int
    batch_size: int
    output: Path
    model: dict[str, Any]
    prompts: PromptSource
    sites: tuple[SiteActions, ...]
    saves: tuple[SaveLayout, ...]
    spec_text: str
    # Arguments for `model.generate` (None: one forward pass per batch).
    generate: dict[str, Any] | None = None
    # Rows whose values other rows' edits read (`from:`, `mean_ablate.over`, kl).
    source_prompts: tuple[str, ...] = ()
    passes: int = 1
    warnings: tuple[str, ...] = field(default_factory=tuple)
    metrics: tuple[MetricLayout, ...] = ()
    # The batch rows in run order; None when prompts stream from a file (then each
    # prompt is one row, keyed by its id).
    rows: tuple[PromptRow, ...] | None = None
    points: tuple[PointInfo, ...] = ()
    # The prompt ids in spec order (the prompt axis of /prompts); None for a file.
    prompt_ids: tuple[str, ...] | None = None
    # torch.use_deterministic_algorithms for the run (the spec's `deterministic:`).
    deterministic: bool = False
    backward: Backward | None = None  # None: no backward pass (inference mode)
    # The attention implementation the run switches the model to (None: as loaded);
    # eager when a save reads attention weights the loaded implementation does not return.
    attn_implementation: str | None = None

    @property
    def modules(self) -> tuple[str, ...]:
        """The modules that get a hook: only those the plan touches."""
        return tuple(dict.fromkeys(s.site.module for s in self.sites))
