"""The commands of ``timm-cff``: train (stage 1, stage 2, test, export), probe, eval, export and analyze a run.

    train_run      config -> RunSetup -> fit_stage1 -> fit_stage2 -> test -> export -> summary.json
    probe_run      stage 2 again on a run's best stage-1 model
    evaluate_run / evaluate_export / export_run / analyze_path

The CLI (``experiment.cli``) is a thin layer over these functions.
"""
import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from timm.data import resolve_data_config
from torch import nn

from ..analysis import analyze
from ..data import BatchAugment, ImageLoader
from ..export import METADATA_FILE, export_model, load_encoder
from ..families import describe_model
from ..methods import NonFiniteLossError
from ..metrics import evaluate_accuracy, first_view
from ..timing import time_inference
from .build import RunSetup, check_train_keys, data_config, launched_by_torchrun, resolve_device
from .config import Config, apply_overrides, check_values
from .data import create_loaders, prepare_data
from .fit import fit_stage1
from .progress import Progress
from .rundir import DATASET_FILE, NONFINITE_FILE, RunDir
from .stage2 import fit_stage2, test_accuracy

__all__ = ['train_run', 'probe_run', 'evaluate_run', 'evaluate_export', 'export_run', 'analyze_path']

_logger = logging.getLogger(__name__)


def _finish(cfg: Config, run: RunDir, setup: RunSetup, summary: dict, progress: Progress) -> dict[str, Any]:
    summary.update(test_accuracy(cfg, setup))
    summary['metric'] = {cfg.run.metric: summary['test'].get(cfg.run.metric)}
    summary['export'] = None
    if cfg.run.export and not setup.is_ff:
        try:
            export_model(setup.model, run.export_path, data_config=data_config(setup.data),
                         label_names=setup.data.label_names, metadata=_metadata(cfg, setup, test=summary['test']))
            summary['export'] = str(run.export_path)
        except (TypeError, ValueError) as e:  # an MLP or a patch-ReLU ViT is no stock timm model
            _logger.warning('No timm export: %s Its weights are in %s.', e, run.checkpoint_path('final'))
    run.write_json('summary.json', summary)
    for name in ('test', 'test_one_pass_head'):
        if name in summary:
            scores = ', '.join(f'{k} {v:.2f}' for k, v in summary[name].items() if k.startswith('top'))
            progress.message(f'{name.replace("_", " ")}: {scores}')
    return summary


def _dataset_record(setup: RunSetup) -> dict[str, Any]:
    """What ``timm-cff compare`` reports of a run before its summary: the data sizes and the model as built."""
    data = setup.data
    return {'num_classes': data.num_classes, 'num_images': {k: len(getattr(data, k)) for k in ('train', 'val', 'test')},
            'model': describe_model(setup.model),
            'architecture': getattr(setup.model, 'pretrained_cfg', {}).get('architecture', setup.cfg.model.name)}


@contextlib.contextmanager
def _record_nonfinite(run: RunDir, rank: int, where: str):
    """Record a NaN/inf stop in the run folder (``nonfinite.json``), so that a resume may change the learning rate."""
    try:
        yield
    except NonFiniteLossError as e:
        if rank == 0:
            record = run.read_json(NONFINITE_FILE) if run.stopped_nonfinite else {}
            record['stops'] = [*record.get('stops', []), {'in': where, 'stage': e.stage, 'step': e.step,
                                                           'value': str(e.value)}]
            run.write_json(NONFINITE_FILE, record)
        raise


def _check_run_path(cfg: Config, run_path: str | Path, resume: bool) -> None:
    """Before anything is built: a resumed run must match its saved config, a new one needs a new folder."""
    if resume:
        RunDir(run_path).check_resumable(cfg)
        RunDir(run_path).check_unlocked()
    else:
        RunDir.check_new(run_path)


def _open_run(cfg: Config, run_path: str | Path, resume: bool) -> RunDir:
    """The run folder, taken by this process; a new one is created only now that config and data are valid."""
    if not resume:
        return RunDir.create(run_path, cfg)
    run = RunDir(run_path)
    run.lock()
    run.save_resumed_config(cfg)
    changed = run.record_resume()
    if changed:
        _logger.warning('%s resumes with another %s than it last trained with; it continues, but not bit for bit '
                        'with an uninterrupted run.', run.path,
                        ', '.join(f'{k} ({then} -> {now})' for k, (then, now) in changed.items()))
    return run


def train_run(cfg: Config, run_path: str | Path, resume: bool = False, progress: Progress | None = None,
              explicit_keys: set[str] = frozenset()) -> dict[str, Any]:
    """Run (or resume) the whole pipeline in ``run_path``; returns the summary written to ``summary.json``.

    Under torchrun (a layer pipeline, data-parallel replicas, or both) every process calls this; stage 1 runs on all
    of them, the rest on rank 0, which alone writes the run folder's shared files (the other ranks return ``{}``).
    """
    progress = progress or Progress()
    check_values(cfg)
    check_train_keys(cfg, explicit_keys)
    wall = time.perf_counter()
    distributed = cfg.pipeline.stages > 1 or launched_by_torchrun()
    if not distributed:
        _check_run_path(cfg, run_path, resume)
    setup = RunSetup(cfg, distributed)
    run = None if distributed else _open_run(cfg, run_path, resume)
    try:
        return _train(cfg, run, run_path, resume, setup, progress, wall)
    finally:
        if run is not None:
            run.unlock()


