"""Adapter folders: adapter_config.json + adapter.safetensors. Never pickle.

Loading checks, in order, and fails with one line saying what is wrong and what to do: the folder and both files
exist, the config is valid JSON of a supported format version with every field of the right type and range
(`read_adapter_config`), the weights file is a readable safetensors file, the base model matches (a fingerprint
of its weights and the tensor shapes).

The weights file may also hold `draft_vocab` (int64, 1-D): the token ids drafts are restricted to
(`MTPModel.set_draft_vocab`). Adapters without it decode with the full vocabulary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file, save

from maskspec.errors import AdapterError
from maskspec.files import atomic_folder, atomic_write_bytes
from maskspec.hub import is_default_model
from maskspec.version import __version__

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from maskspec.model.mtp import MTPModel

FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
DRAFT_VOCAB_KEY = "draft_vocab"
DEFAULT_ADAPTER = "default"
SHIPPED_ADAPTER_DIR = Path(__file__).parent / "adapters" / "smollm2-135m-instruct"


@dataclass
class AdapterConfig:
    format_version: int
    k: int
    rank: int
    alpha: float
    dropout: float
    target_modules: list[str]
    sampler_shape: list[int]
    hidden_size: int
    base_model: str
    base_fingerprint: str
    dtype: str
    maskspec_version: str
    training: dict[str, Any] | None = None
    # Measured decoding defaults per device type, e.g. {"cpu": {"k": 2, "tree": 4, "measured": "..."}}: the k,
    # draft-tree size and step ("static": true for the static step) decoding uses when given neither k nor tree.
    # Optional; written by `maskspec tune` (or by hand).
    decoding: dict[str, Any] | None = None

    def mtp_kwargs(self) -> dict[str, Any]:
        """The adapter's shape as keyword arguments of `MTPConfig`."""
        return {"k": self.k, "rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": list(self.target_modules)}


def base_fingerprint(model: "PreTrainedModel") -> str:
    """A short hash of the base model's architecture and of samples of its weights. Rounded to bfloat16 so
    the same weights loaded in fp32 or bf16 give the same fingerprint."""
    cfg = model.config.get_text_config()
    h = hashlib.sha256()
    h.update(json.dumps([type(model).__name__, cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers]).encode())
    # Names as in the plain model, whether or not gated LoRA layers have been injected.
    params = {n.replace(".base.", "."): p for n, p in model.named_parameters() if "lora_" not in n}
    for name in sorted(params):
        h.update(f"{name}:{list(params[name].shape)}".encode())
    for name in sorted(params)[:4]:
        sample = params[name].detach().reshape(-1)[:2048].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def resolve_adapter(adapter: str | Path | None, model: str | None) -> Path | None:
    """None -> no adapter; "default" -> the adapter shipped for the embedded model; else a folder."""
    if adapter is None:
        return None
    if str(adapter) == DEFAULT_ADAPTER:
        if not is_default_model(model):
            raise AdapterError(f"no default adapter ships for model {model!r}; train one with `maskspec train` "
                               "and pass --adapter FOLDER")
        if not (SHIPPED_ADAPTER_DIR / WEIGHTS_FILE).is_file():
            raise AdapterError("this installation ships no default adapter; pass --adapter FOLDER")
        return SHIPPED_ADAPTER_DIR
    return Path(adapter)


def shipped_adapter_available() -> bool:
    return (SHIPPED_ADAPTER_DIR / WEIGHTS_FILE).is_file() and (SHIPPED_ADAPTER_DIR / CONFIG_FILE).is_file()


def shipped_adapter_for(model: str | None) -> str | None:
    """The adapter that goes with `model` when none is given: "default" (the shipped one) for the embedded default
    model when this installation ships it, else None."""
    return DEFAULT_ADAPTER if is_default_model(model) and shipped_adapter_available() else None


def adapter_files(mtp: "MTPModel", training: dict[str, Any] | None = None) -> dict[str, bytes]:
    """The files of `mtp`'s adapter folder by name, in the order they are written: the weights, then the config."""
    state = {name: t.detach().contiguous().cpu() for name, t in mtp.adapter_state_dict().items()}
    if mtp.draft_vocab is not None:
        state[DRAFT_VOCAB_KEY] = mtp.draft_vocab.detach().cpu()
    hidden = mtp.mask_embeddings.shape[1]
    config = AdapterConfig(
        format_version=FORMAT_VERSION, k=mtp.config.k, rank=mtp.config.rank, alpha=mtp.config.alpha,
        dropout=mtp.config.dropout, target_modules=list(mtp.config.target_modules),
        sampler_shape=[2 * hidden, hidden, hidden], hidden_size=hidden, base_model=mtp.model_name,
        base_fingerprint=base_fingerprint(mtp.model), dtype=str(mtp.mask_embeddings.dtype).replace("torch.", ""),
        maskspec_version=__version__, training=training,
    )
    return {WEIGHTS_FILE: save(state, metadata={"format": "pt", "maskspec_format": str(FORMAT_VERSION)}),
            CONFIG_FILE: (json.dumps(config.__dict__, indent=2) + "\n").encode()}


