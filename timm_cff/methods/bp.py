"""BP+CE: the reference the CFF paper compares against (Table 3), on the same model and data pipeline.

The whole model (encoder, ``fc_norm`` and ``head``) is trained end to end with cross-entropy: AdamW lr 5e-4 and
weight decay 0.01 on every parameter, constant LR (the official ``main_BP.py`` settings), one view, and the checkpoint
with the lowest validation cross-entropy kept. The trained model is the timm model itself, so it exports unchanged.
"""
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import StageOptimizers, TrainerBase
from .registry import MethodInfo, register_method

__all__ = ['BackpropTrainer']


class BackpropTrainer(TrainerBase):
    """End-to-end cross-entropy training with the same run-loop protocol as ``LocalTrainer``.

    Args:
        model: any classifier ``[B, ...] -> [B, C]`` (a timm ViT, an ``MLP``).
        lr: 5e-4 (official BP+CE).
        optimizer: a ``timm.optim`` name (``'adamw'``: decay on all parameters, as the official code) or a factory
            ``params -> Optimizer``.
        weight_decay, optimizer_kwargs, scheduler: as for ``LocalTrainer``.
        label_smoothing: 0 (official).
        check_finite: refuse a NaN/inf loss before the weights change.
    """

    def __init__(self, model: nn.Module, lr: float = 5e-4, *, optimizer: str | Callable = 'adamw',
                 weight_decay: float = 0.01, optimizer_kwargs: dict | None = None, scheduler: dict | None = None,
                 label_smoothing: float = 0.0, check_finite: bool = True):
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        self.stage_optimizers = StageOptimizers.create(  # the whole model is one "stage"
            [params], optimizer, lr=lr, weight_decay=weight_decay, optimizer_kwargs=optimizer_kwargs,
            scheduler=scheduler, finite_guard=check_finite)
        self.label_smoothing = label_smoothing
        self.num_views = 1
        self.num_updates = 0
        self.epoch = 0

    @property
    def selection_key(self) -> str:
        """``'loss'``: the validation cross-entropy."""
        return 'loss'

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Logits ``[B, C]`` in one forward pass."""
        self.model.eval()
        return self.model(x.to(self.device))

    def step(self, views: Tensor | Sequence[Tensor], labels: Tensor) -> dict[str, Tensor]:
        """One end-to-end step; ``{'loss', 'top1'}``: the batch's detached loss and top-1 accuracy (percent)."""
        x, y = self.prepare_batch(views, labels)
        self.model.train()
        self.stage_optimizers.zero_grad()
        loss, top1 = self._loss(x, y)
        self.stage_optimizers.backward(loss)
        self.stage_optimizers.check_finite(loss.detach()[None], step=self.num_updates)  # before the weights change
        self.num_updates += 1
        self.stage_optimizers.step(self.num_updates)
        return {'loss': loss.detach(), 'top1': top1}

    def evaluate_batch(self, views: Tensor | Sequence[Tensor], labels: Tensor) -> dict[str, Tensor]:
        x, y = self.prepare_batch(views, labels)
        loss, top1 = self._loss(x, y)
        return {'loss': loss, 'top1': top1}

    def _loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model(x)  # [B, C]
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        top1 = (logits.detach().argmax(1) == y).float().mean() * 100
        return loss, top1


register_method(MethodInfo('bp', 'BP+CE', BackpropTrainer, end_to_end=True,
                           description='end-to-end backpropagation with cross-entropy'))
