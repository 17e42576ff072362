"""load_model: the spec's ``model:`` mapping -> model + tokenizer + provenance."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from nnrun.errors import ModelError
from nnrun.models._builtin import builtin_checkpoint, builtin_names
from nnrun.models._hf import auto_class, load_gguf, load_gguf_tokenizer, one_line, quiet_loading
from nnrun.models._info import (
    LoadedModel,
    ModelInfo,
    config_sha256,
    remember_info,
    weights_files_sha256,
)

SOURCE_KEYS: tuple[str, ...] = ("path", "id", "gguf", "builtin")
DTYPE_NAMES: tuple[str, ...] = ("float32", "float16", "bfloat16", "float64", "auto")
DEFAULT_CLASS = "AutoModelForCausalLM"

# A failed hub lookup should cost seconds, not the minute of retries huggingface_hub
# does inside from_pretrained when the network is down.
_HUB_PROBE_TIMEOUT_S = 10.0

_DEVICE_RE = re.compile(r"cuda(:\d+)?")


def load_model(
    model_spec: Mapping[str, Any], *, progress: Callable[[str], None] | None = None
) -> LoadedModel:
    """Load the model and tokenizer named by a spec's ``model:`` mapping.

    Exactly one of ``path`` (local directory), ``id`` (hub id), ``gguf`` (a .gguf
    file) or ``builtin`` names the model. The model comes back in eval mode with
    gradients off, on its device (or placed by accelerate when ``device_map`` is
    given); the tokenizer always has a pad token. Every user-facing failure raises
    ModelError with the reason on one line. ``progress`` receives short messages
    about slow steps (a first conversion, GGUF dequantization).
    """
    import torch

    source, name = _source_of(model_spec)
    new_modules: tuple[str, ...] = ()
    cls_name = model_spec.get("class") or DEFAULT_CLASS
    cls = auto_class(str(cls_name))
    dtype = _torch_dtype(model_spec.get("dtype") or "float32")
    device_map = model_spec.get("device_map")
    device = None if device_map is not None else _resolve_device(model_spec.get("device") or "auto")
    revision = model_spec.get("revision")
    revision = None if revision is None else str(revision)
    trust = model_spec.get("trust_remote_code", False)
    if not isinstance(trust, bool):
        raise ModelError(f"model.trust_remote_code must be true or false, not {trust!r}")

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust}
    kwargs.update(placement_kwargs(model_spec))
    if model_spec.get("attn_implementation"):  # absent: the model's own default
        kwargs["attn_implementation"] = str(model_spec["attn_implementation"])
    tok_kwargs: dict[str, Any] = {"trust_remote_code": trust}

    if source == "id":
        model = _from_hub(cls.from_pretrained, name, revision, kwargs, what="model")
        resolved = _hub_snapshot_dir(name, revision)
        default_tok: Callable[[], Any] = partial(
            _from_hub, _auto_tokenizer, name, revision, tok_kwargs, what="tokenizer"
        )
    elif source == "gguf":
        file = _existing_file(name, "GGUF file")
        resolved = file
        if progress is not None:
            progress(f"dequantizing GGUF file {file} ...")
        try:
            model = load_gguf(cls, file, **kwargs)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"could not load the GGUF file {file}: {one_line(exc)}") from exc
        default_tok = partial(
            _guarded, load_gguf_tokenizer, file, what=f"the tokenizer in {file}", **tok_kwargs
        )
    else:
        if source == "builtin":
            if name not in builtin_names():
                raise ModelError(
                    f"unknown builtin model {name!r}; available: {', '.join(builtin_names())}"
                )
            directory = builtin_checkpoint(name, progress=progress)
        else:
            directory = _existing_dir(name)
        resolved = directory
        model, loading = _guarded(
            cls.from_pretrained,
            str(directory),
            what=f"the model in {directory}",
            output_loading_info=True,
            **kwargs,
        )
        new_modules = _new_modules(model, loading.get("missing_keys", ()))
        default_tok = partial(
            _guarded,
            _auto_tokenizer,
            str(directory),
            what=f"the tokenizer in {directory}",
            **tok_kwargs,
        )

    tok_name = model_spec.get("tokenizer")
    tokenizer = default_tok() if tok_name is None else _load_tokenizer(str(tok_name), tok_kwargs)
    _ensure_pad_token(tokenizer)

    # Hash before anything below touches the config.
    cfg_hash = config_sha256(model.config)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    if device is not None:
        try:
            model.to(device)
        except (RuntimeError, ValueError) as exc:
            raise ModelError(f"could not move the model to {device}: {one_line(exc)}") from exc
    gen_config = getattr(model, "generation_config", None)
    if gen_config is not None and getattr(gen_config, "pad_token_id", 0) is None:
        # Saves generate() from warning on every call that it picked a pad id itself.
        gen_config.pad_token_id = tokenizer.pad_token_id

    info = ModelInfo(
        source=source,
        name=name,
        resolved_path=str(resolved),
        revision=revision,
        config_sha256=cfg_hash,
        weights_files_sha256=weights_files_sha256(resolved) if isinstance(resolved, Path) else "",
        model_class=type(model).__name__,
        dtype=str(getattr(model, "dtype", torch.float32)).removeprefix("torch."),
        device=_mapped_device(model) if device is None else _actual_device(model, device),
    )
    if new_modules and progress is not None:
        progress(
            f"{type(model).__name__} added {', '.join(new_modules)} with random weights "
            f"(not in the checkpoint); model.class: AutoModel loads the model without them"
        )
    remember_info(model, info)
    return LoadedModel(model=model, tokenizer=tokenizer, info=info, new_modules=new_modules)


def _new_modules(model: Any, missing: Any) -> tuple[str, ...]:
    """What was missing from the checkpoint: the largest modules none of whose parameters
    were there, then any other missing parameter."""
    missing = set(missing)
    if not missing:
        return ()
    found: list[str] = []
    for name, module in model.named_modules():
        params = [f"{name}.{p}" if name else p for p, _ in module.named_parameters()]
        inside = any(name == f or name.startswith(f"{f}.") for f in found)
        if params and not inside and all(p in missing for p in params):
            found.append(name or "(model)")
    rest = [p for p in sorted(missing) if not any(p.startswith(f"{f}.") for f in found)]
    return tuple(found + rest)


def load_tokenizer(model_spec: Mapping[str, Any]) -> Any:
    """Only the tokenizer a spec's ``model:`` mapping names (for `nnrun tokens`).

    Loads no weights; a builtin model must have been converted once (any run does it).
    """
    source, name = _source_of(model_spec)
    trust = model_spec.get("trust_remote_code", False) is True
    kwargs: dict[str, Any] = {"trust_remote_code": trust}
    tok_name = model_spec.get("tokenizer")
    if tok_name is not None:
        tokenizer = _load_tokenizer(str(tok_name), kwargs)
    elif source == "gguf":
        file = _existing_file(name, "GGUF file")
        tokenizer = _guarded(load_gguf_tokenizer, file, what=f"the tokenizer in {file}", **kwargs)
    elif source == "id":
        revision = model_spec.get("revision")
        tokenizer = _from_hub(
            _auto_tokenizer,
            name,
            None if revision is None else str(revision),
            kwargs,
            what="tokenizer",
        )
    else:
        directory = builtin_checkpoint(name) if source == "builtin" else _existing_dir(name)
        tokenizer = _guarded(
            _auto_tokenizer, str(directory), what=f"the tokenizer in {directory}", **kwargs
        )
    _ensure_pad_token(tokenizer)
    return tokenizer


# -- spec values ---------------------------------------------------------------------


def _source_of(model_spec: Mapping[str, Any]) -> tuple[str, str]:
    given = [key for key in SOURCE_KEYS if model_spec.get(key) not in (None, "")]
    if len(given) != 1:
        what = "none" if not given else ", ".join(given)
        raise ModelError(f"model needs exactly one of {', '.join(SOURCE_KEYS)} (got {what})")
    return given[0], str(model_spec[given[0]])


def _torch_dtype(name: Any) -> Any:
    import torch

    table = {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "float64": torch.float64,
        "auto": "auto",  # transformers takes the checkpoint's own dtype
    }
    if name not in table:
        raise ModelError(f"model.dtype {name!r} is not one of {', '.join(DTYPE_NAMES)}")
    return table[name]


def _resolve_device(value: Any) -> str:
    import torch

    device = str(value)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ModelError(
                "model.device is 'mps' but this torch has no usable MPS (Apple GPU) backend"
            )
        return device
    if _DEVICE_RE.fullmatch(device):
        if not torch.cuda.is_available():
            raise ModelError(
                f"model.device is {device!r} but torch {torch.__version__} sees no CUDA GPU; "
                "use device: cpu (or auto)"
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ModelError(
                f"model.device is {device!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return device
    raise ModelError(f"model.device {device!r} is not one of auto, cpu, mps, cuda, cuda:N")


def placement_kwargs(model_spec: Mapping[str, Any]) -> dict[str, Any]:
    """from_pretrained's device_map, max_memory and offload_folder, as accelerate takes them.

    Strategy names (auto, balanced, ...) pass through; in a mapping and in max_memory
    GPUs become numbers (`cuda:1`, `"1"` -> 1), which is how accelerate names them.
    """
    from nnrun.spec._devices import accelerate_device

    device_map = model_spec.get("device_map")
    if device_map is None:
        return {}
    out: dict[str, Any] = {"device_map": device_map}
    if isinstance(device_map, Mapping):
        out["device_map"] = {str(k): accelerate_device(v) for k, v in device_map.items()}
    memory = model_spec.get("max_memory")
    if isinstance(memory, Mapping):
        out["max_memory"] = {accelerate_device(k): v for k, v in memory.items()}
    folder = model_spec.get("offload_folder")
    if folder:
        out["offload_folder"] = str(Path(str(folder)).expanduser())
    return out


def _mapped_device(model: Any) -> str:
    """`device_map {...}`: where accelerate put each module (provenance)."""
    import json

    placed = getattr(model, "hf_device_map", None)
    if not placed:  # a map that names one device: transformers just moves the model there
        return "device_map " + _actual_device(model, "cpu")
    return "device_map " + json.dumps({k: str(v) for k, v in placed.items()})


def _actual_device(model: Any, fallback: str) -> str:
    for param in model.parameters():
        return str(param.device)  # "cuda" becomes "cuda:0": record where it really is
    return fallback


def _existing_dir(name: str) -> Path:
    directory = Path(name).expanduser()
    # os.path answers False for names the OS refuses (too long, NUL), where Path raises.
    if not os.path.exists(directory):
        raise ModelError(f"model directory {name!r} does not exist ({directory.absolute()})")
    if not os.path.isdir(directory):
        hint = "; for a GGUF file use `model: {gguf: FILE}`" if directory.suffix == ".gguf" else ""
        raise ModelError(f"model.path {name!r} is a file, not a model directory{hint}")
    if not os.path.isfile(directory / "config.json"):
        raise ModelError(
            f"model directory {name!r} has no config.json; is it a transformers checkpoint?"
        )
    return directory.resolve()


def _existing_file(name: str, key: str) -> Path:
    file = Path(name).expanduser()
    if not os.path.isfile(file):
        state = "is a directory" if os.path.isdir(file) else "does not exist"
        raise ModelError(f"{key} {name!r} {state} ({file.absolute()})")
    return file.resolve()


# -- loading -------------------------------------------------------------------------


def _auto_tokenizer(name: str, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, **kwargs)


def _guarded(loader: Callable[..., Any], *args: Any, what: str, **kwargs: Any) -> Any:
    """Call a transformers loader; any failure becomes a one-line ModelError."""
    try:
        with quiet_loading():
            return loader(*args, **kwargs)
    except ModelError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... here
        raise ModelError(f"could not load {what}: {one_line(exc)}") from exc


def _load_tokenizer(name: str, kwargs: dict[str, Any]) -> Any:
    local = Path(name).expanduser()
    if os.path.isfile(local) and local.suffix == ".gguf":
        return _guarded(load_gguf_tokenizer, local, what=f"the tokenizer in {local}", **kwargs)
    if os.path.isdir(local):
        return _guarded(_auto_tokenizer, str(local), what=f"the tokenizer in {local}", **kwargs)
    # Not a local path, so it names a hub repository.
    return _from_hub(_auto_tokenizer, name, None, kwargs, what="tokenizer")


def _from_hub(
    loader: Callable[..., Any],
    repo_id: str,
    revision: str | None,
    kwargs: dict[str, Any],
    *,
    what: str,
) -> Any:
    """Load from the hub, failing within seconds when it cannot be reached.

    A copy already in the local Hugging Face cache is used when the hub is down, as
    transformers itself would do, only without its minute of retries first.
    """
    from huggingface_hub import constants

    kw = dict(kwargs)
    if revision is not None:
        kw["revision"] = revision
    if constants.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE is set"
    else:
        reason = _probe_hub(repo_id, revision)
        if reason is None:
            return _guarded(loader, repo_id, what=f"{what} {repo_id!r} from the hub", **kw)
    try:
        with quiet_loading():
            return loader(repo_id, local_files_only=True, **kw)
    except Exception as exc:
        raise ModelError(
            f"could not download {repo_id!r} from the Hugging Face hub (no network or no such "
            f"model): {reason}; if you have the files locally, use `model: {{path: DIR}}`"
        ) from exc


def _probe_hub(repo_id: str, revision: str | None) -> str | None:
    """None when the hub knows the repository; a reason when the hub cannot be reached.

    Answers from the hub that settle the matter (no such repository, revision or
    access) raise ModelError right away.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hint = "if you have the files locally, use `model: {path: DIR}`"
    try:
        HfApi().model_info(repo_id, revision=revision, timeout=_HUB_PROBE_TIMEOUT_S)
    except GatedRepoError as exc:
        raise ModelError(
            f"{repo_id!r} is gated on the Hugging Face hub: accept its terms there and log in "
            f"(`hf auth login`); {hint}"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelError(
            f"no model {repo_id!r} on the Hugging Face hub (or it is private: log in with "
            f"`hf auth login`); {hint}"
        ) from exc
    except RevisionNotFoundError as exc:
        raise ModelError(f"revision {revision!r} of {repo_id!r} not found on the hub") from exc
    except ValueError as exc:  # HFValidationError: not of the form org/name
        raise ModelError(
            f"{repo_id!r} is not a valid hub model id ({one_line(exc)}); {hint}"
        ) from exc
    except HfHubHTTPError as exc:  # 5xx and the like: treat as unreachable
        return one_line(exc)
    except Exception as exc:  # connection refused, DNS failure, timeout, proxy, ...
        return f"{type(exc).__name__}: {one_line(exc)}"
    return None


def _hub_snapshot_dir(repo_id: str, revision: str | None) -> Path | str:
    """The local snapshot directory that from_pretrained used, when it can be found."""
    try:
        from transformers.utils import cached_file

        config = cached_file(repo_id, "config.json", revision=revision, local_files_only=True)
    except Exception:  # provenance only: fall back to the id
        return repo_id
    return Path(config).parent if config else repo_id


def _ensure_pad_token(tokenizer: Any) -> None:
    """Give the tokenizer a pad token without adding one to its vocabulary.

    A new token would change the vocabulary and the embedding matrix. Reusing an
    existing token is harmless because the attention mask hides padded positions.
    """
    if tokenizer.pad_token is not None:
        return
    for attr in ("eos_token", "unk_token", "bos_token"):
        token = getattr(tokenizer, attr, None)
        if token is not None:
            tokenizer.pad_token = token
            return
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
