"""``TrainerBase``: the run-loop protocol every timm-cff method shares (layer-local CFF, the FF family,
backpropagation), and the per-stage optimizer/scheduler/autocast builders they use.

A method implements one training step and its statistics; the base turns them into ``step``, ``train_epoch``,
``evaluate``, ``end_epoch`` and ``state_dict``/``load_state_dict``, refuses a non-finite loss before any weight
changes and steps every stage's optimizer.
"""
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ['TrainerBase', 'NonFiniteLossError', 'split_batch', 'build_optimizer', 'build_scheduler',
           'resolve_autocast_dtype']

_logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A stage loss was NaN or infinite; no optimizer stepped on it."""

    def __init__(self, stage: int, step: int, value: float):
        super().__init__(f'Non-finite loss {value} at stage {stage}, step {step}; no weights were updated. '
                         'Lower the learning rate or check the inputs for NaN/inf.')
        self.stage, self.step, self.value = stage, step, value


def split_batch(batch: Any) -> tuple[Any, Tensor]:
    """A loader batch ``(inputs, labels)`` -> ``(inputs, labels)``, with a clear error for other shapes."""
    if not (isinstance(batch, (list, tuple)) and len(batch) == 2):
        raise ValueError('Loader batches must be (inputs, labels) pairs; inputs is one tensor [B, ...] or a '
                         'tuple of V view tensors.')
    return batch[0], batch[1]


def build_optimizer(params: list[nn.Parameter], optimizer: Any, lr: float, weight_decay: float,
                     kwargs: dict) -> torch.optim.Optimizer:
    """``'adamw'`` (the official: decay on every parameter) or any ``timm.optim`` name, or a factory."""
    if callable(optimizer):
        return optimizer(params)
    from timm.optim import create_optimizer_v2
    # A parameter list (not a module) keeps timm from splitting off no-decay groups: official CFF decays all.
    return create_optimizer_v2(params, opt=optimizer, lr=lr, weight_decay=weight_decay, **kwargs)


_AUTOCAST_DTYPES = {None: None, 'float32': None, torch.float32: None, 'bfloat16': torch.bfloat16,
                    torch.bfloat16: torch.bfloat16, 'float16': torch.float16, torch.float16: torch.float16}


def resolve_autocast_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``None``/``'float32'`` -> ``None`` (no autocast); ``'bfloat16'``/``'float16'`` (or the dtypes) -> the dtype."""
    if not isinstance(dtype, str | torch.dtype | None) or dtype not in _AUTOCAST_DTYPES:
        raise ValueError(f"autocast_dtype must be None, 'bfloat16' or 'float16', got {dtype!r}.")
    return _AUTOCAST_DTYPES[dtype]


def build_scheduler(optimizer: torch.optim.Optimizer, kwargs: dict):
    from timm.scheduler import create_scheduler_v2
    return create_scheduler_v2(optimizer, **kwargs)[0]


