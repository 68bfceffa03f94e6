"""``timm-cff probe PATH``: the linear probe of a frozen encoder, in place on a run's own data or onto new data.

    probe_path       a run on its own data -> commands.probe_run (in place); anything else -> transfer_probe
    transfer_probe   export (or a run's export, or a run's stage-1 checkpoint) -> reset_classifier(C) ->
                     train_linear_probe on the new data -> test -> a NEW timm export folder; the source is only read

A transfer probe's data section is the source's when the dataset and root stay the same, else the defaults plus
the keys given: a key such as ``data.train_subset`` belongs to the source's data and is not carried over silently.
"""
import json
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from ..data import DataError
from ..export import METADATA_FILE, check_replaceable, export_model, load_encoder
from ..metrics import evaluate_accuracy
from ..probe import ProbeResult
from .build import data_config, resolve_device, seed_all
from .commands import export_run, probe_run
from .config import Config, ConfigError, apply_overrides, check_values, flatten, iter_fields
from .data import PreparedData, create_loaders, prepare_data
from .progress import Progress
from .rundir import RunDir
from .stage2 import train_probe

__all__ = ['is_new_data', 'probe_path', 'transfer_probe']

_logger = logging.getLogger(__name__)

#: The ``run.*`` keys a transfer probe reads; every ``data.*`` and ``probe.*`` key is read too.
RUN_KEYS = ('run.seed', 'run.device', 'run.topk', 'run.metric', 'run.quiet')
#: The data keys that name the data: when one differs from the source's, the data section starts from the defaults.
DATA_IDENTITY = ('data.dataset', 'data.root')


def _is_export(path: Path) -> bool:
    return (path / 'config.json').is_file()


def _source_data(source: Path) -> dict[str, Any]:
    """The data section the source was trained with (``data.*`` keys): a run's config, or an export's
    ``timm_cff.json`` (none for an export written without it: the defaults)."""
    if _is_export(source):
        meta_path = source / METADATA_FILE
        data = json.loads(meta_path.read_text()).get('data', {}) if meta_path.is_file() else {}
    else:
        data = vars(RunDir(source).read_config().data)
    return {f'data.{k}': v for k, v in data.items()}


def _data_defaults() -> dict[str, Any]:
    return {key: value for key, _, value in iter_fields(Config().data, 'data.')}


def is_new_data(source: str | Path, overrides: dict[str, Any]) -> bool:
    """Whether ``overrides`` name another dataset or root than the source (run or export folder) was trained on."""
    given = {k: v for k, v in overrides.items() if k in DATA_IDENTITY}
    if not given:
        return False
    old = {**_data_defaults(), **_source_data(Path(source))}
    return any(old[k] != v for k, v in given.items())


def probe_path(path: str | Path, overrides: dict[str, Any] | None = None, out: str | Path | None = None,
               progress: Progress | None = None, checkpoint: str | None = None) -> dict[str, Any]:
    """``timm-cff probe PATH``: a run folder on its own data without ``out`` or ``checkpoint`` is re-probed in place
    (``probe_run``); an export folder, new data, ``out`` or a run's ``checkpoint`` give a transfer probe into a new
    folder."""
    path, overrides = Path(path), flatten(overrides or {})
    if checkpoint is None and not _is_export(path) and out is None and not is_new_data(path, overrides):
        return probe_run(path, (lambda cfg: apply_overrides(cfg, overrides)) if overrides else None, progress)
    return transfer_probe(path, overrides, out, progress, checkpoint)


def _check_keys(overrides: dict[str, Any]) -> None:
    """A transfer probe keeps the source's encoder: model, train and pipeline keys have nothing to act on."""
    unused = [k for k in overrides if not k.startswith(('data.', 'probe.')) and k not in RUN_KEYS]
    if unused:
        raise ConfigError(f'--{unused[0]} does not apply to a probe of an export (the encoder is the source\'s); '
                          f'give only data.*, probe.* and {", ".join(RUN_KEYS)} keys.')


def _config(source: Path, overrides: dict[str, Any]) -> Config:
    """Defaults < the source's data section (unless the dataset or root changes) < ``overrides``."""
    old = _source_data(source)
    cfg = Config()
    if is_new_data(source, overrides):
        defaults = _data_defaults()
        dropped = [f'{k}={v!r}' for k, v in old.items() if k not in overrides and v != defaults.get(k)]
        if dropped:
            _logger.warning('New data: the data keys of %s are not carried over: %s (give them again to keep '
                            'them).', source, ', '.join(dropped))
    else:
        apply_overrides(cfg, old)
    apply_overrides(cfg, overrides)
    check_values(cfg)
    if cfg.probe.epochs < 1:
        raise ConfigError('probe.epochs=0 keeps no head, but a transfer probe trains a new one; give '
                          '--probe.epochs=N with N >= 1.')
    return cfg


