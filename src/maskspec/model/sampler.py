"""Sampler head: turns a mask latent into a draft token, conditioned on the token drafted before it.

logits = W_out(z + MLP([E(prev); z])), each MLP layer Linear -> SiLU -> LayerNorm (2d -> d -> d). E is the frozen
input embedding and W_out the frozen output head of the base model: no new vocabulary matrix.
[choice] The residual from z, with the last LayerNorm's scale started at zero, makes an untrained sampler
propose exactly what the base head predicts at the mask; training moves it from there.
"""

from __future__ import annotations

import torch
from torch import nn

from maskspec.model.kernels import Kernels, PackCache, linear


class SamplerHead(nn.Module):
    def __init__(self, hidden_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None,
                 eps: float = 1e-5) -> None:
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.fc1 = nn.Linear(2 * hidden_size, hidden_size, **kw)
        self.norm1 = nn.LayerNorm(hidden_size, eps=eps, **kw)
        self.fc2 = nn.Linear(hidden_size, hidden_size, **kw)
        self.norm2 = nn.LayerNorm(hidden_size, eps=eps, **kw)
        nn.init.zeros_(self.norm2.weight)

    def forward(self, prev_embeddings: torch.Tensor, latents: torch.Tensor, kernel: Kernels = Kernels.STOCK,
                packs: PackCache | None = None) -> torch.Tensor:
        """Hidden state to feed the output head: (..., d) from (..., d) previous-token embeddings and latents.
        `kernel` picks the linear kernel (`maskspec.model.kernels`); with `Kernels.PACKED` the layers multiply
        by their packs in `packs`, keyed by `id(layer)`, where it has them."""
        x = torch.cat([prev_embeddings, latents], dim=-1)
        h = self.norm1(nn.functional.silu(self._linear(self.fc1, x, kernel, packs)))
        h = self.norm2(nn.functional.silu(self._linear(self.fc2, h, kernel, packs)))
        return latents + h

    @staticmethod
    def _linear(layer: nn.Linear, x: torch.Tensor, kernel: Kernels, packs: PackCache | None) -> torch.Tensor:
        pack = packs.get(id(layer)) if packs is not None and kernel == Kernels.PACKED else None
        return linear(x, layer.weight, layer.bias, kernel=kernel, packed=None if pack is None else pack.matrix)
