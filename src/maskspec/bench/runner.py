"""Running the benchmark: every method on the same chat-templated input, interleaved per prompt.

Methods:
- `hf`: Hugging Face `generate`, greedy (or sampling with --temperature): the baseline every speed-up refers to;
- `hf-prompt-lookup`: Hugging Face prompt-lookup decoding (`prompt_lookup_num_tokens`);
- `hf-static`: Hugging Face greedy with its static cache, which on a GPU it also compiles (`torch.compile` of the
  decoding forward); warmed on the longest prompt first, so no timed call compiles;
- `ar`: maskspec's own reference loop (same code path as the drafting modes, no drafts);
- `maskspec`: self-speculative decoding in mode `quadratic` or `linear` with k drafts (quadratic: also with draft
  trees of up to `tree` nodes). `static` runs ar, the chains and the trees also with the static step
  (`decode.static`: a CUDA graph per step on a GPU; the same drafts), labelled "... static".

Each generation is timed by the wall clock around the call (after `torch.cuda.synchronize` on a GPU). Forward
passes of the HF methods are counted with a forward hook on the base model (the prefill counts as one); the
maskspec methods report their own count. The gated LoRA is off outside maskspec's own forward, so
`mtp.model.generate` is the plain base model.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch

from maskspec.bench.suites import BenchPrompt
from maskspec.decode.steps import DRAFT_MODES
from maskspec.decode.stopping import cut_at_eos
from maskspec.errors import MaskspecError

HF = "hf"
HF_PROMPT_LOOKUP = "hf-prompt-lookup"
HF_STATIC = "hf-static"
AR = "ar"
MASKSPEC = "maskspec"
BASELINES = (HF, HF_PROMPT_LOOKUP, HF_STATIC)


def method_label(method: str, mode: str | None, k: int | None, tree: int = 0, static: bool = False) -> str:
    suffix = " static" if static else ""
    if method != MASKSPEC:
        return method + suffix
    return f"{mode} k={k}" + (f" tree={tree}" if tree else "") + suffix


@dataclass(frozen=True)
class Method:
    """One decoding method: `method` is hf | hf-prompt-lookup | hf-static | ar | maskspec; mode, k and tree only
    for maskspec (mode "ar" for the reference loop; tree 0: a chain); `static`: ar or a chain with the static
    step."""

    method: str
    mode: str | None = None
    k: int | None = None
    tree: int = 0
    static: bool = False

    @property
    def label(self) -> str:
        return method_label(self.method, self.mode, self.k, self.tree, self.static)

    @property
    def key(self) -> tuple[str, str | None, int | None, int, bool]:
        return (self.method, self.mode, self.k, self.tree, self.static)


@dataclass
class RunRecord:
    """One timed generation."""

    prompt_id: str
    domain: str
    method: str
    mode: str | None
    k: int | None
    repeat: int
    new_tokens: int
    forward_passes: int | None
    seconds: float
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    reference: str | None = None
    tree: int = 0
    static: bool = False

    @property
    def key(self) -> tuple[str, str | None, int | None, int, bool]:
        return (self.method, self.mode, self.k, self.tree, self.static)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BenchSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0
    repeats: int = 1
    prompt_lookup_tokens: int = 10
    warmup_tokens: int = 16
    seed: int = 0


def build_methods(modes: Iterable[str], ks: Iterable[int], baselines: Iterable[str],
                  max_k: int | None, trees: Iterable[int] = (0,),
                  static: bool = False) -> tuple[list[Method], list[int]]:
    """The method list in run order (hf first: it is the baseline) and the ks skipped because they exceed the
    adapter's k. `max_k=None` means no drafting adapter: only baselines and mode ar. Quadratic decoding runs
    once per tree size in `trees` (0: the chain); linear decoding drafts chains only. With `static`, ar and each
    quadratic chain and tree also run with the static step, right after their usual step."""
    trees = list(trees)
    methods = [Method(HF)]
    for baseline in (HF_PROMPT_LOOKUP, HF_STATIC):
        if baseline in baselines:
            methods.append(Method(baseline))
    modes = list(modes)
    if AR in modes:
        methods.append(Method(AR, AR, None))
        if static:
            methods.append(Method(AR, AR, None, static=True))
    skipped: list[int] = []
    if max_k is not None:
        for mode in (m for m in DRAFT_MODES if m in modes):
            for k in ks:
                if k > max_k:
                    if k not in skipped:
                        skipped.append(k)
                    continue
                for tree in (trees if mode == "quadratic" else [0]):
                    methods.append(Method(MASKSPEC, mode, k, tree))
                    if static and mode == "quadratic":
                        methods.append(Method(MASKSPEC, mode, k, tree, static=True))
    return methods, skipped


def truncate_at_eos(ids: list[int], eos_ids: Iterable[int]) -> list[int]:
    """The tokens up to and including the first end-of-sequence token (HF generate keeps the EOS)."""
    return cut_at_eos(ids, eos_ids)[0]


class _PassCounter:
    """Counts calls of a module's forward while active."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.count = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.count += 1

    def close(self) -> None:
        self._handle.remove()


