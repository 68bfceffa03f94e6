"""Per-block features: every stage's pooled output from one no-grad pass over a loader.

The CFF paper's layer-wise analysis (Sec. 4.2, Fig. 5) looks at each block's token-averaged output, the feature its
local loss sees (Eq. 13). For a timm ``VisionTransformer`` one ``forward_intermediates`` call gives every block's
tokens; they are pooled with the model's own ``pool`` (prefix tokens handled as in the stages). Other model families
go through their registered stage adapter (``timm_cff.create_stages``), one stage after another.
"""
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..metrics import first_view
from ..stages import StageAdapter, VitStages, create_stages

__all__ = ['extract_block_features', 'block_outputs']


def _vit_block_outputs(stages: VitStages, x: Tensor) -> list[Tensor]:
    """``[B, C, H, W]`` -> L pooled block outputs ``[B, D]`` from one ``forward_intermediates`` pass."""
    model = stages.model
    outputs = model.forward_intermediates(x, return_prefix_tokens=True, output_fmt='NLC', intermediates_only=True)
    if model.num_prefix_tokens:  # timm splits off class/register tokens; `pool` expects them in front again
        outputs = [torch.cat([prefix, tokens], dim=1) for tokens, prefix in outputs]
    return [stages.pool(h) for h in outputs]


def _stage_block_outputs(stages: StageAdapter, x: Tensor) -> list[Tensor]:
    """The stages one after another, each output pooled: ``[B, ...]`` -> L tensors ``[B, D]``."""
    pooled, h = [], x
    for index in range(stages.num_stages):
        h = stages.forward_stage(index, h)
        pooled.append(stages.pool(h).flatten(1))
    return pooled


@torch.no_grad()
def block_outputs(model: nn.Module, x: Tensor, stages: StageAdapter | None = None) -> list[Tensor]:
    """Every block's pooled output for one batch, as the stage losses see it (no normalisation).

    Args:
        model: a timm ViT or any model with a registered stage adapter; used as it is (call ``eval()`` first).
        x: inputs ``[B, C, H, W]`` on the model's device.
        stages: the adapter to use; ``create_stages(model)`` by default.

    Returns:
        L tensors ``[B, D_l]``, block 0 first.
    """
    stages = stages or create_stages(model)
    if type(stages) is VitStages:  # a subclass may change a stage, which forward_intermediates would not see
        return _vit_block_outputs(stages, x)
    return _stage_block_outputs(stages, x)


@torch.no_grad()
def extract_block_features(model: nn.Module, loader: Iterable, max_samples: int | None = None,
                           stages: StageAdapter | None = None) -> tuple[list[Tensor], Tensor]:
    """Pooled block outputs of a whole loader, in eval mode, gathered on the CPU in float32.

    Args:
        model: a timm ViT or any model with a registered stage adapter.
        loader: ``(inputs, labels)`` batches; with several views only the first is used.
        max_samples: stop once this many samples are collected (``None``: the whole loader).
        stages: the adapter to use; ``create_stages(model)`` by default.

    Returns:
        ``features``: L tensors ``[N, D_l]``; ``labels``: ``[N]`` int64.
    """
    stages = stages or create_stages(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks, labels, count = [], [], 0
    for inputs, targets in loader:
        x = first_view(inputs).to(device, non_blocking=True)
        chunks.append([f.float().cpu() for f in block_outputs(model, x, stages)])
        labels.append(torch.as_tensor(targets).long().cpu())
        count += len(labels[-1])
        if max_samples is not None and count >= max_samples:
            break
    model.train(was_training)
    if not chunks:
        raise ValueError('The loader yielded no batches; give a non-empty validation loader.')
    features = [torch.cat(blocks)[:max_samples] for blocks in zip(*chunks)]
    return features, torch.cat(labels)[:max_samples]
