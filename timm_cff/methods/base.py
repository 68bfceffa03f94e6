"""What every timm-cff method shares: ``StageOptimizers`` (one optimizer per stage, with its scheduler, the float16
gradient scaler and the finite-loss guard) and ``TrainerBase`` (the run-loop protocol: ``train_epoch``, ``evaluate``,
``end_epoch``, ``state_dict``/``load_state_dict``).

A method implements ``step(views, labels)`` (one update, returning named detached statistics) and
``evaluate_batch(views, labels)`` (the same statistics without an update); the base averages them over epochs.
Per-stage statistics are named ``{name}_stage{i}`` (``stage_key``).
"""
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..loop import MeanMeter

__all__ = ['TrainerBase', 'StageOptimizers', 'NonFiniteLossError', 'split_batch', 'check_views', 'batch_views',
           'stage_key', 'name_by_stage', 'build_optimizer', 'build_scheduler', 'schedule', 'SCHEDULES',
           'EPOCH_LENGTH_SCHEDULES', 'resolve_autocast_dtype']

_logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A stage loss was NaN or infinite; no optimizer stepped on it."""

    def __init__(self, stage: int, step: int, value: float):
        super().__init__(f'Non-finite loss {value} at stage {stage}, step {step}; no weights were updated. '
                         'Lower the learning rate or check the inputs for NaN/inf.')
        self.stage, self.step, self.value = stage, step, value


# ------------------------------------------------------------------------------------------------ batches
def split_batch(batch: Any) -> tuple[Any, Tensor]:
    """A loader batch ``(inputs, labels)`` -> ``(inputs, labels)``, with a clear error for other shapes."""
    if not (isinstance(batch, (list, tuple)) and len(batch) == 2):
        raise ValueError('Loader batches must be (inputs, labels) pairs; inputs is one tensor [B, ...] or a '
                         'tuple of V view tensors.')
    return batch[0], batch[1]


def check_views(views: Tensor | Sequence[Tensor], labels: Tensor, num_views: int) -> list[Tensor]:
    """The first ``num_views`` views ``[B, ...]`` of a batch, checked against each other and the labels ``[B]``."""
    views = [views] if isinstance(views, Tensor) else list(views)
    if len(views) < num_views:
        raise ValueError(f'The trainer uses {num_views} views per image but the batch has {len(views)}; '
                         'give a tuple of views or set num_views=1.')
    views = views[:num_views]
    if any(v.shape != views[0].shape for v in views):
        raise ValueError(f'All views must have one shape, got {[tuple(v.shape) for v in views]}.')
    if not isinstance(labels, Tensor) or labels.dim() != 1 or len(labels) != len(views[0]):
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f'Labels must be a [B] tensor with B = {len(views[0])} (the batch size), got {shape}.')
    return views


def batch_views(views: Tensor | Sequence[Tensor], labels: Tensor, num_views: int,
                device: torch.device) -> tuple[Tensor, Tensor]:
    """Views -> one view-major ``[VB, ...]`` tensor and labels ``[B]``, both on ``device``."""
    views = check_views(views, labels, num_views)
    return torch.cat(views).to(device, non_blocking=True), labels.to(device, non_blocking=True)


# ------------------------------------------------------------------------------------------------ names
def stage_key(name: str, index: int) -> str:
    """The name of stage ``index``'s statistic ``name``: ``stage_key('loss', 2) == 'loss_stage2'``."""
    return f'{name}_stage{index}'


