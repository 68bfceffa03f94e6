"""Classification metrics: top-k accuracy of logits and of a model over a loader."""
from collections.abc import Callable, Iterable, Sequence

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
def evaluate_accuracy(model: nn.Module | Callable[[Tensor], Tensor], loader: Iterable,
                      topk: Sequence[int] = (1, 5, 10), device: torch.device | str | None = None) -> dict[str, float]:
    """Cross-entropy and top-k accuracy (percent) over ``(inputs, labels)`` batches.

    Args:
        model: a module (run in eval mode) or any ``inputs [B, ...] -> scores [B, C]`` callable, e.g. an FF
            trainer's ``predict``.
        device: where inputs go; default: the module's parameters' device.
    """
    module = model if isinstance(model, nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
        device = device or next(module.parameters()).device
    loss_sum, correct, count = 0.0, torch.zeros(len(topk)), 0
    for inputs, labels in loader:
        x, y = first_view(inputs).to(device or 'cpu'), labels.to(device or 'cpu')
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction='sum'))
        correct += torch.tensor(accuracy(logits, y, topk)) * len(y)
        count += len(y)
    if module is not None:
        module.train(was_training)
    if count == 0:
        raise ValueError('The loader yielded no batches.')
    return {'loss': loss_sum / count, **{f'top{k}': float(c / count) for k, c in zip(topk, correct)}}
