"""The whole pipeline of a run: stage 1 (layer-local training with per-epoch validation and best-checkpoint
selection), stage 2 (linear probe), test evaluation (top-k) and the timm export. The CLI is a thin layer over this.
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

from .config import Config, apply_overrides
from .data import PreparedData, create_loaders, prepare_data
from .export import METADATA_FILE, export_model, load_encoder
from .margins import MarginSchedule
from .metrics import evaluate_accuracy
from .models import create_model
from .probe import train_linear_probe
from .run import RunDir
from .trainer import LocalTrainer

__all__ = ['train_run', 'probe_run', 'evaluate_run', 'evaluate_export', 'export_run', 'build_trainer', 'resolve_device', 'seed_all',
           'Progress']

_logger = logging.getLogger(__name__)


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


def build_trainer(cfg: Config, model: nn.Module) -> LocalTrainer:
    """The stage-1 trainer of ``cfg.train.method``."""
    t = cfg.train
    if t.method != 'cff':
        raise ValueError(f"Unknown train.method {t.method!r}. Known: cff.")
    margins = MarginSchedule(t.margin_schedule, t.m0, t.m_last) if t.loss == 'marginal_supcon' else None
    return LocalTrainer(model, loss=t.loss, margins=margins, lr=t.lr, loss_kwargs={'temperature': t.temperature},
                        optimizer=t.optimizer, weight_decay=t.weight_decay, num_views=t.num_views,
                        select_on=t.select_on)


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
    """Data, model and trainer of a run, built identically for a fresh start and for a resume."""

    def __init__(self, cfg: Config):
        self.device = resolve_device(cfg.run.device)
        seed_all(cfg.run.seed)
        self.data = prepare_data(cfg.data)
        self.loaders = create_loaders(self.data, cfg.data, num_views=cfg.train.num_views, seed=cfg.run.seed,
                                      device=self.device)
        self.model = create_model(cfg.model, self.data.num_classes, self.data.input_size)
        _check_input_size(self.model, self.data)
        self.model.to(self.device)
        self.trainer = build_trainer(cfg, self.model)


def _stage1(cfg: Config, run: RunDir, setup: _Setup, progress: Progress) -> dict[str, Any]:
    trainer, loaders = setup.trainer, setup.loaders
    state = {'epoch': 0, 'best_loss': None, 'best_epoch': None, 'time_s': 0.0}
    if run.checkpoint_path('last').exists():
        saved = run.load_checkpoint('last')
        trainer.load_state_dict(saved['trainer'])
        torch.set_rng_state(saved['rng'])
        state = saved['state']
        run.truncate_rows('metrics.csv', state['epoch'])
        _logger.info('Resuming %s after epoch %d', run.path, state['epoch'])
    key = trainer.selection_key
    for epoch in range(state['epoch'], cfg.train.epochs):
        start = time.perf_counter()
        loaders['train'].set_epoch(epoch)
        loaders['val'].set_epoch(epoch)
        bar = progress.bar(_limit(loaders['train'], cfg.train.max_steps), f'epoch {epoch + 1}/{cfg.train.epochs}',
                           total=min(len(loaders['train']), cfg.train.max_steps or len(loaders['train'])))
        train = trainer.train_epoch(bar, on_step=lambda out: progress.update(bar, out))
        progress.close(bar)
        val = trainer.evaluate(_limit(loaders['val'], cfg.train.max_steps))
        seconds = time.perf_counter() - start
        if state['best_loss'] is None or val[key] < state['best_loss']:
            state.update(best_loss=val[key], best_epoch=epoch + 1)
            run.save_checkpoint('best', {'model': setup.model.state_dict(), 'epoch': epoch + 1})
        state.update(epoch=epoch + 1, time_s=state['time_s'] + seconds)
        run.save_checkpoint('last', {'trainer': trainer.state_dict(), 'rng': torch.get_rng_state(), 'state': state})
        run.append_row('metrics.csv', {'epoch': epoch + 1, 'time_s': round(seconds, 3),
                                       'lr': trainer.optimizers[0].param_groups[0]['lr'],
                                       **{f'train_{k}': v for k, v in train.items()},
                                       **{f'val_{k}': v for k, v in val.items()}})
        progress.message(f'epoch {epoch + 1}: train loss {train["loss"]:.4f}, val {key} {val[key]:.4f}'
                       f'{" (best)" if state["best_epoch"] == epoch + 1 else ""}, {seconds:.1f}s')
    return state


def _stage2(cfg: Config, run: RunDir, model: nn.Module, loaders: dict, progress: Progress) -> dict[str, Any]:
    """Linear probe on the best stage-1 encoder; deterministic, so a resumed run simply redoes it."""
    model.load_state_dict(run.load_checkpoint('best')['model'])
    seed_all(cfg.run.seed + 2)
    bar = progress.bar(desc='probe', total=cfg.probe.epochs)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        for name in ('probe_train', 'probe_val'):
            loaders[name].set_epoch(epoch)
        run.append_row('probe.csv', {'epoch': epoch, **metrics})
        progress.update(bar, metrics, advance=True)

    (run.path / 'probe.csv').unlink(missing_ok=True)
    for name in ('probe_train', 'probe_val'):
        loaders[name].set_epoch(0)
    # Without augmentation the probe sees the same inputs every epoch: encode them once.
    fixed_inputs = not (cfg.data.randaugment or loaders['probe_train'].augment.padding or
                        loaders['probe_train'].augment.hflip)
    result = train_linear_probe(model, loaders['probe_train'], loaders['probe_val'], epochs=cfg.probe.epochs,
                                lr=cfg.probe.lr, weight_decay=cfg.probe.weight_decay, cache_features=fixed_inputs,
                                on_epoch=on_epoch)
    progress.close(bar)
    run.save_checkpoint('final', {'model': model.state_dict()})
    progress.message(f'probe: best epoch {result.best_epoch}, val loss {result.best_val_loss:.4f}')
    return {'best_epoch': result.best_epoch, 'best_val_loss': result.best_val_loss}


def _finish(cfg: Config, run: RunDir, model: nn.Module, setup_data: PreparedData, test_loader, summary: dict,
            progress: Progress) -> dict[str, Any]:
    test = evaluate_accuracy(model, test_loader, topk=cfg.run.topk)
    summary['test'] = test
    summary['metric'] = {cfg.run.metric: test.get(cfg.run.metric)}
    if cfg.run.export:
        try:
            export_model(model, run.export_path, data_config=_data_config(setup_data),
                         metadata={'method': cfg.train.method, 'test': test, 'config': str(run.config_path),
                                   'data': vars(cfg.data)})
            summary['export'] = str(run.export_path)
        except ValueError as e:  # e.g. model.patch_act='relu': not a stock timm model
            _logger.warning('No timm export: %s', e)
            summary['export'] = None
    run.write_json('summary.json', summary)
    progress.message('test: ' + ', '.join(f'{k} {v:.2f}' for k, v in test.items() if k.startswith('top')))
    return summary


def train_run(cfg: Config, run_path: str | Path, resume: bool = False, progress: Progress | None = None
              ) -> dict[str, Any]:
    """Run (or resume) the whole pipeline in ``run_path``; returns the summary written to ``summary.json``."""
    progress = progress or Progress()
    if resume:
        run = RunDir(run_path)
        run.check_resumable(cfg)
    else:
        run = RunDir.create(run_path, cfg)
    wall = time.perf_counter()
    setup = _Setup(cfg)
    stage1 = _stage1(cfg, run, setup, progress)
    probe = _stage2(cfg, run, setup.model, setup.loaders, progress)
    summary = {'run': str(run.path), 'best_epoch': stage1['best_epoch'], 'best_val_loss': stage1['best_loss'],
               'selection_key': setup.trainer.selection_key, 'stage1_time_s': round(stage1['time_s'], 2),
               'probe': probe, 'num_classes': setup.data.num_classes,
               'num_images': {k: len(getattr(setup.data, k)) for k in ('train', 'val', 'test')},
               'wall_time_s': None}
    summary = _finish(cfg, run, setup.model, setup.data, setup.loaders['test'], summary, progress)
    summary['wall_time_s'] = round(time.perf_counter() - wall, 2)
    run.write_json('summary.json', summary)
    return summary


def _model_and_data(run: RunDir, checkpoint: str, overrides: Callable[[Config], None] | None = None):
    cfg = run.read_config()
    if overrides is not None:
        overrides(cfg)
    setup_device = resolve_device(cfg.run.device)
    data = prepare_data(cfg.data)
    model = create_model(cfg.model, data.num_classes, data.input_size)
    model.load_state_dict(run.load_checkpoint(checkpoint)['model'])
    return cfg, data, model.to(setup_device), setup_device


def probe_run(run_path: str | Path, overrides: Callable[[Config], None] | None = None,
              progress: Progress | None = None) -> dict[str, Any]:
    """Redo stage 2 of a run (e.g. with other ``probe.*`` settings), then test and export again."""
    progress = progress or Progress()
    run = RunDir(run_path)
    cfg, data, model, device = _model_and_data(run, 'best', overrides)
    loaders = create_loaders(data, cfg.data, num_views=1, seed=cfg.run.seed, device=device)
    summary = run.read_json('summary.json') if (run.path / 'summary.json').exists() else {'run': str(run.path)}
    summary['probe'] = _stage2(cfg, run, model, loaders, progress)
    return _finish(cfg, run, model, data, loaders['test'], summary, progress)


def evaluate_run(run_path: str | Path, overrides: Callable[[Config], None] | None = None) -> dict[str, float]:
    """Test accuracy of a finished run (its probed model)."""
    run = RunDir(run_path)
    cfg, data, model, device = _model_and_data(run, 'final', overrides)
    loaders = create_loaders(data, cfg.data, num_views=1, seed=cfg.run.seed, device=device)
    return evaluate_accuracy(model, loaders['test'], topk=cfg.run.topk)


def evaluate_export(export_path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, float]:
    """Test accuracy of an export folder; the dataset comes from its ``timm_cff.json`` and ``overrides``."""
    export_path = Path(export_path)
    meta_path = export_path / METADATA_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    model = load_encoder(export_path)
    cfg = apply_overrides(Config(), {'data': meta.get('data', {})})
    cfg.data.mean, cfg.data.std = list(model.pretrained_cfg['mean']), list(model.pretrained_cfg['std'])
    apply_overrides(cfg, overrides or {})
    device = resolve_device(cfg.run.device)
    data = prepare_data(cfg.data)
    loaders = create_loaders(data, cfg.data, num_views=1, seed=cfg.run.seed, device=device)
    return evaluate_accuracy(model.to(device), loaders['test'], topk=cfg.run.topk)


def export_run(run_path: str | Path, out: str | Path | None = None, checkpoint: str = 'final') -> Path:
    """Write the timm folder of a run's ``final`` (probed) or ``best`` (stage-1 only) weights."""
    run = RunDir(run_path)
    cfg, data, model, _ = _model_and_data(run, checkpoint)
    return export_model(model.cpu(), out or run.export_path, data_config=_data_config(data),
                        metadata={'method': cfg.train.method, 'checkpoint': checkpoint, 'data': vars(cfg.data)})
