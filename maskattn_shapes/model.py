"""The Shapes base model: ComfyUI's own SDXL classes at a size a CPU can train and sample.

- UNet: ComfyUI's SDXL UNet (`model_base.SDXL`, v-prediction) with SDXL's attn2 layout
  (input 4,5,7,8, middle, output 0-5; 2048-wide context, 2816-wide ADM input) at 64 channels,
  so MaskAttn Loader, Visualize Mask and the trainer run on it unchanged.
- Text encoder: ComfyUI's SDXL CLIP (its real tokenizers; CLIP-L + CLIP-G, causal, 2048-wide
  tokens, a 1280-wide pooled vector) with three layers (SDXL reads the second), frozen, its weights regenerated from a
  seed with numpy's PCG64 (stable across versions and platforms), so nothing of it is stored.
- Latent codec: a fixed linear map of each 8x8 pixel cell's mean colour to SDXL's 4 latent
  channels (no learned VAE): pictures of flat shapes survive it, and nothing needs training.

The trained UNet is stored once, 8-bit per output row (`weights/shapes_base.safetensors`).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch

from maskattn_comfy.tiny_model import TINY_UNET_CONFIG, build_sdxl_model
from maskattn_shapes.world import BACKGROUND

IMAGE_SIZE = 128
SHAPES_UNET_CONFIG = dict(TINY_UNET_CONFIG, model_channels=64, channel_mult=[1, 2, 2])
SHAPES_CLIP_CONFIG = {"num_hidden_layers": 3, "intermediate_size": 512, "num_attention_heads": 4}
TEXT_SEED = 20260926
WEIGHTS = Path(__file__).resolve().parent / "weights" / "shapes_base.safetensors"
GATES = Path(__file__).resolve().parent / "gates"  # gates trained on the world; the Loader lists them
CONTROL = WEIGHTS.parent / "shapes_control.safetensors"  # the study's control (maskattn_shapes/control.py)
FORMAT = "maskattn-shapes-base"
LATENT_SCALE = 0.13025  # SDXL's latent_format.scale_factor: the model multiplies raw latents by it


class ShapesCodec(torch.nn.Module):
    """Pixels in [-1, 1] <-> raw SDXL-layout latents, 8x smaller: the mean colour of each 8x8 cell,
    less the background's, in 3 orthonormal latent directions (the 4th carries nothing)."""

    def __init__(self, gain: float = 1.5):
        super().__init__()
        basis = torch.linalg.qr(torch.tensor([[1.0, 0.5, -0.3, 0.2], [0.4, -1.0, 0.6, 0.3], [-0.2, 0.3, 1.0, -0.5],
                                              [0.3, 0.2, 0.1, 1.0]]))[0][:, :3]
        self.register_buffer("basis", basis)  # [4, 3], orthonormal columns
        self.register_buffer("background", torch.tensor(BACKGROUND, dtype=torch.float32) / 127.5 - 1.0)
        self.gain = gain

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        cells = torch.nn.functional.avg_pool2d(pixels.float(), 8) - self.background.view(1, 3, 1, 1)
        return torch.einsum("lc,bchw->blhw", self.basis, cells) * (self.gain / LATENT_SCALE)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        cells = torch.einsum("lc,blhw->bchw", self.basis, latent.float()) * (LATENT_SCALE / self.gain)
        cells = cells + self.background.view(1, 3, 1, 1)
        return torch.nn.functional.interpolate(cells, scale_factor=8, mode="bilinear", align_corners=False)


