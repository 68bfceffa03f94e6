"""Stage 1 of a run: ``timm_cff.loop.fit`` with the run's callbacks (checkpoints, ``metrics.csv``, progress).

The runner is the method's trainer, or a layer pipeline over devices (one process) or processes (torchrun); all
speak the same ``Runner`` protocol, and only their checkpoints differ: ``last.pt``/``best.pt`` in one process, a
folder per epoch with one file per stage group under torchrun.
"""
import logging
from typing import Any

import torch

from ..loop import Callback, EpochResult, fit, new_fit_state
from .build import RunSetup
from .config import Config
from .progress import Progress
from .rundir import RunDir

__all__ = ['fit_stage1']

_logger = logging.getLogger(__name__)


class Checkpoints(Callback):
    """Stage-1 checkpoints of a one-process run: ``last.pt`` (the resume point) and ``best.pt``."""

    def __init__(self, run: RunDir, runner: Any):
        self.run, self.runner = run, runner

    def resume(self) -> dict[str, Any] | None:
        if not self.run.checkpoint_path('last').exists():
            return None
        saved = self.run.load_checkpoint('last')
        self.runner.load_state_dict(saved['trainer'])
        torch.set_rng_state(saved['rng'])
        return saved['state']

    def on_epoch_end(self, result: EpochResult) -> None:
        if result.improved:
            self.run.save_checkpoint('best', {'trainer': self.runner.state_dict(), 'epoch': result.epoch})
        self.run.save_checkpoint('last', {'trainer': self.runner.state_dict(), 'rng': torch.get_rng_state(),
                                          'state': result.state})

    def finish(self) -> None:
        """After the last epoch; ``best.pt`` is already complete."""


class MetricsRow(Callback):
    """The epoch's ``metrics.csv`` row, put into the loop state before the checkpoint saves it: a row and the
    checkpoint it describes are one commit, so no kill point loses or duplicates a row."""

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.lr = None

    def on_epoch_start(self, epoch: int, steps: int | None) -> None:
        self.lr = self.trainer.optimizers[0].param_groups[0]['lr']  # the LR this epoch trains with (stage 1's)

    def on_epoch_end(self, result: EpochResult) -> None:
        result.state.setdefault('rows', []).append({
            'epoch': result.epoch, 'time_s': round(result.seconds, 3), 'lr': self.lr,
            **{f'train_{k}': v for k, v in result.train.items()}, **{f'val_{k}': v for k, v in result.val.items()}})


def _numbers(row: dict[str, str]) -> dict[str, Any]:
    """A CSV row with its values as numbers again (``repr`` of a float reads back exactly)."""
    return {k: int(v) if k == 'epoch' else float(v) for k, v in row.items()}


class MetricsLog(Callback):
    """Appends the row of each epoch to ``metrics.csv`` once its checkpoint is saved."""

    def __init__(self, run: RunDir):
        self.run = run

    def on_epoch_end(self, result: EpochResult) -> None:
        self.run.append_row('metrics.csv', result.state['rows'][-1])

    def restore(self, state: dict[str, Any]) -> None:
        """Make ``metrics.csv`` hold exactly the rows of the state a run starts from (a kill between a checkpoint
        and its row, or a deleted ``last.pt``, would otherwise lose or duplicate rows)."""
        if 'rows' not in state and state['epoch']:  # a checkpoint written before rows were kept in it
            self.run.truncate_rows('metrics.csv', state['epoch'])
            state['rows'] = [_numbers(row) for row in self.run.read_rows('metrics.csv')]
        self.run.write_rows('metrics.csv', state.get('rows', []))


class ProgressReport(Callback):
    """A bar per epoch with the latest step's losses, and one message per epoch."""

    def __init__(self, progress: Progress, epochs: int, key: str):
        self.progress, self.epochs, self.key, self.bar = progress, epochs, key, None

    def on_epoch_start(self, epoch: int, steps: int | None) -> None:
        self.bar = self.progress.bar(desc=f'epoch {epoch + 1}/{self.epochs}', total=steps)

    def on_step(self, stats: dict[str, torch.Tensor]) -> None:
        self.progress.update(self.bar, stats, advance=True)

    def on_epoch_end(self, result: EpochResult) -> None:
        self.progress.close(self.bar)
        train, val = result.train, result.val
        self.progress.message(f'epoch {result.epoch}: train loss {train["loss"]:.4f}, val {self.key} '
                              f'{val[self.key]:.4f}{" (best)" if result.improved else ""}, {result.seconds:.1f}s')


class PipelineCheckpoints(Callback):
    """``RankCheckpoints`` of a torchrun pipeline, and at the end the best epoch merged into ``best.pt``."""

    def __init__(self, run: RunDir, worker: Any):
        from ..pipeline.session import RankCheckpoints
        self.run, self.ranks = run, RankCheckpoints(worker, run.path)

    def resume(self) -> dict[str, Any] | None:
        return self.ranks.resume()

    def on_epoch_end(self, result: EpochResult) -> None:
        self.ranks.on_epoch_end(result)

    def finish(self) -> None:
        """Every rank has finished its epochs: rank 0 gathers the best model into one checkpoint."""
        if self.ranks.rank == 0:
            self.run.save_checkpoint('best', {'trainer': self.ranks.merged_best()})
        torch.distributed.barrier()


def _runner(cfg: Config, run: RunDir, setup: RunSetup) -> tuple[Any, Any]:
    """The stage-1 runner (the trainer, or a layer pipeline over devices or processes) and its checkpoints."""
    p = cfg.pipeline
    if not (p.devices or torch.distributed.is_initialized()):
        return setup.trainer, Checkpoints(run, setup.trainer)
    from ..pipeline.session import create_runner
    train = setup.loaders['train']
    first = next(iter(train)) if setup.rank == 0 else None
    runner = create_runner(setup.trainer, p.stages, p.devices, first, run.path / 'checkpoints' / 'pipeline',
                           p.max_in_flight)
    if not torch.distributed.is_initialized():
        return runner, Checkpoints(run, runner)
    if not runner.reads_data:  # only the first stage group of each replica reads batches
        setup.loaders['train'] = setup.loaders['val'] = None
    return runner, PipelineCheckpoints(run, runner)


def fit_stage1(cfg: Config, run: RunDir, setup: RunSetup, progress: Progress) -> dict[str, Any]:
    """Train (or resume) stage 1; returns the loop state (epochs run, best epoch and loss, seconds, stop reason)."""
    runner, checkpoints = _runner(cfg, run, setup)
    state = checkpoints.resume() or new_fit_state()
    if state['epoch']:
        _logger.info('Resuming %s after epoch %d', run.path, state['epoch'])
    callbacks = [checkpoints]
    if setup.rank == 0:
        log = MetricsLog(run)
        log.restore(state)
        callbacks = [MetricsRow(setup.trainer), checkpoints, log,
                     ProgressReport(progress, cfg.train.epochs, runner.selection_key)]
    state = fit(runner, setup.loaders['train'], setup.loaders['val'], cfg.train.epochs, state=state,
                patience=cfg.train.patience, max_steps=cfg.train.max_steps, callbacks=callbacks)
    if state['stop_reason'] == 'patience':
        progress.message(f'early stop after epoch {state["epoch"]}: no improvement of {runner.selection_key} for '
                         f'{cfg.train.patience} epochs (best epoch {state["best_epoch"]})')
    checkpoints.finish()
    runner.gather(setup.device)
    return state
