"""Stage 2: a linear probe (``fc_norm`` + ``head``) on the frozen, layer-locally trained encoder.

This is the official CFF probe (LayerNorm(E) then Linear(E, C) on the token mean of the last block): with
``global_pool='avg'`` timm applies exactly these two modules after pooling, and stage 1 never trains them.
Defaults follow the official code: AdamW, lr 5e-4, wd 0.01, constant LR, 50 epochs, best validation cross-entropy.
The epochs run through ``timm_cff.loop.fit``, the loop of stage 1, with the probe as its runner.
"""
import copy
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.utils import AverageMeter
from torch import Tensor, nn

from .families import HEAD_MODULES
from .loop import Callback, EpochResult, fit
from .methods.base import NonFiniteLossError, StageOptimizers
from .metrics import accuracy, first_view

__all__ = ['train_linear_probe', 'ProbeResult']

_logger = logging.getLogger(__name__)


@dataclass
class ProbeResult:
    """What the probe run did: the epoch kept (1-based), its validation loss, and per-epoch metrics."""
    best_epoch: int
    best_val_loss: float | None
    history: list[dict[str, float]] = field(default_factory=list)


def _head_modules(model: nn.Module, names: tuple[str, ...]) -> nn.ModuleList:
    missing = [n for n in names if not hasattr(model, n)]
    if missing:
        raise TypeError(f'{type(model).__name__} has no {missing}; the probe trains the timm classifier modules '
                        f'{list(names)} (build the ViT with global_pool="avg").')
    return nn.ModuleList([getattr(model, n) for n in names])


def _reset(modules: nn.ModuleList) -> None:
    for module in modules.modules():
        if hasattr(module, 'reset_parameters'):
            module.reset_parameters()


def _encoded(model: nn.Module, loader: Iterable) -> Iterator[tuple[Tensor, Tensor]]:
    """``(tokens [B, N, D], labels [B])`` of the frozen encoder; the first view of multi-view batches."""
    device = next(model.parameters()).device
    for inputs, labels in loader:
        with torch.no_grad():
            yield model.forward_features(first_view(inputs).to(device, non_blocking=True)), labels.to(device)


class _FeatureCache:
    """Encoder outputs of a loader computed once and re-batched in a fresh order each epoch (for loaders
    whose inputs do not change between epochs, i.e. without augmentation)."""

    def __init__(self, model: nn.Module, loader: Iterable):
        pairs = list(_encoded(model, loader))
        self.batch_size = len(pairs[0][1]) if pairs else 1
        self.features = torch.cat([f for f, _ in pairs]) if pairs else torch.empty(0)
        self.labels = torch.cat([y for _, y in pairs]) if pairs else torch.empty(0, dtype=torch.long)
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.epoch += 1
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(self.epoch))
        for index in order.to(self.labels.device).split(self.batch_size):
            yield self.features[index], self.labels[index]


def _run_epoch(model: nn.Module, head: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
               optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
    """One pass over encoded batches; trains the head when an optimizer is given."""
    loss_meter, top1_meter = AverageMeter(), AverageMeter()  # per-sample means
    head.train(optimizer is not None)
    for step, (features, y) in enumerate(batches):
        with torch.set_grad_enabled(optimizer is not None):
            logits = model.forward_head(features)  # pool -> fc_norm -> head, [B, C]
            loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):  # refused before the head changes (one host sync per step)
            raise NonFiniteLossError('probe', step, float(loss))
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        loss_meter.update(float(loss.detach()), len(y))
        top1_meter.update(accuracy(logits.detach(), y)[0], len(y))
    if loss_meter.count == 0:
        raise ValueError('The probe loader yielded no batches.')
    return {'loss': loss_meter.avg, 'top1': top1_meter.avg}