def shapes_vae():
    """A real comfy.sd.VAE (VAEEncode/VAEDecode use it as any VAE) around the fixed codec."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd

    # ComfyUI's pixel-space VAE gives the right small memory estimates; its module is swapped for ours.
    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
    vae.first_stage_model = ShapesCodec().eval().to(vae.vae_dtype)
    vae.downscale_ratio = vae.upscale_ratio = 8
    vae.latent_channels = 4
    vae.size = None
    vae.patcher = comfy.model_patcher.ModelPatcher(vae.first_stage_model, load_device=vae.device,
                                                   offload_device=mm.vae_offload_device())
    return vae


# How the frozen random text encoder's weights are drawn. v1 (the first base): unit-gain attention
# and MLPs, so every token's output carries much of its context, and a random pooled projection;
# that base learned to read the caption from the pooled vector, out of any word mask's reach
# (EVIDENCE.md). v2: a strong residual (attention and MLP outputs at gain `mixing`) and a zero text
# projection, so the pooled vector is 0; its base read the caption from the padding tokens instead,
# which a causal encoder fills with a summary of the whole caption. words (base v2): no attention at
# all (its output projection is 0), so each token's output is a function of its own word and
# position only: the padding, the start and end tokens are the same for every prompt, the pooled
# vector is 0, and the caption reaches the picture through its words' tokens alone, which is what a
# word-level mask acts on. Which colour belongs to which shape the UNet must then work out from the
# words' positions, as SDXL's cross-attention must: the binding errors MaskAttn is for.
TEXT_ENCODERS = {
    "v1": {"mixing": 1.0, "pooled": True},
    "v2": {"mixing": 0.25, "pooled": False},
    "words": {"mixing": 0.5, "pooled": False, "attention": 0.0},
}
TEXT_ENCODER = "words"  # what new bases are trained with; a base file names its own (metadata "text_encoder")


def _fill_text_encoder_(module: torch.nn.Module, seed: int, mixing: float = 1.0, pooled: bool = True,
                        attention: float | None = None) -> None:
    """Seeded weights for a frozen random CLIP: token identity dominates the residual stream; the
    attention and MLP output projections at gain `mixing` (1: every token carries a real share of
    its context), the attention's at gain `attention` where given (0: no token sees another);
    `pooled` False zeroes the text projection, so the pooled vector is 0."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(name.encode())]))
            if "layer_norm" in name or name.endswith("logit_scale"):
                value = np.ones(p.shape, np.float32) if name.endswith("weight") else np.zeros(p.shape, np.float32)
            elif name.endswith("bias"):
                value = np.zeros(p.shape, np.float32)
            elif "token_embedding" in name:
                value = rng.standard_normal(p.shape, dtype=np.float32)
            elif "position_embedding" in name:
                value = 0.3 * rng.standard_normal(p.shape, dtype=np.float32)
            elif "text_projection" in name and not pooled:
                value = np.zeros(p.shape, np.float32)
            else:
                value = rng.standard_normal(p.shape, dtype=np.float32) / np.sqrt(p.shape[-1])
                if name.endswith("out_proj.weight") and attention is not None:
                    value = value * np.float32(attention)
                elif name.endswith(("out_proj.weight", "fc2.weight")):
                    value = value * np.float32(mixing)
            p.copy_(torch.from_numpy(value).reshape(p.shape))


def text_encoder_of(meta: dict) -> str:
    """The text-encoder recipe a base file was trained with (files from before v2 name none: v1)."""
    name = meta.get("text_encoder", "v1")
    if name not in TEXT_ENCODERS:
        raise ShapesWeightsError(f"unknown Shapes text encoder {name!r} (known: {', '.join(TEXT_ENCODERS)})")
    return name


def shapes_clip(seed: int = TEXT_SEED, encoder: str = TEXT_ENCODER):
    """A real comfy.sd.CLIP for SDXL (real tokenizers; CLIPTextEncode uses it as any CLIP)."""
    import comfy.sd
    import comfy.supported_models

    target = comfy.supported_models.SDXL(dict(SHAPES_UNET_CONFIG)).clip_target()
    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32, "clip_l_model_config": dict(SHAPES_CLIP_CONFIG),
                                                "clip_g_model_config": dict(SHAPES_CLIP_CONFIG)})
    _fill_text_encoder_(clip.cond_stage_model, seed, **TEXT_ENCODERS[encoder])
    return clip


