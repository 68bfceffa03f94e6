"""The whole pipeline of a run: stage 1 (training with per-epoch validation and best-checkpoint selection),
stage 2 (linear probe; the one-pass head for the FF family), test evaluation (top-k) and the timm export.
Every method of ``timm_cff.baselines.create_trainer`` runs through the same code. The CLI is a thin layer over this.
"""
import json
import logging
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .analysis import analyze, clamped_fraction_metric
from .baselines import create_trainer, time_inference, train_one_pass_head
from .config import Config, ConfigError, apply_overrides
from .data import BatchAugment, ImageLoader, PreparedData, create_loaders, prepare_data
from .export import METADATA_FILE, export_model, load_encoder
from .margins import MarginSchedule
from .metrics import evaluate_accuracy, first_view
from .models import create_model
from .probe import train_linear_probe
from .pipeline.session import start_distributed
from .run import DATASET_FILE, RunDir
from .trainer import TrainerBase

__all__ = ['train_run', 'probe_run', 'evaluate_run', 'evaluate_export', 'export_run', 'analyze_path', 'build_trainer',
           'resolve_device', 'seed_all', 'Progress', 'FF_METHODS']

_logger = logging.getLogger(__name__)

#: Methods trained with label tokens / one-hot labels and predicted by goodness over C passes.
FF_METHODS = ('ff', 'symba', 'collab')


class Progress:
    """Progress hooks; the CLI passes tqdm-backed ones, the library default only logs messages."""

    def bar(self, iterable: Iterable | None = None, desc: str = '', total: int | None = None) -> Any:
        """A progress bar over ``iterable`` (or a manual counter of ``total`` steps); returns the iterable."""
        return iterable

    def update(self, bar: Any, values: dict[str, Any], advance: bool = False) -> None:
        """Show ``values`` on ``bar``; ``advance`` moves a manual counter one step."""

    def close(self, bar: Any) -> None:
        pass

    def message(self, text: str) -> None:
        _logger.info(text)


def resolve_device(name: str) -> torch.device:
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'run.device={name!r} but CUDA is not available; use run.device=cpu.')
    return device


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def build_trainer(cfg: Config, model: nn.Module):
    """The stage-1 trainer of ``cfg.train.method`` with the run's hyperparameters."""
    t = cfg.train
    common = dict(optimizer=t.optimizer, weight_decay=t.weight_decay)
    if t.lr is not None:
        common['lr'] = t.lr
    if t.method != 'cff' and (t.autocast or t.compile):
        raise ConfigError(f'train.autocast and train.compile apply to train.method=cff only, not {t.method!r}; '
                          'remove them from the config.')
    if t.method == 'cff':
        margins = MarginSchedule(t.margin_schedule, t.m0, t.m_last) if t.loss == 'marginal_supcon' else None
        metrics = {'clamped': clamped_fraction_metric} if t.log_clamped else None
        return create_trainer('cff', model, loss=t.loss, margins=margins, loss_kwargs={'temperature': t.temperature},
                              num_views=t.num_views, select_on=t.select_on, stage_metrics=metrics,
                              autocast_dtype=t.autocast, compile_stages=t.compile, **common)
    if t.method in FF_METHODS:
        loss_kwargs = {'alpha': t.alpha} if t.method == 'symba' else {'threshold': t.threshold}
        return create_trainer(t.method, model, loss_kwargs=loss_kwargs, score_first_stage=t.score_first_stage,
                              seed=cfg.run.seed, **common)
    return create_trainer(t.method, model, **common)


def _limit(loader: Iterable, max_steps: int | None) -> Iterable:
    for i, batch in enumerate(loader):
        if max_steps is not None and i >= max_steps:
            return
        yield batch


