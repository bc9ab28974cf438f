"""What a generation call returns: the tokens, the text and how it was produced."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class GenerationStats:
    new_tokens: int = 0
    forward_passes: int = 0  # the prefill counts as one
    accepted_histogram: list[int] = field(default_factory=list)  # [i] = steps that accepted i drafts
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prompt_tokens: int = 0
    finish_reason: str = ""  # one of decode.stopping.FINISH_REASONS

    @property
    def tokens_per_pass(self) -> float:
        """tau: new tokens per forward pass, prefill included (plain decoding = 1.0)."""
        return self.new_tokens / self.forward_passes if self.forward_passes else 0.0

    tokens_per_step = tokens_per_pass

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(tokens_per_pass=self.tokens_per_pass, seconds=self.seconds,
                 tokens_per_second=self.tokens_per_second)
        return d


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # (1, prompt + new) token ids, like HF generate
    new_token_ids: list[int]
    text: str | None
    stats: GenerationStats
