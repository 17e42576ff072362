"""The probe pass's answer kept on disk: module order and value shapes per model files.

The probe pass (see `probe_sites`) is a real forward pass with a hook on every
module; on a small model with short prompts it costs as much as the experiment's
own pass. Its answer depends only on the model, so it is kept in
`$NNRUN_CACHE/probes/<key>.json`, where the key covers everything that could change
it: the model's class and module tree, its config, dtype and attention
implementation, the probe token, the torch/transformers/nnrun versions, and the
files it was loaded from (names, sizes, modification times and sampled bytes). A
file that cannot be read, or that does not fit the model, is ignored and the model
is probed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

_FORMAT = 1


def probe_key(model: nn.Module, token: int) -> str | None:
    """The cache key of a model loaded by `load_model` (None for any other model)."""
    from nnrun.models._info import info_of, weight_files

    info = info_of(model)
    if info is None or not info.resolved_path:
        return None
    import torch
    import transformers

    import nnrun

    location = Path(info.resolved_path)
    files = []
    for path in [*weight_files(location), location / "config.json"]:
        try:
            stat = path.stat()
        except OSError:
            continue
        files.append([path.name, stat.st_size, stat.st_mtime_ns])
    config = getattr(model, "config", None)
    parameter = next(model.parameters(), None)
    tree = hashlib.sha256()
    for name, module in model.named_modules():
        tree.update(f"{name}\0{type(module).__module__}.{type(module).__qualname__}\n".encode())
    parts = {
        "format": _FORMAT,
        "versions": [nnrun.__version__, torch.__version__, transformers.__version__],
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "tree": tree.hexdigest(),
        "config": info.config_sha256,
        "weights": info.weights_files_sha256,
        "files": files,
        "dtype": None if parameter is None else str(parameter.dtype),
        "attention": str(getattr(config, "_attn_implementation", None)),
        "token": token,
    }
    text = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _directory() -> Path:
    from nnrun.models import cache_dir

    return cache_dir() / "probes"


def load_probe(key: str, model: nn.Module) -> dict[tuple[str, str], Any] | None:
    """The probe answer stored under `key`, if it is there and fits `model`."""
    from nnrun.compile._probe import SiteInfo

    try:
        with open(_directory() / f"{key}.json", encoding="utf-8") as f:
            data = json.load(f)
        if data.get("format") != _FORMAT:
            return None
        modules = {name for name, _ in model.named_modules()}
        sites = {}
        for name, port, rank, shape in data["sites"]:
            if name not in modules or port not in ("input", "output") or type(rank) is not int:
                return None
            sites[(name, port)] = SiteInfo(rank=rank, shape=_shape(shape))
        if sorted(info.rank for info in sites.values()) != list(range(len(sites))):
            return None
        return sites
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None  # absent, unreadable or not ours: probe again


def store_probe(key: str, sites: dict[tuple[str, str], Any]) -> None:
    """Keep a probe answer for the next run (quietly nothing where the cache is read-only)."""
    rows = [[name, port, info.rank, info.shape] for (name, port), info in sites.items()]
    text = json.dumps({"format": _FORMAT, "sites": rows})
    directory = _directory()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{key}.", suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, directory / f"{key}.json")  # whole files only, even with two runs
    except OSError:
        Path(tmp).unlink(missing_ok=True)


def _shape(value: Any) -> Any:
    """A stored shape back as probe_sites gives it: int tuples, tuples of those, None."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise TypeError("not a shape")
    if all(type(v) is int for v in value):
        return tuple(value)
    return tuple(_shape(v) for v in value)
