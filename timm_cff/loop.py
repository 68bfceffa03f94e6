"""The one epoch loop: train, validate, keep the best epoch, stop on patience; everything else is a callback.

Every method's stage 1 (a trainer or a layer pipeline), the linear probe and the FF one-pass head run through
``fit``. What a run does around it (checkpoints, the metrics CSV, progress bars) are ``Callback`` objects, so the
loop itself stays the algorithm of a training run:

    for epoch in epochs:
        stop if the selection loss has not improved for `patience` epochs
        train = runner.train_epoch(train batches);  val = runner.evaluate(val batches)
        improved = val[runner.selection_key] < best
        callbacks see the epoch
"""
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = ['Runner', 'Callback', 'EpochResult', 'MeanMeter', 'fit', 'new_fit_state', 'out_of_patience']


class Runner(Protocol):
    """What ``fit`` drives: ``TrainerBase`` (every method), the layer pipelines, the probe."""
    selection_key: str  # the evaluate() entry whose minimum picks the best epoch

    def train_epoch(self, loader: Iterable, on_step=None) -> dict[str, float]:
        """One epoch of updates; per-sample means. ``on_step(stats)`` may see each step's detached statistics."""

    def evaluate(self, loader: Iterable) -> dict[str, float]:
        """The same statistics without updates."""


@dataclass
class EpochResult:
    """One finished epoch as the callbacks see it; ``state`` is the loop state after it (1-based epochs)."""
    epoch: int
    train: dict[str, float]
    val: dict[str, float]
    seconds: float
    improved: bool
    state: dict[str, Any]


class Callback:
    """Hooks of ``fit``; every method is optional."""

    def on_epoch_start(self, epoch: int, steps: int | None) -> None:
        """Before the training pass of ``epoch`` (0-based) of ``steps`` batches (``None``: unknown)."""

    def on_step(self, stats: dict[str, Tensor]) -> None:
        """After each training step, with its detached statistics (no host sync unless the callback reads them)."""

    def on_epoch_end(self, result: EpochResult) -> None:
        """After the epoch's validation and selection."""


class MeanMeter:
    """Per-sample means of batch statistics: ``add(stats, n)`` per batch of ``n`` samples, ``mean()`` at the end.

    ``stats`` is a tensor (one shape for every batch) or a dict of 0-d tensors (the same keys every batch, kept as
    one stacked tensor); ``sum()`` and ``mean()`` return the same kind. Sums stay on the statistics' device, so
    adding never syncs with the host.
    """

    def __init__(self):
        self.total: Tensor | None = None  # the n-weighted sum of the statistics
        self.count = 0
        self.keys: list[str] | None = None  # the names, when the statistics come as a dict

    def add(self, stats: Tensor | dict[str, Tensor], n: int) -> None:
        if isinstance(stats, dict):
            if self.keys is None:
                self.keys = list(stats)
            elif list(stats) != self.keys:
                raise ValueError(f'Every batch must report the same statistics: {self.keys}, got {list(stats)}.')
            stats = torch.stack([stats[k] for k in self.keys])
        self.total = stats * n if self.total is None else self.total + stats * n
        self.count += n

    def sum(self) -> Tensor | dict[str, Tensor]:
        """The n-weighted sums so far."""
        if self.total is None:
            raise ValueError('The loader yielded no batches.')
        return self._as_given(self.total)

    def mean(self) -> Tensor | dict[str, Tensor]:
        if self.total is None or self.count == 0:
            raise ValueError('The loader yielded no batches.')
        return self._as_given(self.total / self.count)

    def _as_given(self, values: Tensor) -> Tensor | dict[str, Tensor]:
        return values if self.keys is None else dict(zip(self.keys, values.unbind()))


def new_fit_state() -> dict[str, Any]:
    """The loop state a run starts from; saved with every checkpoint, so a resumed run continues from it."""
    return {'epoch': 0, 'best_loss': None, 'best_epoch': None, 'time_s': 0.0}


def out_of_patience(state: dict[str, Any], patience: int | None) -> bool:
    """Whether ``patience`` epochs have passed since the best one; decided from the saved state alone, so a
    resumed run with more patience (or more epochs) continues where an uninterrupted one would be."""
    return patience is not None and state['best_epoch'] is not None and state['epoch'] - state['best_epoch'] >= patience


def _limited(loader: Iterable | None, max_steps: int | None) -> Iterator | None:
    if loader is None or max_steps is None:
        return loader
    return (batch for i, batch in zip(range(max_steps), loader))


def _set_epoch(loader: Any, epoch: int) -> None:
    if hasattr(loader, 'set_epoch'):  # the DistributedSampler convention: reshuffle and re-augment per epoch
        loader.set_epoch(epoch)


def fit(runner: Runner, train_loader: Iterable | None, val_loader: Iterable | None, epochs: int, *,
        state: dict[str, Any] | None = None, patience: int | None = None, max_steps: int | None = None,
        validate: bool = True, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train ``runner`` up to ``epochs`` epochs from ``state`` (default: a fresh start); returns the final state.

    Each epoch trains on ``train_loader`` and evaluates on ``val_loader`` (both ``None`` on pipeline ranks that read
    no data: their runner receives its batches from the previous rank); with ``validate=False`` nothing is
    selected. The best epoch is the first minimum of
    ``val[runner.selection_key]``. With ``patience`` the loop stops once that many epochs passed without a new best.
    The state's ``stop_reason`` says why it ended: ``'epochs'`` or ``'patience'``.
    """
    state = dict(state or new_fit_state())
    key = runner.selection_key
    for epoch in range(state['epoch'], epochs):
        if out_of_patience(state, patience):
            break
        for loader in (train_loader, val_loader):
            _set_epoch(loader, epoch)
        steps = None if train_loader is None or not hasattr(train_loader, '__len__') else \
            min(len(train_loader), max_steps or len(train_loader))
        for callback in callbacks:
            callback.on_epoch_start(epoch, steps)
        start = time.perf_counter()
        train = runner.train_epoch(_limited(train_loader, max_steps),
                                   on_step=lambda stats: [c.on_step(stats) for c in callbacks])
        val = runner.evaluate(_limited(val_loader, max_steps)) if validate else {}
        seconds = time.perf_counter() - start
        improved = key in val and (state['best_loss'] is None or val[key] < state['best_loss'])
        if improved:
            state.update(best_loss=val[key], best_epoch=epoch + 1)
        state.update(epoch=epoch + 1, time_s=state['time_s'] + seconds)
        result = EpochResult(epoch + 1, train, val, seconds, improved, state)
        for callback in callbacks:
            callback.on_epoch_end(result)
    stopped = out_of_patience(state, patience) and state['epoch'] < epochs
    state['stop_reason'] = 'patience' if stopped else 'epochs'
    return state