def save_adapter(mtp: "MTPModel", folder: str | Path, training: dict[str, Any] | None = None) -> Path:
    """Write the adapter folder atomically: a temporary sibling folder is filled, then replaces `folder`."""
    folder = Path(folder)
    files = adapter_files(mtp, training)
    with atomic_folder(folder) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    return folder


def read_adapter_config(folder: str | Path) -> AdapterConfig:
    folder = Path(folder)
    if not folder.exists():
        raise AdapterError(f"adapter folder {folder} does not exist; pass the folder written by `maskspec train`")
    if not folder.is_dir():
        raise AdapterError(f"adapter path {folder} is a file; pass the folder that holds {CONFIG_FILE}")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise AdapterError(f"adapter folder {folder} has no {name}; it is not a complete maskspec adapter")
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{folder / CONFIG_FILE} is not valid JSON ({exc}); re-save or re-train the adapter") \
            from None
    except OSError as exc:
        raise AdapterError(f"{folder / CONFIG_FILE} cannot be read ({exc.strerror})") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{folder / CONFIG_FILE} must hold a JSON object")
    version = raw.get("format_version")
    if not _is_int(version) or version != FORMAT_VERSION:
        raise AdapterError(f"adapter format version {_json(version)} is not supported (this maskspec reads version "
                           f"{FORMAT_VERSION}); upgrade maskspec or re-train the adapter")
    missing = [name for name, f in AdapterConfig.__dataclass_fields__.items()
               if name not in raw and f.default is dataclasses.MISSING]
    if missing:
        raise AdapterError(f"{folder / CONFIG_FILE} is missing field(s) {', '.join(map(repr, missing))}; it is not "
                           "a complete maskspec adapter config (re-save or re-train the adapter)")
    values = {name: raw[name] for name in AdapterConfig.__dataclass_fields__ if name in raw}
    problem = _config_problem(values)
    if problem is not None:
        field_name, what, value = problem
        raise AdapterError(f"{folder / CONFIG_FILE}: field {field_name!r} {what}, got {_json(value)}; fix the file "
                           "or re-train the adapter")
    values["alpha"] = float(values["alpha"])
    values["dropout"] = float(values["dropout"])
    return AdapterConfig(**values)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _json(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _config_problem(values: dict[str, Any]) -> tuple[str, str, Any] | None:
    """The first field of an adapter config whose JSON value has the wrong type or range: its name, what it must
    be, and the value found."""
    for name in ("k", "rank", "hidden_size"):
        if not _is_int(values[name]) or values[name] < 1:
            return name, "must be an integer >= 1", values[name]
    if not _is_number(values["alpha"]):
        return "alpha", "must be a finite number", values["alpha"]
    if not _is_number(values["dropout"]) or not 0 <= values["dropout"] < 1:
        return "dropout", "must be a number in [0, 1)", values["dropout"]
    modules = values["target_modules"]
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) and m for m in modules):
        return "target_modules", "must be a non-empty list of module names (strings)", modules
    shape = values["sampler_shape"]
    if not isinstance(shape, list) or len(shape) != 3 or not all(_is_int(n) and n >= 1 for n in shape):
        return "sampler_shape", "must be a list of 3 integers >= 1", shape
    for name in ("base_model", "base_fingerprint", "dtype", "maskspec_version"):
        if not isinstance(values[name], str):
            return name, "must be a string", values[name]
    if values.get("training") is not None and not isinstance(values["training"], dict):
        return "training", "must be an object or null", values["training"]
    decoding = values.get("decoding")
    if decoding is None:
        return None
    if not isinstance(decoding, dict):
        return "decoding", 'must be an object of device types, e.g. {"cpu": {"k": 2}}, or null', decoding
    for device, entry in decoding.items():
        if not isinstance(entry, dict):
            return f"decoding.{device}", 'must be an object, e.g. {"k": 2}', entry
        if "k" in entry and (not _is_int(entry["k"]) or not 1 <= entry["k"] <= values["k"]):
            return f"decoding.{device}.k", f"must be an integer from 1 to the adapter's k ({values['k']})", entry["k"]
        if "tree" in entry and (not _is_int(entry["tree"]) or entry["tree"] < 0):
            return f"decoding.{device}.tree", "must be an integer >= 0 (0: a chain)", entry["tree"]
        if "static" in entry and not isinstance(entry["static"], bool):
            return f"decoding.{device}.static", "must be true or false (the static step)", entry["static"]
    return None


