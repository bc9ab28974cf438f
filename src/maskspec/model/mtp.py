"""MTPModel: a frozen Hugging Face causal LM plus k mask embeddings, a gated LoRA and a sampler head.

The base model is driven only through its public interface: `inputs_embeds`, explicit `position_ids`, a 4-D
attention mask (or the per-layer-type dict that hybrid models such as Gemma3 take) and its cache object. No
modeling code is copied. Logits are computed only for the rows that need them (`head_logits`), so a step with
(k+1)^2 rows never pays for (k+1)^2 vocabulary projections.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch import nn
from transformers import Cache, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from maskspec.adapter import load_adapter, read_adapter_config, resolve_adapter, save_adapter, shipped_adapter_for
from maskspec.hub import load_model_and_tokenizer
from maskspec.model.gated_lora import (DEFAULT_TARGET_MODULES, FIND_SPAN, GatedLoRALinear, GateState,
                                       inject_gated_lora)
from maskspec.model.kernels import Kernels, PackCache, PackSource, linear
from maskspec.model.layout import Layout, apply_sliding_window
from maskspec.model.sampler import SamplerHead

if TYPE_CHECKING:
    from maskspec.decode.types import GenerationOutput


@dataclass
class MTPConfig:
    """Shape of the additions. Saved in adapter_config.json."""

    k: int = 8
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        self.target_modules = list(self.target_modules)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StepOutput:
    """Result of one forward pass over a layout."""

    hidden: torch.Tensor  # (batch, rows, d): last-layer latents after the final norm
    past_key_values: Cache | None


class MTPModel(nn.Module):
    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None,
                 config: MTPConfig | None = None, model_name: str | None = None) -> None:
        super().__init__()
        self.config = config or MTPConfig()
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name or getattr(model.config, "name_or_path", "") or type(model).__name__
        for p in self.model.parameters():
            p.requires_grad_(False)
        # The packed matrices of decoding sessions (`decoding_session`); the gate lends it to the wrapped layers.
        self._packs = PackCache()
        self.gate = GateState(self._packs)
        embed = model.get_input_embeddings()
        weight = embed.weight
        hidden = weight.shape[1]
        self.lora_layers = inject_gated_lora(
            model, self.config.target_modules, self.config.rank, self.config.alpha, self.config.dropout, self.gate,
            exclude=[model.get_output_embeddings()],
        )
        # [choice] masks start as normal noise with the spread of the embedding layer's output rows.
        with torch.no_grad():
            sample_ids = torch.arange(min(4096, weight.shape[0]), device=weight.device)
            std = embed(sample_ids).float().std().item()
        self.mask_embeddings = nn.Parameter(torch.randn(self.config.k, hidden, dtype=weight.dtype,
                                                        device=weight.device) * std)
        self.sampler = SamplerHead(hidden, dtype=weight.dtype, device=weight.device)
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self._kernels = Kernels.PACKED  # see the `kernels` property
        self._lora_layer_modules: list[GatedLoRALinear] | None = None
        self._sessions = 0  # open `decoding_session` blocks
        # Measured per-device decoding defaults from the adapter's config ({"cpu": {"k": 1, ...}}); see default_k.
        self.decoding_defaults: dict[str, Any] = {}
        # Optional draft vocabulary (`set_draft_vocab`): buffers, so `.to()` moves them; not part of state_dict.
        self.register_buffer("draft_vocab", None, persistent=False)
        self.register_buffer("_draft_head_weight", None, persistent=False)
        self.register_buffer("_draft_head_bias", None, persistent=False)
        self.register_buffer("_draft_member", None, persistent=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model: str | None = None, adapter: str | Path | None = None, *,
                        config: MTPConfig | None = None, dtype: str | torch.dtype | None = None,
                        device: str | torch.device = "cpu", attn_implementation: str = "sdpa") -> "MTPModel":
        """Load a base model (HF id, folder or `default`) and attach an adapter folder or a fresh adapter.
        `adapter="default"` takes the adapter shipped for the embedded model."""
        adapter_path = resolve_adapter(adapter, model)
        if adapter is None and config is None:
            if shipped_adapter_for(model) is not None:
                warnings.warn("MTPModel.from_pretrained: no adapter given, so the mask tokens, LoRA and sampler are "
                              "untrained (about one token per pass). Pass adapter='default' for the shipped one.",
                              UserWarning, stacklevel=2)
        if adapter_path is not None:
            config = MTPConfig(**read_adapter_config(adapter_path).mtp_kwargs())
        base, tokenizer = load_model_and_tokenizer(model, dtype=dtype, device=device,
                                                   attn_implementation=attn_implementation)
        mtp = cls(base, tokenizer, config, model_name=base.config.name_or_path)
        if adapter_path is not None:
            load_adapter(mtp, adapter_path)
        mtp.eval()
        return mtp

    def save_adapter(self, folder: str | Path) -> Path:
        return save_adapter(self, folder)

    def load_adapter(self, folder: str | Path) -> None:
        load_adapter(self, folder)

    # ------------------------------------------------------------------ parameters
    @property
    def k(self) -> int:
        return self.config.k

    @property
    def default_k(self) -> int:
        """The k decoding uses when given none: what the adapter's config recommends for this device type (a
        measured choice: more drafts cost more per pass), else the adapter's k."""
        k = self._decoding_default("k")
        return k if k is not None and 1 <= k <= self.k else self.k

    @property
    def default_tree(self) -> int:
        """The draft-tree size decoding uses when given neither k nor a tree: what the adapter's config recommends
        for this device type (`maskspec tune` measures it), else 0 (a chain)."""
        tree = self._decoding_default("tree")
        return tree if tree is not None and tree >= 0 else 0

    @property
    def default_static(self) -> bool:
        """Whether the adapter's config recommends the static step for this device type (`maskspec tune
        --static` measures it); used for greedy decoding given neither k nor a tree."""
        entry = self.decoding_defaults.get(self.device.type)
        return isinstance(entry, dict) and entry.get("static") is True

    def _decoding_default(self, name: str) -> int | None:
        """An integer the adapter's config records for this device type (`decoding.<type>.<name>`), else None."""
        entry = self.decoding_defaults.get(self.device.type)
        value = entry.get(name) if isinstance(entry, dict) else None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def device(self) -> torch.device:
        return self.mask_embeddings.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor, named stably: masks, LoRA A/B per layer, sampler."""
        state = {"mask_embeddings": self.mask_embeddings}
        for name, module in self.model.named_modules():
            if isinstance(module, GatedLoRALinear):
                state[f"lora.{name}.A"] = module.lora_A.weight
                state[f"lora.{name}.B"] = module.lora_B.weight
        for name, p in self.sampler.named_parameters():
            state[f"sampler.{name}"] = p
        return state

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.adapter_state_dict().values())

    def base_parameters(self) -> list[tuple[str, nn.Parameter]]:
        adapter_ids = {id(p) for p in self.trainable_parameters()}
        return [(n, p) for n, p in self.model.named_parameters() if id(p) not in adapter_ids]

    # ------------------------------------------------------------------ forward pieces
    def embed_rows(self, token_ids: torch.Tensor, mask_slot: torch.Tensor) -> torch.Tensor:
        """Input embeddings for rows that are either tokens (mask_slot < 0) or mask j (mask_slot = j-1)."""
        is_mask = mask_slot >= 0
        tokens = self.model.get_input_embeddings()(torch.where(is_mask, torch.zeros_like(token_ids), token_ids))
        masks = self.mask_embeddings[mask_slot.clamp(min=0)].to(tokens.dtype)
        return torch.where(is_mask[..., None], masks, tokens)

    def forward_rows(self, token_ids: torch.Tensor, mask_slot: torch.Tensor, position_ids: torch.Tensor,
                     attention: torch.Tensor, key_positions: torch.Tensor,
                     past_key_values: Cache | None = None, use_cache: bool = False,
                     keep_gate_for_backward: bool = False,
                     mask_rows: tuple[torch.Tensor, tuple[int, int] | None] | None = None) -> StepOutput:
        """One pass over rows given as batched tensors: token_ids, mask_slot, position_ids (B, R); attention
        (B, R, past + R) bool; key_positions (B, past + R). Returns last-layer latents (after the final norm).

        With `keep_gate_for_backward` the caller owns the gate (`with mtp.gate.active(rows)` around forward and
        backward), which gradient checkpointing needs because it re-runs the forward during backward.
        `mask_rows`: (the flat indices of the mask rows, their (start, stop) span or None) when the caller knows
        them (a fixed layout); else they are found from mask_slot, which reads it on the host."""
        embeds = self.embed_rows(token_ids, mask_slot)
        if mask_rows is None:
            rows = torch.nonzero((mask_slot >= 0).reshape(-1), as_tuple=False).squeeze(-1)
            mask_rows = (rows, FIND_SPAN)
        masks = self.model_attention_mask(attention, position_ids, key_positions, embeds.dtype)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()  # no config: full layers everywhere, windows come from our mask
        gate_ctx = (nullcontext() if keep_gate_for_backward
                    else self.gate.active(mask_rows[0], self._pass_kernel(), span=mask_rows[1]))
        with gate_ctx:
            out = self.model.get_decoder()(
                inputs_embeds=embeds, position_ids=position_ids, attention_mask=masks,
                cache=past_key_values, use_cache=use_cache,
            )
        return StepOutput(out.last_hidden_state, past_key_values if use_cache else None)

    def forward_layout(self, normal_ids: torch.Tensor, layout: Layout, past_key_values: DynamicCache | None = None,
                       use_cache: bool = False) -> StepOutput:
        """One pass over a single layout shared by the batch: normal_ids (B, num_normal)."""
        batch = normal_ids.shape[0]
        token_ids = normal_ids[:, layout.normal_index.clamp(min=0)]
        expand = lambda t: t.unsqueeze(0).expand(batch, *t.shape)  # noqa: E731
        return self.forward_rows(token_ids, expand(layout.mask_slot), expand(layout.position_ids),
                                 expand(layout.attention), expand(layout.key_positions), past_key_values, use_cache)

    # ------------------------------------------------------------------ kernels and decoding sessions
    @property
    def kernels(self) -> str:
        """The linear kernel of decoding's own passes on CPU in float32 (`maskspec.model.kernels`): "packed"
        (the default: oneDNN's matmul, multiplying by oneDNN-packed copies of the frozen matrices in calls of
        2+ rows inside `decoding_session`; bit-identical to "onednn", faster, memory equal to those matrices
        again), "onednn" (oneDNN's matmul on the plain matrices) or "stock" (`F.linear` everywhere). oneDNN
        rounds differently from the stock kernel in the last bits. The model called directly (`self.model`)
        always runs the stock kernel."""
        return self._kernels.value

    @kernels.setter
    def kernels(self, value: str) -> None:
        try:
            choice = Kernels(value)
        except ValueError:
            names = ", ".join(repr(k.value) for k in Kernels)
            raise ValueError(f"kernels must be one of {names}, got {value!r}") from None
        self._kernels = choice
        if choice != Kernels.PACKED:
            self._packs.clear()  # their memory back; "packed" packs again at the next session

    @contextmanager
    def decoding_session(self) -> Iterator[None]:
        """Decoding passes inside this block multiply by packed matrices when `kernels` is "packed" (CPU
        float32, no autograd): entering it packs what is missing or changed since the last session (1-2 ms for
        the embedded model once packed), the passes inside read the packs without checking them again. So the
        weights must not change inside the block; outside it, nothing packed is used. Blocks may nest and
        interleave (several generators at once)."""
        if self._kernels == Kernels.PACKED:
            self._packs.refresh(self._pack_sources())
        self._sessions += 1  # a count, not a flag: interleaved generators end in any order
        try:
            yield
        finally:
            self._sessions -= 1


    def _pack_sources(self) -> dict[Hashable, PackSource]:
        """Every matrix decoding multiplies by, keyed as the passes look them up: `id(module)` for the output
        head, the sampler's layers and the wrapped projections ([W; A], `GatedLoRALinear.pack_source`),
        `_DRAFT_HEAD` for the draft vocabulary's head rows."""
        sources: dict[Hashable, PackSource] = {}
        head = self.model.get_output_embeddings()
        if type(head) is nn.Linear:
            sources[id(head)] = ([head.weight], None)
        for layer in (self.sampler.fc1, self.sampler.fc2):
            sources[id(layer)] = ([layer.weight], None)
        if self._draft_head_weight is not None:
            sources[_DRAFT_HEAD] = ([self._draft_head_weight], None)
        if self._lora_layer_modules is None:  # fixed once the adapter is injected
            self._lora_layer_modules = [m for m in self.model.modules() if isinstance(m, GatedLoRALinear)]
        for layer in self._lora_layer_modules:
            source = layer.pack_source()
            if source is not None:
                sources[id(layer)] = source
        return sources

    def _pass_kernel(self) -> Kernels:
        """The kernel of a pass now: `kernels`, except that packed matrices are used only inside a decoding
        session and without autograd (elsewhere "packed" means oneDNN on the plain matrices)."""
        if self._kernels == Kernels.PACKED and (self._sessions == 0 or torch.is_grad_enabled()):
            return Kernels.ONEDNN
        return self._kernels

    def _packed_matrix(self, key: Hashable, kernel: Kernels) -> torch.Tensor | None:
        pack = self._packs.get(key) if kernel == Kernels.PACKED else None
        return None if pack is None else pack.matrix

    def model_attention_mask(self, attention: torch.Tensor, query_positions: torch.Tensor,
                             key_positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | dict:
        """The boolean rule, in the form this model's attention implementation takes: a (B, 1, Q, K) mask, or a
        per-layer-type dict where the model mixes full and sliding-window layers."""
        cfg = self.model.config.get_text_config()
        window = getattr(cfg, "sliding_window", None)
        layer_types = getattr(cfg, "layer_types", None)
        if layer_types is not None:
            masks = {"full_attention": attention}
            if "sliding_attention" in layer_types:
                masks["sliding_attention"] = apply_sliding_window(attention, query_positions, key_positions, window)
            for name in set(layer_types) - set(masks):
                raise NotImplementedError(f"attention type {name!r} is not supported yet")
            return {name: self._format_mask(m, dtype) for name, m in masks.items()}
        if window is not None:  # every layer slides (e.g. Mistral)
            attention = apply_sliding_window(attention, query_positions, key_positions, window)
        return self._format_mask(attention, dtype)

    def _format_mask(self, attention: torch.Tensor, dtype: torch.dtype) -> Any:
        mask = attention[:, None]
        implementation = self.model.config._attn_implementation
        if implementation == "sdpa":
            return mask
        if implementation == "flex_attention":
            return block_mask(attention)
        # eager (and others) add the mask to the scores: a boolean would be added as 0/1, so use 0 / -inf.
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's own output head (with Gemma-style final soft-capping where configured)."""
        head = self.model.get_output_embeddings()
        if type(head) is nn.Linear:
            kernel = self._pass_kernel()
            logits = linear(hidden, head.weight, head.bias, kernel=kernel,
                            packed=self._packed_matrix(id(head), kernel))
        else:
            logits = head(hidden)
        return self._soft_cap(logits)

    def _soft_cap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def sampler_logits(self, prev_ids: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return self.head_logits(self._sampler_hidden(prev_ids, latents))

    def _sampler_hidden(self, prev_ids: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        prev = self.model.get_input_embeddings()(prev_ids).to(latents.dtype)
        return self.sampler(prev, latents, self._pass_kernel(), self._packs)

    # ------------------------------------------------------------------ draft vocabulary
    @property
    def vocab_size(self) -> int:
        """Rows of the output head: the size of every full-vocabulary distribution."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def draft_vocab_set(self) -> bool:
        return self.draft_vocab is not None

    def set_draft_vocab(self, ids: Sequence[int] | torch.Tensor | None) -> None:
        """Restrict drafts to `ids` (plus each sequence's context tokens, see `draft_ids`); None restores the full
        vocabulary. Verification always uses the full head, so this changes only which drafts are proposed: the
        output stays exact (greedy) and exact in distribution (sampling). The matching head rows are kept as one
        contiguous matrix, so a draft costs a projection over len(ids) rows instead of the whole vocabulary."""
        if ids is None:
            self._packs.drop(_DRAFT_HEAD)
            self.draft_vocab = self._draft_head_weight = self._draft_head_bias = self._draft_member = None
            return
        head = self.model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"a draft vocabulary needs a linear output head, this model has {type(head).__name__}")
        ids = torch.as_tensor(ids).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("the draft vocabulary is empty; pass None for the full vocabulary")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"draft vocabulary ids must be integers, got {ids.dtype}")
        ids = torch.unique(ids.long())  # sorted
        vocab = self.vocab_size
        if int(ids[0]) < 0 or int(ids[-1]) >= vocab:
            bad = int(ids[0]) if int(ids[0]) < 0 else int(ids[-1])
            raise ValueError(f"draft vocabulary id {bad} is outside the output head's range 0..{vocab - 1}")
        device = head.weight.device
        ids = ids.to(device)
        member = torch.zeros(vocab, dtype=torch.bool, device=device)
        member[ids] = True
        self._packs.drop(_DRAFT_HEAD)  # the old rows' pack: a session already open must not use it
        with torch.no_grad():
            self.draft_vocab = ids
            self._draft_head_weight = head.weight.detach()[ids].contiguous()
            self._draft_head_bias = head.bias.detach()[ids].contiguous() if head.bias is not None else None
            self._draft_member = member

    def draft_extra_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Of `ids` (context tokens), those the draft vocabulary lacks: sorted, unique."""
        ids = ids.reshape(-1).to(self.device, torch.long)
        if self._draft_member is None or ids.numel() == 0:
            return ids.new_empty(0)
        return torch.unique(ids[~self._draft_member[ids]])

    def draft_ids(self, extra_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """The ids a draft may be: the draft vocabulary, then the `extra_ids` (a sequence's context tokens) it
        lacks, sorted; None when no draft vocabulary is set (every id)."""
        if self.draft_vocab is None:
            return None
        if extra_ids is None:
            return self.draft_vocab
        return torch.cat([self.draft_vocab, self.draft_extra_ids(extra_ids)])

    def draft_logits(self, prev_ids: torch.Tensor, latents: torch.Tensor, extra_ids: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sampler logits over the ids a draft may be, and those ids (`draft_ids(extra_ids)`): (rows, len(ids))
        and (len(ids),). Without a draft vocabulary: the full `sampler_logits` and None."""
        hidden = self._sampler_hidden(prev_ids, latents)
        if self.draft_vocab is None:
            return self.head_logits(hidden), None
        ids = self.draft_ids(extra_ids)
        kernel = self._pass_kernel()
        logits = linear(hidden, self._draft_head_weight, self._draft_head_bias, kernel=kernel,
                        packed=self._packed_matrix(_DRAFT_HEAD, kernel))
        extra = ids[self.draft_vocab.numel():]
        if extra.numel():  # context tokens outside the vocabulary: their few head rows, gathered per call
            head = self.model.get_output_embeddings()
            bias = head.bias[extra] if head.bias is not None else None
            logits = torch.cat([logits, linear(hidden, head.weight[extra], bias, kernel=kernel)], dim=-1)
        return self._soft_cap(logits), ids

    # ------------------------------------------------------------------ generation
    def generate(self, prompt: Any = None, **kwargs: Any) -> "GenerationOutput":
        """Generate from token ids, a string or a chat (list of messages). See `maskspec.decode.generate`."""
        from maskspec.decode.api import generate

        return generate(self, prompt, **kwargs)


_DRAFT_HEAD = "draft_head"  # the pack key of the draft vocabulary's head rows


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> list[int]:
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, getattr(model.config, "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None):
        if value is None:
            continue
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if int(v) not in ids:
                ids.append(int(v))
    return ids


def randomize_adapter_(mtp: MTPModel, seed: int = 0, scale: float = 0.05,
                       parts: Sequence[str] = ("lora", "sampler")) -> MTPModel:
    """Fill LoRA and sampler weights with random non-zero values (tests, ablations of an untrained adapter)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mtp.adapter_state_dict().items():
            if name.split(".")[0] in parts:
                p.copy_((torch.randn(p.shape, generator=gen) * scale).to(p.dtype))
    return mtp


def block_mask(attention: torch.Tensor) -> Any:
    """The boolean rule (B, Q, K) as a FlexAttention BlockMask: the kernels skip every 128 x 128 tile the rule
    leaves empty. The training layout is mostly such tiles (a mask block sees its head's prefix and itself, not the
    other blocks), so attention costs a fraction of the dense (k + 1)L x (k + 1)L product. Same rule, same
    outputs as the dense mask, up to summation order."""
    from torch.nn.attention.flex_attention import create_block_mask

    def rule(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return attention[b, q, kv]

    batch, queries, keys = attention.shape
    return create_block_mask(rule, batch, None, queries, keys, device=attention.device)
