"""A small world where MaskAttn's effect can be measured: captioned pictures of coloured
shapes (`world`) and a reader that scores what a model drew against its prompt (`evaluate`).
Pure numpy and PIL: no torch, no ComfyUI."""

from .world import (COLORS, HELDOUT_COMBOS, HELDOUT_PAIRINGS, KINDS, PALETTE, RELATIONS, SHAPES, Obj, Prompt,
                    Scene, heldout_prompts, parse_caption, render, scene_for, training_scenes, write_folder)

__all__ = ["COLORS", "HELDOUT_COMBOS", "HELDOUT_PAIRINGS", "KINDS", "PALETTE", "RELATIONS", "SHAPES", "Obj",
           "Prompt", "Scene", "heldout_prompts", "parse_caption", "render", "scene_for", "training_scenes",
           "write_folder"]
