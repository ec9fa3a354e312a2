"""Small real ComfyUI setups shared by the tests."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from maskattn_comfy.tiny_model import FIXTURE_UNET_CONFIG, build_sdxl_model


def read_fixture(path):
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata() or {}
    return load_file(str(path)), meta


def fixture_unet(fixtures_dir, dtype=torch.float32):
    """ComfyUI's SDXL UNet at the fixture's size, with the fixture's base weights (diffusers names mapped)."""
    import comfy.utils

    diffusers_sd = load_file(str(fixtures_dir / "official_tiny_mid_base_unet_diffusers.safetensors"))
    config = dict(FIXTURE_UNET_CONFIG)
    mapping = comfy.utils.unet_to_diffusers(dict(config, num_res_blocks=config["num_res_blocks"]))
    state = {comfy_key: diffusers_sd[d_key].float() for d_key, comfy_key in mapping.items() if d_key in diffusers_sd}
    return build_sdxl_model(config, state_dict=state, dtype=dtype)


def fixture_inputs(fixtures_dir):
    """x, timestep, context, y for the fixture's forward pass; y as ComfyUI builds SDXL's ADM input."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import timestep_embedding

    tensors, meta = read_fixture(fixtures_dir / "official_tiny_mid_forward.safetensors")
    unet_meta = json.loads(meta["unet"]) if "unet" in meta else {}
    width = int(unet_meta.get("addition_time_embed_dim", 32))
    time_ids = tensors["input.time_ids"].flatten()
    embeds = torch.cat([timestep_embedding(t.reshape(1), width) for t in time_ids], dim=-1)
    y = torch.cat([tensors["input.text_embeds"], embeds.reshape(1, -1)], dim=-1)
    return tensors, y


def run_unet(model_patcher, x, timestep, context, y):
    """One forward of the real UNet with the patcher's transformer_options (its patches and replaces)."""
    unet = model_patcher.model.diffusion_model
    options = model_patcher.model_options.get("transformer_options", {})
    with torch.no_grad():
        return unet(x, timesteps=timestep, context=context, y=y, transformer_options=dict(options))