def _export_of(source: Path) -> Path:
    """The export folder whose encoder is probed: the source itself or a run's ``export/``."""
    if _is_export(source):
        return source
    run = RunDir(source)
    run.read_config()  # refuses a folder that is no run
    if not _is_export(run.export_path):
        raise FileNotFoundError(f'{source} has no export folder ({run.export_path}); write one with `timm-cff '
                                f'export {source}`, then probe it.')
    return run.export_path


def _load_source(source: Path, checkpoint: str | None) -> tuple[Any, dict[str, Any], Path | None]:
    """The encoder to probe, its export metadata, and its export folder: the source's export, or (``checkpoint``)
    that checkpoint of a run exported to a scratch folder and read from there (``None``): the run, also one that is
    still training, is only read."""
    if checkpoint is None:
        export_dir = _export_of(source)
        return load_encoder(export_dir), _read_meta(export_dir), export_dir
    if _is_export(source):
        raise ConfigError(f'--checkpoint picks a checkpoint of a run folder, but {source} is an export folder; probe '
                          'it without --checkpoint.')
    with tempfile.TemporaryDirectory(prefix='timm-cff-probe-') as scratch:
        export_dir = export_run(source, Path(scratch) / 'export', checkpoint)
        return load_encoder(export_dir), _read_meta(export_dir), None


def _protected(source: Path) -> Path:
    """The folder a transfer probe never writes into: the run folder of a run (or of a run's export), else the
    export folder itself."""
    if not _is_export(source):
        return source  # a run folder
    return source.parent if (source.parent / 'config.yaml').is_file() else source


def _default_out(source: Path, cfg: Config) -> Path:
    """``<source>-probe-<data>-<time>`` beside the source (beside the run folder for a run's export)."""
    base = _protected(source)
    data = (Path(cfg.data.root).name if cfg.data.root and cfg.data.dataset in ('npz', 'folder') else '') or \
        cfg.data.dataset
    stem = f'{base.name}-probe-{re.sub(r"[^A-Za-z0-9_.-]+", "_", data)}-{time.strftime("%Y%m%d-%H%M%S")}'
    out, n = base.parent / stem, 1
    while out.exists():  # two probes in one second: never replace the first
        n += 1
        out = base.parent / f'{stem}-{n}'
    return out


def _check_out(out: Path, source: Path) -> None:
    """Refuse an output folder inside the source or holding it, and one with files timm-cff did not write."""
    protected, target = _protected(source).resolve(), out.resolve()
    if target == protected or protected in target.parents or target in protected.parents:
        raise FileExistsError(f'--out {out} overlaps the source {protected}; a transfer probe never writes into '
                              'its source. Give a folder outside it.')
    check_replaceable(out)


def _check_shapes(model: Any, data: PreparedData, cfg: Config) -> None:
    """The new images must have the channels and (for a fixed-size ViT) the size the encoder was exported for."""
    expected = tuple(model.pretrained_cfg['input_size'])  # (C, H, W)
    got = data.input_size
    dynamic = getattr(model, 'dynamic_img_size', False)
    if got[0] != expected[0] or (got[1:] != expected[1:] and not dynamic):
        name = cfg.data.root or cfg.data.dataset
        fix = ('convert the images to ' + ('grey' if expected[0] == 1 else 'RGB') if got[0] != expected[0]
               else f'resize the images to {expected[1]} x {expected[2]}')
        raise DataError(f'The export takes {expected[0]} x {expected[1]} x {expected[2]} (C x H x W) images but '
                        f'{name} has {got[0]} x {got[1]} x {got[2]}; {fix}, or export a model for '
                        f'{got[0]} x {got[1]} x {got[2]}.')


