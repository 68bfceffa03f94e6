"""Per-block features: every stage's pooled output from one no-grad pass over a loader.

The CFF paper's layer-wise analysis (Sec. 4.2, Fig. 5) looks at each block's token-averaged output, the feature its
local loss sees (Eq. 13). The stages run one after another through the model's stage adapter
(``timm_cff.create_stages``), each output pooled as the stage loss pools it; for a timm ViT the tests check this
against timm's own ``forward_intermediates``.
"""
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..metrics import first_view
from ..families import StageAdapter, create_stages

__all__ = ['extract_block_features', 'block_outputs']


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
    pooled, h = [], x
    for index in range(stages.num_stages):
        h = stages.forward_stage(index, h)
        pooled.append(stages.pool(h).flatten(1))
    return pooled


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
