"""Hypothesis strategies and a harness for the fuzz tests (tests/test_fuzz.py).

The strategies build adversarial inputs: specs mutated as data (wrong types, missing
and unknown keys, huge numbers, NaN, unicode with lone surrogates and NUL, deep
nesting, bad ${}) and as text (python tags, duplicate keys, alias bombs, binary
garbage, truncation), command-line overrides, and crafted HDF5 files (every dtype
h5py can write, huge and empty dataspaces, dangling and external links, a /saves
that is a dataset or holds groups, axes attributes that are not JSON, ...).

`Harness` runs one case through the real CLI entry point in-process and sorts its
outcome: clean (exit 0, 1 or 2 with a message), internal (a traceback, an escaped
exception or "internal error"), or hang (still running after the time limit).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml
from hypothesis import strategies as st

SENTINEL = "nnrun-fuzz-code-ran"

# -- spec values -----------------------------------------------------------------------

HUGE = 10**5000 - 1  # 5000 digits: past what int() and str() convert by default
WEIRD_SCALARS: list[Any] = [
    0,
    -1,
    1,
    7,
    2**31,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63) - 1,
    10**20,
    10**400,
    math.nan,
    math.inf,
    -math.inf,
    1e308,
    -0.0,
    5e-324,
    0.5,
    True,
    False,
    None,
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800",
    "x\udfffy",
    "${",
    "${}",
    "${ undefined }",
    "${name}${name}",
    "$${name}",
    "${1x}",
    "../../../etc/passwd",
    "/dev/zero",
    "/",
    ".",
    "runs/",
    "model.__class__.output",
    "__import__",
    "model.layers.__init__.output",
    "model.layers.*.output",
    "model.layers[-1].output",
    "model.layers[0:99999999999999999999].output",
    "output",
    "input",
    "all",
    "-1",
    "0:",
    ":",
    "5:2",
    "💥" * 300,
    "x" * 100_000,
    "ǅ\u200b\u202e\ufeff",
    [],
    {},
    [[[]]],
    [1, "a", None],
]

DEEP = st.integers(min_value=1, max_value=3000)


@dataclass(frozen=True)
class Deep:
    """A value nested `depth` levels deep, kept as a marker until it is written.

    Python's json and yaml writers (and hypothesis' own reports) recurse, so the
    nesting is only built as text (`to_text`) or as data (`materialize`)."""

    depth: int
    as_dict: bool
    leaf: str

    def text(self) -> str:
        if self.as_dict:
            return '{"k": ' * self.depth + self.leaf + "}" * self.depth
        return "[" * self.depth + self.leaf + "]" * self.depth

    def build(self) -> Any:
        value: Any = json.loads(self.leaf)
        for _ in range(self.depth):
            value = {"k": value} if self.as_dict else [value]
        return value


def deep_value() -> st.SearchStrategy[Deep]:
    return st.builds(Deep, DEEP, st.booleans(), st.sampled_from(["1", '"x"', "null"]))


def scalar_values() -> st.SearchStrategy[Any]:
    # builds(): hypothesis describes strategies with repr(), which a 5000-digit int refuses.
    return st.one_of(
        st.builds(lambda: HUGE),
        st.builds(lambda: -HUGE),
        st.sampled_from(WEIRD_SCALARS),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(alphabet=st.characters(exclude_categories=()), max_size=40),
        st.booleans(),
    )


def values() -> st.SearchStrategy[Any]:
    return _VALUES


# Built once: hypothesis validates a strategy each time one is made.
_VALUES = st.one_of(
    st.recursive(
        scalar_values(),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=8,
    ),
    deep_value(),
)


def _paths(data: Any) -> list[tuple]:
    """Every place in a spec (not inside markers), without recursion."""
    out: list[tuple] = []
    stack: list[tuple[Any, tuple]] = [(data, ())]
    while stack:
        value, prefix = stack.pop()
        out.append(prefix)
        if isinstance(value, dict):
            stack += [(v, (*prefix, k)) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, (*prefix, i)) for i, v in enumerate(value)]
    return sorted(out, key=repr)


def materialize(value: Any) -> Any:
    """The spec with every Deep marker built (for the dict API)."""
    if isinstance(value, Deep):
        return value.build()
    if isinstance(value, dict):
        return {k: materialize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [materialize(v) for v in value]
    return value


def _get(data: Any, path: tuple) -> Any:
    for part in path:
        data = data[part]
    return data


KEY_NAMES = [
    "nnrun", "name", "model", "prompts", "save", "edits", "generate", "vars", "seed",
    "batch_size", "output", "at", "tokens", "steps", "prompts", "apply", "set", "add",
    "mul", "zero", "noise", "std", "clamp", "min", "max", "skip", "mean_ablate", "over",
    "project_out", "alpha", "from", "file", "dataset", "max_new_tokens", "temperature",
    "do_sample", "top_k", "top_p", "path", "builtin", "dtype", "device", "class",
    "trust_remote_code", "tokenizer", "limit", "field", "id_field", "metrics", "sweep",
    "before_edits", "__class__", "<<", "", "ü", "a.b", "x[0]",
]  # fmt: skip


@st.composite
def mutated_spec(draw: Callable, bases: list[dict[str, Any]]) -> dict[str, Any]:
    """A base spec with 1-4 data mutations at random places."""
    spec = json.loads(json.dumps(draw(st.sampled_from(bases))))
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(spec)
        path = draw(st.sampled_from(paths))
        parent = _get(spec, path[:-1]) if path else None
        op = draw(st.sampled_from(["replace", "replace", "delete", "add", "rename", "wrap"]))
        if not path:
            op = "add"
        if op == "replace":
            parent[path[-1]] = copy.deepcopy(draw(values()))
        elif op == "delete":
            del parent[path[-1]]
        elif op == "wrap":
            parent[path[-1]] = [parent[path[-1]]]
        elif op == "rename" and isinstance(parent, dict):
            new = draw(st.sampled_from(KEY_NAMES) | st.text(max_size=10))
            parent[new] = parent.pop(path[-1])
        else:
            target = _get(spec, path)
            if isinstance(target, dict):
                target[draw(st.sampled_from(KEY_NAMES))] = copy.deepcopy(draw(values()))
            elif isinstance(target, list):
                target.append(copy.deepcopy(draw(values())))
    return spec


@contextlib.contextmanager
def _any_int_digits() -> Iterator[None]:
    # Only while writing a case: the code under test must meet Python's default limit.
    before = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        yield
    finally:
        sys.set_int_max_str_digits(before)


def describe(value: Any, limit: int = 300) -> str:
    """A short text of a case for a failure report."""
    return to_text(value, "json")[:limit]


# Plausible values for a spec that must get past validation to test compile and run.
SITES = [
    "output", "input", "model.embed_tokens.input", "model.embed_tokens.output",
    "transformer.wte.input", "transformer.wpe.output", "model.layers.0.input",
    "model.layers.*.output", "model.layers[-1].output", "model.layers[0:2].output",
    "model.layers.1.self_attn.output[0]", "model.layers.1.self_attn.output[1]",
    "model.layers.0.mlp.down_proj.input", "model.rotary_emb.output", "model.norm.output",
    "transformer.h.*.output", "transformer.h.0.attn.output[0]", "transformer.ln_f.output",
    "lm_head.output", "model.layers.output", "model.__class__.output", "transformer.h.9.output",
    "model.layers.0.output[0]", "model.layers.0.output[5]",
]  # fmt: skip
APPLY = [
    "model.norm", "lm_head", "model.layers.0", "model.rotary_emb", "model.embed_tokens",
    "transformer.ln_f", "transformer.h.0", "transformer.wpe", "softmax", "argmax", "norm",
    "float", "mean", {"topk": 3}, {"topk": 10**9}, "__class__", "model.layers",
]  # fmt: skip
TEXTS = [
    "Hi", "The capital of France is", "a" * 600, "x " * 200, "é ü 東京 🙂", "\u202e\u200b",
    "\x00", "a\x00b", " ", "\n\n", "<s></s>", "\ud800",
]  # fmt: skip
GENTLE: dict[str, st.SearchStrategy[Any]] = {
    "int": st.one_of(
        st.integers(-8, 40),
        st.sampled_from([2**31, 2**63 - 1, 2**63, 10**20, 10**9, 100_000, 65_536, 65_537]),
    ),
    "float": st.one_of(
        st.floats(-10, 10), st.sampled_from([math.nan, math.inf, 1e308, 1e-320, 0.0, -0.0])
    ),
    "str": st.one_of(
        st.sampled_from(SITES),
        st.sampled_from(TEXTS),
        st.sampled_from(["all", "0:2", "-1:", "5:2", ":"]),
    ),
    "list": st.one_of(
        st.lists(st.integers(-8, 8), min_size=1, max_size=3, unique=True),
        st.lists(st.sampled_from(APPLY), max_size=4),
        st.lists(st.floats(-2, 2), min_size=1, max_size=40),
        st.sampled_from([[[1.0] * 32], [[[0.5]]], [1e308] * 32, ["clean"], ["a", "b"], ["zz"]]),
    ),
}


@st.composite
def gentle_spec(draw: Callable, bases: list[dict[str, Any]]) -> dict[str, Any]:
    """A base spec with 1-3 of its values replaced by plausible ones of the same kind,
    so that most cases pass validation and reach compile and run."""
    spec = json.loads(json.dumps(draw(st.sampled_from(bases))))
    for _ in range(draw(st.integers(1, 3))):
        leaves = [p for p in _paths(spec) if p and not isinstance(_get(spec, p), dict)]
        path = draw(st.sampled_from(leaves))
        value = _get(spec, path)
        kind = (
            "int" if isinstance(value, int) and not isinstance(value, bool)
            else "float" if isinstance(value, float)
            else "list" if isinstance(value, list)
            else "str" if isinstance(value, str)
            else draw(st.sampled_from(list(GENTLE)))
        )  # fmt: skip
        _get(spec, path[:-1])[path[-1]] = copy.deepcopy(draw(GENTLE[kind]))
    return spec


def to_text(spec: dict[str, Any], fmt: str) -> str:
    """The spec as YAML or JSON text (values YAML cannot write become their repr)."""
    deep: list[Deep] = []

    def mark(value: Any) -> Any:
        if isinstance(value, Deep):
            deep.append(value)
            return f"@@DEEP{len(deep) - 1}@@"
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        return value

    marked = mark(spec)
    with _any_int_digits():
        text = None
        if fmt == "yaml":
            try:
                text = yaml.safe_dump(marked, allow_unicode=True, sort_keys=False, width=10**9)
            except (yaml.YAMLError, ValueError):
                text = None
        if text is None:
            text = json.dumps(marked, ensure_ascii=False, default=repr)
    for i, value in enumerate(deep):
        for quoted in (f'"@@DEEP{i}@@"', f"'@@DEEP{i}@@'", f"@@DEEP{i}@@"):
            text = text.replace(quoted, value.text())
    return text


TAGS = [
    f'!!python/object/apply:os.system ["touch {SENTINEL}"]',
    f"!!python/object/apply:subprocess.check_output [[touch, {SENTINEL}]]",
    "!!python/name:os.system",
    "!!python/object/new:type [x, [], {}]",
    "!!python/module:os",
    "!!binary aGVsbG8=",
    "!!set {a, b}",
    "!!timestamp 2001-12-14t21:59:43.10-05:00",
    "!!float .nan",
    "!!int 0x" + "f" * 50,
    "!custom {a: 1}",
]

ALIAS_BOMB = "\n".join(
    ["vars:", '  a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
)


@st.composite
def mutated_text(draw: Callable, bases: list[dict[str, Any]]) -> bytes:
    """A spec's text with text-level damage: tags, duplicates, bombs, garbage, cuts."""
    text = to_text(draw(st.sampled_from(bases)), draw(st.sampled_from(["yaml", "json"])))
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        op = draw(
            st.sampled_from(["tag", "duplicate", "bomb", "garbage", "cut", "char", "bom", "crlf"])
        )
        at = draw(st.integers(0, len(lines)))
        if op == "tag":
            key = draw(st.sampled_from(["seed", "x", "name", "  at", "description"]))
            lines.insert(at, f"{key}: {draw(st.sampled_from(TAGS))}")
        elif op == "duplicate" and lines:
            lines.insert(at, lines[min(at, len(lines) - 1)])
        elif op == "bomb":
            lines += ALIAS_BOMB.splitlines() + ["description: *a8"]
        elif op == "garbage":
            junk = draw(st.binary(min_size=1, max_size=40)).decode("latin-1")
            lines.insert(at, junk)
        elif op == "cut":
            text = "\n".join(lines)
            lines = text[: draw(st.integers(0, len(text)))].splitlines()
        elif op == "char" and lines:
            i = min(at, len(lines) - 1)
            line = lines[i]
            pos = draw(st.integers(0, len(line)))
            lines[i] = (
                line[:pos] + draw(st.sampled_from(list("\t:{}[]&*!|>'\"%@`#-?,\x00"))) + line[pos:]
            )
        elif op == "bom":
            lines.insert(0, "\ufeff")
        elif op == "crlf":
            lines = [line + "\r" for line in lines]
    data = "\n".join(lines).encode("utf-8", "surrogateescape")
    if draw(st.booleans()) and draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))] + draw(st.binary(max_size=8))
    return data


