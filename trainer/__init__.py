"""The headless MaskAttn trainer: `python trainer/train.py --checkpoint ... --data ...`.

It learns only the gate heads; the SDXL checkpoint stays frozen. One concern per module:
config (defaults, config files, flags), data (captioned images), encoders (VAE and text
encoders, real or the demo's stand-ins), cache (content-keyed latents and text), loop (the
noise-prediction step), checkpoints (never lose work), distributed (torchrun), report
(progress bar and metrics), validation (samples with and without the gates, and the mask
grid, every --validate-every steps), demo (the tiny built-in model and dataset).
"""
