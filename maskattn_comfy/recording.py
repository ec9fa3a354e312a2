"""Record what the gates do, layer by layer, as MaskAttnPatch's recorder.

Each call is reduced at once (positive-prompt rows averaged, heads averaged) to one
[T, h, w] map per layer, on the CPU, at that layer's own grid: the latent's real height
and width halved as the UNet halves them. No [batch, heads, N, T] tensor outlives the
call that made it. With `token_groups`, only those columns are kept (each group's
tokens averaged), so a long prompt costs memory for what is drawn, not for every token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from maskattn_core import LayerKey

MAPS = ("probability", "hard", "attention_masked", "attention_unmasked")
ATTENTION_MAPS = ("attention_masked", "attention_unmasked")


def level_sides(height: int, width: int, level: int) -> tuple[int, int]:
    """The sides after `level` stride-2 downsamples with padding 1, which round up: ceil(side / 2**level)."""
    step = 2 ** level
    return -(-height // step), -(-width // step)


def layer_grid(extra_options: dict, locations: int) -> tuple[int, int]:
    """(h, w) of the grid behind a transformer's `locations` = h*w query positions."""
    # ComfyUI's SpatialTransformer reports the activations it flattened; older versions do not.
    shape = extra_options.get("activations_shape")
    if shape is not None and len(shape) == 4 and shape[2] * shape[3] == locations:
        return int(shape[2]), int(shape[3])
    original = extra_options.get("original_shape")
    if original is None or len(original) != 4:
        raise ValueError(f"cannot place {locations} attention locations on an image: ComfyUI passed no 4-d "
                         f"original_shape (got {original!r})")
    height, width = int(original[2]), int(original[3])
    level = 0
    while True:
        h, w = level_sides(height, width, level)
        if h * w == locations:
            return h, w
        if h * w < locations or (h, w) == (1, 1):
            raise ValueError(f"{locations} attention locations match no UNet level of a {height}x{width} latent "
                             "(each level halves both sides, rounding up)")
        level += 1


def positive_rows(extra_options: dict, batch: int, cond: int = 0) -> list[int]:
    """Batch rows that belong to the chunk(s) of `cond` (0 = the positive prompt) in `cond_or_uncond`."""
    chunks = extra_options.get("cond_or_uncond") or [cond]
    size = batch // len(chunks)
    return [c * size + i for c, which in enumerate(chunks) if which == cond for i in range(size)]


