"""The official DaViT detectors/segmentors, as far as their checkpoints are concerned.

Importing this module registers ``OfficialDaViT`` (the plain reference backbone, whose parameters
carry the official code's names and which, like the official detection backbone, builds an output
norm for every stage) into mmdet's and mmseg's model registries, so a config can build the model
the official code trained: official backbone + mmdet/mmseg neck and heads. Its ``state_dict()``
is then laid out as the released checkpoints are, and :func:`official_checkpoint` wraps it the way
mmcv 1.x saved them (``meta``, ``state_dict``, ``optimizer``).
"""
import importlib
import os.path as osp
import time
from typing import Sequence

import numpy as np
import torch

from davit_mm.models.reference import ReferenceDaViT


class OfficialDaViT(ReferenceDaViT):
    """The reference backbone under a registry name; all four stages and norms, as officially."""

    def __init__(self, arch='tiny', out_indices: Sequence[int] = (0, 1, 2, 3), init_cfg=None) -> None:
        super().__init__(arch=arch, out_indices=out_indices)


for _library in ('mmdet', 'mmseg'):
    importlib.import_module(f'{_library}.registry').MODELS.register_module(module=OfficialDaViT,
                                                                           force=True)

# What the official configs change in davit_mm's quickstart configs to build the official models.
OFFICIAL_BACKBONE = "dict(_delete_=True, type='OfficialDaViT', arch={{_base_.davit_mini_arch}})"
OFFICIAL_OVERRIDES = {
    # The official RetinaNet feeds FPN from all four stage outputs and starts it at level 1.
    'retinanet': f"model = dict(backbone={OFFICIAL_BACKBONE}, neck=dict(in_channels=[32, 64, 128, 256], "
                 f"start_level=1))\n",
    'maskrcnn': f'model = dict(backbone={OFFICIAL_BACKBONE})\n',
    'upernet': f'model = dict(backbone={OFFICIAL_BACKBONE})\n',
}


def official_config(davit_mm_config: str, kind: str, folder: str) -> str:
    """Write the official-backbone version of a davit_mm quickstart config into ``folder``."""
    path = osp.join(folder, f'official_{kind}.py')
    with open(path, 'w') as f:
        f.write(f'_base_ = [{davit_mm_config!r}]\n'
                "custom_imports = dict(imports=['davit_mm', 'official_models'], allow_failed_imports=False)\n"
                + OFFICIAL_OVERRIDES[kind])
    return path


def randomise_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights a trained model could have: nothing at its init value (norms included), and
    classification biases at 0 so that every head predicts scores above the test thresholds."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith('bias') and any(part in name for part in ('retina_cls', 'rpn_cls', 'fc_cls')):
                param.zero_()
            elif 'norm' in name or '.bn.' in name:
                param.copy_((1.0 if name.endswith('weight') else 0.0) + 0.1 * noise)
            else:
                fan_in = param[0].numel() if param.dim() > 1 else param.numel()
                param.copy_(noise * (0.5 / fan_in ** 0.5 if param.dim() > 1 else 0.05))
        for name, buffer in model.named_buffers():
            if name.endswith('running_var'):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
            elif name.endswith('running_mean'):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
    return model


def official_checkpoint(model: torch.nn.Module, library: str, classes: Sequence[str],
                        palette=None) -> dict:
    """``model`` saved as mmcv 1.3's runner saved the released models: weights, the old
    runner's ``meta`` (versions, config text, class names, a numpy score) and AdamW's state."""
    state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta = dict(mmcv_version='1.3.0', time=time.asctime(), env_info='sys.platform: linux\nCUDA available: True',
                config="model = dict(type='...')", seed=None, exp_name='davit_config.py', epoch=12,
                iter=88000, hook_msgs=dict(last_ckpt='work_dirs/davit/epoch_12.pth',
                                           best_score=np.float64(0.25)),
                CLASSES=tuple(classes))
    meta['mmdet_version' if library == 'mmdet' else 'mmseg_version'] = \
        '2.11.0' if library == 'mmdet' else '0.11.0'
    if palette is not None:
        meta['PALETTE'] = [list(color) for color in palette]
    first = next(iter(state_dict.values()))
    optimizer = dict(state={0: dict(step=10, exp_avg=torch.zeros_like(first), exp_avg_sq=torch.zeros_like(first))},
                     param_groups=[dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05,
                                        amsgrad=False, initial_lr=1e-4, params=[0])])
    return dict(meta=meta, state_dict=state_dict, optimizer=optimizer)