OVERRIDE_KEYS = [
    "seed", "batch_size", "output", "name", "prompts.a", "save.x.at", "edits.0.at",
    "edits.5", "generate.max_new_tokens", "model.path", "vars.layer", "layer", "a.b.c",
    "edits[0]", "[0]", "save..x", "prompts.file", "nnrun",
]  # fmt: skip


def overrides() -> st.SearchStrategy[list[str]]:
    value = st.one_of(
        st.sampled_from(
            ["1", "-1", "9" * 5000, ".nan", "[1, 2", "{a: 1}", "!!python/object/apply:os.system [x]",
             "", "null", "'\x00'", '"\\ud800"', "*a", "&a [1]", "${x}", "all", "[" * 2000]
        ),
        st.text(max_size=30),
    )  # fmt: skip
    one = st.one_of(
        st.builds(lambda k, v: f"{k}={v}", st.sampled_from(OVERRIDE_KEYS), value),
        st.text(max_size=20),
    )
    return st.lists(one, max_size=3)


# -- crafted HDF5 files ------------------------------------------------------------------


def _dataset(draw: Callable, group: h5py.Group, name: str) -> None:
    kind = draw(
        st.sampled_from(
            ["float", "int", "bool", "complex", "vlen-str", "bytes", "compound", "vlen-int",
             "ref", "empty", "scalar", "huge", "zero", "bigendian", "enum", "float16"]
        )
    )  # fmt: skip
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    if kind == "float":
        group[name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    elif kind == "int":
        group[name] = np.arange(math.prod(shape), dtype=np.int64).reshape(shape)
    elif kind == "bool":
        group[name] = np.ones(shape, dtype=bool)
    elif kind == "complex":
        group[name] = np.ones(shape, dtype=np.complex64)
    elif kind == "vlen-str":
        group.create_dataset(
            name, data=np.array(["a", "b\u00e9"] * 2, dtype=object), dtype=h5py.string_dtype()
        )
    elif kind == "bytes":
        group[name] = np.array([b"ab", b"cd"])
    elif kind == "compound":
        group[name] = np.zeros(shape, dtype=[("a", "i4"), ("b", "f8")])
    elif kind == "vlen-int":
        ds = group.create_dataset(name, (2,), dtype=h5py.vlen_dtype(np.int32))
        ds[0], ds[1] = np.arange(3, dtype=np.int32), np.arange(1, dtype=np.int32)
    elif kind == "ref":
        ds = group.create_dataset(name, (1,), dtype=h5py.ref_dtype)
        ds[0] = group.file.ref
    elif kind == "empty":
        group.create_dataset(name, data=h5py.Empty("f"))
    elif kind == "scalar":
        group[name] = np.float64(3.5)
    elif kind == "huge":
        group.create_dataset(
            name, shape=(2**40, 2**20), maxshape=(None, None), dtype="f4", chunks=(1, 1024)
        )
    elif kind == "zero":
        group.create_dataset(name, shape=(0, 3), maxshape=(None, 3), dtype="f4")
    elif kind == "bigendian":
        group[name] = np.ones(shape, dtype=">f8")
    elif kind == "enum":
        group.create_dataset(
            name,
            data=np.zeros(shape, dtype=np.int8),
            dtype=h5py.enum_dtype({"A": 0, "B": 1}, basetype="i1"),
        )
    elif kind == "float16":
        group[name] = np.ones(shape, dtype=np.float16)
    ds = group.get(name)
    if isinstance(ds, h5py.Dataset):
        axes = draw(
            st.sampled_from(
                [None, '["prompt", "token", "vocab"]', '["prompt", "layer", "token", "hidden"]',
                 "not json", "[1, 2]", '{"a": 1}', "[", '"prompt"', b"\xff\xfe", np.arange(3)]
            )
        )  # fmt: skip
        if axes is not None:
            ds.attrs["axes"] = axes
        if draw(st.booleans()):
            ds.attrs["save"] = draw(st.sampled_from([name, "missing", "", "../x"]))


def _attrs(draw: Callable, obj: Any) -> None:
    for key in draw(st.lists(st.sampled_from(
        ["status", "spec", "model_resolved_path", "seed", "error", "nnrun_version", "inputs",
         "axes", "odd"]), max_size=4)):  # fmt: skip
        value = draw(
            st.sampled_from(
                ["complete", "partial", "", "x" * 70_000, b"\xff", 5, np.arange(4), 2.5,
                 "EVIL_TOKENIZER", "/", "/dev/zero", h5py.Empty("i"), np.zeros(2, dtype=[("a", "i4")])]
            )
        )  # fmt: skip
        try:
            obj.attrs[key] = value
        except (TypeError, ValueError, OSError):
            pass


@st.composite
def crafted_h5(draw: Callable) -> Callable[[Path, Path], None]:
    """A function writing one crafted file at a path (given the evil tokenizer directory)."""
    blocks = draw(
        st.lists(
            st.sampled_from(
                ["saves-group", "saves-dataset", "save-is-group", "prompts", "prompts-wrong",
                 "generation", "axes", "axes-dataset", "soft-link", "external-link",
                 "cycle", "root-attrs", "logits", "metrics", "sweep"]
            ),
            max_size=7,
        )
    )  # fmt: skip
    raw = draw(st.sampled_from([None, None, None, None, "garbage", "empty", "truncate"]))
    seeds = draw(st.lists(st.integers(0, 255), min_size=40, max_size=40))
    inner = st.data()
    sub = draw(inner)

    def write(path: Path, evil: Path) -> None:
        if raw == "garbage":
            path.write_bytes(bytes(seeds))
            return
        if raw == "empty":
            path.write_bytes(b"")
            return
        with h5py.File(path, "w") as f:
            for block in blocks:
                with contextlib.suppress(ValueError, TypeError, KeyError, OSError, RuntimeError):
                    _block(sub.draw, f, block, evil)
        if raw == "truncate":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])

    return write


