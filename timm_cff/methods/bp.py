"""BP+CE: the reference the CFF paper compares against (Table 3), on the same model and data pipeline.

The whole model (encoder, ``fc_norm`` and ``head``) is trained end to end with cross-entropy: AdamW lr 5e-4 and
weight decay 0.01 on every parameter, constant LR (the official ``main_BP.py`` settings), one view, and the checkpoint
with the lowest validation cross-entropy kept. The trained model is the timm model itself, so it exports unchanged.
"""
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import TrainerBase, build_optimizer, build_scheduler
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
        self.optimizers = [build_optimizer(params, optimizer, lr, weight_decay, dict(optimizer_kwargs or {}))]
        self.schedulers = [build_scheduler(self.optimizers[0], scheduler)] if scheduler else []
        self.label_smoothing = label_smoothing
        self.num_views = 1
        self.check_finite = check_finite
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

    def _update(self, views: Tensor | Sequence[Tensor], labels: Tensor) -> Tensor:
        """One end-to-end step; ``[2]``: the detached loss and top-1 accuracy (percent) of the batch."""
        x, y = self.prepare_batch(views, labels)
        self._begin_update()
        loss, top1 = self._loss(x, y)
        loss.backward()
        self._finish_update(loss.detach()[None])
        return torch.stack([loss.detach(), top1])

    def _evaluate_batch(self, views: Tensor | Sequence[Tensor], labels: Tensor) -> Tensor:
        x, y = self.prepare_batch(views, labels)
        return torch.stack(self._loss(x, y))

    def _loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model(x)  # [B, C]
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        top1 = (logits.detach().argmax(1) == y).float().mean() * 100
        return loss, top1

    def _as_dict(self, stats: Tensor) -> dict[str, Tensor]:
        return {'loss': stats[0], 'top1': stats[1]}


register_method(MethodInfo('bp', 'BP+CE', BackpropTrainer, end_to_end=True,
                           description='end-to-end backpropagation with cross-entropy'))
