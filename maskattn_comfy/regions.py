"""MaskAttn Region: confine chosen text tokens to a mask of the image, through the attn2 hooks MaskAttn uses.

One `RegionPatch` per MODEL holds every region. Its attn2 patch builds, for each block call, an additive
[B,1,N,T] mask (maskattn_core.regions: the mask averaged onto that call's layer grid, log(1 - strength(1 - m))
on the region's token columns, 0 elsewhere) and leaves it under REGION_KEY; the attn2 replace of the layer
(compose.GatedReplace) adds it to MaskAttn Loader's gates where both act and runs the masked attention
through ComfyUI's own optimized attention. No extra model pass.

ComfyUI runs an area's (or a mask's bounds') crop of the latent as its own model call; a calc_cond_batch
wrapper notes each cond's area by its uuid, so that call's mask is cut from the same place of the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import comfy.ldm.modules.attention as comfy_attention
import comfy.patcher_extension
from maskattn_core import LayerKey, layer_name
from maskattn_core.regions import (NEGATIVE_VALUE, as_mask_batch, latent_mask, layer_mask, region_logits,
                                   repeated_positions)

from .compose import MASK_KEY, REGION_KEY, GatedReplace, region_replace, without_regions
from .model_check import ModelFamilyError, attn2_layers, diffusion_model_of
from .recording import layer_grid

CHUNK = 77  # CLIP's context: a prompt's token columns come in chunks of 77
WRAPPER_KEY = "maskattn_regions"


class RegionMaskError(RuntimeError):
    """A region cannot be placed on what cross-attention got (context or area)."""


@dataclass(frozen=True, eq=False)
class Region:
    """Token `positions` (columns of the prompt's context) that may reach only where `mask` is 1.

    `mask`: [H, W] or [B, H, W] in [0, 1] over the whole image, any resolution (mask i for image i of the
    latent batch, repeated when there are fewer). `prompt_length`: the prompt's token columns (77 per chunk;
    default the chunks that hold the positions). `unconditional`: also confine those columns in the other
    prompts' rows (the negative's), which hold other words there; off by default.
    """
    positions: tuple[int, ...]
    mask: Tensor
    strength: float = 1.0
    prompt_length: int | None = None
    unconditional: bool = False

    def __post_init__(self):
        positions = tuple(sorted({int(p) for p in self.positions}))
        if not positions or positions[0] < 0:
            raise ValueError(f"a region needs token positions >= 0; got {list(self.positions)}")
        length = self.prompt_length or CHUNK * (positions[-1] // CHUNK + 1)
        if positions[-1] >= length:
            raise ValueError(f"token position {positions[-1]} lies beyond the prompt's {length} token columns")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"a region's strength must lie in [0, 1], got {self.strength}")
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "prompt_length", int(length))
        object.__setattr__(self, "mask", as_mask_batch(self.mask).cpu())

    def without(self, positions) -> "Region | None":
        """This region minus `positions` (a later region took them), or None when none are left."""
        left = tuple(p for p in self.positions if p not in set(positions))
        if not left:
            return None
        return Region(left, self.mask, self.strength, self.prompt_length, self.unconditional)


class RegionPatch:
    """The attn2 patch (`__call__`), the attention of layers the Loader does not gate (`attention`) and the
    calc_cond_batch wrapper (`calc_cond_batch`) of one MODEL's regions."""

    def __init__(self, regions: tuple[Region, ...], negative_value: float = NEGATIVE_VALUE):
        self.regions = tuple(regions)
        self.negative_value = negative_value
        self._areas: dict = {}  # uuid -> (y, x) of its crop, for the model pass in progress
        self._latent_size = None  # (height, width) of the whole latent of that pass
        self._cache: dict = {}

    def __deepcopy__(self, memo):  # ModelPatcher.clone() deep-copies model_options; regions are shared
        return self

    # -- the attn2 patch -------------------------------------------------------------------
    def __call__(self, n, context, value, extra_options):
        mask = self.mask_for(n.shape[0], n.shape[1], context.shape[1], extra_options, n.dtype, n.device)
        if mask is not None:
            extra_options[REGION_KEY] = mask
        return n, context, value

    def mask_for(self, batch: int, locations: int, tokens: int, extra_options: dict, dtype=torch.float32,
                 device="cpu") -> Tensor | None:
        """The additive [batch,1,locations,tokens] mask of one block call, or None when no row is confined."""
        confined = self.confined(extra_options)
        if not any(confined):
            return None
        uuids = list(extra_options.get("uuids") or [None] * len(confined))
        grid = layer_grid(extra_options, locations)
        crop = tuple(int(s) for s in extra_options["original_shape"][-2:])
        placements = tuple(self._placement(uuid, crop) for uuid in uuids)
        key = (batch, locations, tokens, grid, crop, confined, placements, dtype, str(device))
        mask = self._cache.get(key)
        if mask is None:
            if len(self._cache) > 256:
                self._cache.clear()
            mask = self._build(batch, locations, tokens, grid, crop, confined, placements).to(device, dtype)
            self._cache[key] = mask
        return mask

    def confined(self, extra_options) -> tuple[tuple[int, ...], ...]:
        """Per chunk of the batch (cond_or_uncond), the indices of the regions that confine its rows."""
        return tuple(tuple(i for i, r in enumerate(self.regions) if which == 0 or r.unconditional)
                     for which in (extra_options.get("cond_or_uncond") or [0]))

    def _placement(self, uuid, crop) -> tuple[int, int, int, int]:
        """(latent height, latent width, top, left) of a call's crop in the whole latent."""
        full = self._latent_size or crop
        top, left = self._areas.get(uuid, (0, 0)) if uuid is not None else (0, 0)
        if top + crop[0] > full[0] or left + crop[1] > full[1]:
            raise RegionMaskError(f"a {crop[0]}x{crop[1]} latent crop at ({top}, {left}) does not fit the "
                                  f"{full[0]}x{full[1]} latent")
        return (*full, top, left)

    def _build(self, batch, locations, tokens, grid, crop, confined, placements) -> Tensor:
        mask = torch.zeros(batch, 1, locations, tokens)
        rows = batch // len(confined)
        for chunk, (indices, (height, width, top, left)) in enumerate(zip(confined, placements)):
            for region in (self.regions[i] for i in indices):
                latent = latent_mask(region.mask, (height, width))[:, top:top + crop[0], left:left + crop[1]]
                logits = region_logits(layer_mask(latent, grid).flatten(1), region.strength, self.negative_value)
                logits = logits[torch.arange(rows) % logits.shape[0]]  # [rows, locations]
                columns = repeated_positions(region.positions, region.prompt_length, tokens)
                mask[chunk * rows:(chunk + 1) * rows, 0, :, columns] = logits[:, :, None].expand(-1, -1, len(columns))
        return mask

    # -- the attn2 replace on layers the Loader does not gate ------------------------------------
    def attention(self, q, k, v, extra_options):
        mask = extra_options.pop(MASK_KEY, None)
        heads, precision = extra_options["n_heads"], extra_options["attn_precision"]
        if mask is None:
            return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=precision,
                                                       transformer_options=extra_options)
        if mask.shape[0] != q.shape[0] or mask.shape[-2] != q.shape[1] or mask.shape[-1] != k.shape[1]:
            block = extra_options.get("block")
            where = layer_name((*block, extra_options.get("block_index", 0))) if block else "a layer"
            raise RegionMaskError(
                f"MaskAttn Region: at {where} the region mask was built for {mask.shape[0]} x {mask.shape[-2]} x "
                f"{mask.shape[-1]} but cross-attention got {q.shape[0]} x {q.shape[1]} x {k.shape[1]}: an attn2 "
                "patch after MaskAttn Region changed the context; put MaskAttn Region after that node.")
        confined = self.confined(extra_options)
        rows = q.shape[0] // len(confined)
        inside = [chunk * rows + i for chunk, regions in enumerate(confined) if regions for i in range(rows)]
        if len(inside) == q.shape[0]:
            return comfy_attention.optimized_attention_masked(q, k, v, heads, mask.to(q.dtype),
                                                              attn_precision=precision,
                                                              transformer_options=extra_options)
        # The rows no region confines (the negative's) run unmasked, exactly ComfyUI's own attention.
        out = torch.empty_like(q)
        outside = [row for row in range(q.shape[0]) if row not in set(inside)]
        out[outside] = comfy_attention.optimized_attention(q[outside], k[outside], v[outside], heads,
                                                           attn_precision=precision,
                                                           transformer_options=extra_options)
        out[inside] = comfy_attention.optimized_attention_masked(q[inside], k[inside], v[inside], heads,
                                                                 mask[inside].to(q.dtype), attn_precision=precision,
                                                                 transformer_options=extra_options)
        return out

    # -- the calc_cond_batch wrapper ------------------------------------------------------------
    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        self._areas = {cond["uuid"]: _area_offset(cond["area"]) for group in conds for cond in (group or [])
                       if cond.get("area") is not None and "uuid" in cond}
        self._latent_size = tuple(int(s) for s in x_in.shape[-2:])
        try:
            return executor(model, conds, x_in, timestep, model_options)
        finally:
            self._areas, self._latent_size = {}, None