def _block(draw: Callable, f: h5py.File, block: str, evil: Path) -> None:
    if block == "saves-group":
        g = f.require_group("saves")
        for i in range(draw(st.integers(1, 3))):
            _dataset(draw, g, f"s{i}")
    elif block == "saves-dataset" and "saves" not in f:
        f["saves"] = np.arange(3)
    elif block == "save-is-group":
        f.require_group("saves").require_group("grp")
    elif block == "prompts":
        g = f.require_group("prompts")
        g.create_dataset("id", data=np.array(["a", "b"], dtype=object), dtype=h5py.string_dtype())
        g.create_dataset("text", data=np.array(["x", "y"], dtype=object), dtype=h5py.string_dtype())
    elif block == "prompts-wrong":
        g = f.require_group("prompts")
        _dataset(draw, g, "id")
        _dataset(draw, g, "text")
    elif block == "generation":
        g = f.require_group("generation")
        _dataset(draw, g, "text")
    elif block == "axes":
        g = f.require_group("axes").require_group(draw(st.sampled_from(["s0", "s1", "logits"])))
        _dataset(draw, g, "prompt")
    elif block == "axes-dataset" and "axes" not in f:
        f["axes"] = np.arange(2)
    elif block == "soft-link":
        g = f.require_group(draw(st.sampled_from(["saves", "prompts", "/"])))
        g[draw(st.sampled_from(["dangling", "text", "id", "s9"]))] = h5py.SoftLink(
            "/nowhere/at/all"
        )
    elif block == "external-link":
        g = f.require_group("saves")
        target = draw(st.sampled_from(["/nonexistent.h5", "/dev/zero", str(evil)]))
        g["ext"] = h5py.ExternalLink(target, "/x")
    elif block == "cycle":
        g = f.require_group("saves").require_group("loop")
        g["again"] = g
    elif block == "root-attrs":
        _attrs(draw, f)
        if draw(st.booleans()):
            f.attrs["model_resolved_path"] = str(evil)
    elif block == "logits":
        g = f.require_group("saves")
        ds = g.create_dataset("logits", data=np.zeros((2, 1, 8), dtype=np.float32))
        ds.attrs["axes"] = json.dumps(["prompt", "token", "vocab"])
        f.attrs["model_resolved_path"] = str(evil)
    elif block in ("metrics", "sweep"):
        g = f.require_group(block)
        _dataset(draw, g, draw(st.sampled_from(["p", "layer"])))


