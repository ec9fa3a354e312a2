"""The nodes this pack adds to ComfyUI; each module only declares nodes."""

from .loader import MaskAttnLoader
from .shapes import MaskAttnShapesCheckpoint
from .visualize import MaskAttnVisualize

NODES = [MaskAttnLoader, MaskAttnVisualize, MaskAttnShapesCheckpoint]