def write_decoding_defaults(folder: str | Path, device_type: str, entry: dict[str, Any]) -> Path:
    """Record the decoding defaults for one device type ({"k": ..., "tree": ..., "measured": ...}) in an adapter's
    config, atomically, keeping every other field. The result is checked as `read_adapter_config` checks it."""
    folder = Path(folder)
    read_adapter_config(folder)  # a complete, valid adapter first
    path = folder / CONFIG_FILE
    raw = json.loads(path.read_text())
    raw["decoding"] = dict(raw.get("decoding") or {})
    raw["decoding"][device_type] = entry
    values = {name: raw[name] for name in AdapterConfig.__dataclass_fields__ if name in raw}
    problem = _config_problem(values)
    if problem is not None:
        raise AdapterError(f"decoding defaults {_json(entry)} are not valid: field {problem[0]!r} {problem[1]}")
    try:
        atomic_write_bytes(path, (json.dumps(raw, indent=2) + "\n").encode())
    except OSError as exc:
        raise AdapterError(f"cannot write {path} ({exc.strerror}); copy the adapter folder somewhere writable and "
                           "pass it with --adapter") from None
    return path


def load_adapter(mtp: "MTPModel", folder: str | Path, check_fingerprint: bool = True) -> AdapterConfig:
    """Load weights from `folder` into `mtp` (whose shape must match the adapter's config)."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    if check_fingerprint:
        fingerprint = base_fingerprint(mtp.model)
        if config.base_fingerprint != fingerprint:
            raise AdapterError(f"adapter {folder} was made for base model {config.base_model!r} (fingerprint "
                               f"{config.base_fingerprint}), not for the loaded {mtp.model_name!r} ({fingerprint}); "
                               "load the matching base model or train an adapter for this one")
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{folder / WEIGHTS_FILE} is corrupt or truncated ({exc}); re-save or re-train the "
                           "adapter") from None
    draft_vocab = tensors.pop(DRAFT_VOCAB_KEY, None)
    if draft_vocab is not None:
        check_draft_vocab(draft_vocab, mtp.vocab_size, folder / WEIGHTS_FILE)
    expected = mtp.adapter_state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterError(f"adapter {folder} does not fit this model: {len(missing)} tensors missing "
                           f"(e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]}); "
                           "it was made for another base model or target modules")
    for name, target in expected.items():
        if tensors[name].shape != target.shape:
            raise AdapterError(f"adapter {folder}: tensor {name} has shape {list(tensors[name].shape)}, the model "
                               f"needs {list(target.shape)}; it was made for another base model or k/rank")
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name].to(target.dtype))
    try:
        mtp.set_draft_vocab(draft_vocab)
    except ValueError as exc:
        raise AdapterError(f"adapter {folder}: {exc}") from None
    mtp.decoding_defaults = dict(config.decoding or {})
    return config


def check_draft_vocab(ids: torch.Tensor, vocab_size: int, where: str | Path) -> None:
    """A draft vocabulary as stored: a non-empty 1-D int64 tensor of ids of the output head. AdapterError if not."""
    if ids.dtype != torch.int64 or ids.dim() != 1:
        raise AdapterError(f"{where}: {DRAFT_VOCAB_KEY} must be a 1-D int64 tensor of token ids, got "
                           f"{str(ids.dtype).replace('torch.', '')} of shape {list(ids.shape)}; rewrite it with "
                           "`maskspec draft-vocab`")
    if ids.numel() == 0:
        raise AdapterError(f"{where}: {DRAFT_VOCAB_KEY} is empty; rewrite it with `maskspec draft-vocab` (--size 0 "
                           "removes it)")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise AdapterError(f"{where}: {DRAFT_VOCAB_KEY} holds id {low if low < 0 else high}, outside the model's "
                           f"vocabulary 0..{vocab_size - 1}; it was made for another model")


def write_draft_vocab(folder: str | Path, ids: Sequence[int] | torch.Tensor | None, vocab_size: int) -> Path:
    """Set (or with None remove) the draft vocabulary of an existing adapter folder. The weights file is rewritten
    atomically and keeps its metadata and file mode."""
    folder = Path(folder)
    read_adapter_config(folder)
    path = folder / WEIGHTS_FILE
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{path} is corrupt or truncated ({exc}); re-save or re-train the adapter") from None
    tensors.pop(DRAFT_VOCAB_KEY, None)
    if ids is not None:
        vocab = torch.unique(torch.as_tensor(ids, dtype=torch.int64).reshape(-1))
        check_draft_vocab(vocab, vocab_size, path)
        tensors[DRAFT_VOCAB_KEY] = vocab
    atomic_write_bytes(path, save(tensors, metadata=metadata))  # keeps the file's mode
    return path