# -- running a case ------------------------------------------------------------------


class Hang(BaseException):
    """Raised by the alarm: a case ran past its time limit (BaseException: never swallowed)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def fire(signum: int, frame: Any) -> None:
        raise Hang()

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _CachedApp:
    """Stands in for `nnrun.cli.app`: the same click command, built once.

    Typer turns the app into a click command on every call (20 ms); a process
    runs `main()` once, a fuzz test thousands of times. Everything else main()
    does (arguments, error handling, exit codes) is unchanged."""

    def __init__(self, app: Any) -> None:
        import typer.main

        self.app = app
        self.command = typer.main.get_command(app)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.command(*args, **kwargs)


_cached: dict[int, _CachedApp] = {}


@contextlib.contextmanager
def _cached_command(cli: Any) -> Iterator[None]:
    app = cli.app
    if id(app) not in _cached:
        _cached[id(app)] = _CachedApp(app)
    cli.app = _cached[id(app)]
    try:
        yield
    finally:
        cli.app = app


@dataclass
class Harness:
    """Runs cases and counts how each ended."""

    limit_s: float = 10.0
    counts: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def cli(self, args: list[str], what: str) -> tuple[int | None, str]:
        """One CLI call in-process; returns (exit code, stdout + stderr)."""
        from nnrun import cli

        out, err = io.StringIO(), io.StringIO()
        code: int | None = None
        outcome = "clean"
        argv = sys.argv
        sys.argv = ["nnrun", *args]
        try:
            with (
                _cached_command(cli),
                time_limit(self.limit_s),
                contextlib.redirect_stdout(out),
                contextlib.redirect_stderr(err),
            ):
                try:
                    cli.main()
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 1
        except Hang:
            outcome = "hang"
        except BaseException as e:  # noqa: BLE001 - anything escaping main is a bug
            outcome = "internal"
            err.write(f"escaped: {type(e).__name__}: {e}")
        finally:
            sys.argv = argv
        text = out.getvalue() + err.getvalue()
        if outcome == "clean" and (
            code not in (0, 1, 2) or "internal error" in text or "Traceback" in text
        ):
            outcome = "internal"
        if outcome == "clean" and code == 0:
            self.counts["accepted"] += 1
        self.record(outcome, what, f"exit {code}: {text[-600:]}")
        return code, text

    def call(self, fn: Callable[[], Any], what: str, clean: tuple[type, ...]) -> Any:
        """One library call; exceptions in `clean` are clean errors, others internal."""
        outcome, detail, result = "clean", "", None
        try:
            with time_limit(self.limit_s):
                result = fn()
            self.counts["accepted"] += 1
        except Hang:
            outcome = "hang"
        except clean as e:
            detail = str(e)
            if not detail.strip():
                outcome, detail = "internal", f"{type(e).__name__} without a message"
        except BaseException as e:  # noqa: BLE001
            outcome, detail = "internal", f"{type(e).__name__}: {e}"
        self.record(outcome, what, detail[-600:])
        return result

    def record(self, outcome: str, what: str, detail: str) -> None:
        self.counts["cases"] += 1
        self.counts[outcome] += 1
        if outcome != "clean":
            self.failures.append(f"[{outcome}] {what}\n{detail}")

    def summary(self, name: str) -> str:
        c = self.counts
        return (
            f"{name}: {c['cases']} cases, {c['clean']} clean ({c['accepted']} accepted, "
            f"{c['clean'] - c['accepted']} clear errors), {c['internal']} internal errors, "
            f"{c['hang']} hangs"
        )
