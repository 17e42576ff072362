"""Provenance attributes: enough to know later exactly what produced a file."""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
import sys
import threading
from collections.abc import Callable
from importlib import metadata
from typing import Any


def provenance(
    spec_text: str,
    seed: int,
    model_attrs: dict[str, str],
    device: str,
    git: Callable[[], tuple[str, bool]] | None = None,
) -> dict[str, Any]:
    """Root attributes of an output file (versions, spec and its hash, git state).

    `git` gives the git state asked for earlier (see `git_state_later`).
    """
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
    commit, dirty = (git or _git_state)()
    attrs["git_commit"] = commit
    attrs["git_dirty"] = dirty
    return attrs


@functools.cache
def _version(package: str) -> str:
    # Once per process: the modules that run are the ones imported first.
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def git_state_later() -> Callable[[], tuple[str, bool]]:
    """Start asking git for the working directory's state; call the result for it.

    Two git processes take tens of milliseconds: a run asks before loading its model.
    """
    found: list[tuple[str, bool]] = []
    thread = threading.Thread(target=lambda: found.append(_git_state()), daemon=True)
    thread.start()

    def result() -> tuple[str, bool]:
        thread.join()
        return found[0] if found else ("", False)

    return result


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