def _area_offset(area) -> tuple[int, int]:
    """(top, left) in latent cells of a resolved ComfyUI area (..., height, width, ..., top, left)."""
    half = len(area) // 2
    return int(area[2 * half - 2]), int(area[2 * half - 1])


def as_region(region) -> Region:
    return region if isinstance(region, Region) else Region(*region)


def find_region_patch(model) -> RegionPatch | None:
    """The RegionPatch a MODEL carries, if any."""
    patches = model.model_options.get("transformer_options", {}).get("patches", {}).get("attn2_patch", [])
    return next((p for p in patches if isinstance(p, RegionPatch)), None)


def merge_regions(previous, new) -> tuple[Region, ...]:
    """`previous` then `new`, each new region taking its token positions from every earlier one (a second
    region on the same words replaces the first); regions at strength 0 only take positions away."""
    merged: list[Region] = list(previous)
    for region in new:
        merged = [r for r in (old.without(region.positions) for old in merged) if r is not None]
        if region.strength > 0.0:
            merged.append(region)
    return tuple(merged)


def apply_regions(model, regions, unconditional: bool | None = None):
    """A clone of `model` (a ModelPatcher) on which each region's tokens may reach only its mask.

    `regions`: `Region`s or tuples (token_positions, mask, strength[, prompt_length]): token_positions are
    columns of the prompt's text context (0-76 for one 77-token chunk; columns of a shorter prompt that ComfyUI
    repeats to the length of a longer one batched with it are confined in every copy); mask is [H, W] or
    [B, H, W] in [0, 1] over the whole image at any resolution (averaged onto each cross-attention layer's
    grid; mask i for latent i, repeated when fewer); strength in [0, 1]. At a layer cell where the averaged
    mask is m, each confined token's attention weight is multiplied by 1 - strength * (1 - m) before the
    softmax renormalises (additive logit log of that, at least -10000: strength 1 outside the mask is the
    paper's -10000). Every attn2 layer is confined; only the positive prompt's rows (cond_or_uncond 0) unless
    `unconditional` (or the region's own flag) is set; an area's crop is confined with the same part of the
    mask. Regions already on `model` stay, except on the positions a new region names (the new one replaces
    them); strength 0 removes a region. MaskAttn Loader's gates, before or after, multiply with the regions
    (a connection is open only if both allow it); IPAdapter's image prompt is never masked.
    """
    new = [as_region(r) for r in regions]
    if unconditional is not None:
        new = [Region(r.positions, r.mask, r.strength, r.prompt_length, unconditional) for r in new]
    layers = attn2_layers(diffusion_model_of(model))
    if not layers:
        raise ModelFamilyError("MaskAttn Region needs a UNet with cross-attention (SDXL-family); this MODEL's "
                               f"diffusion model, a {type(diffusion_model_of(model)).__name__}, has none")
    patched = model.clone()
    previous = find_region_patch(patched)
    kept = merge_regions(previous.regions if previous else (), new)
    transformer_options = patched.model_options.setdefault("transformer_options", {})
    _remove_regions(patched, transformer_options)
    if not kept:
        return patched
    patch = RegionPatch(kept)
    replaced = transformer_options.get("patches_replace", {}).get("attn2", {})
    replaces = {}  # every layer's replace is decided before anything changes: a conflict leaves the model as it was
    for key in layers:
        comfy_key = next((k for k in (tuple(key), tuple(key[:2])) if k in replaced), tuple(key))
        replaces[key] = region_replace(patch, replaced.get(comfy_key), layer_name(key), comfy_key)
    patched.set_model_attn2_patch(patch)
    for key, replace in replaces.items():
        patched.set_model_attn2_replace(replace, *key)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY,
                                 patch.calc_cond_batch)
    return patched


