"""The frozen SDXL checkpoint: its UNet for training, its VAE and text encoders for the caches.

Loaded with ComfyUI's own `comfy.sd.load_checkpoint_guess_config`, so whatever ComfyUI
loads, the trainer loads. The UNet is loaded alone; the VAE and the text encoders are
loaded only when the cache misses something, and leave memory before training starts.
With --validate-every, a second CLIP and VAE are loaded for validation and kept offloaded on
the CPU between validations (trainer/validation.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from maskattn_comfy.model_check import ModelFamilyError, require_sdxl

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


class BaseModelError(ValueError):
    """A --checkpoint that cannot be trained on; the message says why."""


@dataclass
class BaseModel:
    patcher: object                      # comfy ModelPatcher of the frozen UNet
    layer_channels: dict                 # {LayerKey: channels} of its attn2 layers
    open_encoders: Callable[[], object]  # -> an object with encode_image, encode_text, close
    identities: tuple[str, str]          # (VAE identity, text-encoder identity) for the cache keys
    provenance: dict                     # what the gate file records about the base model
    # -> (ComfyUI CLIP, ComfyUI VAE) for --validate-every; loaded only when validation is on
    open_validation: Callable[[], tuple] | None = None


class ComfyEncoders:
    """ComfyUI's VAE (in float32: SDXL's VAE overflows in float16) and its CLIP-L + CLIP-G."""

    def __init__(self, vae, clip):
        self.vae, self.clip = vae, clip
        vae.first_stage_model.to(torch.float32)
        vae.vae_dtype = torch.float32

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,H,W,3] in [0,1] -> raw VAE latents [B,4,H/8,W/8] (before the model's latent scaling)."""
        return self.vae.encode(pixels).float().cpu()

    def encode_text(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """-> context [1,T,2048] (T = 77, 154, ...), pooled [1,1280]."""
        context, pooled = self.clip.encode_from_tokens(self.clip.tokenize(caption), return_pooled=True)
        return context.cpu(), pooled.cpu()

    def word_positions(self, caption: str) -> list[tuple[str, list[int]]]:
        """The caption's words as the tokenizer splits them, each with its context columns (for --mask-loss)."""
        from maskattn_comfy.tokens import token_labels

        words: list[tuple[str, list[int]]] = []
        text = ""
        for label in token_labels(self.clip, self.clip.tokenize(caption)):
            if label.special:
                text = ""
                continue
            if not text or label.word != words[-1][0]:  # a word's first token
                words.append((label.word, []))
                text = ""
            words[-1][1].append(label.position)
            text += label.text
            if text == label.word:
                text = ""
        return words

    def close(self) -> None:
        import comfy.model_management as mm

        self.vae = self.clip = None
        mm.unload_all_models()
        mm.soft_empty_cache()


def resolve_checkpoint(name: str) -> Path:
    """A path, or a file name in ComfyUI's models/checkpoints."""
    path = Path(name).expanduser()
    if path.is_file():
        return path.resolve()
    import folder_paths

    found = folder_paths.get_full_path("checkpoints", name)
    if found:
        return Path(found)
    folders = ", ".join(folder_paths.get_folder_paths("checkpoints"))
    raise BaseModelError(f"--checkpoint {name!r} is neither a file nor a checkpoint name in {folders}")


def file_sha256(path: Path, cache_dir: Path) -> str:
    """The file's SHA-256, remembered by (path, size, mtime) so a 7 GB checkpoint is hashed once."""
    stat = path.stat()
    record = cache_dir / "file_hashes.json"
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    known = json.loads(record.read_text()) if record.is_file() else {}
    if key not in known:
        h = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                h.update(chunk)
        known[key] = h.hexdigest()
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f"{record.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, record)
    return known[key]


def check_sdxl(patcher, source: str) -> dict:
    try:
        return require_sdxl(patcher)
    except ModelFamilyError as error:
        raise BaseModelError(f"{source} is not an SDXL checkpoint: {error}") from error


SHAPES_CHECKPOINT = "maskattn-shapes"  # --checkpoint name of the pack's own trained Shapes world (maskattn_shapes/)


def load_shapes(precision: str) -> BaseModel:
    """The Shapes world's base: the same UNet, CLIP and VAE the "MaskAttn Shapes Checkpoint" node gives."""
    from maskattn_shapes import model as shapes

    state, meta = shapes.read_base()
    patcher = shapes.shapes_unet(state, dtype=unet_dtype(precision) or torch.float32)
    layer_channels = check_sdxl(patcher, SHAPES_CHECKPOINT)
    digest = hashlib.sha256(shapes.WEIGHTS.read_bytes()).hexdigest()

    encoder = shapes.text_encoder_of(meta)

    def open_encoders():
        return ComfyEncoders(shapes.shapes_vae(), shapes.shapes_clip(encoder=encoder))

    identities = (f"vae:{shapes.FORMAT}-codec:float32", f"text:{shapes.FORMAT}-clip:{meta.get('text_seed')}:{encoder}")
    provenance = {"base_model": SHAPES_CHECKPOINT, "base_model_sha256": digest, "prediction": prediction_type(patcher)}
    return BaseModel(patcher, layer_channels, open_encoders, identities, provenance,
                     lambda: (shapes.shapes_clip(encoder=encoder), shapes.shapes_vae()))


def load_checkpoint(name: str, precision: str, cache_dir: Path) -> BaseModel:
    import comfy.sd
    import folder_paths

    if name == SHAPES_CHECKPOINT:
        return load_shapes(precision)
    path = resolve_checkpoint(name)
    dtype = unet_dtype(precision)
    model_options = {"dtype": dtype} if dtype is not None else {}
    try:
        patcher, *_ = comfy.sd.load_checkpoint_guess_config(
            str(path), output_vae=False, output_clip=False, model_options=model_options)
    except Exception as error:  # ComfyUI raises RuntimeError/KeyError/safetensors errors for files it cannot read
        raise BaseModelError(f"ComfyUI cannot load {path.name} as a checkpoint: {error}") from error
    layer_channels = check_sdxl(patcher, path.name)
    digest = file_sha256(path, cache_dir)

    def load_clip_and_vae(needed_for: str):
        _, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(path), output_model=False, output_vae=True, output_clip=True,
            embedding_directory=folder_paths.get_folder_paths("embeddings"))
        if clip is None or vae is None:
            raise BaseModelError(f"{path.name} holds no {'text encoders' if clip is None else 'VAE'}; {needed_for}")
        return clip, vae

    def open_encoders():
        clip, vae = load_clip_and_vae("the trainer needs a full single-file SDXL checkpoint")
        return ComfyEncoders(vae, clip)

    def open_validation():
        # The checkpoint's own CLIP and VAE for --validate-every; kept offloaded on the CPU between validations.
        return load_clip_and_vae("--validate-every needs both to encode prompts and decode samples")

    identities = (f"vae:{digest}:float32", f"text:{digest}")
    provenance = {"base_model": path.name, "base_model_sha256": digest,
                  "prediction": prediction_type(patcher)}
    return BaseModel(patcher, layer_channels, open_encoders, identities, provenance, open_validation)


