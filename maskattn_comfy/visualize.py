"""Visualize Mask: run a MaskAttn model at a few noise levels, record its maps, draw them.

The model runs through ComfyUI's own sampling path (CFGGuider, cfg 1, positive prompt
only) with a "sampler" that visits the chosen noise levels of one seeded noise instead of
integrating: every level sees the latent noised to that sigma, as a sampler step would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import comfy.sample
import comfy.samplers
import comfy.utils

from .patch import apply_maskattn, find_maskattn_patch
from .model_check import diffusion_model_of
from .recording import MapRecorder
from .regions import layer_levels, region_maps, require_regions
from .render import (CHOICES, GROUPINGS, TITLES, GridLayout, chosen_maps, grid_layout, group_rows, render_grid,
                     row_labels, scale_for, to_image_tensor, word_mask)
from .tokens import TokenLabel, select_tokens, token_labels

VAE_SCALE = 8  # SDXL's VAE: one latent pixel is 8x8 image pixels


@dataclass(frozen=True)
class VisualizeOptions:
    seed: int = 0
    noise_levels: int = 4
    start_percent: float = 0.2
    end_percent: float = 0.8
    map: str = "probability"
    grouping: str = "block"
    words: str = ""
    batch_index: int = 0
    show_special_tokens: bool = False

    def __post_init__(self):
        if self.noise_levels < 1:
            raise ValueError(f"noise_levels must be at least 1, got {self.noise_levels}")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise ValueError(f"need 0 <= start_percent <= end_percent <= 1, got {self.start_percent} and {self.end_percent}")
        if self.map not in CHOICES:
            raise ValueError(f"map must be one of {list(CHOICES)}, got {self.map!r}")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {list(GROUPINGS)}, got {self.grouping!r}")


@dataclass
class Visualization:
    image: Tensor             # IMAGE [1, H, W, 3]: the grid
    mask: Tensor              # MASK [1, height, width]: the chosen words' map at pixel size
    labels: list[TokenLabel]  # every context column, special tokens included
    columns: list[TokenLabel] # the columns drawn
    boxes: dict               # {(row label, token position): (left, top, right, bottom)} in the grid
    layer_maps: dict          # {LayerKey: [C, h, w]} the chosen map per layer for the C drawn columns, at each layer's own grid
    layout: GridLayout        # the grid's bands and cells, and the note when columns were left out


def noise_sigmas(model_sampling, count: int, start_percent: float, end_percent: float) -> Tensor:
    """`count` sigmas evenly spaced in schedule percent between start and end, highest first."""
    if count == 1:
        percents = [(start_percent + end_percent) / 2]
    else:
        percents = torch.linspace(start_percent, end_percent, count).tolist()
    low, high = float(model_sampling.sigma_min), float(model_sampling.sigma_max)
    # percent_to_sigma maps 0 and 1 to "infinite" and 0; the model's own range bounds them.
    sigmas = [min(max(model_sampling.percent_to_sigma(p), low), high) for p in percents]
    return torch.tensor(sorted(sigmas, reverse=True), dtype=torch.float32)


def pick_latent(latent: dict, batch_index: int) -> Tensor:
    samples = latent["samples"]
    if samples.is_nested or samples.ndim != 4:
        raise ValueError(f"Visualize Mask needs an SDXL image latent [batch, 4, height, width]; got shape "
                         f"{tuple(samples.shape) if not samples.is_nested else 'nested'}")
    if not 0 <= batch_index < samples.shape[0]:
        raise ValueError(f"the LATENT holds {samples.shape[0]} image(s), so batch_index must be 0 to "
                         f"{samples.shape[0] - 1}; got {batch_index}")
    return samples


def pick_photo(image: Tensor, batch_index: int) -> Tensor:
    """Image `batch_index` (the last one if there are fewer) of an IMAGE as [H, W, 3]: RGBA composited over
    white (the grid's background), greyscale repeated; any other layout is a ValueError naming it."""
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"the image input must be a ComfyUI IMAGE [batch, height, width, 1, 3 or 4 channels]; "
                         f"got shape {tuple(image.shape)}")
    photo = image[min(batch_index, image.shape[0] - 1)].float()
    if photo.shape[-1] == 4:
        alpha = photo[..., 3:].clamp(0, 1)
        return photo[..., :3] * alpha + (1 - alpha)
    return photo.expand(*photo.shape[:2], 3)