class BenchRunner:
    """Runs methods on prompts for one loaded MTPModel."""

    def __init__(self, mtp: Any, settings: BenchSettings) -> None:
        self.mtp = mtp
        self.settings = settings
        self.device = torch.device(mtp.device)
        tokenizer = mtp.tokenizer
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self.pad_token_id = pad if pad is not None else (mtp.eos_token_ids[0] if mtp.eos_token_ids else 0)

    # ------------------------------------------------------------------ helpers
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def input_ids(self, prompt: BenchPrompt) -> torch.Tensor:
        from maskspec.decode.api import prepare_input_ids

        return prepare_input_ids(self.mtp, prompt.messages).to(self.device)

    def decode(self, ids: list[int]) -> str:
        if self.mtp.tokenizer is None:
            return ""
        return self.mtp.tokenizer.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ one generation
    def generate(self, method: Method, input_ids: torch.Tensor, max_new_tokens: int,
                 seed: int) -> tuple[list[int], int | None, float]:
        """Run one method once: (new token ids up to the first EOS, forward passes, wall seconds)."""
        s = self.settings
        if method.method in BASELINES:
            kwargs: dict[str, Any] = dict(
                attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                eos_token_id=list(self.mtp.eos_token_ids) or None, pad_token_id=self.pad_token_id,
            )
            if s.temperature > 0:
                kwargs.update(do_sample=True, temperature=s.temperature, top_p=1.0, top_k=0)
            else:
                kwargs.update(do_sample=False)
            if method.method == HF_PROMPT_LOOKUP:
                kwargs["prompt_lookup_num_tokens"] = s.prompt_lookup_tokens
            if method.method == HF_STATIC:
                kwargs["cache_implementation"] = "static"
            counter = _PassCounter(self.mtp.model)
            try:
                if s.temperature > 0:
                    torch.manual_seed(seed)
                self._sync()
                start = time.perf_counter()
                with torch.inference_mode():
                    out = self.mtp.model.generate(input_ids, **kwargs)
                self._sync()
                seconds = time.perf_counter() - start
            finally:
                counter.close()
            new = out[0, input_ids.shape[1]:].tolist()
            return truncate_at_eos(new, self.mtp.eos_token_ids), counter.count, seconds

        from maskspec.decode.api import generate

        self._sync()
        start = time.perf_counter()
        out = generate(self.mtp, input_ids, max_new_tokens=max_new_tokens, mode=method.mode, k=method.k,
                       tree=method.tree, temperature=s.temperature, seed=seed if s.temperature > 0 else None,
                       static=method.static)
        self._sync()
        seconds = time.perf_counter() - start
        return truncate_at_eos(list(out.new_token_ids), self.mtp.eos_token_ids), out.stats.forward_passes, seconds

    # ------------------------------------------------------------------ the benchmark
    def warm_up(self, methods: list[Method], prompt: BenchPrompt, longest: BenchPrompt | None = None) -> None:
        """Run every method once, untimed, with few tokens: first-call costs (allocations, kernels) go here.
        Methods with fixed-size state are also run once on `longest` (the longest prompt) with the full budget:
        hf-static then compiles for the largest cache the run needs (Hugging Face keeps the largest size seen),
        and the static step sizes its KV storage for every prompt, so no timed call compiles or captures."""
        ids = self.input_ids(prompt)
        for method in methods:
            self.generate(method, ids, min(self.settings.warmup_tokens, self.settings.max_new_tokens),
                          self.settings.seed)
        if longest is not None:
            ids = self.input_ids(longest)
            for method in methods:
                if method.method == HF_STATIC or method.static:
                    self.generate(method, ids, self.settings.max_new_tokens, self.settings.seed)

    def run(self, prompts: list[BenchPrompt], methods: list[Method],
            on_done: Callable[[RunRecord], None] | None = None,
            deadline: float | None = None) -> list[RunRecord]:
        """All methods on prompt 1 (every repeat), then prompt 2, ... so machine noise hits all methods alike.
        The method order rotates with the repeat index so no method is always first after a prompt switch.
        `deadline` (a `time.perf_counter()` value): no prompt is started after it, so every method has run on
        the same prompts."""
        if not methods or methods[0].method != HF:
            raise MaskspecError("the benchmark needs the hf baseline as its first method")
        s = self.settings
        records: list[RunRecord] = []
        for prompt in prompts:
            if deadline is not None and time.perf_counter() >= deadline:
                break
            ids = self.input_ids(prompt)
            for repeat in range(s.repeats):
                shift = repeat % len(methods)
                for method in methods[shift:] + methods[:shift]:
                    seed = s.seed + repeat
                    tokens, passes, seconds = self.generate(method, ids, s.max_new_tokens, seed)
                    record = RunRecord(prompt_id=prompt.id, domain=prompt.domain, method=method.method,
                                       mode=method.mode, k=method.k, repeat=repeat, new_tokens=len(tokens),
                                       forward_passes=passes, seconds=seconds, token_ids=tokens,
                                       text=self.decode(tokens), reference=prompt.reference, tree=method.tree,
                                       static=method.static)
                    records.append(record)
                    if on_done is not None:
                        on_done(record)
        return records


def system_info(device: torch.device | str, dtype: torch.dtype | str) -> dict[str, Any]:
    """Where the numbers come from: CPU, GPU, threads and library versions."""
    import os
    import platform

    import transformers

    from maskspec.version import __version__

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "device": str(device), "cpu": cpu, "cpu_count": os.cpu_count(), "gpu": gpu,
        "threads": torch.get_num_threads(), "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "transformers": transformers.__version__, "maskspec": __version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "dtype": str(dtype).replace("torch.", ""),
    }