def unet_dtype(precision: str) -> torch.dtype | None:
    """The frozen UNet's dtype; "auto": bfloat16 on GPUs that have it, else float32 (None: ComfyUI's choice on the CPU).

    Not float16 by default: its range (65504) is narrow for a backward pass whose straight-through
    factor alone is |negative_value| = 1e4 (trainer/README.md, "Gradients"); bfloat16 has float32's range.
    """
    if precision != "auto":
        return PRECISIONS[precision]
    import comfy.model_management as mm

    if mm.get_torch_device().type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return None


def prediction_type(patcher) -> str:
    """'eps' or 'v': what the UNet predicts, from ComfyUI's model_sampling for this model."""
    import comfy.model_sampling as ms

    sampling = patcher.get_model_object("model_sampling")
    discrete = isinstance(sampling, ms.ModelSamplingDiscrete) and not isinstance(sampling, ms.ModelSamplingDiscreteEDM)
    kind = next((k for k in (ms.EDM, ms.X0, ms.CONST, ms.V_PREDICTION, ms.EPS) if isinstance(sampling, k)), None)
    if discrete and kind is ms.V_PREDICTION:
        return "v"
    if discrete and kind is ms.EPS:
        return "eps"
    raise BaseModelError(f"this model samples as {kind.__name__ if kind else type(sampling).__name__}"
                         f"{'' if discrete else ' (continuous)'}; the trainer supports discrete epsilon- and "
                         "v-prediction SDXL models")


def freeze(patcher) -> None:
    for parameter in patcher.model.parameters():
        parameter.requires_grad_(False)
