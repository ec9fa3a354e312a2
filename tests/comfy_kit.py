"""Small real ComfyUI setups shared by the tests, and the seeded recipes of the official reference vectors.

The reference vectors in tests/fixtures/official store only what the authors' code computed; every
input and base weight is rebuilt here from a seed, the same way tests/fixtures/official/generate.py
built it for the authors' code.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official"
TOKEN_DIM = 2048


def read_fixture(path):
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata() or {}
    return load_file(str(path)), meta


# -- seeded recipes (also imported by the generator) ---------------------------------------

def seeded_uniform(seed: int, name: str, shape, bound: float, center: float = 0.0) -> torch.Tensor:
    """float32 values uniform in [center - bound, center + bound), drawn for `name` under `seed`.

    Only PCG64's raw 64-bit stream and its seeding are used: numpy keeps those stable across versions and
    platforms, while its distributions (normal, uniform) may change. Each name has its own stream, so order
    and the set of other names never matter.
    """
    count = int(np.prod(shape, dtype=np.int64))
    bits = np.random.Generator(np.random.PCG64([seed, zlib.crc32(name.encode())])).bit_generator.random_raw(count)
    unit = (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53  # 53 random bits: exact in [0, 1)
    return torch.from_numpy((center + bound * (2.0 * unit - 1.0)).astype(np.float32)).reshape(tuple(shape))


def seeded_parameter(seed: int, name: str, shape) -> torch.Tensor:
    """A layer's parameter: norm scales near 1, biases near 0, weights with unit-variance fan-in scaling."""
    shape = tuple(shape)
    if len(shape) == 1 and name.endswith("weight"):
        return seeded_uniform(seed, name, shape, 0.1, center=1.0)
    if len(shape) <= 1:
        return seeded_uniform(seed, name, shape, 0.1)
    fan_in = int(np.prod(shape[1:]))
    return seeded_uniform(seed, name, shape, (3.0 / fan_in) ** 0.5)


def seeded_input(seed: int, name: str, shape) -> torch.Tensor:
    """Unit-variance activations."""
    return seeded_uniform(seed, name, shape, 3.0 ** 0.5)


def layer_case_tensors(meta: dict) -> dict[str, torch.Tensor]:
    """The weights and inputs of a layer case (names as in the authors' Attention and MaskGateHead)."""
    seed, batch, locations, channels, tokens = (int(meta[k]) for k in ("seed", "batch", "locations", "channels",
                                                                      "tokens"))
    inner, hidden = int(meta["heads"]) * int(meta["dim_head"]), int(meta["gate_hidden_dim"])
    shapes = {"attn.to_q.weight": (inner, channels), "attn.to_k.weight": (inner, TOKEN_DIM),
              "attn.to_v.weight": (inner, TOKEN_DIM), "attn.to_out.0.weight": (channels, inner),
              "attn.to_out.0.bias": (channels,)}
    for net, width in (("feature_net", channels), ("token_net", TOKEN_DIM)):
        shapes.update({f"gate_head.{net}.0.weight": (width,), f"gate_head.{net}.0.bias": (width,),
                       f"gate_head.{net}.1.weight": (hidden, width), f"gate_head.{net}.1.bias": (hidden,),
                       f"gate_head.{net}.3.weight": (hidden, hidden), f"gate_head.{net}.3.bias": (hidden,)})
    tensors = {name: seeded_parameter(seed, name, shape) for name, shape in shapes.items()}
    tensors["gate_head.logit_bias"] = torch.tensor(float(meta["logit_bias"]))
    tensors["input.hidden_states"] = seeded_input(seed, "input.hidden_states", (batch, locations, channels))
    tensors["input.encoder_hidden_states"] = seeded_input(seed, "input.encoder_hidden_states",
                                                          (batch, tokens, TOKEN_DIM))
    return tensors


def base_unet_weights(seed: int, shapes: dict) -> dict[str, torch.Tensor]:
    """The frozen base UNet, by diffusers parameter name."""
    return {name: seeded_parameter(seed, name, shape) for name, shape in shapes.items()}


def forward_inputs(meta: dict) -> dict[str, torch.Tensor]:
    """One UNet call's inputs in diffusers' terms: latent, text tokens, pooled text, SDXL's six size ids."""
    seed = int(meta["input_seed"])
    height, width = json.loads(meta["latent_size"])
    return {"input.sample": seeded_input(seed, "input.sample", (1, 4, height, width)),
            "input.encoder_hidden_states": seeded_input(seed, "input.encoder_hidden_states", (1, 77, TOKEN_DIM)),
            "input.text_embeds": seeded_input(seed, "input.text_embeds", (1, 1280)),
            "input.time_ids": torch.tensor([json.loads(meta["time_ids"])], dtype=torch.float32)}


# -- ComfyUI at the fixture's size ------------------------------------------------------------

def fixture_unet(fixtures_dir=FIXTURES, dtype=torch.float32):
    """ComfyUI's SDXL UNet at the fixture's size, with the fixture's seeded base weights (diffusers names mapped)."""
    import comfy.utils
    from maskattn_comfy.tiny_model import FIXTURE_UNET_CONFIG, build_sdxl_model

    _, meta = read_fixture(fixtures_dir / "official_tiny_forward.safetensors")
    config = dict(FIXTURE_UNET_CONFIG)
    model = build_sdxl_model(config, dtype=torch.float32)
    comfy_shapes = {k: v.shape for k, v in model.model.diffusion_model.state_dict().items()}
    # ComfyUI's map also names parameters this layout lacks (a skip_connection where channels stay the same), and
    # names SDXL's ADM weights twice: diffusers' SDXL UNet holds them as add_embedding, never class_embedding.
    mapping = {d_key: c_key for d_key, c_key in comfy.utils.unet_to_diffusers(config).items()
               if c_key in comfy_shapes and not d_key.startswith("class_embedding.")}
    unmapped = sorted(set(comfy_shapes) - set(mapping.values()))
    assert not unmapped, f"ComfyUI UNet parameters with no diffusers name: {unmapped[:5]}"
    weights = base_unet_weights(int(meta["weight_seed"]), {d_key: comfy_shapes[c_key] for d_key, c_key in mapping.items()})
    state = {c_key: weights[d_key] for d_key, c_key in mapping.items()}
    return build_sdxl_model(config, state_dict=state, dtype=dtype)


def fixture_inputs(fixtures_dir=FIXTURES):
    """The fixture's inputs and the authors' outputs; y as ComfyUI builds SDXL's ADM input."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import timestep_embedding

    expected, meta = read_fixture(fixtures_dir / "official_tiny_forward.safetensors")
    tensors = dict(forward_inputs(meta), **expected)
    tensors["input.timestep"] = torch.tensor([float(meta["timestep"])])
    width = int(json.loads(meta["unet"])["addition_time_embed_dim"])
    embeds = torch.cat([timestep_embedding(t.reshape(1), width) for t in tensors["input.time_ids"].flatten()], dim=-1)
    y = torch.cat([tensors["input.text_embeds"], embeds.reshape(1, -1)], dim=-1)
    return tensors, y


def run_unet(model_patcher, x, timestep, context, y):
    """One forward of the real UNet with the patcher's transformer_options (its patches and replaces)."""
    unet = model_patcher.model.diffusion_model
    options = model_patcher.model_options.get("transformer_options", {})
    with torch.no_grad():
        return unet(x, timesteps=timestep, context=context, y=y, transformer_options=dict(options))