def run_noise_levels(model, positive, latent: dict, batch_index: int, seed: int, sigmas: Tensor) -> None:
    """Call `model` (a ModelPatcher) once per sigma on batch item `batch_index` of the LATENT, noised
    with the seed's noise for that item (the noise KSampler would give it); cfg 1, positive only."""
    samples = comfy.sample.fix_empty_latent_channels(model, pick_latent(latent, batch_index))
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))[batch_index:batch_index + 1]
    samples = samples[batch_index:batch_index + 1]
    model_sampling = model.get_model_object("model_sampling")
    progress = comfy.utils.ProgressBar(len(sigmas))

    def visit(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        ones = x.new_ones([x.shape[0]])
        for sigma in sigmas:
            noisy = model_sampling.noise_scaling(sigma, model_k.noise, model_k.latent_image)
            model_k(noisy, sigma * ones, **(extra_args or {}))
            progress.update(1)
        return x

    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": positive})
    guider.set_cfg(1.0)
    with torch.no_grad():
        guider.sample(noise, samples, comfy.samplers.KSAMPLER(visit), sigmas, seed=seed, disable_pbar=True)


def require_maskattn(model):
    """The MaskAttnPatch of a MODEL patched by MaskAttn Loader, or a ValueError that says what to connect."""
    patch = find_maskattn_patch(model)
    if patch is None:
        raise ValueError("this MODEL carries no MaskAttn gates: connect the MODEL output of MaskAttn Loader "
                         "(with strength above 0) to Visualize Mask")
    return patch


def record_maps(model, positive, latent: dict, options: VisualizeOptions,
                token_groups: list[list[int]] | None = None) -> MapRecorder:
    """Run the MaskAttn `model` at the options' noise levels and return what its gates recorded
    (every context column, or only `token_groups`, each group's columns averaged)."""
    patch = require_maskattn(model)
    pick_latent(latent, options.batch_index)  # a bad batch_index fails before any work
    recorder = MapRecorder(CHOICES[options.map], token_groups=token_groups)
    recording = apply_maskattn(model, patch.gate_set, patch.options, recorder=recorder)
    sigmas = noise_sigmas(model.get_model_object("model_sampling"), options.noise_levels,
                          options.start_percent, options.end_percent)
    run_noise_levels(recording, positive, latent, options.batch_index, options.seed, sigmas)
    if recorder.calls() == 0:
        raise ValueError(f"the gates never ran between {options.start_percent:g} and {options.end_percent:g} of the "
                         f"schedule: MaskAttn Loader limits them to {patch.options.start_percent:g}-"
                         f"{patch.options.end_percent:g}. Pick noise levels inside that range.")
    return recorder


def visualize_mask(model, clip, text: str, latent: dict, options: VisualizeOptions,
                   image: Tensor | None = None) -> Visualization:
    """The grid IMAGE and the words' MASK for `text` on `model` (patched by MaskAttn Loader; by MaskAttn Region
    for the "region" map, which is drawn from the regions themselves, with no model call)."""
    regions = require_regions(model) if options.map == "region" else None
    if regions is None:
        require_maskattn(model)
    if not text.strip():
        raise ValueError("the prompt is empty: type the prompt whose words you want to see mapped")
    tokens = clip.tokenize(text)
    labels = token_labels(clip, tokens)
    columns = [label for label in labels if options.show_special_tokens or not label.special]
    if not columns:
        raise ValueError(f"the prompt {text!r} has no tokens besides start and end; type some words")
    words = select_tokens(labels, options.words) or [[label.position for label in columns]]
    positive = clip.encode_from_tokens_scheduled(tokens)

    # Only the columns the grid has room for are recorded, plus one averaged column per word for the MASK.
    latent_size = tuple(pick_latent(latent, options.batch_index).shape[-2:])
    levels = layer_levels(diffusion_model_of(model)) if regions is not None else None
    layers = list(levels) if regions is not None else require_maskattn(model).gate_set.layers
    layout = grid_layout(row_labels(layers, options.grouping), len(columns), latent_size)
    drawn = columns[:layout.shown]
    if regions is not None:
        pick_latent(latent, options.batch_index)
        recorded = region_maps(regions, levels, latent_size, [[c.position] for c in drawn] + words,
                               options.batch_index)
    else:
        recorder = record_maps(model, positive, latent, options, [[c.position] for c in drawn] + words)
        recorded = chosen_maps(recorder.maps(), options.map)
    layer_maps = {key: maps[:len(drawn)] for key, maps in recorded.items()}
    word_maps = {key: maps[len(drawn):] for key, maps in recorded.items()}
    rows = group_rows(layer_maps, options.grouping, latent_size, size=layout.cell)
    scale = scale_for(options.map, torch.stack([values for _, values in rows]))

    photo = None if image is None else pick_photo(image, options.batch_index)
    height, width = photo.shape[:2] if photo is not None else (latent_size[0] * VAE_SCALE, latent_size[1] * VAE_SCALE)
    when = ("the regions' own masks, no model call" if regions is not None else
            f"{options.noise_levels} noise level(s) from {options.start_percent:.0%} to "
            f"{options.end_percent:.0%} of the schedule")
    title = (f"{TITLES[options.map]}  |  {when}  |  latent {latent_size[1]}x{latent_size[0]} "
             f"(image {latent_size[1] * VAE_SCALE}x{latent_size[0] * VAE_SCALE})")
    grid, boxes, layout = render_grid(rows, drawn, scale, title, image=photo, left_out=len(columns) - len(drawn),
                                      latent_size=latent_size)
    everything = group_rows(word_maps, "all", latent_size)[0][1]
    mask = word_mask(everything, [[w] for w in range(len(words))], scale, (height, width))
    return Visualization(to_image_tensor(grid), mask, labels, drawn, boxes, layer_maps, layout)