def name_by_stage(per_stage: Mapping[int, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """``{stage: {name: value}}`` -> ``{'{name}_stage{i}': value}``, name-major (all losses, then each metric), the
    column order of a run's ``metrics.csv``."""
    names = next(iter(per_stage.values()), {})
    return {stage_key(name, index): stats[name] for name in names for index, stats in per_stage.items()}


# ------------------------------------------------------------------------------------------------ builders
def build_optimizer(params: list[nn.Parameter], optimizer: Any, lr: float, weight_decay: float,
                    kwargs: dict) -> torch.optim.Optimizer:
    """``'adamw'`` (the official: decay on every parameter) or any ``timm.optim`` name, or a factory."""
    if callable(optimizer):
        return optimizer(params)
    from timm.optim import create_optimizer_v2
    # A parameter list (not a module) keeps timm from splitting off no-decay groups: official CFF decays all.
    return create_optimizer_v2(params, opt=optimizer, lr=lr, weight_decay=weight_decay, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, kwargs: dict):
    from timm.scheduler import create_scheduler_v2
    return create_scheduler_v2(optimizer, **kwargs)[0]


#: LR schedules by name: ``constant`` (official) and the epoch-stepped ones of ``timm.scheduler``.
SCHEDULES = ('constant', 'cosine', 'tanh', 'step', 'poly')
#: Schedules whose shape depends on the number of epochs (a resumed run cannot change it).
EPOCH_LENGTH_SCHEDULES = ('cosine', 'tanh', 'poly')


def schedule(sched: str = 'constant', epochs: int = 1, *, warmup_epochs: int = 0, warmup_lr: float = 1e-5,
             min_lr: float = 0.0, decay_epochs: float = 90, decay_rate: float = 0.1) -> dict | None:
    """``create_scheduler_v2`` kwargs of a per-epoch schedule over ``epochs`` epochs, or ``None`` for a constant LR
    without warmup (the official protocol). ``constant`` with warmup is timm's ``step`` with ``decay_rate=1``."""
    if sched not in SCHEDULES:
        raise ValueError(f'Unknown schedule {sched!r}; use one of {", ".join(SCHEDULES)}.')
    if sched == 'constant' and not warmup_epochs:
        return None
    return dict(sched='step' if sched == 'constant' else sched, num_epochs=epochs, warmup_epochs=warmup_epochs,
                warmup_lr=warmup_lr, min_lr=min_lr, decay_epochs=decay_epochs,
                decay_rate=1.0 if sched == 'constant' else decay_rate, cooldown_epochs=0)


_AUTOCAST_DTYPES = {None: None, 'float32': None, torch.float32: None, 'bfloat16': torch.bfloat16,
                    torch.bfloat16: torch.bfloat16, 'float16': torch.float16, torch.float16: torch.float16}


def resolve_autocast_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``None``/``'float32'`` -> ``None`` (no autocast); ``'bfloat16'``/``'float16'`` (or the dtypes) -> the dtype."""
    if not isinstance(dtype, str | torch.dtype | None) or dtype not in _AUTOCAST_DTYPES:
        raise ValueError(f"autocast_dtype must be None, 'bfloat16' or 'float16', got {dtype!r}.")
    return _AUTOCAST_DTYPES[dtype]


# ------------------------------------------------------------------------------------------------ optimizers
class StageOptimizers:
    """One optimizer per stage (and optionally one timm scheduler each), with what their updates share: the
    float16 gradient scaler and the guard that refuses a non-finite loss before any weight changes.

    An update is ``zero_grad()``, ``backward(loss)`` per stage, ``check_finite(losses)``, ``step(num_updates)``.
    Stepping after every backward gives the same updates as stepping each stage right after its own: the stages'
    parameters are disjoint and no stage's input depends on another's update within a batch.

    Args:
        optimizers: one per stage (end-to-end BP has one "stage").
        schedulers: none, or one per optimizer (``step(epoch)`` per epoch, ``step_update(num_updates)`` per update).
        scaler: a ``GradScaler`` for float16 autocast, shared by the stages; ``None`` otherwise.
        finite_guard: ``check_finite`` refuses NaN/inf (one host sync per call); ``False`` turns it off.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence = (),
                 scaler: torch.amp.GradScaler | None = None, finite_guard: bool = True):
        if schedulers and len(schedulers) != len(optimizers):
            raise ValueError(f'Give one scheduler per optimizer ({len(optimizers)}), got {len(schedulers)}.')
        self.optimizers = list(optimizers)
        self.schedulers = list(schedulers)
        self.scaler = scaler
        self.finite_guard = finite_guard

    @classmethod
    def create(cls, stage_params: Sequence[list[nn.Parameter]], optimizer: str | Callable = 'adamw', *,
               lr: float, weight_decay: float = 0.01, optimizer_kwargs: dict | None = None,
               scheduler: dict | None = None, scaler: torch.amp.GradScaler | None = None,
               finite_guard: bool = True) -> 'StageOptimizers':
        """One ``build_optimizer`` per parameter list, and a ``build_scheduler`` for each if ``scheduler`` is set."""
        optimizers = [build_optimizer(p, optimizer, lr, weight_decay, dict(optimizer_kwargs or {}))
                      for p in stage_params]
        schedulers = [build_scheduler(opt, scheduler) for opt in optimizers] if scheduler else []
        return cls(optimizers, schedulers, scaler, finite_guard)

    def __len__(self) -> int:
        return len(self.optimizers)

    def _stages(self, stages: Iterable[int] | None) -> Iterable[int]:
        return range(len(self.optimizers)) if stages is None else stages

    def zero_grad(self, stages: Iterable[int] | None = None) -> None:
        """Drop the gradients of ``stages`` (default: all), so each backward allocates fresh ones."""
        for index in self._stages(stages):
            self.optimizers[index].zero_grad(set_to_none=True)

    def backward(self, loss: Tensor) -> None:
        """Back-propagate ``loss`` (scaled when float16 autocast needs it)."""
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def check_finite(self, losses: Tensor, stages: Sequence[int] | None = None, step: int = 0) -> None:
        """Raise ``NonFiniteLossError`` (after dropping those stages' gradients) if a loss is NaN or infinite.

        Args:
            losses: ``[len(stages)]`` detached losses of ``stages`` (default: one per optimizer, in order).
            step: the update the losses belong to, for the message.
        """
        if not self.finite_guard:
            return
        stages = range(len(losses)) if stages is None else stages
        finite = torch.isfinite(losses)
        if not bool(finite.all()):  # one host sync per update
            k = int((~finite).nonzero()[0])
            self.zero_grad(stages)
            raise NonFiniteLossError(stages[k], step, float(losses[k]))

    def step(self, num_updates: int, stages: Iterable[int] | None = None) -> None:
        """Step the optimizers of ``stages`` (default: all), then move their schedulers to ``num_updates``."""
        stages = list(self._stages(stages))
        for index in stages:
            self.scaler.step(self.optimizers[index]) if self.scaler else self.optimizers[index].step()
        if self.scaler:
            self.scaler.update()
        for index in stages if self.schedulers else ():
            self.schedulers[index].step_update(num_updates=num_updates)

    def step_epoch(self, epoch: int) -> None:
        """Move epoch-based schedulers to ``epoch``."""
        for sched in self.schedulers:
            sched.step(epoch)

    def state_dict(self) -> dict[str, Any]:
        """``{'optimizers': [...], 'schedulers': [...]}``, plus ``'scaler'`` under float16 autocast. The schedulers'
        states are a record; a resume recomputes them (``resume_schedule``)."""
        return {'optimizers': [opt.state_dict() for opt in self.optimizers],
                'schedulers': [sched.state_dict() for sched in self.schedulers],
                **({'scaler': self.scaler.state_dict()} if self.scaler else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load ``state_dict()``'s optimizer moments and scaler; ``ValueError`` (before anything changes) for another
        number of stages. The learning rates stay those this run was built with, and the schedulers are not
        loaded: ``resume_schedule`` recomputes them from the epoch (see there)."""
        if len(state['optimizers']) != len(self.optimizers):
            raise ValueError(f'The checkpoint has {len(state["optimizers"])} stage optimizers, this trainer has '
                             f'{len(self.optimizers)}; it belongs to a model of another depth or another method.')
        for index, opt_state in enumerate(state['optimizers']):
            self.load_optimizer(index, opt_state)
        if self.scaler and 'scaler' in state:
            self.scaler.load_state_dict(state['scaler'])

    def load_optimizer(self, index: int, state: dict[str, Any]) -> None:
        """Stage ``index``'s optimizer state, keeping its configured learning rate (``lr`` and timm's
        ``initial_lr``): a run resumed with a new ``train.lr`` (after a non-finite stop) really uses it."""
        optimizer = self.optimizers[index]
        configured = [{k: g[k] for k in ('lr', 'initial_lr') if k in g} for g in optimizer.param_groups]
        optimizer.load_state_dict(state)
        for group, lrs in zip(optimizer.param_groups, configured):
            group.update(lrs)

    def resume_schedule(self, epoch: int, num_updates: int) -> None:
        """Put every scheduler where an uninterrupted run is after ``epoch`` epochs and ``num_updates`` updates.

        A timm schedule is a function of the epoch (or update) and its settings, so recomputing it is exact, and it
        follows the run's own settings rather than a checkpoint's copy of them.
        """
        for sched in self.schedulers:
            sched.step(epoch)
            sched.step_update(num_updates=num_updates)


# ------------------------------------------------------------------------------------------------ the protocol
class TrainerBase:
    """The run-loop protocol every timm-cff trainer shares (layer-local CFF, the FF family, backpropagation).

    A subclass sets ``model``, ``stage_optimizers`` and ``num_views`` and implements ``step(views, labels)`` (one
    update; detached 0-d statistics holding at least ``'loss'``), ``evaluate_batch(views, labels)`` (the same
    statistics without an update), ``selection_key`` and ``predict``. Statistics derived from others (a sum over
    stages) are recomputed from the epoch means by ``with_totals``.
    """
    model: nn.Module
    stage_optimizers: StageOptimizers
    num_views: int = 1
    num_updates: int = 0
    epoch: int = 0
    selection_key: str  # the evaluate() entry whose minimum picks the best checkpoint
    predict: Callable[[Tensor], Tensor]  # inputs [B, ...] -> class scores [B, C]
    step: Callable[[Any, Tensor], dict[str, Tensor]]  # (views, labels) -> detached statistics, after one update
    evaluate_batch: Callable[[Any, Tensor], dict[str, Tensor]]  # the same statistics without an update

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """One optimizer per stage."""
        return self.stage_optimizers.optimizers

    @property
    def schedulers(self) -> list:
        """One scheduler per stage, or none."""
        return self.stage_optimizers.schedulers

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The float16 gradient scaler, or ``None``."""
        return self.stage_optimizers.scaler

    def prepare_batch(self, views: Tensor | Sequence[Tensor], labels: Tensor,
                      device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """Views -> one view-major ``[VB, ...]`` tensor on ``device`` (default: the model's); labels checked."""
        return batch_views(views, labels, self.num_views, self.device if device is None else device)

    def with_totals(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        """``stats`` with the entries derived from others recomputed (none here; a sum over stages in subclasses)."""
        return stats

    # ------------------------------------------------------------------------------------------------ epochs
    def train_epoch(self, loader: Iterable, on_step: Callable[[dict[str, Tensor]], None] | None = None
                    ) -> dict[str, float]:
        """``step()`` over a loader of ``(views, labels)``; per-sample means of the epoch.

        ``on_step`` receives every step's output dict (detached tensors), e.g. for a progress bar.
        """
        meter = MeanMeter()
        for batch in loader:
            views, labels = split_batch(batch)
            stats = self.step(views, labels)
            meter.add(stats, len(labels))
            if on_step is not None:
                on_step(stats)
        self.end_epoch()
        return self.epoch_means(meter.mean())

    def end_epoch(self) -> None:
        """Advance the epoch counter and epoch-based schedulers."""
        self.epoch += 1
        self.stage_optimizers.step_epoch(self.epoch)

    @torch.no_grad()
    def evaluate(self, loader: Iterable) -> dict[str, float]:
        """Per-sample means of the step statistics on a loader, without updates (eval mode)."""
        was_training = self.model.training
        self.model.eval()
        meter = MeanMeter()
        for batch in loader:
            views, labels = split_batch(batch)
            meter.add(self.evaluate_batch(views, labels), len(labels))
        self.model.train(was_training)
        return self.epoch_means(meter.mean())

    def epoch_means(self, means: dict[str, Tensor]) -> dict[str, float]:
        """Per-sample means (0-d tensors, on any devices) -> floats, with the totals recomputed from them.

        A total is the sum of its stages' epoch means (not the mean of per-step sums): a layer pipeline, which
        never holds every stage's loss of one batch at once, reports the same numbers bit for bit.
        """
        return {k: float(v) for k, v in self.with_totals({k: v.cpu() for k, v in means.items()}).items()}

    def gather(self, device: torch.device | str | None = None) -> 'TrainerBase':
        """The trainer itself: a one-process trainer already holds the whole model (pipelines gather theirs)."""
        return self

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: model, optimizers, schedulers (and scaler) and counters."""
        return {'model': self.model.state_dict(), **self.stage_optimizers.state_dict(),
                'num_updates': self.num_updates, 'epoch': self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage_optimizers.load_state_dict(state)  # first: it refuses a checkpoint of another depth or method
        self.model.load_state_dict(state['model'])
        self.num_updates = state['num_updates']
        self.epoch = state.get('epoch', 0)
        self.stage_optimizers.resume_schedule(self.epoch, self.num_updates)