class MapRecorder:
    """Sums of per-layer maps over the model calls it sees; `maps()` gives their means.

    `wanted` names the maps to record (a subset of MAPS); the attention maps cost one
    extra q·k product per gated layer, so they are only computed when asked for.
    """

    def __init__(self, wanted: tuple[str, ...] = MAPS, cond: int = 0, token_groups: list[list[int]] | None = None):
        unknown = sorted(set(wanted) - set(MAPS))
        if unknown:
            raise ValueError(f"unknown maps {unknown}; known maps are {list(MAPS)}")
        if token_groups is not None and not all(token_groups):
            raise ValueError("every token group needs at least one context column")
        self.wanted = tuple(wanted)
        self.cond = cond
        self.token_groups = token_groups
        self.latent_size: tuple[int, int] | None = None
        self._sums: dict[LayerKey, dict[str, Tensor]] = {}
        self._counts: dict[LayerKey, dict[str, int]] = {}

    # -- MaskAttnPatch's hooks -------------------------------------------------------------
    def gate(self, key: LayerKey, probabilities: Tensor, hard: Tensor, extra_options: dict) -> None:
        if "probability" not in self.wanted and "hard" not in self.wanted:
            return
        rows = positive_rows(extra_options, probabilities.shape[0], self.cond)
        if not rows:
            return
        grid = self._grid(extra_options, probabilities.shape[1])
        with torch.no_grad():
            if "probability" in self.wanted:
                self._add(key, "probability", probabilities[rows].float().mean(0), grid)
            if "hard" in self.wanted:
                self._add(key, "hard", hard[rows].float().mean(0), grid)

    def attention(self, key: LayerKey, q: Tensor, k: Tensor, mask: Tensor, heads: int, extra_options: dict) -> None:
        if not any(name in self.wanted for name in ATTENTION_MAPS):
            return
        rows = positive_rows(extra_options, q.shape[0], self.cond)
        if not rows:
            return
        grid = self._grid(extra_options, q.shape[1])
        with torch.no_grad():
            masked, unmasked = head_mean_attention(q[rows], k[rows], mask[rows], heads)
            if "attention_masked" in self.wanted:
                self._add(key, "attention_masked", masked, grid)
            if "attention_unmasked" in self.wanted:
                self._add(key, "attention_unmasked", unmasked, grid)

    # -- results ---------------------------------------------------------------------------
    def maps(self) -> dict[LayerKey, dict[str, Tensor]]:
        """{layer: {map name: [T, h, w] mean over the recorded calls}}; [G, h, w] with G token groups."""
        return {key: {name: total / self._counts[key][name] for name, total in sums.items()}
                for key, sums in self._sums.items()}

    def calls(self) -> int:
        return max((max(c.values()) for c in self._counts.values()), default=0)

    def _grid(self, extra_options: dict, locations: int) -> tuple[int, int]:
        original = extra_options.get("original_shape")
        if original is not None and len(original) == 4:
            size = (int(original[2]), int(original[3]))
            if self.latent_size is not None and size != self.latent_size:
                raise ValueError(f"one recording saw latents of {self.latent_size} and {size}; record one size at a time")
            self.latent_size = size
        return layer_grid(extra_options, locations)

    def _add(self, key: LayerKey, name: str, tokens_by_location: Tensor, grid: tuple[int, int]) -> None:
        h, w = grid
        if self.token_groups is not None:
            tokens_by_location = self._grouped(tokens_by_location)
        flat = tokens_by_location.transpose(0, 1).reshape(-1, h, w).cpu()  # [N,T] -> [T,h,w]
        sums = self._sums.setdefault(key, {})
        counts = self._counts.setdefault(key, {})
        if name in sums:
            sums[name] += flat
            counts[name] += 1
        else:
            sums[name] = flat.clone()
            counts[name] = 1


    def _grouped(self, tokens_by_location: Tensor) -> Tensor:
        """[N, T] -> [N, G]: each group's columns averaged."""
        tokens = tokens_by_location.shape[1]
        columns = [c for group in self.token_groups for c in group]
        if max(columns) >= tokens or min(columns) < 0:
            raise ValueError(f"token groups name context columns up to {max(columns)}, but the context has {tokens}")
        device = tokens_by_location.device
        owner = torch.tensor([g for g, group in enumerate(self.token_groups) for _ in group], device=device)
        sizes = torch.tensor([len(group) for group in self.token_groups], device=device, dtype=torch.float32)
        picked = tokens_by_location[:, torch.tensor(columns, device=device)].float()
        summed = picked.new_zeros(picked.shape[0], len(self.token_groups)).index_add_(1, owner, picked)
        return summed / sizes


def head_mean_attention(q: Tensor, k: Tensor, mask: Tensor, heads: int,
                        budget: int = 1 << 22) -> tuple[Tensor, Tensor]:
    """Softmax(q·k/sqrt(d) + mask) and softmax(q·k/sqrt(d)), averaged over heads and rows: two [N,T] maps.

    q [R,N,heads*d], k [R,T,heads*d], mask [R,1,N,T]. Heads go in groups whose logits hold at most
    `budget` numbers, so the extra memory stays small however large the latent is.
    """
    rows, locations, width = q.shape
    tokens, dim_head = k.shape[1], width // heads
    q = q.float().reshape(rows, locations, heads, dim_head).transpose(1, 2)  # [R,heads,N,d]
    k = k.float().reshape(rows, tokens, heads, dim_head).transpose(1, 2)     # [R,heads,T,d]
    mask = mask.float()
    masked = q.new_zeros(locations, tokens)
    unmasked = q.new_zeros(locations, tokens)
    group = max(1, budget // max(1, rows * locations * tokens))
    for first in range(0, heads, group):
        logits = torch.matmul(q[:, first:first + group], k[:, first:first + group].transpose(-1, -2)) * dim_head ** -0.5
        unmasked += logits.softmax(-1).sum((0, 1))
        masked += logits.add_(mask).softmax(-1).sum((0, 1))
    count = rows * heads
    return masked / count, unmasked / count
