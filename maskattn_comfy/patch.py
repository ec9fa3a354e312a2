"""Apply a MaskAttn gate set to a ComfyUI MODEL through its attn2 hooks.

Two hooks per patched model, sharing one `MaskAttnPatch`:
- the attn2 patch sees norm2(x) before `to_q` and the raw text context before `to_k`/`to_v`
  (the paper's gate inputs), computes the hard gate and leaves an additive [B,1,N,T] mask
  in `extra_options`, the dict ComfyUI passes to both hooks of one block call;
- the attn2 replace on each gated key takes that mask and runs ComfyUI's own optimized
  attention with `mask=`, so the user's attention backend still does the work.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

import comfy.ldm.modules.attention as comfy_attention
from maskattn_core import (GateSet, LayerKey, additive_mask, closed_logit, closed_mask, layer_name, open_connections,
                          soft_mask, straight_through)

from .compose import MASK_KEY, GatedReplace, PatchConflictError, composed_replace, without_maskattn
from .model_check import SDXL_CONTEXT_DIM, require_sdxl

log = logging.getLogger("MaskAttn")


STRAIGHT_THROUGH = ("paper", "output")
SOFT_MASK_KEY = "maskattn_soft_mask"  # --straight-through output: the soft gate's mask, beside MASK_KEY


class MaskShapeError(RuntimeError):
    """A later attn2 patch changed what cross-attention sees after the gates were computed."""


@dataclass(frozen=True)
class PatchOptions:
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    threshold: float | None = None  # None: the gate set's own
    # Training only (trainer --straight-through): "paper", the authors' estimator; "output", forward the hard
    # mask's attention, backward the soft gate's (output_straight_through). Without gradients both are the same.
    straight_through: str = "paper"

    def __post_init__(self):
        if self.straight_through not in STRAIGHT_THROUGH:
            raise ValueError(f"straight_through must be one of {STRAIGHT_THROUGH}, got {self.straight_through!r}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must lie in [0, 1], got {self.strength}")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise ValueError(f"need 0 <= start_percent <= end_percent <= 1, got {self.start_percent} and {self.end_percent}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")


class MaskAttnPatch:
    """The state both hooks share: gates, options, and small per-call caches.

    `recorder`, when set, is told every gate (`recorder.gate(key, probabilities, opened,
    extra_options)`, `opened` the boolean hard gate) and every masked attention
    (`recorder.attention(key, q, k, mask, heads, extra_options)`); Visualize Mask uses it.
    """

    def __init__(self, gate_set: GateSet, options: PatchOptions, sigma_range: tuple[float, float] | None,
                 recorder=None):
        self.gate_set = gate_set
        self.options = options
        self.threshold = gate_set.config.threshold if options.threshold is None else options.threshold
        self.soft = gate_set.config.gate == "soft"
        self.output_straight_through = options.straight_through == "output" and not self.soft
        self.penalty = closed_logit(options.strength, gate_set.config.negative_value)
        self.sigma_range = sigma_range  # (sigma_start, sigma_end) or None for the whole schedule
        self.recorder = recorder
        self.keys = {tuple(key): gate_set.layer_heads[layer_name(key)] for key in gate_set.layers}
        self._heads_by_device: dict[torch.device, torch.nn.ModuleDict] = {}
        self._token_cache: dict[str, tuple] = {}
        self._last_sigmas = None
        self._last_active = True
        self._pending = None
        self._warned_run = None

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options; the gates are shared, never copied.
        return self

    # -- the attn2 patch -------------------------------------------------------------------
    def __call__(self, n, context, value, extra_options):
        key = _layer_key(extra_options)
        head_name = self.keys.get(key)
        if head_name is None or not self._active(extra_options):
            return n, context, value
        self._check_pending(extra_options)
        head = self._heads_on(n.device)[head_name]
        tokens = self._token_features(head_name, head, context, extra_options)
        logits = head.logits(n, context, tokens)
        self._pending = extra_options
        if self.soft:  # the ablation: weights scaled by p, forward and backward; no hard gate to compute
            extra_options[MASK_KEY] = soft_mask(logits, self.options.strength, self.gate_set.config.negative_value,
                                                n.dtype)
            if self.recorder is not None:
                probabilities = torch.sigmoid(logits)
                self.recorder.gate(key, probabilities, open_connections(probabilities, self.threshold), extra_options)
            return n, context, value
        probabilities = torch.sigmoid(logits)
        opened = open_connections(probabilities, self.threshold)
        if probabilities.requires_grad:  # training: forward the hard gate, backward through the probabilities
            gate = straight_through(opened.to(probabilities.dtype), probabilities)
            extra_options[MASK_KEY] = additive_mask(gate, self.penalty, n.dtype)
            if self.output_straight_through:  # the same hard mask, its gradient taken by the soft attention instead
                extra_options[MASK_KEY] = extra_options[MASK_KEY].detach()
                extra_options[SOFT_MASK_KEY] = soft_mask(logits, self.options.strength,
                                                         self.gate_set.config.negative_value, n.dtype)
        else:
            extra_options[MASK_KEY] = closed_mask(opened, self.penalty, n.dtype)
        if self.recorder is not None:
            self.recorder.gate(key, probabilities, opened, extra_options)
        return n, context, value

    # -- the attn2 replace -----------------------------------------------------------------
    def attention(self, q, k, v, extra_options):
        mask = extra_options.pop(MASK_KEY, None)
        soft = extra_options.pop(SOFT_MASK_KEY, None)
        heads, precision = extra_options["n_heads"], extra_options["attn_precision"]
        if mask is None:  # outside the step range: exactly ComfyUI's own path
            return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=precision,
                                                       transformer_options=extra_options)
        if mask.shape[-1] != k.shape[1] or mask.shape[-2] != q.shape[1] or mask.shape[0] != q.shape[0]:
            raise MaskShapeError(_mask_shape_message(_layer_key(extra_options), mask, q, k))
        if mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        if self.recorder is not None:
            self.recorder.attention(_layer_key(extra_options), q, k, mask, heads, extra_options)
        if soft is not None:
            return output_straight_through(q, k, v, heads, mask, soft.to(q.dtype), precision, extra_options)
        return comfy_attention.optimized_attention_masked(q, k, v, heads, mask, attn_precision=precision,
                                                          transformer_options=extra_options)

    # -- helpers ---------------------------------------------------------------------------
    def _active(self, extra_options) -> bool:
        if self.sigma_range is None:
            return True
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            return True
        if sigmas is not self._last_sigmas:  # once per model call, not once per layer
            sigma = float(sigmas.max())
            self._last_active = self.sigma_range[1] <= sigma <= self.sigma_range[0]
            self._last_sigmas = sigmas
        return self._last_active

    def _heads_on(self, device: torch.device) -> torch.nn.ModuleDict:
        heads = self._heads_by_device.get(device)
        if heads is None:
            heads = self.gate_set.heads
            if next(heads.parameters()).device != device:  # lowvram/offload: one copy per device, not per call
                heads = torch.nn.ModuleDict({name: _copy_to(h, device) for name, h in heads.items()})
            self._heads_by_device[device] = heads
        return heads

    def _token_features(self, head_name, head, context, extra_options):
        # Every gated layer of one model call sees the same context tensor: compute g(e) once per head.
        # Only without autograd: a cached graph could outlive the backward pass that frees it.
        if torch.is_grad_enabled():
            return head.token_features(context)
        sigmas = extra_options.get("sigmas")
        cached = self._token_cache.get(head_name)
        version = None if context.is_inference() else context._version  # inference tensors have no counter
        if (cached is not None and cached[0] is context and cached[1] == version
                and cached[2] is sigmas and cached[3] is head):
            return cached[4]
        tokens = head.token_features(context)
        self._token_cache[head_name] = (context, version, sigmas, head, tokens)
        return tokens

    def _check_pending(self, extra_options):
        pending, self._pending = self._pending, None
        if pending is None or MASK_KEY not in pending:
            return
        pending.pop(MASK_KEY, None)
        run = extra_options.get("sample_sigmas")
        if run is None or run is not self._warned_run:
            self._warned_run = run
            key = _layer_key(pending)
            where = layer_name(key) if key else "a gated layer"
            log.warning("MaskAttn: the gate mask for %s was computed but not applied: a node after MaskAttn "
                        "Loader replaced its cross-attention. Put MaskAttn Loader last in the MODEL chain, "
                        "or remove the other attention patch.", where)


def output_straight_through(q, k, v, heads, hard_mask, soft_mask, precision, extra_options):
    """y_hard + (y_soft - stopgrad(y_soft)): the value is exactly the hard mask's attention (x - x is exactly 0),
    the gradient (in the gates' logits and in q, k, v) exactly the soft gate's attention's, so a closed
    connection still learns. One more attention per gated layer, in training only; y_hard keeps no graph."""
    def attend(mask):
        return comfy_attention.optimized_attention_masked(q, k, v, heads, mask, attn_precision=precision,
                                                          transformer_options=extra_options)
    with torch.no_grad():
        hard = attend(hard_mask)
    soft = attend(soft_mask)
    return hard + (soft - soft.detach())


def _mask_shape_message(key, mask, q, k) -> str:
    where = layer_name(key) if key else "a gated layer"
    return (f"MaskAttn: at {where} the gates were computed for {mask.shape[0]} x {mask.shape[-2]} locations x "
            f"{mask.shape[-1]} text tokens, but cross-attention got {q.shape[0]} x {q.shape[1]} x {k.shape[1]}: "
            "a cross-attention (attn2) patch that runs after MaskAttn's changed the context or the image "
            "features (e.g. appended tokens). Put MaskAttn Loader after that node in the MODEL chain, so the "
            "gates see what attention sees.")


def _layer_key(extra_options) -> LayerKey | None:
    """The attn2 key of the block call in progress, as ComfyUI's BasicTransformerBlock builds it."""
    block = extra_options.get("block")
    return LayerKey(block[0], block[1], extra_options.get("block_index", 0)) if block else None


def _copy_to(head, device):
    return copy.deepcopy(head).to(device)


def is_maskattn_patch(obj) -> bool:
    return (isinstance(obj, (MaskAttnPatch, GatedReplace))
            or isinstance(getattr(obj, "__self__", None), MaskAttnPatch))


def find_maskattn_patch(model) -> MaskAttnPatch | None:
    """The MaskAttnPatch a MODEL carries, if any."""
    patches = model.model_options.get("transformer_options", {}).get("patches", {}).get("attn2_patch", [])
    for p in patches:
        if isinstance(p, MaskAttnPatch):
            return p
    return None


def apply_maskattn(model, gate_set: GateSet, options: PatchOptions = PatchOptions(), recorder=None):
    """A clone of `model` (a ModelPatcher) with MaskAttn gates; `model` itself is untouched."""
    layer_channels = require_sdxl(model)
    gate_set.check_fits(layer_channels, SDXL_CONTEXT_DIM)
    patched = model.clone()
    transformer_options = patched.model_options.setdefault("transformer_options", {})
    _remove_previous_maskattn(transformer_options)  # a second Loader replaces the first, strength 0 included
    if options.strength == 0.0:
        return patched  # the original attention path, no work at all
    sigma_range = None
    if (options.start_percent, options.end_percent) != (0.0, 1.0):
        sampling = patched.get_model_object("model_sampling")
        sigma_range = (sampling.percent_to_sigma(options.start_percent), sampling.percent_to_sigma(options.end_percent))
    patch = MaskAttnPatch(gate_set, options, sigma_range, recorder)
    replaced = transformer_options.get("patches_replace", {}).get("attn2", {})
    replaces = {}  # alone, or around IPAdapter's image prompt (compose.py); another replace stops here, before any change
    for key in gate_set.layers:
        # ComfyUI looks a layer up by (block, number, index), then (block, number): either may hold another replace.
        comfy_key = next((k for k in (tuple(key), tuple(key[:2])) if k in replaced), tuple(key))
        replaces[key] = composed_replace(patch, replaced.get(comfy_key), layer_name(key), comfy_key)
    patched.set_model_attn2_patch(patch)
    for key, replace in replaces.items():
        patched.set_model_attn2_replace(replace, *key)
    return patched


def _remove_previous_maskattn(transformer_options: dict) -> None:
    """A second MaskAttn Loader on the same MODEL replaces the first instead of stacking."""
    patches = transformer_options.get("patches", {})
    if "attn2_patch" in patches:
        patches["attn2_patch"] = [p for p in patches["attn2_patch"] if not is_maskattn_patch(p)]
    attn2 = transformer_options.get("patches_replace", {}).get("attn2", {})
    for key in [k for k, fn in attn2.items() if is_maskattn_patch(fn)]:
        if without_maskattn(attn2[key]) is None:
            del attn2[key]
        else:  # it shared the layer with IPAdapter: IPAdapter's own replace stays
            attn2[key] = without_maskattn(attn2[key])