def transfer_probe(source: str | Path, overrides: dict[str, Any] | None = None, out: str | Path | None = None,
                   progress: Progress | None = None, checkpoint: str | None = None) -> dict[str, Any]:
    """Probe the frozen encoder of ``source`` (an export folder, a run folder's export, or a run's stage-1
    checkpoint) on the data of ``overrides`` and write the result as a new timm export folder ``out``; ``source`` is
    only read.

    Args:
        source: an export folder (config.json + model.safetensors + timm_cff.json) or a run folder.
        overrides: dotted ``data.*``, ``probe.*`` and ``run.*`` keys (e.g. ``{'data.dataset': 'npz', ...}``).
        out: the new folder: missing, empty or an earlier export (not inside the source); default
            ``<source>-probe-<data>-<time>`` beside the source.
        progress: probe-epoch progress hooks.
        checkpoint: ``'best'`` or ``'final'``: probe that checkpoint of the run folder ``source`` instead of its
            export (``'best'`` works while the run trains: a snapshot of its best epoch so far).

    Returns:
        The summary: ``export`` (the new folder), ``source``, ``num_classes``, ``num_images`` per split,
        ``stage2`` (best epoch, val loss), ``test`` (top-k on the test split), ``metric``.
    """
    progress = progress or Progress()
    source, overrides = Path(source), flatten(overrides or {})
    _check_keys(overrides)
    cfg = _config(source, overrides)
    out = Path(out) if out is not None else _default_out(source, cfg)
    _check_out(out, source)
    device = resolve_device(cfg.run.device)
    model, source_meta, export_dir = _load_source(source, checkpoint)
    origin = export_dir or f'{source} ({checkpoint} checkpoint, epoch {source_meta.get("epoch")})'
    data = prepare_data(cfg.data, model.pretrained_cfg['input_size'][1])  # folders/streams fitted to the export
    _check_shapes(model, data, cfg)
    seed_all(cfg.run.seed + 2)  # the seed of stage 2 in a run
    model.reset_classifier(data.num_classes)  # timm's own head swap; the probe re-initialises fc_norm + head
    model.to(device)
    loaders = create_loaders(data, cfg.data, num_views=1, seed=cfg.run.seed, device=device)
    result = _probe(model, loaders, cfg, progress)
    test = evaluate_accuracy(model, loaders['test'], topk=cfg.run.topk)
    name = cfg.data.root or cfg.data.dataset
    export_model(model.cpu(), out, data_config=data_config(data), label_names=data.label_names,
                 metadata=_metadata(source, source_meta, export_dir, cfg, data, result, test),
                 description=f'Linear probe on {name} of the encoder of {origin} (timm-cff).')
    progress.message(f'probe of {origin} on {name}: best epoch {result.best_epoch}, val loss '
                     f'{result.best_val_loss:.4f}')
    return {'export': str(out), 'source': str(source), 'num_classes': data.num_classes,
            'num_images': _num_images(data), 'stage2': _stage2(result), 'test': test,
            'metric': {cfg.run.metric: test.get(cfg.run.metric)}}


def _metadata(source: Path, source_meta: dict[str, Any], export_dir: Path | None, cfg: Config, data: PreparedData,
              result: ProbeResult, test: dict[str, float]) -> dict[str, Any]:
    """``timm_cff.json`` of the new export: what ``timm-cff eval``/``analyze`` read (method, margins, data), where
    the encoder came from (export folder, or run checkpoint and its epoch), the probe and its test accuracy, and the
    class names."""
    origin = {'export': str(export_dir.resolve())} if export_dir is not None else \
        {'export': None, 'checkpoint': source_meta.get('checkpoint'), 'epoch': source_meta.get('epoch')}
    return {'method': source_meta.get('method'), 'margins': source_meta.get('margins'),
            'source': {'path': str(source.resolve()), **origin, 'data': source_meta.get('data')},
            'data': vars(cfg.data), 'num_classes': data.num_classes, 'num_images': _num_images(data),
            'probe': {**vars(cfg.probe), 'seed': cfg.run.seed, **_stage2(result), 'history': result.history},
            'test': test, 'label_names': data.label_names}


def _stage2(result: ProbeResult) -> dict[str, Any]:
    return {'best_epoch': result.best_epoch, 'best_val_loss': result.best_val_loss}


def _num_images(data: PreparedData) -> dict[str, int]:
    return {split: len(getattr(data, split)) for split in ('train', 'val', 'test')}


def _probe(model: Any, loaders: dict, cfg: Config, progress: Progress) -> ProbeResult:
    """The run's stage-2 probe (``stage2.train_probe``) with a progress bar."""
    bar = progress.bar(desc='probe', total=cfg.probe.epochs)
    result = train_probe(cfg, model, loaders, lambda epoch, metrics: progress.update(bar, metrics, advance=True))
    progress.close(bar)
    return result


def _read_meta(export_dir: Path) -> dict[str, Any]:
    path = export_dir / METADATA_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
