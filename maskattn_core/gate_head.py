"""The gate head: how strongly each latent location wants each text token."""

from __future__ import annotations

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

    def extra_repr(self) -> str:
        return f"feature_dim={self.feature_dim}, token_dim={self.token_dim}, hidden_dim={self.hidden_dim}"