def _check_input_size(model: nn.Module, data: PreparedData) -> None:
    expected = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
    if expected is not None and tuple(expected) != data.input_size[1:] and not getattr(model, 'dynamic_img_size',
                                                                                         False):
        raise ValueError(f'The model expects {tuple(expected)} images but the dataset has {data.input_size[1:]}; '
                         f'set model.img_size={data.input_size[1]} (or leave it unset to follow the data).')


def _data_config(data: PreparedData) -> dict[str, Any]:
    return dict(input_size=data.input_size, mean=data.mean, std=data.std, crop_pct=1.0, interpolation='bicubic')


class _Setup:
    """Data, model, trainer and loaders of a run, built identically for a fresh start, a resume and evaluation.

    ``classifier`` is what classifies in one forward pass: the model itself (CFF, BP), or the FF family's one-pass
    head once stage 2 has built it.
    """

    def __init__(self, cfg: Config, distributed: bool = False):
        self.cfg = cfg
        self.rank, shard = 0, (0, 1)
        if distributed:  # one process per stage group (x replicas), launched by torchrun
            if cfg.train.method != 'cff':
                raise ValueError(f'The layer pipeline trains layer-local methods; train.method={cfg.train.method!r} '
                                 'is not one (use cff).')
            self.device = start_distributed(cfg.pipeline.stages, cfg.pipeline.timeout_s)
            self.rank = torch.distributed.get_rank()
            shard = (self.rank // cfg.pipeline.stages, torch.distributed.get_world_size() // cfg.pipeline.stages)
        else:
            self.device = resolve_device(cfg.run.device)
        seed_all(cfg.run.seed)
        self.data = prepare_data(cfg.data)
        self.model = create_model(cfg.model, self.data.num_classes, self.data.input_size)
        _check_input_size(self.model, self.data)
        self.model.to(self.device)
        self.trainer = build_trainer(cfg, self.model)
        self.loaders = create_loaders(self.data, cfg.data, num_views=self.trainer.num_views, seed=cfg.run.seed,
                                      device=self.device, shard=shard)
        self.classifier: nn.Module | None = None if cfg.train.method in FF_METHODS else self.model

    @property
    def is_ff(self) -> bool:
        return self.cfg.train.method in FF_METHODS

    def load(self, run: RunDir, checkpoint: str) -> None:
        """Trainer state (model + method extras) of ``best`` or ``final``; ``final`` also holds the FF head."""
        saved = run.load_checkpoint(checkpoint)
        self.trainer.load_state_dict(saved['trainer'])
        if saved.get('head') is not None:
            self._one_pass_head().head.load_state_dict(saved["head"])

    def _one_pass_head(self) -> nn.Module:
        if self.classifier is None:
            from .baselines import OnePassClassifier
            self.classifier = OnePassClassifier.from_trainer(self.trainer)
        return self.classifier


class _Checkpoints:
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

    def save(self, state: dict[str, Any], improved: bool) -> None:
        if improved:
            self.run.save_checkpoint('best', {'trainer': self.runner.state_dict(), 'epoch': state['epoch']})
        self.run.save_checkpoint('last', {'trainer': self.runner.state_dict(), 'rng': torch.get_rng_state(),
                                          'state': state})


def _runner(cfg: Config, run: RunDir, setup: _Setup) -> tuple[Any, Any]:
    """The stage-1 runner (the trainer, or a layer pipeline over devices or processes) and its checkpoints."""
    p = cfg.pipeline
    if not (p.devices or torch.distributed.is_initialized()):
        return setup.trainer, _Checkpoints(run, setup.trainer)
    from .pipeline.session import RankCheckpoints, create_runner
    train = setup.loaders['train']
    first = next(iter(train)) if setup.rank == 0 else None
    runner = create_runner(setup.trainer, p.stages, p.devices, first, run.path / 'checkpoints' / 'pipeline',
                           p.max_in_flight)
    if not torch.distributed.is_initialized():
        return runner, _Checkpoints(run, runner)
    if not runner.reads_data:  # only the first stage group of each replica reads batches
        setup.loaders['train'] = setup.loaders['val'] = None
    return runner, RankCheckpoints(runner, run.path)


def _stage1(cfg: Config, run: RunDir, setup: _Setup, progress: Progress) -> dict[str, Any]:
    runner, checkpoints = _runner(cfg, run, setup)
    loaders = setup.loaders
    state = checkpoints.resume() or {'epoch': 0, 'best_loss': None, 'best_epoch': None, 'time_s': 0.0}
    if state['epoch']:
        if setup.rank == 0:
            run.truncate_rows('metrics.csv', state['epoch'])
        _logger.info('Resuming %s after epoch %d', run.path, state['epoch'])
    key = runner.selection_key
    for epoch in range(state['epoch'], cfg.train.epochs):
        if out_of_patience(state, cfg.train.patience):
            break
        start = time.perf_counter()
        train, val = _epoch(cfg, runner, loaders['train'], loaders['val'], epoch, progress)
        seconds = time.perf_counter() - start
        improved = state['best_loss'] is None or val[key] < state['best_loss']
        if improved:
            state.update(best_loss=val[key], best_epoch=epoch + 1)
        state.update(epoch=epoch + 1, time_s=state['time_s'] + seconds)
        checkpoints.save(state, improved)
        if setup.rank == 0:
            run.append_row('metrics.csv', {'epoch': epoch + 1, 'time_s': round(seconds, 3),
                                           'lr': setup.trainer.optimizers[0].param_groups[0]['lr'],
                                           **{f'train_{k}': v for k, v in train.items()},
                                           **{f'val_{k}': v for k, v in val.items()}})
        progress.message(f'epoch {epoch + 1}: train loss {train["loss"]:.4f}, val {key} {val[key]:.4f}'
                         f'{" (best)" if improved else ""}, {seconds:.1f}s')
    state['stop_reason'] = 'patience' if out_of_patience(state, cfg.train.patience) and \
        state['epoch'] < cfg.train.epochs else 'epochs'
    if state['stop_reason'] == 'patience':
        progress.message(f'early stop after epoch {state["epoch"]}: no improvement of {key} for '
                         f'{cfg.train.patience} epochs (best epoch {state["best_epoch"]})')
    if hasattr(checkpoints, 'merged_best'):  # every rank has finished its epochs: rank 0 gathers the best model
        if setup.rank == 0:
            run.save_checkpoint('best', {'trainer': checkpoints.merged_best()})
        torch.distributed.barrier()
    if hasattr(runner, 'gather'):
        runner.gather(setup.device)
    return state


def out_of_patience(state: dict[str, Any], patience: int | None) -> bool:
    """Whether ``patience`` epochs have passed since the best one; decided from the saved state alone, so a
    resumed run with more patience (or more epochs) continues where an uninterrupted one would be."""
    return patience is not None and state['best_epoch'] is not None and state['epoch'] - state['best_epoch'] >= patience


def _epoch(cfg: Config, runner: Any, train_loader, val_loader, epoch: int, progress: Progress):
    """One training epoch and one validation pass; a loader is ``None`` on pipeline ranks that read no data."""
    for loader in (train_loader, val_loader):
        if loader is not None:
            loader.set_epoch(epoch)
    limited = (lambda loader: None if loader is None else _limit(loader, cfg.train.max_steps))
    steps = min(len(train_loader), cfg.train.max_steps or len(train_loader)) if train_loader is not None else None
    bar = progress.bar(limited(train_loader), f'epoch {epoch + 1}/{cfg.train.epochs}', total=steps)
    on_step = (lambda out: progress.update(bar, out)) if isinstance(runner, TrainerBase) else None
    train = runner.train_epoch(bar, on_step=on_step) if on_step else runner.train_epoch(bar)
    progress.close(bar)
    return train, runner.evaluate(limited(val_loader))


def _stage2(cfg: Config, run: RunDir, setup: _Setup, progress: Progress) -> dict[str, Any]:
    """The probe (CFF) or one-pass head (FF family) on the best stage-1 model; deterministic, so a resumed run
    simply redoes it. BP's classifier is trained end to end and needs no stage 2."""
    setup.load(run, 'best')
    loaders = setup.loaders
    if cfg.train.method == 'bp' or cfg.probe.epochs == 0:
        run.save_checkpoint('final', {'trainer': setup.trainer.state_dict()})
        return {}
    seed_all(cfg.run.seed + 2)
    bar = progress.bar(desc='probe' if not setup.is_ff else 'one-pass head', total=cfg.probe.epochs)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        for name in ('probe_train', 'probe_val'):
            loaders[name].set_epoch(epoch)
        run.append_row('probe.csv', {'epoch': epoch, **metrics})
        progress.update(bar, metrics, advance=True)

    (run.path / 'probe.csv').unlink(missing_ok=True)
    for name in ('probe_train', 'probe_val'):
        loaders[name].set_epoch(0)
    kwargs = dict(epochs=cfg.probe.epochs, lr=cfg.probe.lr, weight_decay=cfg.probe.weight_decay, on_epoch=on_epoch)
    if setup.is_ff:
        setup.classifier, result = train_one_pass_head(setup.trainer, loaders['probe_train'], loaders['probe_val'],
                                                       **kwargs)
    else:
        # Without augmentation the probe sees the same inputs every epoch: encode them once.
        augment = loaders['probe_train'].augment
        fixed = not (cfg.data.randaugment or augment.padding or augment.hflip)
        result = train_linear_probe(setup.model, loaders['probe_train'], loaders['probe_val'],
                                    cache_features=fixed, **kwargs)
    progress.close(bar)
    head = setup.classifier.head.state_dict() if setup.is_ff else None
    run.save_checkpoint('final', {'trainer': setup.trainer.state_dict(), 'head': head})
    progress.message(f'stage 2: best epoch {result.best_epoch}, val loss {result.best_val_loss:.4f}')
    return {'best_epoch': result.best_epoch, 'best_val_loss': result.best_val_loss}


def _test(cfg: Config, setup: _Setup) -> dict[str, Any]:
    """Test top-k: the one-forward classifier; for the FF family also the C-pass goodness prediction (``test``)."""
    out = {}
    if setup.classifier is not None:
        out['test'] = evaluate_accuracy(setup.classifier, setup.loaders['test'], topk=cfg.run.topk)
    if setup.is_ff:
        if 'test' in out:
            out['test_one_pass_head'] = out.pop('test')
        out['test'] = evaluate_accuracy(setup.trainer.predict, setup.loaders['test'], topk=cfg.run.topk,
                                        device=setup.device)
    return out


def _finish(cfg: Config, run: RunDir, setup: _Setup, summary: dict, progress: Progress) -> dict[str, Any]:
    summary.update(_test(cfg, setup))
    summary['metric'] = {cfg.run.metric: summary['test'].get(cfg.run.metric)}
    summary['export'] = None
    if cfg.run.export and not setup.is_ff:
        try:
            export_model(setup.model, run.export_path, data_config=_data_config(setup.data),
                         metadata=_metadata(cfg, setup, test=summary['test']))
            summary['export'] = str(run.export_path)
        except (TypeError, ValueError) as e:  # an MLP or a patch-ReLU ViT is no stock timm model
            _logger.warning('No timm export: %s Its weights are in %s.', e, run.checkpoint_path('final'))
    run.write_json('summary.json', summary)
    for name in ('test', 'test_one_pass_head'):
        if name in summary:
            scores = ', '.join(f'{k} {v:.2f}' for k, v in summary[name].items() if k.startswith('top'))
            progress.message(f'{name.replace("_", " ")}: {scores}')
    return summary


def _dataset_record(data: PreparedData) -> dict[str, Any]:
    return {'num_classes': data.num_classes,
            'num_images': {k: len(getattr(data, k)) for k in ('train', 'val', 'test')}}


def _open_run(cfg: Config, run_path: str | Path, resume: bool) -> RunDir:
    if resume:
        run = RunDir(run_path)
        run.check_resumable(cfg)
        return run
    return RunDir.create(run_path, cfg)


def train_run(cfg: Config, run_path: str | Path, resume: bool = False, progress: Progress | None = None
              ) -> dict[str, Any]:
    """Run (or resume) the whole pipeline in ``run_path``; returns the summary written to ``summary.json``.

    With ``pipeline.stages > 1`` every torchrun process calls this; stage 1 runs on all of them, the rest on rank 0
    (the other ranks return an empty dict).
    """
    progress = progress or Progress()
    if cfg.train.patience is not None and cfg.train.patience < 1:
        raise ConfigError(f'train.patience must be a positive number of epochs or null, got {cfg.train.patience}.')
    wall = time.perf_counter()
    distributed = cfg.pipeline.stages > 1
    run = None if distributed else _open_run(cfg, run_path, resume)
    setup = _Setup(cfg, distributed)
    if distributed:  # rank 0 names and creates the folder, the others follow
        box = [str(run_path)]
        torch.distributed.broadcast_object_list(box, src=0)
        run = _open_run(cfg, box[0], resume) if setup.rank == 0 else RunDir(box[0])
        torch.distributed.barrier()
        progress = progress if setup.rank == 0 else Progress()
    if setup.rank == 0:  # what `timm-cff compare` reports of a run before it has a summary
        run.write_json(DATASET_FILE, _dataset_record(setup.data))
    try:
        stage1 = _stage1(cfg, run, setup, progress)
    finally:
        if distributed and setup.rank != 0:
            torch.distributed.destroy_process_group()
    if setup.rank != 0:
        return {}
    stage2 = _stage2(cfg, run, setup, progress)
    summary = {'run': str(run.path), 'method': cfg.train.method, 'epochs': stage1['epoch'],
               'epochs_configured': cfg.train.epochs, 'patience': cfg.train.patience,
               'stop_reason': stage1['stop_reason'],
               'best_epoch': stage1['best_epoch'], 'best_val_loss': stage1['best_loss'],
               'selection_key': setup.trainer.selection_key, 'stage1_time_s': round(stage1['time_s'], 2),
               'stage2': stage2, **_dataset_record(setup.data)}
    summary = _finish(cfg, run, setup, summary, progress)
    summary['wall_time_s'] = round(time.perf_counter() - wall, 2)
    run.write_json('summary.json', summary)
    if distributed:
        torch.distributed.destroy_process_group()
    return summary


def _setup_from_run(run: RunDir, overrides: Callable[[Config], None] | None = None) -> tuple[Config, _Setup]:
    cfg = run.read_config()
    if overrides is not None:
        overrides(cfg)
    return cfg, _Setup(cfg)


def probe_run(run_path: str | Path, overrides: Callable[[Config], None] | None = None,
              progress: Progress | None = None) -> dict[str, Any]:
    """Redo stage 2 of a run (e.g. with other ``probe.*`` settings), then test and export again."""
    progress = progress or Progress()
    run = RunDir(run_path)
    cfg, setup = _setup_from_run(run, overrides)
    summary = run.read_json('summary.json') if (run.path / 'summary.json').exists() else {'run': str(run.path)}
    summary['stage2'] = _stage2(cfg, run, setup, progress)
    return _finish(cfg, run, setup, summary, progress)


def evaluate_run(run_path: str | Path, overrides: Callable[[Config], None] | None = None,
                 timing: bool = False) -> dict[str, Any]:
    """Test accuracy of a finished run; with ``timing``, milliseconds per test image of each way to predict."""
    run = RunDir(run_path)
    cfg, setup = _setup_from_run(run, overrides)
    setup.load(run, 'final')
    result = _test(cfg, setup)
    if timing:
        result['timing_ms_per_image'] = _timing(setup)
    return result


def _timing(setup: _Setup) -> dict[str, float]:
    """Table 2's inference time per image, one test batch, every predictor measured the same way."""
    x = first_view(next(iter(setup.loaders['test']))[0])
    timings = {}
    if setup.classifier is not None:
        setup.classifier.eval()
        timings['one_forward'] = time_inference(setup.classifier, x)
    if setup.is_ff:
        timings['goodness_c_passes'] = time_inference(setup.trainer.predict, x)
    return timings


def _export_config(export_path: Path, overrides: dict[str, Any] | None) -> tuple[Config, nn.Module, dict]:
    """The model of an export folder and a config whose data section comes from its ``timm_cff.json``."""
    meta_path = export_path / METADATA_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    model = load_encoder(export_path)
    cfg = apply_overrides(Config(), {'data': meta.get('data', {})})
    cfg.data.mean, cfg.data.std = list(model.pretrained_cfg['mean']), list(model.pretrained_cfg['std'])
    return apply_overrides(cfg, overrides or {}), model, meta


def evaluate_export(export_path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Test accuracy of an export folder; the dataset comes from its ``timm_cff.json`` and ``overrides``."""
    cfg, model, _ = _export_config(Path(export_path), overrides)
    device = resolve_device(cfg.run.device)
    data = prepare_data(cfg.data)
    loaders = create_loaders(data, cfg.data, num_views=1, seed=cfg.run.seed, device=device)
    return {'test': evaluate_accuracy(model.to(device), loaders['test'], topk=cfg.run.topk)}


def export_run(run_path: str | Path, out: str | Path | None = None, checkpoint: str = 'final') -> Path:
    """Write the timm folder of a run's ``final`` (probed) or ``best`` (stage 1 only) weights."""
    run = RunDir(run_path)
    cfg, setup = _setup_from_run(run)
    if setup.is_ff:
        raise ValueError(f'A {cfg.train.method} model needs its label embedding to predict; it has no timm export. '
                         f'Its weights are in {run.checkpoint_path(checkpoint)}.')
    setup.load(run, checkpoint)
    return export_model(setup.model.cpu(), out or run.export_path, data_config=_data_config(setup.data),
                        metadata=_metadata(cfg, setup, checkpoint=checkpoint))


def _metadata(cfg: Config, setup: _Setup, **extra: Any) -> dict[str, Any]:
    """What an export folder records beside the timm files (``timm_cff.json``): enough to evaluate and analyse it."""
    return {'method': cfg.train.method, 'margins': getattr(setup.trainer, 'margins', None), 'data': vars(cfg.data),
            **extra}


def analyze_path(path: str | Path, out: str | Path | None = None, overrides: dict[str, Any] | None = None,
                 **kwargs: Any) -> dict[str, Any]:
    """The layer-wise report (``timm_cff.analysis.analyze``) of a run folder or an export folder, on the clean
    validation images of its dataset; written to ``out`` (default ``PATH/analysis``)."""
    path = Path(path)
    if (path / 'config.json').exists():  # an export folder
        cfg, model, meta = _export_config(path, overrides)
        margins, history = meta.get('margins'), None
    else:
        run = RunDir(path)
        cfg, setup = _setup_from_run(run, (lambda c: apply_overrides(c, overrides)) if overrides else None)
        setup.load(run, 'final')
        model, margins, history = setup.model, getattr(setup.trainer, 'margins', None), run.path / 'metrics.csv'
    device = resolve_device(cfg.run.device)
    data = prepare_data(cfg.data)
    clean = ImageLoader(data.val, cfg.data.batch_size, BatchAugment(data.mean, data.std, train=False), device=device)
    return analyze(model.to(device), clean, margins=margins, history_csv=history, out_dir=out or path / 'analysis',
                   class_names=data.train.classes, title=f'Layer-wise analysis of {path.name}', **kwargs)
