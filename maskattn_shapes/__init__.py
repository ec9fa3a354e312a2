"""A small world where MaskAttn's effect can be measured: captioned pictures of coloured
shapes (`world`) and a reader that scores what a model drew against its prompt (`evaluate`).
Pure numpy and PIL: no torch, no ComfyUI."""

import importlib

_EXPORTS = {
    "world": ("COLORS", "HELDOUT_COMBOS", "HELDOUT_PAIRINGS", "KINDS", "PALETTE", "RELATIONS", "SHAPES", "Obj",
              "Prompt", "Scene", "heldout_prompts", "parse_caption", "render", "scene_for", "training_scenes",
              "write_folder"),
    "evaluate": ("Found", "read_image", "score", "through_latent", "validate"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    # Imported on first use, so `python -m maskattn_shapes.world` does not load world twice.
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
