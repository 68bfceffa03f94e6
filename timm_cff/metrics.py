"""Classification metrics: top-k accuracy of logits and of a model over a loader."""
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from timm.utils import AverageMeter
from torch import Tensor, nn

__all__ = ['accuracy', 'evaluate_accuracy', 'first_view']


def accuracy(logits: Tensor, target: Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """Top-k accuracies in percent of ``logits [B, C]`` against ``target [B]`` (``timm.utils.accuracy``: k is
    capped at C), as floats."""
    from timm.utils import accuracy as timm_accuracy
    return [float(acc) for acc in timm_accuracy(logits, target, topk=tuple(topk))]


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
    meters = {name: AverageMeter() for name in ('loss', *(f'top{k}' for k in topk))}  # per-sample means
    for inputs, labels in loader:
        x, y = first_view(inputs).to(device or 'cpu'), labels.to(device or 'cpu')
        logits = model(x)
        values = [float(F.cross_entropy(logits, y)), *accuracy(logits, y, topk)]
        for meter, value in zip(meters.values(), values):
            meter.update(value, len(y))
    if module is not None:
        module.train(was_training)
    if meters['loss'].count == 0:
        raise ValueError('The loader yielded no batches.')
    return {name: meter.avg for name, meter in meters.items()}
