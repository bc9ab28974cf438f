"""The acceptance rules: which drafts survive verification, and which token comes after them.

Greedy: accept draft d_j while it equals the argmax of the normal head at the position before it; the token
after the last accepted draft is that position's argmax (the "bonus"). The output is plain greedy decoding.

Sampling: standard speculative rejection sampling. Draft d_j was sampled from q_j (the sampler head's warped
distribution); it is accepted with probability min(1, p_j(d_j) / q_j(d_j)), where p_j is the base model's
warped distribution at that position. On the first rejection the replacement token is drawn from
normalise(max(0, p_j - q_j)); if every draft is accepted the bonus is drawn from p after the last draft. The
emitted tokens are then distributed exactly as plain sampling from p. Over a draft tree the same rule runs at
every node over its children in turn, each rejection leaving the residual as the next child's target
(`accept_sampling_tree`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import torch

from maskspec.errors import UsageError

# Seeds as torch.Generator.manual_seed takes them.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# Below this temperature, logits are shifted by their maximum before the division (in float64), so that even the
# smallest positive temperature gives finite scores: the limit distribution (ties of the argmax share it).
SHIFTED_TEMPERATURE = 1e-2


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingConfig:
    """The sampling options of one generation, checked once here for the CLI, the server and distillation:
    a finite temperature >= 0 (0: greedy), 0 < top_p <= 1, an integer top_k >= 0 (0: off). A bad value raises
    UsageError (a ValueError) whose message names the option."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        t, p, k = self.temperature, self.top_p, self.top_k
        if not _is_number(t) or not math.isfinite(t) or t < 0:
            raise UsageError(f"temperature must be a finite number >= 0, got {t!r}")
        if not _is_number(p) or not math.isfinite(p) or not 0.0 < p <= 1.0:
            raise UsageError(f"top_p must be in (0, 1], got {p!r}")
        if not _is_int(k) or k < 0:
            raise UsageError(f"top_k must be an integer >= 0, got {k!r}")
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(p))
        object.__setattr__(self, "top_k", int(k))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def check_seed(seed: Any) -> int | None:
    """A sampling seed: None (random) or an integer that torch.Generator.manual_seed takes. UsageError if not."""
    if seed is None:
        return None
    if not _is_int(seed) or not SEED_MIN <= seed <= SEED_MAX:
        raise UsageError(f"seed must be an integer in [-2**63, 2**64 - 1], got {seed!r}")
    return int(seed)


def check_sampling(temperature: float, top_p: float = 1.0, top_k: int = 0, seed: Any = None) -> None:
    """The decoders' own checks of the sampling options and seed, run before a model is loaded (UsageError)."""
    SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k)
    check_seed(seed)


