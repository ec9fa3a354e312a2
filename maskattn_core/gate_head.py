"""The gate head: how strongly each latent location wants each text token."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn


def _mlp(width: int, hidden: int) -> nn.Sequential:
    # Index layout (0 LayerNorm, 1 Linear, 2 SiLU, 3 Linear) matches the authors' state dicts.
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden))


class GateHead(nn.Module):
    """Two small MLPs, one on location features [B,N,C] and one on token embeddings
    [B,T,D], compared by a dot product scaled by hidden^-0.5 plus a learned logit bias.

    It always computes in float32, whatever the model's dtype.
    """

    def __init__(self, feature_dim: int, token_dim: int = 2048, hidden_dim: int = 128):
        super().__init__()
        if min(feature_dim, token_dim, hidden_dim) <= 0:
            raise ValueError(f"GateHead sizes must be positive, got {feature_dim}, {token_dim}, {hidden_dim}")
        self.feature_dim, self.token_dim, self.hidden_dim = feature_dim, token_dim, hidden_dim
        self.feature_net = _mlp(feature_dim, hidden_dim)
        self.token_net = _mlp(token_dim, hidden_dim)
        self.logit_bias = nn.Parameter(torch.zeros(()))
        self.scale = hidden_dim ** -0.5

    def token_features(self, context: Tensor) -> Tensor:
        """[B,T,D] -> [B,T,h]; the part shared by every layer that sees the same context."""
        return self.token_net(context.float())

    def location_features(self, x: Tensor) -> Tensor:
        """[B,N,C] -> [B,N,h]."""
        return self.feature_net(x.float())

    def logits(self, x: Tensor, context: Tensor, token_features: Tensor | None = None) -> Tensor:
        """[B,N,T] gate logits: f(x)·g(e)·h^-0.5 + bias."""
        if token_features is None:
            token_features = self.token_features(context)
        locations = self.location_features(x)
        # The authors' order of operations (product, then scale, then bias) keeps hard gates equal to theirs.
        return torch.matmul(locations, token_features.transpose(1, 2)) * self.scale + self.logit_bias

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """Gate probabilities [B,N,T]."""
        return torch.sigmoid(self.logits(x, context))

    @classmethod
    def sizes_of(cls, state: Mapping[str, Tensor]) -> tuple[int, int, int]:
        """(feature_dim, token_dim, hidden_dim) of a state dict read from a file, after checking
        every tensor without allocating anything: exactly GateHead's parameters, floating point,
        the shapes those sizes imply, and each tensor backed by as many stored values as it has
        (a stride-0 view of a few bytes could otherwise claim gigabytes). Raises ValueError."""
        if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
            raise ValueError(f"a gate head's state must map parameter names to tensors, got {type(state).__name__}")
        missing, unexpected = sorted(set(_PARAMETERS) - set(state)), sorted(set(state) - set(_PARAMETERS))
        if missing or unexpected:
            raise ValueError(f"a gate head needs exactly the parameters {list(_PARAMETERS)}; missing {missing}, "
                             f"unexpected {unexpected}")
        for name, tensor in state.items():
            if not isinstance(tensor, Tensor):
                raise ValueError(f"{name} is a {type(tensor).__name__}, not a tensor")
            if tensor.dtype not in _WEIGHT_DTYPES:
                raise ValueError(f"{name} is {tensor.dtype}; gate weights are floating point "
                                 f"({', '.join(str(d) for d in _WEIGHT_DTYPES)})")
            if not _stored_densely(tensor):
                raise ValueError(f"{name} (shape {list(tensor.shape)}, strides {list(tensor.stride())}) repeats or "
                                 "overlaps its stored values: it claims more data than the file holds")
        for net in ("feature_net", "token_net"):
            if state[f"{net}.1.weight"].dim() != 2:
                raise ValueError(f"{net}.1.weight must be 2-D [hidden, width], got shape {list(state[f'{net}.1.weight'].shape)}")
        hidden, feature_dim = state["feature_net.1.weight"].shape
        token_dim = state["token_net.1.weight"].shape[1]
        sizes = (int(feature_dim), int(token_dim), int(hidden))
        if min(sizes) <= 0:
            raise ValueError(f"gate head sizes must be positive, got {sizes}")
        with torch.device("meta"):  # the shapes these sizes imply, without allocating
            expected = {k: tuple(v.shape) for k, v in cls(*sizes).state_dict().items()}
        wrong = [f"{k} {list(state[k].shape)} (expected {list(shape)})" for k, shape in expected.items()
                 if tuple(state[k].shape) != shape]
        if wrong:
            raise ValueError(f"gate head tensors of the wrong shape for sizes {sizes}: " + ", ".join(wrong))
        return sizes

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], sizes: tuple[int, int, int] | None = None) -> "GateHead":
        """A float32 head from a state dict read from a file; its sizes come from its tensors, checked
        (`sizes_of`) against `sizes` when given, before anything is allocated; non-finite weights are
        refused. Raises ValueError."""
        found = cls.sizes_of(state)
        if sizes is not None and tuple(sizes) != found:
            raise ValueError(f"sizes {list(sizes)} were declared but the tensors are {list(found)} "
                             "(feature_dim, token_dim, hidden_dim)")
        for name, tensor in state.items():
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{name} holds NaN or infinite values")
        with torch.device("meta"):
            head = cls(*found)
        head.load_state_dict({k: v.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
                              for k, v in state.items()}, strict=True, assign=True)
        return head

    def extra_repr(self) -> str:
        return f"feature_dim={self.feature_dim}, token_dim={self.token_dim}, hidden_dim={self.hidden_dim}"


_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
with torch.device("meta"):
    _PARAMETERS = tuple(GateHead(1, 1, 1).state_dict())


def _stored_densely(tensor: Tensor) -> bool:
    """True when the tensor's elements are distinct stored values: no stride-0 repeats, no overlap."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(tensor.stride(), tensor.shape) if n > 1):
        if stride != expected:
            return False
        expected *= size
    end = (tensor.storage_offset() + tensor.numel()) * tensor.element_size()
    return end <= tensor.untyped_storage().nbytes()
