"""MaskAttn's attn2 replace, and how it shares a gated layer with IPAdapter's.

ComfyUI runs one attn2 replace per layer. IPAdapter_plus's replace (`Attn2Replace` in its
`CrossAttentionPatch.py`) computes the text attention itself, with no mask, and adds each adapter's
image-prompt attention to it. MaskAttn's gates belong to the text attention only, so on a layer
both patch, `GatedReplace` runs MaskAttn's masked text attention and then IPAdapter's own
image-prompt callbacks, unchanged, exactly as IPAdapter would have added them. Either node order
meets here:
- IPAdapter first: the Loader finds IPAdapter's replace on the key and takes it inside its own;
- MaskAttn first: IPAdapter finds a replace on the key and calls its `.add(callback, **kwargs)`,
  which builds IPAdapter's own `Attn2Replace` inside MaskAttn's.
Any other replace on a gated key (one MaskAttn cannot see inside) is a PatchConflictError: a
clear stop, never a picture that silently lost one of the two patches.

MaskAttn Region (regions.py) confines words with the same replace: its attn2 patch leaves its additive mask
under REGION_KEY, and the replace adds it to the gates' mask (a connection stays open only if both allow it;
below strength 1 the kept weights multiply). On a layer the Loader does not gate, the RegionPatch's own
attention runs instead of MaskAttnPatch's.
"""

from __future__ import annotations

MASK_KEY = "maskattn_mask"  # the gates' additive [B,1,N,T] mask, from the attn2 patch to the replace of one block call
REGION_KEY = "maskattn_region_mask"  # the regions' additive mask, the same way

# IPAdapter's stand-in sigma when a call carries none (percent_to_sigma(0.0) gives the same): every window holds it.
NO_SIGMA = 999999999.9


class PatchConflictError(ValueError):
    """Another node already replaces cross-attention on a layer MaskAttn needs."""


def is_image_prompt_replace(obj) -> bool:
    """IPAdapter_plus's Attn2Replace: adapters' `ipadapter_attention` callbacks, each with its sigma window."""
    callbacks, kwargs = getattr(obj, "callback", None), getattr(obj, "kwargs", None)
    return (type(obj).__name__ == "Attn2Replace" and callable(getattr(obj, "get_multigpu_kwargs", None))
            and isinstance(callbacks, list) and isinstance(kwargs, list) and len(callbacks) == len(kwargs) > 0
            and all(getattr(c, "__name__", None) == "ipadapter_attention" for c in callbacks)
            and all(isinstance(kw, dict) and "sigma_start" in kw and "sigma_end" in kw for kw in kwargs))


class GatedReplace:
    """MaskAttn's attn2 replace on one gated layer: the gates' masked text attention (`patch.attention`),
    plus IPAdapter's image-prompt attention where IPAdapter patches the same layer.

    `regions` is the RegionPatch when MaskAttn Region confines words on this layer too; on a layer only regions
    patch, `patch` is that RegionPatch itself."""

    def __init__(self, patch, image_prompt=None, regions=None):
        self.patch = patch  # a MaskAttnPatch or RegionPatch: shared, never copied (their __deepcopy__ returns self)
        self.image_prompt = image_prompt  # IPAdapter's Attn2Replace, or None
        self.regions = regions

    def __call__(self, q, k, v, extra_options):
        region = extra_options.pop(REGION_KEY, None)
        if region is not None:
            gates = extra_options.get(MASK_KEY)
            extra_options[MASK_KEY] = region if gates is None else gates + region
        out = self.patch.attention(q, k, v, extra_options)
        if self.image_prompt is None:
            return out
        return image_prompt_attention(self.image_prompt, out, q, k, v, extra_options)

    def add(self, callback, **kwargs):
        """IPAdapter's way onto a key that already has a replace (its set_model_patch_replace)."""
        if self.image_prompt is not None:
            self.image_prompt.add(callback, **kwargs)
            return
        replace_class = getattr(callback, "__globals__", {}).get("Attn2Replace")
        image_prompt = replace_class(callback, **kwargs) if isinstance(replace_class, type) else None
        if not is_image_prompt_replace(image_prompt):
            raise PatchConflictError(
                f"A node after MaskAttn Loader tried to add {getattr(callback, '__qualname__', callback)!r} to "
                "MaskAttn's cross-attention (attn2) replace. MaskAttn composes with IPAdapter_plus's image "
                "prompt there, not with this; remove one of the two nodes from this MODEL chain.")
        self.image_prompt = image_prompt

    def to(self, device, *args, **kwargs):
        # ComfyUI moves replaces with the model (model_patches_to); IPAdapter's keeps its per-device copies.
        if self.image_prompt is not None and hasattr(self.image_prompt, "to"):
            self.image_prompt = self.image_prompt.to(device, *args, **kwargs)
        return self