def new_generator(cfg: SamplingConfig, seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """The random generator of one sequence: None for greedy decoding, else seeded with `seed` (None: random)."""
    if cfg.greedy:
        return None
    seed = check_seed(seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    return generator


def warped_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the order HF applies them), as probabilities in float32."""
    if cfg.temperature >= SHIFTED_TEMPERATURE:
        scores = logits.float() / cfg.temperature
    else:  # (l - max) / T is 0 at the argmax and -inf (or very negative) elsewhere: never inf - inf = NaN
        wide = logits.double()
        scores = ((wide - wide.amax(dim=-1, keepdim=True)) / cfg.temperature).float()
    if cfg.top_k > 0 and cfg.top_k < scores.shape[-1]:
        kth = torch.topk(scores, cfg.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - cfg.top_p)
        remove_sorted[..., -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores.softmax(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator).item())


def accept_greedy(drafts: list[int], target_argmax: list[int]) -> tuple[int, int]:
    """(number of drafts accepted, bonus token). target_argmax[i] is the greedy token after normal row i
    (row 0 = the newest verified token, row j = draft j); it has len(drafts) + 1 entries."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == target_argmax[accepted]:
        accepted += 1
    return accepted, target_argmax[accepted]


def tree_children(parents: list[int]) -> dict[int, list[int]]:
    """Each node's children in index order (-1: the children of the newest verified token)."""
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(parents):
        children.setdefault(parent, []).append(i)
    return children


def greedy_tree_path(tokens: list[int], parents: list[int], wanted: Callable[[int, int], int | None]) -> list[int]:
    """The root-to-leaf path that follows the wanted tokens: from the newest verified token (node -1), go to the
    child holding wanted(node, depth), then on from it, until no child holds it (or wanted gives None)."""
    children = tree_children(parents)
    path: list[int] = []
    at = -1
    while True:
        want = wanted(at, len(path))
        nxt = next((c for c in children.get(at, ()) if tokens[c] == want), None) if want is not None else None
        if nxt is None:
            return path
        path.append(nxt)
        at = nxt


def accept_greedy_tree(tokens: list[int], parents: list[int], target_argmax: list[int]) -> tuple[list[int], int]:
    """Greedy acceptance over a draft tree: (the accepted path as node indices, root to leaf; the token after it).
    Node i holds `tokens[i]` and hangs off node `parents[i]` (-1: off the newest verified token). target_argmax[0]
    is the greedy token after the newest verified token, target_argmax[1 + i] the one after node i. From the root,
    the child whose token is the greedy one is accepted, then its child, and so on: the path plain greedy decoding
    takes (a chain is the tree whose node i hangs off node i - 1)."""
    path = greedy_tree_path(tokens, parents, lambda node, depth: target_argmax[node + 1])
    return path, target_argmax[(path[-1] if path else -1) + 1]


def accept_sampling(drafts: list[int], draft_probs: list[torch.Tensor], target_probs: torch.Tensor,
                    generator: torch.Generator | None) -> tuple[int, int]:
    """(number of drafts accepted, next token) under rejection sampling. target_probs: (len(drafts)+1, V);
    draft_probs[j]: the distribution draft j was sampled from. A chain is the tree whose draft j hangs off
    draft j - 1: `accept_sampling_tree` is the one rule."""
    path, token = accept_sampling_tree(drafts, list(range(-1, len(drafts) - 1)), draft_probs, target_probs,
                                       generator)
    return len(path), token


def accept_sampling_tree(tokens: list[int], parents: list[int], draft_probs: list[torch.Tensor | None],
                         target_probs: torch.Tensor, generator: torch.Generator | None) -> tuple[list[int], int]:
    """Recursive rejection sampling over a draft tree: (the accepted path as node indices, root to leaf; the token
    after it), distributed exactly as plain sampling from the target.

    Node i holds tokens[i], hangs off parents[i] (-1: the newest verified token) and was drawn from
    draft_probs[i]; siblings that share one distribution (the same tensor) were drawn from it one after another
    without replacement, in index order; None marks a point mass (a token chosen without sampling). At a node
    with target p (target_probs[0] at the root, target_probs[1 + i] after node i), the children are tried in
    order: child c, drawn from r (its distribution without its earlier siblings from the same one,
    renormalised), is accepted with probability min(1, p(c) / r(c)); on rejection p becomes
    normalise(max(0, p - r)) for the next child. The first accepted child is where the walk goes on; if none is,
    the token is drawn from the last p.

    Why this is exact: given the earlier siblings, child c is a draw from r, so one try is one step of ordinary
    rejection sampling with target p, whose rejection branch needs a draw from normalise(max(0, p - r)), which
    is what the remaining children and the final draw produce (by induction on the number of children left).
    This is SpecInfer's multi-draft rule with siblings drawn without replacement (as in recursive speculative
    decoding, Jeon et al. 2024): no second try is spent on a token already rejected, and a point-mass sibling
    (prompt lookup) fits the same rule."""
    children = tree_children(parents)
    path: list[int] = []
    at = -1
    while True:
        p = target_probs[at + 1]
        drawn: dict[int, list[int]] = {}  # id of a shared distribution -> its tokens tried so far at this node
        accepted = None
        for child in children.get(at, ()):
            token, q = tokens[child], draft_probs[child]
            if q is None:
                r = torch.zeros_like(p)
                r[token] = 1.0
            else:
                earlier = drawn.setdefault(id(q), [])
                r = q
                if earlier:
                    r = q.clone()
                    r[earlier] = 0
                    r = r / r.sum()
                earlier.append(token)
            ratio = (p[token] / r[token]).item() if r[token] > 0 else float("inf")
            u = torch.rand((), generator=generator, device=p.device).item()
            if u < min(1.0, ratio):
                accepted = child
                break
            residual = (p - r).clamp(min=0)
            total = residual.sum()
            # p == r up to rounding: the residual is empty; p itself is then exact.
            p = residual / total if total > 0 else p
        if accepted is None:
            return path, sample(p, generator)
        path.append(accepted)
        at = accepted
