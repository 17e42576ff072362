"""Names fixed by spec format 1 that several modules need (kept in sync with the schema by tests)."""

from __future__ import annotations

FORMAT_VERSION = 1

TOP_LEVEL_KEYS = (
    "nnrun",
    "name",
    "description",
    "vars",
    "model",
    "seed",
    "batch_size",
    "deterministic",
    "output",
    "prompts",
    "chat_template",
    "save",
    "edits",
    "metrics",
    "backward",
    "generate",
    "sweep",
    "sweep_mode",
)

# Top-level keys of the product design that this version does not implement yet; they get
# a "not supported yet" message instead of a did-you-mean guess.
FUTURE_TOP_LEVEL_KEYS = ("include", "includes")

# Top-level scalars usable as ${...} variables besides those declared under vars:.
SCALAR_VARIABLES = ("name", "seed", "batch_size")

EDIT_OPS = ("set", "add", "mul", "zero", "noise", "mean_ablate", "project_out", "clamp", "skip")
VALUE_OPS = ("set", "add", "mul", "project_out")

MODEL_SOURCES = ("path", "id", "gguf", "builtin")
DEFAULT_BUILTIN_MODEL = "smollm2-135m-instruct"
MODEL_DEFAULTS = {
    "dtype": "float32",
    "device": "auto",
    "class": "AutoModelForCausalLM",
    "trust_remote_code": False,
}

DEFAULT_NAME = "experiment"
DEFAULT_SEED = 0
DEFAULT_BATCH_SIZE = 8
PROMPT_FILE_DEFAULTS = {"field": "text", "id_field": None, "limit": None}

METRIC_KINDS = ("prob", "logprob", "logit", "rank", "logit_diff", "kl")
# Metrics a backward pass can start from (rank is a count: it has no gradient).
DIFFERENTIABLE_METRICS = ("prob", "logprob", "logit", "logit_diff", "kl")
BACKWARD_REDUCE = ("sum", "mean")

# model.attn_implementation: the names transformers gives its attention kernels. Only
# eager returns attention weights (`attn.output[1]`).
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")

# A sweep bigger than this runs only when asked (`nnrun run --yes`); validation refuses
# to expand anything beyond MAX_SWEEP_POINTS at all.
CONFIRM_SWEEP_POINTS = 10_000
MAX_SWEEP_POINTS = 1_000_000