def image_prompt_attention(replace, out, q, k, v, extra_options):
    """What IPAdapter's Attn2Replace adds to the text attention `out`: each adapter's callback, in order, at the
    steps inside its [sigma_end, sigma_start] window, given the running sum as IPAdapter gives it."""
    sigma = extra_options["sigmas"].detach().cpu()[0].item() if "sigmas" in extra_options else NO_SIGMA
    per_device = replace.get_multigpu_kwargs(q.device)
    for callback, window, kwargs in zip(replace.callback, replace.kwargs, per_device):
        if window["sigma_end"] <= sigma <= window["sigma_start"]:
            out = out + callback(out, q, k, v, extra_options, **kwargs)
    return out.to(dtype=q.dtype)


def composed_replace(patch, existing, where: str, comfy_key) -> GatedReplace:
    """MaskAttn's replace for a gated key that holds `existing` (None when free)."""
    if existing is None or is_image_prompt_replace(existing):
        return GatedReplace(patch, existing)
    if isinstance(existing, GatedReplace) and existing.patch is existing.regions:  # regions only: the gates join
        return GatedReplace(patch, existing.image_prompt, existing.regions)
    raise PatchConflictError(
        f"MaskAttn needs the cross-attention (attn2) replace on {where} (ComfyUI key {comfy_key}), "
        "but another node already replaces attention there, and only one replace can run per layer. "
        "MaskAttn composes with IPAdapter there, not with this node. Remove that node from this MODEL chain "
        "or limit it to other blocks; MaskAttn Loader cannot combine with it on the same layer.")


def without_maskattn(entry):
    """What stays on a key when MaskAttn Loader leaves it: the regions' replace and IPAdapter's if they shared the
    layer, else nothing."""
    if not isinstance(entry, GatedReplace):
        return entry
    if entry.regions is not None:
        return GatedReplace(entry.regions, entry.image_prompt, entry.regions)
    return entry.image_prompt


def region_replace(regions, existing, where: str, comfy_key) -> GatedReplace:
    """The replace for a key MaskAttn Region confines, holding `existing` (None when free); a previous region
    replace on it must have been taken off first (without_regions)."""
    if isinstance(existing, GatedReplace):  # MaskAttn Loader's gates (and IPAdapter's image prompt) stay
        return GatedReplace(existing.patch, existing.image_prompt, regions)
    if existing is None or is_image_prompt_replace(existing):
        return GatedReplace(regions, existing, regions)
    raise PatchConflictError(
        f"MaskAttn Region needs the cross-attention (attn2) replace on {where} (ComfyUI key {comfy_key}), "
        "but another node already replaces attention there, and only one replace can run per layer. "
        "MaskAttn composes with IPAdapter there, not with this node. Remove that node from this MODEL chain "
        "or put MaskAttn Region before it.")


def without_regions(entry):
    """What stays on a key when MaskAttn Region leaves it: the Loader's gates and IPAdapter's image prompt."""
    if not isinstance(entry, GatedReplace) or entry.regions is None:
        return entry
    if entry.patch is entry.regions:
        return entry.image_prompt
    return GatedReplace(entry.patch, entry.image_prompt)
