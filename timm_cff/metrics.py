"""Classification metrics: top-k accuracy of logits and of a model over a loader."""
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ['accuracy', 'evaluate_accuracy', 'first_view']


def accuracy(logits: Tensor, target: Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """Top-k accuracies in percent of ``logits [B, C]`` against ``target [B]``; k is capped at C (as timm does)."""
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices  # [B, maxk]
    correct = pred.eq(target[:, None])  # [B, maxk]
    return [float(correct[:, :min(k, maxk)].any(dim=1).float().mean() * 100) for k in topk]


def first_view(inputs: Tensor | Sequence[Tensor]) -> Tensor:
    """The first view of a multi-view batch, or the batch itself."""
    return inputs if isinstance(inputs, Tensor) else inputs[0]


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader: Iterable, topk: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Cross-entropy and top-k accuracy (percent) of ``model`` over ``(inputs, labels)`` batches, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct, count = 0.0, torch.zeros(len(topk)), 0
    for inputs, labels in loader:
        x, y = first_view(inputs).to(device), labels.to(device)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction='sum'))
        correct += torch.tensor(accuracy(logits, y, topk)) * len(y)
        count += len(y)
    model.train(was_training)
    if count == 0:
        raise ValueError('The loader yielded no batches.')
    return {'loss': loss_sum / count, **{f'top{k}': float(c / count) for k, c in zip(topk, correct)}}