def _remove_regions(patched, transformer_options: dict) -> None:
    patches = transformer_options.get("patches", {})
    if "attn2_patch" in patches:
        patches["attn2_patch"] = [p for p in patches["attn2_patch"] if not isinstance(p, RegionPatch)]
    attn2 = transformer_options.get("patches_replace", {}).get("attn2", {})
    for key in [k for k, fn in attn2.items() if isinstance(fn, GatedReplace) and fn.regions is not None]:
        kept = without_regions(attn2[key])
        if kept is None:
            del attn2[key]
        else:
            attn2[key] = kept
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY)


def word_positions(clip, text: str, words: str) -> tuple[list[int], int]:
    """The token columns of `words` (comma-separated, as Visualize Mask's: any script, "(red:1.2)" tolerated) in
    `text` as `clip` tokenizes it, and the prompt's token column count; a ValueError names every word not found."""
    from .tokens import select_tokens, token_labels

    if not words.replace(",", " ").strip():
        raise ValueError("MaskAttn Region needs the word(s) to confine, e.g. 'red, cube' (comma-separated)")
    labels = token_labels(clip, clip.tokenize(text))
    missing, positions = [], []
    for word in (w.strip() for w in words.split(",")):
        if not word:
            continue
        try:
            positions += select_tokens(labels, word)[0]
        except ValueError:
            missing.append(word)
    if missing:
        known = ", ".join(dict.fromkeys(label.word for label in labels if not label.special))
        raise ValueError(f"MaskAttn Region: {', '.join(repr(w) for w in missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not in the prompt {text!r}; its words (as the "
                         f"tokenizer splits them) are: {known}")
    return positions, len(labels)


