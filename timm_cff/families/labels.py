"""Label-conditioned stages for the Forward-Forward family (FF, SymBa, FF-Collab).

FF scores an (input, label) pair, so the label must enter the network (CFF paper, Alg. 1, right side):

- ViT: a fixed random patch per class goes through the model's own patch projection, gets a learnable position
  embedding owned by the baseline and is prepended to the image tokens. The patches are distinct Gaussian draws
  from a seed ("randomly initialized and fixed", as in SymBa), never the colliding one-hot codes of the official
  code. Goodness reads the token mean of the image tokens only (the label token is left out, as in the code).
- MLP: Hinton's FF writes a one-hot label into the first C input values.

Between stages every sample is L2-normalised as a whole (``'sample'``: over tokens × E, as the official code), so
a stage cannot pass its goodness on. ``LabelledStages`` wraps a model family's ``StageAdapter``; a new family
registers its own with ``register_labelled_stages``.
"""
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..loss import goodness
from .base import _FAMILIES, StageAdapter, get_family

__all__ = ['LabelledStages', 'register_labelled_stages', 'create_labelled_stages', 'draw_negative_labels']

_NORMALIZE = ('sample', 'token')


def draw_negative_labels(labels: Tensor, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
    """A wrong label per sample, uniform over the ``C - 1`` other classes: ``[B] -> [B]``.

    Drawn on the generator's device (CPU by default) and moved to ``labels.device``.
    """
    if num_classes < 2:
        raise ValueError(f'Negative labels need at least 2 classes, got {num_classes}.')
    device = generator.device if generator is not None else torch.device('cpu')
    shift = torch.randint(1, num_classes, labels.shape, generator=generator, device=device)
    return (labels + shift.to(labels.device)) % num_classes


class LabelledStages(nn.Module):
    """A model's stages with a label written into the input: the forward pass of the FF family.

    Holds the label parameters and buffers (not part of the timm model's state dict, so they are saved with the
    trainer); the model itself is reached through ``stages`` and is not a submodule.

    Args:
        stages: the model family's ``StageAdapter``.
        num_classes: C.
        normalize: between stages, unit L2 per ``'sample'`` (whole output, official) or per ``'token'``.
    """

    def __init__(self, stages: StageAdapter, num_classes: int, normalize: str = 'sample'):
        super().__init__()
        if normalize not in _NORMALIZE:
            raise ValueError(f'normalize must be one of {_NORMALIZE}, got {normalize!r}.')
        if num_classes < 2:
            raise ValueError(f'The FF family needs at least 2 classes, got num_classes={num_classes}.')
        self.stages = stages
        self.num_stages = stages.num_stages
        self.num_classes = num_classes
        self.normalize = normalize

    def forward_first(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """Stage 0 on inputs ``[B, ...]`` with ``labels [B]`` (``None``: the all-zero label) written in."""
        raise NotImplementedError

    def pool(self, h: Tensor) -> Tensor:
        """A stage output ``[B, ...]`` -> the features whose goodness is scored ``[B, D]``."""
        return self.stages.pool(h)

    def forward_stage(self, index: int, h: Tensor, labels: Tensor | None = None) -> Tensor:
        """Stage ``index``: inputs and labels for stage 0; otherwise the previous output, detached and normalised."""
        if index == 0:
            return self.forward_first(h, labels)
        return self.stages.forward_stage(index, self._normalize(h.detach()))

    def pooled_outputs(self, x: Tensor, labels: Tensor | None) -> list[Tensor]:
        """The pooled output ``[B, D]`` of every stage for inputs ``[B, ...]`` labelled ``labels``."""
        h, outputs = x, []
        for index in range(self.num_stages):
            h = self.forward_stage(index, h, labels)
            outputs.append(self.pool(h))
        return outputs

    def goodness(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """Goodness (mean of squares of the pooled output) of every stage: ``[L, B]``."""
        return torch.stack([goodness(z) for z in self.pooled_outputs(x, labels)])

    def _normalize(self, h: Tensor) -> Tensor:
        if self.normalize == 'token':
            return F.normalize(h, dim=-1)
        return F.normalize(h.flatten(1), dim=1).view_as(h)

    def extra_repr(self) -> str:
        return f'num_classes={self.num_classes}, normalize={self.normalize!r}'


def register_labelled_stages(stages_class: type) -> Callable[[type], type]:
    """Class decorator: the FF-family label embedding of the model family whose stage adapter is ``stages_class``."""
    def _register(cls: type) -> type:
        family = next((f for f in _FAMILIES if f.stages_class is stages_class), None)
        if family is None:
            raise ValueError(f'{stages_class.__name__} is no registered stage adapter; register it with '
                             'register_stages first.')
        family.labels_class = cls
        return cls
    return _register


def create_labelled_stages(stages: StageAdapter, num_classes: int, **kwargs) -> LabelledStages:
    """The FF-family forward for a model family's stages; ``kwargs`` go to the family's class."""
    family = get_family(stages.model)
    if family.labels_class is None:
        supported = ', '.join(f.name for f in _FAMILIES if f.labels_class is not None)
        raise TypeError(f'No FF label embedding for {type(stages).__name__}; families with one: {supported}. '
                        'Register one with register_labelled_stages.')
    return family.labels_class(stages, num_classes, **kwargs)
