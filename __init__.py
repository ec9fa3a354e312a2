"""MaskAttn for ComfyUI: learned cross-attention gates for SDXL (MaskAttn-SDXL, arXiv 2509.15357)."""

import os
import sys

# maskattn_core and maskattn_comfy are imported by name (the trainer uses them too);
# appended, not prepended, so nothing of ComfyUI's is shadowed.
_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.append(_here)

from comfy_api.latest import ComfyExtension, io  # noqa: E402

from maskattn_comfy.folders import register_folder  # noqa: E402

register_folder()

from .nodes import NODES  # noqa: E402


class MaskAttnExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> MaskAttnExtension:
    return MaskAttnExtension()
