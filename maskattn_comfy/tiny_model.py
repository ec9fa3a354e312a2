"""A tiny SDXL-topology model built from ComfyUI's own classes, for the demo, tests and benchmarks.

It has SDXL's block layout (attn2 layers at input 4,5,7,8, middle, output 0-5, 2048-wide
context, 2816-wide ADM input) at small widths, with seeded weights: ComfyUI's ops skip
initialisation, so every parameter is filled here.
"""

from __future__ import annotations

import torch

TINY_UNET_CONFIG = {
    "model_channels": 32, "in_channels": 4, "out_channels": 4, "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 1, 1, 2, 2], "transformer_depth_middle": 2,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2], "context_dim": 2048, "adm_in_channels": 2816,
    "use_linear_in_transformer": True, "num_head_channels": 64, "use_spatial_transformer": True,
    "num_classes": "sequential", "legacy": False, "use_temporal_attention": False, "use_temporal_resblock": False, "image_size": 32,
}
# The layout of the official fixture: the same, with a 1472-wide ADM input (1280 + 6*32).
FIXTURE_UNET_CONFIG = dict(TINY_UNET_CONFIG, adm_in_channels=1472)


def fill_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "in_layers.0.weight",
                              "out_layers.0.weight", "out.0.weight")) or (p.ndim == 1 and "norm" in name and "weight" in name):
                p.copy_(1.0 + scale * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=generator))
    return module


def build_sdxl_model(unet_config: dict | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
                     v_prediction: bool = False, state_dict: dict | None = None):
    """A comfy ModelPatcher around a real model_base.SDXL with the given UNet config."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    from comfy.model_base import ModelType

    model_config = comfy.supported_models.SDXL(dict(unet_config or TINY_UNET_CONFIG))
    model_config.set_inference_dtype(dtype, None)
    model_type = ModelType.V_PREDICTION if v_prediction else ModelType.EPS
    model = comfy.model_base.SDXL(model_config, model_type=model_type, device=torch.device("cpu"))
    if state_dict is None:
        fill_(model.diffusion_model, seed)
    else:
        missing, unexpected = model.diffusion_model.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(f"UNet weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.diffusion_model.to(dtype)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def tiny_conditioning(batch: int = 1, tokens: int = 77, seed: int = 0, width: int = 1024, height: int = 1024):
    """ComfyUI conditioning ([[context, {"pooled_output": ...}]]) with seeded 2048-wide tokens."""
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, tokens, 2048, generator=generator)
    pooled = torch.randn(batch, 1280, generator=generator)
    return [[context, {"pooled_output": pooled, "width": width, "height": height}]]


TINY_VAE_CONFIG = {"embed_dim": 4, "ddconfig": {
    "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}


def build_tiny_vae(seed: int = 0):
    """A real comfy.sd.VAE with SDXL's latent layout (4 channels, 8x downscale) at a tiny width."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    module = AutoencoderKL(**TINY_VAE_CONFIG)
    fill_(module, seed, scale=0.1)
    return comfy.sd.VAE(sd=module.state_dict(), config={"params": TINY_VAE_CONFIG})



TINY_CLIP_CONFIG = {"num_hidden_layers": 3, "intermediate_size": 64, "num_attention_heads": 2}


def build_sdxl_clip(seed: int = 0):
    """A real comfy.sd.CLIP for SDXL (its real tokenizers, CLIP-L + CLIP-G encoders at SDXL's widths,
    3 small layers each), with seeded weights."""
    import comfy.sd
    import comfy.supported_models

    target = comfy.supported_models.SDXL(dict(TINY_UNET_CONFIG)).clip_target()
    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32, "clip_l_model_config": dict(TINY_CLIP_CONFIG),
                                                "clip_g_model_config": dict(TINY_CLIP_CONFIG)})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clip.cond_stage_model.parameters():
            # Rows drawn from a small seeded table: the 49408-token embeddings fill in a blink.
            rows = p.view(p.shape[0], -1) if p.ndim > 1 else p.view(1, -1)
            table = torch.randn((min(rows.shape[0], 97), rows.shape[1]), generator=generator)
            rows.copy_(0.02 * table[torch.arange(rows.shape[0]) % table.shape[0]])
    return clip
