"""From gate probabilities to the additive attention mask, in the paper's terms.

probability = sigmoid(gate logits); hard gate = probability > threshold (a location with
no open token keeps its most probable one); the forward pass uses the hard gate and the
backward pass the probabilities (straight-through); closed connections get a negative
value added to the attention logits before the softmax.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def gate_probabilities(logits: Tensor) -> Tensor:
    return torch.sigmoid(logits)


def open_connections(probabilities: Tensor, threshold: float = 0.5) -> Tensor:
    """The hard gate as booleans: True where probability > threshold (strict); a row with no
    open token keeps its argmax.

    Without the fallback a fully closed row would softmax over -10000 everywhere, which is
    uniform attention rather than "attend to nothing".
    """
    opened = probabilities > threshold
    # Branch-free (no host sync on a GPU): opening every row's argmax is the empty-row fallback,
    # and changes nothing in a row with an open token, whose argmax is open already.
    opened.scatter_(-1, probabilities.argmax(dim=-1, keepdim=True), True)
    return opened


def hard_gate(probabilities: Tensor, threshold: float = 0.5) -> Tensor:
    """1 where probability > threshold (strict), else 0; an all-closed row keeps its argmax."""
    return open_connections(probabilities, threshold).to(probabilities.dtype)


def straight_through(hard: Tensor, probabilities: Tensor) -> Tensor:
    """Forward: the hard gate; backward: d/dprobabilities (straight-through estimator)."""
    if not probabilities.requires_grad:
        return hard
    return hard.detach() - probabilities.detach() + probabilities


def closed_logit(strength: float, negative_value: float = -10000.0) -> float:
    """The logit penalty of a closed connection.

    strength 1 is the paper's hard mask (negative_value); below 1 a closed connection keeps
    (1 - strength) of its softmax weight before renormalisation: penalty log(1 - strength).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], got {strength}")
    if strength >= 1.0:
        return float(negative_value)
    return max(math.log1p(-strength), float(negative_value))


def additive_mask(gate: Tensor, penalty: float = -10000.0, dtype: torch.dtype | None = None) -> Tensor:
    """[B,N,T] gate -> [B,1,N,T] additive logit mask: 0 where open, `penalty` where closed."""
    mask = (1.0 - gate) * penalty
    if dtype is not None:
        mask = mask.to(dtype)
    return mask.unsqueeze(1)


def closed_mask(opened: Tensor, penalty: float = -10000.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """[B,N,T] boolean hard gate -> [B,1,N,T] additive mask in `dtype`.

    The inference form of `additive_mask(hard_gate(p))`, with the same values, for when no
    gradient has to reach the probabilities: one `where` (and a cast when `dtype` is not
    float32) instead of a cast, a subtraction, a product and another cast per gated layer,
    each a kernel launch on a GPU. The penalty passes through float32 as in `additive_mask`.
    """
    return torch.where(opened, 0.0, penalty).to(torch.float32).to(dtype).unsqueeze(1)


def soft_mask(logits: Tensor, strength: float = 1.0, negative_value: float = -10000.0,
              dtype: torch.dtype | None = None) -> Tensor:
    """[B,N,T] gate logits -> [B,1,N,T] additive mask of the soft gate: strength * log p.

    Adding log p to an attention logit multiplies that connection's softmax weight by p before
    renormalisation (by p**strength below strength 1); unlike the hard gate, a nearly closed
    connection keeps a gradient (d log p / d logit = 1 - p), so it can open again in training.
    """
    mask = (torch.nn.functional.logsigmoid(logits) * strength).clamp_min(negative_value)
    if dtype is not None:
        mask = mask.to(dtype)
    return mask.unsqueeze(1)
