"""`--validate-every N`: fixed-seed samples without and with the current gates, and the mask grid.

Every N optimizer steps rank 0 renders, for each validation prompt, one sample of the frozen
model without gates and one with the gates as they are now (same seed, same noise, side by
side: left without, right with) and the Visualize Mask grid of the gated sample (the code the
Visualize Mask node runs), as PNGs under `<output>/validation/step-NNNNNNNN/`.

It needs a VAE to decode and a CLIP to encode the prompts and label the grid's tokens: the
checkpoint's own, loaded once and kept offloaded on the CPU between validations (only when
validation is on). `--demo`'s stand-in encoders cannot decode or tokenize, so the demo uses
ComfyUI's tiny SDXL CLIP and VAE (maskattn_comfy.tiny_model), random like the rest of the demo.

Validation must not change training: it runs under torch.no_grad(), gates in eval mode, on a
fresh patch of the frozen model (the training patch's caches stay untouched), with every
random generator it could touch (torch CPU and CUDA, Python's `random`, NumPy) restored
afterwards, so a run with validation ends with bit-identical gates.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import torch

SAMPLER, SCHEDULER, CFG = "euler", "normal", 5.0
FALLBACK_PROMPTS = ("a red circle on a blue background", "a yellow square on a green background")
GAP = 4  # white pixels between the two samples


def default_prompts(captions: list[str], count: int = 2) -> tuple[str, ...]:
    """The first `count` distinct non-empty captions of the dataset, else a fixed list."""
    found: list[str] = []
    for caption in captions:
        caption = caption.strip()
        if caption and caption not in found:
            found.append(caption)
        if len(found) == count:
            break
    return tuple(found) or FALLBACK_PROMPTS


@contextlib.contextmanager
def preserved_rng(device: torch.device):
    """Everything inside may seed or draw from the global generators (ComfyUI's prepare_noise calls
    torch.manual_seed); afterwards they are exactly as before."""
    python_state = random.getstate()
    try:
        import numpy
        numpy_state = numpy.random.get_state()
    except ImportError:  # numpy is optional here
        numpy, numpy_state = None, None
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        if numpy is not None:
            numpy.random.set_state(numpy_state)


def to_png(image: torch.Tensor, path: Path) -> Path:
    """[H,W,3] in [0,1] -> an 8-bit PNG."""
    from PIL import Image

    array = (image.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(path)
    return path


class Validator:
    """Loads the validation CLIP and VAE once (offloaded between runs) and renders on request."""

    def __init__(self, base, gate_set, patched, prompts: tuple[str, ...], config, output: Path,
                 device: torch.device):
        self.base, self.gate_set, self.patched = base, gate_set, patched
        self.prompts = tuple(prompts)
        self.config, self.device = config, device
        self.folder = Path(output) / "validation"
        self._conds: dict[str, list] = {}
        if base.open_validation is None:
            from .config import ConfigError
            raise ConfigError("--validate-every: this base model offers no CLIP and VAE to render with")
        with preserved_rng(device):  # building encoders may draw from the global generator
            self.clip, self.vae = base.open_validation()
        self.vae.first_stage_model.to(torch.float32)  # SDXL's VAE overflows in float16
        self.vae.vae_dtype = torch.float32
        self.offload()

    # -- memory ------------------------------------------------------------------------------
    def offload(self) -> None:
        """Back to training: the training UNet fully loaded, the CLIP and VAE (and any sampling
        clone) off the accelerator."""
        import comfy.model_management as mm

        mm.load_models_gpu([self.patched], force_full_load=True)
        if self.device.type == "cpu":
            return
        keep = [m for m in mm.current_loaded_models if m.model is self.patched]
        mm.free_memory(1e30, mm.get_torch_device(), keep_loaded=keep)
        mm.soft_empty_cache()

    # -- rendering ---------------------------------------------------------------------------
    def conditioning(self, text: str) -> list:
        if text not in self._conds:
            side = self.config.resolution
            tokens = self.clip.tokenize(text)
            cond = self.clip.encode_from_tokens_scheduled(tokens)
            self._conds[text] = [[c, dict(extra, width=side, height=side, target_width=side, target_height=side)]
                                 for c, extra in cond]
        return self._conds[text]

    def run(self, step: int) -> list[dict]:
        """Render every prompt; returns [{"prompt", "samples", "mask_grid"}] (paths as strings)."""
        modes = [(m, m.training) for root in (self.gate_set, self.patched.model) for m in root.modules()]
        self.gate_set.eval()
        self.patched.model.eval()
        try:
            with preserved_rng(self.device), torch.no_grad():
                return self._render(step)
        finally:
            for module, training in modes:  # exactly as they were, module by module
                module.training = training
            self.offload()

    def _render(self, step: int) -> list[dict]:
        import comfy.sample
        from maskattn_comfy.patch import apply_maskattn
        from maskattn_comfy.visualize import VisualizeOptions, visualize_mask

        seed = self.config.seed
        folder = self.folder / f"step-{step:08d}"
        side = self.config.resolution // 8
        negative = self.conditioning("")
        plain_model = self.base.patcher.clone()
        gated_model = apply_maskattn(self.base.patcher, self.gate_set)  # a fresh patch: training's caches untouched
        written = []
        for index, prompt in enumerate(self.prompts):
            positive = self.conditioning(prompt)
            latent = comfy.sample.fix_empty_latent_channels(plain_model, torch.zeros(1, 4, side, side))
            noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
            samples = [comfy.sample.sample(model, noise, self.config.validate_sampler_steps, CFG, SAMPLER, SCHEDULER,
                                           positive, negative, latent, seed=seed, disable_pbar=True)
                       for model in (plain_model, gated_model)]
            images = self.vae.decode(torch.cat(samples)).float().cpu()  # [2, H, W, 3]
            gap = torch.ones(images.shape[1], GAP, 3)
            pair = to_png(torch.cat([images[0], gap, images[1]], dim=1), folder / f"prompt-{index:02d}-samples.png")
            view = visualize_mask(gated_model, self.clip, prompt, {"samples": samples[1]},
                                  VisualizeOptions(seed=seed), image=images[1:2])
            grid = to_png(view.image[0], folder / f"prompt-{index:02d}-mask-grid.png")
            written.append({"prompt": prompt, "samples": str(pair), "mask_grid": str(grid)})
        return written
