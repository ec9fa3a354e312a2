"""Region supervision (--mask-loss): the gate probabilities of the words that name an object, pulled towards its mask.

At every gated layer, for every supervised context column j of sample b (the tokens of the words a mask
names, trainer/region_masks.py), the layer's gate probabilities p[b, :, j] over its H x W locations are
compared with the object's mask m averaged onto that layer's grid (maskattn_core.regions.layer_mask) by binary
cross-entropy, mean over the locations:

    mask_loss = mean over (layer, sample, supervised column) of  mean_n  -[m_n log p_n + (1 - m_n) log(1 - p_n)]

It supervises where those words' gates open (inside their object) and close (outside it); it leaves free
every other column (start, end and padding tokens, articles, relation words, words no mask names) and the
attention itself, and it reaches only the gate heads (the UNet is frozen; the hidden states the heads read are
constants in the backward pass, trainer/loop.py). The trainer minimises loss + weight * mask_loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maskattn_core.regions import layer_mask


class RegionSupervision:
    """A MaskAttnPatch recorder (its `gate` hook sees every gated layer's probabilities) that sums the mask loss of
    the micro-batch set by `begin`; `take` returns its mean and forgets the batch, so a recomputation (gradient
    checkpointing) or an ungraded pass (validation) adds nothing."""

    def __init__(self):
        self.targets = None
        self.total, self.count = None, 0

    def begin(self, targets) -> None:
        """`targets`: per sample of the micro-batch, (columns int64 [K], latent-grid masks float [K, h, w]) or None."""
        self.targets = targets if any(t is not None for t in targets) else None
        self.total, self.count = None, 0

    def gate(self, key, probabilities, opened, extra_options) -> None:
        if self.targets is None or not probabilities.requires_grad:
            return
        grid = tuple(extra_options["activations_shape"][-2:])
        for sample, target in enumerate(self.targets):
            if target is None:
                continue
            columns, masks = target
            wanted = layer_mask(masks.to(probabilities.device), grid).flatten(1)  # [K, N], N row-major as the UNet
            p = probabilities[sample][:, columns.to(probabilities.device)].transpose(0, 1)  # [K, N]
            term = F.binary_cross_entropy(p.float(), wanted.float(), reduction="none").mean(dim=1).sum()
            self.total = term if self.total is None else self.total + term
            self.count += len(columns)

    def attention(self, key, q, k, mask, heads, extra_options) -> None:
        pass

    def take(self) -> torch.Tensor | None:
        """The micro-batch's mask loss (a tensor with a graph), or None when nothing was supervised."""
        total, count = self.total, self.count
        self.targets, self.total, self.count = None, None, 0
        return None if total is None else total / count


def load_regions(cache, items, cut=()) -> list:
    """Per item: (columns, latent-grid masks) from its --mask-loss cache entry, or None. Columns past a caption cut
    to share the batch (`cut`: (item, before, after) from load_batch) are dropped; of a caption repeated to the
    batch's length only the first copy is supervised (every copy has the same gate)."""
    kept = {id(item): after for item, _, after in cut}
    targets = []
    for item in items:
        entry = cache.get("regions", item.regions) if item.regions else None
        if entry is None or entry["positions"].numel() == 0:
            targets.append(None)
            continue
        columns, masks = entry["positions"], entry["masks"].float()
        if id(item) in kept:
            keep = columns < kept[id(item)]
            columns, masks = columns[keep], masks[keep]
        targets.append((columns, masks) if columns.numel() else None)
    return targets