class TrainerBase:
    """The run-loop protocol every timm-cff trainer shares (layer-local CFF, the FF family, backpropagation).

    A subclass sets ``model``, ``optimizers``, ``schedulers``, ``num_views`` and ``check_finite`` and implements
    ``_update(views, labels)`` (one training step) and ``_evaluate_batch(views, labels)`` (the same statistics without
    an update), both returning a detached tensor of per-batch means, ``_as_dict`` (that tensor as named 0-d tensors
    holding at least ``'loss'``), ``selection_key`` and ``predict``. The base turns these into ``step``,
    ``train_epoch``, ``evaluate``, ``end_epoch`` and ``state_dict``/``load_state_dict``.
    """
    model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    schedulers: Sequence = ()
    num_views: int = 1
    check_finite: bool = True
    num_updates: int = 0
    epoch: int = 0
    scaler: torch.amp.GradScaler | None = None  # float16 autocast only
    selection_key: str  # the evaluate() entry whose minimum picks the best checkpoint
    predict: Callable[[Tensor], Tensor]  # inputs [B, ...] -> class scores [B, C]
    _update: Callable[[Any, Tensor], Tensor]  # (views, labels) -> detached per-batch statistics, after one update
    _evaluate_batch: Callable[[Any, Tensor], Tensor]  # the same statistics without an update
    _as_dict: Callable[[Tensor], dict[str, Tensor]]  # statistics -> {'loss': ..., ...}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def step(self, views: Tensor | Sequence[Tensor], labels: Tensor) -> dict[str, Tensor]:
        """One update on a batch; ``{'loss': ..., ...}`` as detached 0-d tensors (no host sync)."""
        return self._as_dict(self._update(views, labels))

    # ------------------------------------------------------------------------------------------------ epochs
    def train_epoch(self, loader: Iterable, on_step: Callable[[dict[str, Tensor]], None] | None = None
                    ) -> dict[str, float]:
        """``step()`` over a loader of ``(views, labels)``; per-sample means of the epoch.

        ``on_step`` receives every step's output dict (detached tensors), e.g. for a progress bar.
        """
        totals, count = None, 0
        for batch in loader:
            views, labels = split_batch(batch)
            rows = self._update(views, labels)
            if on_step is not None:
                on_step(self._as_dict(rows))
            totals, count = (rows * len(labels) if totals is None else totals + rows * len(labels)), count + len(labels)
        self.end_epoch()
        return self.epoch_means(totals, count)

    def end_epoch(self) -> None:
        """Advance the epoch counter and epoch-based schedulers."""
        self.epoch += 1
        for sched in self.schedulers:
            sched.step(self.epoch)

    @torch.no_grad()
    def evaluate(self, loader: Iterable) -> dict[str, float]:
        """Per-sample means of the step statistics on a loader, without updates (eval mode)."""
        was_training = self.model.training
        self.model.eval()
        totals, count = None, 0
        for batch in loader:
            views, labels = split_batch(batch)
            out = self._evaluate_batch(views, labels) * len(labels)
            totals, count = (out if totals is None else totals + out), count + len(labels)
        self.model.train(was_training)
        return self.epoch_means(totals, count)

    def gather(self, device: torch.device | str | None = None) -> 'TrainerBase':
        """The trainer itself: a one-process trainer already holds the whole model (pipelines gather theirs)."""
        return self

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: model, optimizers, schedulers and counters."""
        return {
            'model': self.model.state_dict(),
            'optimizers': [opt.state_dict() for opt in self.optimizers],
            'schedulers': [sched.state_dict() for sched in self.schedulers],
            **({'scaler': self.scaler.state_dict()} if self.scaler else {}),
            'num_updates': self.num_updates,
            'epoch': self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state['optimizers']) != len(self.optimizers):
            raise ValueError(f'The checkpoint has {len(state["optimizers"])} stage optimizers, this trainer has '
                             f'{len(self.optimizers)}; it belongs to a model of another depth or another method.')
        self.model.load_state_dict(state['model'])
        for opt, opt_state in zip(self.optimizers, state['optimizers']):
            opt.load_state_dict(opt_state)
        for sched, sched_state in zip(self.schedulers, state.get('schedulers', [])):
            sched.load_state_dict(sched_state)
        if self.scaler and 'scaler' in state:
            self.scaler.load_state_dict(state['scaler'])
        self.num_updates = state['num_updates']
        self.epoch = state.get('epoch', 0)

    # ----------------------------------------------------------------------------------------------- helpers
    def _begin_update(self) -> None:
        self.model.train()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def _finish_update(self, losses: Tensor) -> None:
        """Refuse non-finite ``losses [K]`` before any weight changes, then step every optimizer and scheduler."""
        if self.check_finite:
            self.raise_if_not_finite(losses)
        self.num_updates += 1
        self.step_stages(range(len(self.optimizers)), self.num_updates)

    def step_stages(self, stages: Sequence[int], num_updates: int) -> None:
        """Step the optimizers of ``stages``, then move their per-update schedulers to ``num_updates``."""
        for index in stages:
            self.scaler.step(self.optimizers[index]) if self.scaler else self.optimizers[index].step()
        if self.scaler:
            self.scaler.update()
        for index in stages if self.schedulers else ():
            self.schedulers[index].step_update(num_updates=num_updates)

    def prepare_batch(self, views: Tensor | Sequence[Tensor], labels: Tensor,
                      device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """Views -> one view-major ``[VB, ...]`` tensor on ``device`` (default: the model's); labels checked."""
        views = [views] if isinstance(views, Tensor) else list(views)
        if len(views) < self.num_views:
            raise ValueError(f'The trainer uses {self.num_views} views per image but the batch has {len(views)}; '
                             'give a tuple of views or set num_views=1.')
        views = views[:self.num_views]
        if any(v.shape != views[0].shape for v in views):
            raise ValueError(f'All views must have one shape, got {[tuple(v.shape) for v in views]}.')
        if not isinstance(labels, Tensor) or labels.dim() != 1 or len(labels) != len(views[0]):
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f'Labels must be a [B] tensor with B = {len(views[0])} (the batch size), got {shape}.')
        device = self.device if device is None else device
        return torch.cat(views).to(device, non_blocking=True), labels.to(device, non_blocking=True)

    def raise_if_not_finite(self, losses: Tensor, stages: Sequence[int] | None = None,
                            step: int | None = None) -> None:
        """Raise ``NonFiniteLossError`` (after clearing those stages' gradients) if a loss is NaN or infinite.

        Args:
            losses: ``[len(stages)]`` losses of ``stages`` (default: one per optimizer, in order).
            step: the update the losses belong to (default: ``num_updates``), for the message.
        """
        stages = range(len(losses)) if stages is None else stages
        finite = torch.isfinite(losses)
        if not bool(finite.all()):  # one host sync per step
            k = int((~finite).nonzero()[0])
            for index in stages:
                self.optimizers[index].zero_grad(set_to_none=True)
            raise NonFiniteLossError(stages[k], self.num_updates if step is None else step, float(losses[k]))

    def epoch_means(self, totals: Tensor | None, count: int) -> dict[str, float]:
        """Per-sample means as floats from statistics summed over ``count`` samples (each batch weighted by size)."""
        if totals is None:
            raise ValueError('The loader yielded no batches.')
        return {k: float(v) for k, v in self._as_dict(totals / count).items()}
