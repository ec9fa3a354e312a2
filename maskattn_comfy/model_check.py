"""Which cross-attention layers a ComfyUI MODEL has, and whether it is SDXL-family."""

from __future__ import annotations

from maskattn_core import LayerKey

SDXL_CONTEXT_DIM = 2048
_KNOWN_CONTEXTS = {768: "SD1.x (768-wide CLIP-L context)", 1024: "SD2.x (1024-wide OpenCLIP context)",
                   1280: "the SDXL refiner (1280-wide context)", 4096: "a T5-conditioned model"}


class ModelFamilyError(ValueError):
    """The MODEL is not one MaskAttn can patch."""


def diffusion_model_of(model):
    """The torch UNet inside a ModelPatcher (or a BaseModel, or the UNet itself)."""
    inner = getattr(model, "model", model)
    return getattr(inner, "diffusion_model", inner)


def attn2_layers(unet) -> dict[LayerKey, tuple[int, int]]:
    """{(block_name, number, transformer_index): (channels, context_dim)} for every attn2 layer."""
    layers: dict[LayerKey, tuple[int, int]] = {}
    blocks = [("input", getattr(unet, "input_blocks", None)), ("middle", [getattr(unet, "middle_block", None)]),
              ("output", getattr(unet, "output_blocks", None))]
    for block_name, seq in blocks:
        for number, block in enumerate(seq or []):
            for layer in block or []:
                for index, transformer in enumerate(getattr(layer, "transformer_blocks", None) or []):
                    attn2 = getattr(transformer, "attn2", None)
                    if attn2 is not None:
                        layers[LayerKey(block_name, number, index)] = (attn2.to_q.in_features, attn2.to_k.in_features)
    return layers


def require_sdxl(model) -> dict[LayerKey, int]:
    """Channel width of each attn2 layer of an SDXL-family MODEL, or a ModelFamilyError that says what it is."""
    unet = diffusion_model_of(model)
    layers = attn2_layers(unet)
    if not layers:
        raise ModelFamilyError(
            f"MaskAttn needs an SDXL-family UNet, but this MODEL's diffusion model is a {type(unet).__name__} "
            "with no UNet cross-attention blocks (a DiT or another architecture). Load an SDXL checkpoint "
            "(base, a fine-tune, or v-prediction).")
    contexts = {context for _, context in layers.values()}
    if contexts != {SDXL_CONTEXT_DIM}:
        found = ", ".join(f"{c} ({_KNOWN_CONTEXTS.get(c, 'unknown family')})" for c in sorted(contexts))
        raise ModelFamilyError(
            f"MaskAttn needs an SDXL-family model (text context {SDXL_CONTEXT_DIM} wide); this MODEL's "
            f"cross-attention reads context of width {found}. Connect an SDXL base or fine-tune instead.")
    return {key: channels for key, (channels, _) in layers.items()}