def _train(cfg: Config, run: RunDir | None, run_path: str | Path, resume: bool, setup: RunSetup,
           progress: Progress, wall: float) -> dict[str, Any]:
    distributed = setup.distributed
    if distributed:  # rank 0 names and creates the folder, the others follow
        box = [str(run_path)]
        torch.distributed.broadcast_object_list(box, src=0)
        if setup.rank == 0:
            _check_run_path(cfg, box[0], resume)
        run = _open_run(cfg, box[0], resume) if setup.rank == 0 else RunDir(box[0])
        torch.distributed.barrier()
        progress = progress if setup.rank == 0 else Progress()
    if setup.rank == 0:  # what `timm-cff compare` reports of a run before it has a summary
        run.write_json(DATASET_FILE, _dataset_record(setup))
    try:
        with _record_nonfinite(run, setup.rank, 'stage 1'):
            stage1 = fit_stage1(cfg, run, setup, progress)
    finally:
        if distributed and setup.rank != 0:
            torch.distributed.destroy_process_group()
    if setup.rank != 0:
        return {}
    with _record_nonfinite(run, setup.rank, 'stage 2'):
        stage2 = fit_stage2(cfg, run, setup, progress)
    summary = {'run': str(run.path), 'method': cfg.train.method, 'epochs': stage1['epoch'],
               'epochs_configured': cfg.train.epochs, 'patience': cfg.train.patience,
               'stop_reason': stage1['stop_reason'],
               'best_epoch': stage1['best_epoch'], 'best_val_loss': stage1['best_loss'],
               'selection_key': setup.trainer.selection_key, 'stage1_time_s': round(stage1['time_s'], 2),
               'stage2': stage2, **_dataset_record(setup)}
    summary = _finish(cfg, run, setup, summary, progress)
    summary['wall_time_s'] = round(time.perf_counter() - wall, 2)
    run.write_json('summary.json', summary)
    if distributed:
        torch.distributed.destroy_process_group()
    return summary


def _setup_from_run(run: RunDir, overrides: Callable[[Config], None] | None = None) -> tuple[Config, RunSetup]:
    cfg = run.read_config()
    if overrides is not None:
        overrides(cfg)
    check_values(cfg)
    return cfg, RunSetup(cfg)


def probe_run(run_path: str | Path, overrides: Callable[[Config], None] | None = None,
              progress: Progress | None = None) -> dict[str, Any]:
    """Redo stage 2 of a run (e.g. with other ``probe.*`` settings), then test and export again."""
    progress = progress or Progress()
    run = RunDir(run_path)
    run.check_unlocked()
    cfg, setup = _setup_from_run(run, overrides)
    run.lock()
    try:
        summary = run.read_json('summary.json', missing={'run': str(run.path)})
        summary['stage2'] = fit_stage2(cfg, run, setup, progress)
        return _finish(cfg, run, setup, summary, progress)
    finally:
        run.unlock()


def evaluate_run(run_path: str | Path, overrides: Callable[[Config], None] | None = None,
                 timing: bool = False) -> dict[str, Any]:
    """Test accuracy of a finished run; with ``timing``, milliseconds per test image of each way to predict."""
    run = RunDir(run_path)
    cfg, setup = _setup_from_run(run, overrides)
    setup.load(run, 'final')
    result = test_accuracy(cfg, setup)
    if timing:
        result['timing_ms_per_image'] = _timing(setup)
    return result


def _timing(setup: RunSetup) -> dict[str, float]:
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
    timm_data = resolve_data_config({}, model=model)  # what timm's validate.py would use
    cfg.data.mean, cfg.data.std = list(timm_data['mean']), list(timm_data['std'])
    cfg.model.img_size = timm_data['input_size'][1]  # streamed or mixed-size data is fitted to the model's input
    return apply_overrides(cfg, overrides or {}), model, meta


def evaluate_export(export_path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Test accuracy of an export folder; the dataset comes from its ``timm_cff.json`` and ``overrides``."""
    cfg, model, _ = _export_config(Path(export_path), overrides)
    device = resolve_device(cfg.run.device)
    data = prepare_data(cfg.data, cfg.model.img_size)
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
    return export_model(setup.model.cpu(), out or run.export_path, data_config=data_config(setup.data),
                        label_names=setup.data.label_names, metadata=_metadata(cfg, setup, checkpoint=checkpoint,
                                                                         epoch=setup.trainer.epoch))


def _metadata(cfg: Config, setup: RunSetup, **extra: Any) -> dict[str, Any]:
    """What an export folder records beside the timm files (``timm_cff.json``): enough to evaluate and analyse it."""
    return {'method': cfg.train.method, 'model': describe_model(setup.model),
            'margins': getattr(setup.trainer, 'margins', None), 'data': vars(cfg.data), **extra}


def analyze_path(path: str | Path, out: str | Path | None = None, overrides: dict[str, Any] | None = None,
                 **kwargs: Any) -> dict[str, Any]:
    """The layer-wise report (``timm_cff.analysis.analyze``) of a run folder or an export folder, on the clean
    validation images of its dataset; written to ``out`` (default ``PATH/analysis``)."""
    path = Path(path)
    if (path / 'config.json').exists():  # an export folder
        cfg, model, meta = _export_config(path, overrides)
        margins, history = meta.get('margins'), None
        data = prepare_data(cfg.data, cfg.model.img_size)
    else:
        run = RunDir(path)
        cfg, setup = _setup_from_run(run, (lambda c: apply_overrides(c, overrides)) if overrides else None)
        setup.load(run, 'final')
        model, margins, history = setup.model, getattr(setup.trainer, 'margins', None), run.path / 'metrics.csv'
        data = setup.data
    device = resolve_device(cfg.run.device)
    clean = ImageLoader(data.val, cfg.data.batch_size, BatchAugment(data.mean, data.std, train=False), device=device)
    return analyze(model.to(device), clean, margins=margins, history_csv=history, out_dir=out or path / 'analysis',
                   class_names=data.train.classes, title=f'Layer-wise analysis of {path.name}', **kwargs)