def train_linear_probe(
        model: nn.Module,
        train_loader: Iterable,
        val_loader: Iterable | None = None,
        *,
        epochs: int = 50,
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        optimizer: str = 'adamw',
        scheduler: dict | None = None,
        reinit: bool = True,
        head_modules: tuple[str, ...] = HEAD_MODULES,
        cache_features: bool = False,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> ProbeResult:
    """Train ``fc_norm`` + ``head`` of ``model`` on its frozen encoder; keep the best validation cross-entropy.

    Args:
        model: a timm model (``forward_features`` / ``forward_head``); only ``head_modules`` change.
        train_loader, val_loader: ``(inputs, labels)`` batches; with several views the first is used.
        epochs, lr, weight_decay: AdamW settings (official: 50, 5e-4, 0.01, constant LR).
        optimizer: a ``timm.optim`` name (``'adamw'``: the official probe's torch AdamW).
        scheduler: ``None`` (constant LR) or ``create_scheduler_v2`` kwargs (``timm_cff.methods.schedule``),
            stepped after every epoch.
        reinit: re-initialise the head modules first (the official probe starts from fresh layers).
        cache_features: encode each loader once and reuse the features every epoch; only right when the
            loaders give the same inputs every epoch (no augmentation).
        on_epoch: optional ``fn(epoch, metrics)`` called after every epoch (e.g. a progress bar).

    Returns:
        ``ProbeResult``; the model's head holds the weights of the best epoch (the last without ``val_loader``).

    Raises:
        NonFiniteLossError: a NaN/inf loss, before the head is updated with it.
    """
    if epochs < 1:
        raise ValueError(f'train_linear_probe needs epochs >= 1, got {epochs}.')
    head = _head_modules(model, head_modules)
    if reinit:
        _reset(head)
    was_training = model.training
    model.eval()  # frozen encoder: no dropout / drop-path
    optimizers = StageOptimizers.create([list(head.parameters())], optimizer, lr=lr, weight_decay=weight_decay,
                                        scheduler=scheduler)  # the head is the one "stage"
    probe = _Probe(model, head, optimizers, cache_features)
    record = _Record(head, on_epoch)
    state = fit(probe, train_loader, val_loader, epochs, validate=val_loader is not None, callbacks=[record])
    if record.best_state is not None:
        head.load_state_dict(record.best_state)
    model.train(was_training)
    return ProbeResult(state['best_epoch'] or epochs, state['best_loss'], record.history)


class _Probe:
    """The probe as a ``loop.Runner``: epochs of cross-entropy on the frozen encoder's features."""
    selection_key = 'loss'

    def __init__(self, model: nn.Module, head: nn.Module, optimizers: StageOptimizers, cache: bool):
        self.model, self.head, self.optimizers, self.cache = model, head, optimizers, cache
        self._caches: dict[int, _FeatureCache] = {}
        self.epoch = 0

    def train_epoch(self, loader: Iterable, on_step=None) -> dict[str, float]:
        metrics = _run_epoch(self.model, self.head, self._batches(loader), self.optimizers.optimizers[0])
        self.epoch += 1
        self.optimizers.step_epoch(self.epoch)  # the schedule, if any
        return metrics

    def evaluate(self, loader: Iterable) -> dict[str, float]:
        return _run_epoch(self.model, self.head, self._batches(loader))

    def _batches(self, loader: Iterable) -> Iterable[tuple[Tensor, Tensor]]:
        if not self.cache:
            return _encoded(self.model, loader)
        if id(loader) not in self._caches:  # encoded once, on first use
            self._caches[id(loader)] = _FeatureCache(self.model, loader)
        return self._caches[id(loader)]


class _Record(Callback):
    """Keeps the head of the best validation epoch and the per-epoch history; forwards epochs to ``on_epoch``."""

    def __init__(self, head: nn.Module, on_epoch: Callable[[int, dict[str, float]], None] | None):
        self.head, self.on_epoch = head, on_epoch
        self.best_state: dict[str, Tensor] | None = None
        self.history: list[dict[str, float]] = []

    def on_epoch_end(self, result: EpochResult) -> None:
        metrics = {**{f'train_{k}': v for k, v in result.train.items()},
                   **{f'val_{k}': v for k, v in result.val.items()}}
        if result.improved:
            self.best_state = copy.deepcopy(self.head.state_dict())
        self.history.append({'epoch': result.epoch, **metrics})
        _logger.debug('probe epoch %d: %s', result.epoch, metrics)
        if self.on_epoch is not None:
            self.on_epoch(result.epoch, metrics)