def apply_region_words(model, clip, text: str, words: str, mask: Tensor, strength: float, unconditional=False):
    """apply_regions for `words` of the prompt `text`: the node's whole work."""
    positions, length = word_positions(clip, text, words)
    return apply_regions(model, [Region(positions, mask, strength, length, unconditional)])


# -- what Visualize Mask draws ---------------------------------------------------------------

def require_regions(model) -> RegionPatch:
    """The RegionPatch of a MODEL with MaskAttn Region nodes, or a ValueError that says what to connect."""
    patch = find_region_patch(model)
    if patch is None:
        raise ValueError("this MODEL carries no MaskAttn Region: connect the MODEL output of a MaskAttn Region node "
                         "(with strength above 0) to Visualize Mask for the region mask")
    return patch


def layer_levels(unet) -> dict:
    """{attn2 LayerKey: the number of stride-2 downsamples above it} for a ComfyUI UNet, from its own modules:
    an input block's Downsample counts for the blocks after it, an output block's Upsample for the blocks after it."""
    levels, level = {}, 0
    blocks = [("input", unet.input_blocks), ("middle", [unet.middle_block]), ("output", unet.output_blocks)]
    for block_name, seq in blocks:
        for number, block in enumerate(seq):
            if block_name == "input":
                level += sum(type(layer).__name__ == "Downsample" for layer in block)
            for layer in block:
                for index, _ in enumerate(getattr(layer, "transformer_blocks", None) or []):
                    levels[(block_name, number, index)] = level
            if block_name == "output":
                level -= sum(type(layer).__name__ == "Upsample" for layer in block)
    return {LayerKey(*key): value for key, value in levels.items()}


def region_maps(patch: RegionPatch, levels: dict, latent_size: tuple[int, int], columns: list[list[int]],
                batch_index: int = 0) -> dict:
    """{layer: [C, h, w]} the share of attention weight each column group keeps at each layer's grid under the
    regions (1 where no region confines it; 1 - strength (1 - m) where one does), image `batch_index`; a group's
    columns are averaged, as Visualize Mask's words are."""
    from .recording import level_sides

    maps = {}
    for key, level in levels.items():
        grid = level_sides(*latent_size, level)
        kept = torch.ones(len(columns), *grid)
        for c, group in enumerate(columns):
            per_column = torch.ones(len(group), *grid)
            for g, position in enumerate(group):
                for region in patch.regions:
                    if position % region.prompt_length in region.positions:
                        mask = region.mask[batch_index % region.mask.shape[0]][None]
                        m = layer_mask(latent_mask(mask, latent_size), grid)[0]
                        per_column[g] = per_column[g] * region_logits(m, region.strength, patch.negative_value).exp()
            kept[c] = per_column.mean(0)
        maps[key] = kept
    return maps
