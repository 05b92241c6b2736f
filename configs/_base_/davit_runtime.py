# What every davit_mm config needs, whatever the library: davit_mm imported (it registers DaViT into
# mmdet/mmseg) in every process that reads the config, so the file works from any directory and can
# be inherited by users' configs.
custom_imports = dict(imports=['davit_mm'], allow_failed_imports=False)

# Checkpoints also hold the random generators' states, so `--resume` continues exactly as if the run
# had never stopped (davit_mm.engine.RandomStateHook). Whole detectors/segmentors released with the
# official DaViT code load directly as load_from / test checkpoints (davit_mm.engine.OfficialCheckpointHook).
# The runner reads its own checkpoints under torch's weights_only loading (RunnerCheckpointsHook).
custom_hooks = [dict(type='RandomStateHook'), dict(type='OfficialCheckpointHook'),
                dict(type='RunnerCheckpointsHook')]

# ImageNet-1k DaViT weights as published on the Hugging Face hub by timm (converted from the official
# release); davit_mm downloads, detects the format and converts them on first use. Any other public
# format (official, mmpretrain, Florence-2, davit_mm) works too: see docs/checkpoints.md.
davit_tiny_in1k = 'https://huggingface.co/timm/davit_tiny.msft_in1k/resolve/main/model.safetensors'
davit_small_in1k = 'https://huggingface.co/timm/davit_small.msft_in1k/resolve/main/model.safetensors'
davit_base_in1k = 'https://huggingface.co/timm/davit_base.msft_in1k/resolve/main/model.safetensors'

# "mini": a custom size for CPUs (widths 32..256, one layer per stage) used by configs/quickstart.
# `_delete_=True` because it replaces the string arch='tiny' of the inherited configs.
davit_mini_arch = dict(_delete_=True, embed_dims=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