def encode_captions(clip, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> contexts [N,77,2048], pooled [N,1280] of one-chunk captions, batched: what CLIPTextEncode
    gives for each (every weight is 1), at a fraction of the calls."""
    clip.load_model()
    model = clip.cond_stage_model
    tokens = [clip.tokenize(text) for text in texts]
    if any(len(t["l"]) != 1 or len(t["g"]) != 1 for t in tokens):
        raise ValueError("encode_captions takes captions of at most 75 tokens")
    l_out, _ = model.clip_l([[pair[0] for pair in t["l"][0]] for t in tokens])[:2]
    g_out, g_pooled = model.clip_g([[pair[0] for pair in t["g"][0]] for t in tokens])[:2]
    return torch.cat([l_out, g_out], dim=-1).float(), g_pooled.float()


def shapes_unet(state_dict: dict | None = None, seed: int = 0, dtype: torch.dtype = torch.float32):
    """The Shapes UNet as a ComfyUI ModelPatcher (v-prediction); random (seeded) without a state dict."""
    return build_sdxl_model(SHAPES_UNET_CONFIG, seed=seed, dtype=dtype, v_prediction=True, state_dict=state_dict)


# ---- 8-bit storage of the trained UNet -------------------------------------------------------

def quantize_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Matrices and kernels as int8 with one float16 scale per output row; vectors as float16."""
    stored = {}
    for key, value in state.items():
        value = value.detach().float().cpu()
        if value.ndim >= 2 and value.numel() >= 1024:
            rows = value.reshape(value.shape[0], -1)
            scale = rows.abs().amax(dim=1).clamp_min(1e-12) / 127.0
            stored[f"{key}.q8"] = torch.round(rows / scale[:, None]).to(torch.int8).reshape(value.shape)
            stored[f"{key}.q8scale"] = scale.to(torch.float16)
        else:
            stored[key] = value.to(torch.float16)
    return stored


def dequantize_state(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float32 tensors from quantize_state's; ShapesWeightsError names the first tensor that is
    missing its partner, has the wrong shape or type, or is not finite (NaN weights sample NaN pictures)."""
    state = {}
    for key, value in stored.items():
        if key.endswith(".q8scale"):
            if key[:-5] not in stored:
                raise ShapesWeightsError(f"tensor {key!r} scales no tensor ({key[:-5]!r} is missing)")
            continue
        if key.endswith(".q8"):
            scale = stored.get(f"{key}scale")
            if scale is None:
                raise ShapesWeightsError(f"tensor {key!r} has no scale tensor {key + 'scale'!r}")
            if value.dtype != torch.int8 or value.ndim < 2:
                raise ShapesWeightsError(f"tensor {key!r} must be an int8 matrix or kernel, "
                                         f"got {value.dtype} of shape {list(value.shape)}")
            if tuple(scale.shape) != (value.shape[0],) or not scale.is_floating_point():
                raise ShapesWeightsError(f"tensor {key + 'scale'!r} must hold one float scale per row of {key!r} "
                                         f"(shape [{value.shape[0]}]), got {scale.dtype} of shape {list(scale.shape)}")
            scale = scale.float()
            if not (torch.isfinite(scale).all() and (scale >= 0).all()):
                raise ShapesWeightsError(f"tensor {key + 'scale'!r} holds scales that are not finite and >= 0")
            state[key[:-3]] = (value.float().reshape(value.shape[0], -1) * scale[:, None]).reshape(value.shape)
        else:
            if not value.is_floating_point():
                raise ShapesWeightsError(f"tensor {key!r} must be floating point, got {value.dtype}")
            if not torch.isfinite(value).all():
                raise ShapesWeightsError(f"tensor {key!r} holds values that are not finite (NaN or inf)")
            state[key] = value.float()
    return state


def save_base(path: Path, unet_state: dict[str, torch.Tensor], provenance: dict, encoder: str = TEXT_ENCODER) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(quantize_state(unet_state), str(tmp),
              metadata={"format": FORMAT, "unet_config": json.dumps(SHAPES_UNET_CONFIG),
                        "text_seed": str(TEXT_SEED), "text_encoder": encoder,
                        "provenance": json.dumps(provenance)})
    tmp.replace(path)


class ShapesWeightsError(ValueError):
    """A Shapes base file that is missing or is not one; the message says what to do."""


def read_base(path: Path = WEIGHTS) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (float32 UNet state dict, metadata)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    restore = "restore it with git, or train it with `python -m maskattn_shapes.train_base`"
    if not path.is_file():
        raise ShapesWeightsError(f"the Shapes base weights are missing at {path}; "
                                 "restore them with git, or train them with `python -m maskattn_shapes.train_base`")
    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ShapesWeightsError(f"{path.name} is not a Shapes base file (format {meta.get('format')!r})")
        stored = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        if isinstance(error, ShapesWeightsError):
            raise
        raise ShapesWeightsError(f"the Shapes base weights {path} are truncated or corrupt ({error}); {restore}") from None
    try:
        return dequantize_state(stored), meta
    except ShapesWeightsError as error:
        raise ShapesWeightsError(f"the Shapes base weights {path} are damaged: {error}; {restore}") from None


def load_shapes_checkpoint(path: Path = WEIGHTS):
    """(MODEL, CLIP, VAE) of the trained Shapes world, as ComfyUI's checkpoint loader returns them."""
    state, meta = read_base(path)
    return shapes_unet(state), shapes_clip(encoder=text_encoder_of(meta)), shapes_vae()
