"""The theoretical floor of MaskAttn's overhead: the gates' FLOPs as a share of the SDXL UNet's.

    .venv/bin/python benchmarks/gate_flops.py

Both sides are counted by torch's FlopCounterMode (matrix products and convolutions; norms,
activations and softmax are left out of both), on the meta device, so no weights are
allocated and nothing is computed: the full-width SDXL UNet at each resolution, one sample,
77 tokens; and the gate heads of the authors' default configuration at the same shapes. Per
model call each gated layer runs its head's location MLP on its N latent locations and the
location-token product; the token MLP runs once per head (the patch caches it per context).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SDXL_UNET = {  # the UNet config ComfyUI detects for SDXL base
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
TOKENS = 77


def main():
    sys.path.insert(0, str(REPO))
    from maskattn_comfy import host

    host.boot(cpu=True, use_pytorch_cross_attention=True)  # sub-quadratic attention asks meta tensors for free memory
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import comfy.supported_models
    from maskattn_comfy.model_check import require_sdxl
    from maskattn_core import GateSet, MaskAttnConfig, layer_name

    meta = torch.device("meta")
    unet = comfy.supported_models.SDXL(SDXL_UNET).get_model({}, device=meta).diffusion_model
    layer_channels = require_sdxl(unet)
    gate_set = GateSet.create(MaskAttnConfig(), layer_channels).to(meta)

    print(f"gated layers: {len(gate_set.layers)}, heads: {sorted(gate_set.heads)}, "
          f"gate parameters: {gate_set.parameter_count():,}")
    print("| image | UNet GFLOP / sample | gate GFLOP / sample | gate share |")
    print("|---|---|---|---|")
    for image in (512, 1024):
        side = image // 8
        x = torch.empty(1, 4, side, side, device=meta)
        context = torch.empty(1, TOKENS, 2048, device=meta)
        locations = {}  # (block_name, number, transformer_index) -> N, as the gate hook would see it

        def record(n, context_, value, extra_options):
            locations[(*extra_options["block"], extra_options["block_index"])] = n.shape[1]
            return n, context_, value

        with FlopCounterMode(display=False) as unet_count:
            unet(x, timesteps=torch.empty(1, device=meta), context=context, y=torch.empty(1, 2816, device=meta),
                 transformer_options={"patches": {"attn2_patch": [record]}})
        with FlopCounterMode(display=False) as gate_count:
            tokens = {name: head.token_features(context) for name, head in gate_set.heads.items()}
            for key in gate_set.layers:
                head_name = gate_set.layer_heads[layer_name(key)]
                head = gate_set.heads[head_name]
                head.logits(torch.empty(1, locations[tuple(key)], head.feature_dim, device=meta), context,
                            tokens[head_name])
        unet_flops, gate_flops = unet_count.get_total_flops(), gate_count.get_total_flops()
        print(f"| {image}x{image} | {unet_flops / 1e9:,.1f} | {gate_flops / 1e9:,.2f} | {100 * gate_flops / unet_flops:.2f}% |")


if __name__ == "__main__":
    main()
