"""Provenance attributes: enough to know later exactly what produced a file."""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any


def provenance(
    spec_text: str, seed: int, model_attrs: dict[str, str], device: str
) -> dict[str, Any]:
    """Root attributes of an output file (versions, spec and its hash, git state)."""
    attrs: dict[str, Any] = {
        "nnrun_version": _version("nnrun"),
        "spec": spec_text,
        "spec_sha256": hashlib.sha256(spec_text.encode()).hexdigest(),
        "seed": seed,
        "device": device,
        "python_version": platform.python_version(),
        "torch_version": _version("torch"),
        "transformers_version": _version("transformers"),
        "h5py_version": _version("h5py"),
        "command": " ".join(sys.argv),
        **model_attrs,
    }
    commit, dirty = _git_state()
    attrs["git_commit"] = commit
    attrs["git_dirty"] = dirty
    return attrs


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _git_state() -> tuple[str, bool]:
    """The working directory's git commit and whether it has local changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return "", False
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return commit.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        return "", False
