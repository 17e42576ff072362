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
    "output",
    "prompts",
    "chat_template",
    "save",
    "edits",
    "generate",
)

# Top-level keys of the product design that this version does not implement yet; they get
# a "not supported yet" message instead of a did-you-mean guess.
FUTURE_TOP_LEVEL_KEYS = ("metrics", "sweep", "include", "includes")

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
