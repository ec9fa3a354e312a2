"""The nodes this pack adds to ComfyUI; each module only declares nodes."""

from .loader import MaskAttnLoader
from .regions import MaskAttnRegion
from .shapes import MaskAttnShapesCheckpoint
from .visualize import MaskAttnVisualize

NODES = [MaskAttnLoader, MaskAttnRegion, MaskAttnVisualize, MaskAttnShapesCheckpoint]
