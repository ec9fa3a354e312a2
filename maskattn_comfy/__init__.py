"""Where MaskAttn speaks ComfyUI: model checks, the attn2 patch, and the gate folder."""
