"""Export a trained encoder + probe as a plain timm folder, loadable without timm-cff.

The folder is what ``timm.models.save_for_hf`` writes (``config.json`` + ``model.safetensors``): a built-in timm
architecture name, the constructor arguments (``model_args``) and the data config (input size, mean/std), so that
``timm.create_model('local-dir:DIR', pretrained=True)`` and timm's ``validate.py --model local-dir:DIR`` rebuild it.
"""
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import follow_umask, temporary_folder
from .version import __version__

__all__ = ['export_model', 'load_encoder', 'check_replaceable', 'METADATA_FILE']

_logger = logging.getLogger(__name__)

#: Training metadata written next to the timm files (ignored by timm).
METADATA_FILE = 'timm_cff.json'


def _architecture(model: nn.Module) -> str:
    arch = getattr(model, 'pretrained_cfg', {}).get('architecture')
    if not arch:
        raise TypeError(f'{type(model).__name__} was not built by timm.create_model, so timm cannot rebuild it by '
                        'name; create it with timm.create_model("vit_...", ...) before training.')
    return arch


def _data_config(model: nn.Module, data_config: dict | None) -> dict[str, Any]:
    """Input size from the model; mean/std/crop from ``data_config`` (the training normalisation)."""
    config = {'crop_pct': 1.0, 'interpolation': 'bicubic', **(data_config or {})}
    if 'mean' not in config or 'std' not in config:
        _logger.warning('export_model: no mean/std given, so config.json keeps the registry values %s / %s. Pass '
                        'data_config=dict(mean=..., std=...) with the normalisation used in training.',
                        model.pretrained_cfg.get('mean'), model.pretrained_cfg.get('std'))
    return config


def export_model(
        model: nn.Module,
        directory: str | Path,
        *,
        data_config: dict | None = None,
        model_args: dict | None = None,
        label_names: list[str] | None = None,
        description: str = 'Trained layer-locally with Contrastive Forward-Forward (timm-cff).',
        metadata: dict | None = None,
) -> Path:
    """Write ``model`` (encoder + probe) as a timm ``local-dir:`` folder, atomically.

    Args:
        model: a model built by ``timm.create_model``, unmodified by training (timm-cff never adds modules).
        directory: the output folder: missing, empty or an earlier export (replaced once the new one is complete);
            anything else is refused with ``FileExistsError``.
        data_config: ``input_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation`` used by the data pipeline.
        model_args: constructor arguments overriding those timm recorded (``model._model_args``).
        label_names: the class names in label order (timm's ``label_names`` field of ``config.json``).
        description: stored as ``pretrained_cfg.description``.
        metadata: extra JSON-serialisable training facts, written to ``timm_cff.json``.

    Returns:
        The export folder.
    """
    from timm.models import save_for_hf

    arch = _architecture(model)
    directory = Path(directory)
    check_replaceable(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    model_config = {'pretrained_cfg': {'tag': 'timm_cff', 'description': description, 'license': 'apache-2.0'}}
    if label_names:
        if len(label_names) != getattr(model, 'num_classes', len(label_names)):
            raise ValueError(f'{len(label_names)} label names for a model with {model.num_classes} classes.')
        model_config['label_names'] = list(label_names)
    tmp = temporary_folder(directory)
    try:
        try:
            save_for_hf(model, tmp, model_config=model_config, model_args=model_args, safe_serialization=True,
                        data_config=_data_config(model, data_config))
        except ValueError as e:  # e.g. a custom embed layer: config.json cannot describe it
            raise ValueError(f'{arch} cannot be exported as a plain timm model: {e}') from e
        # the marker that makes this folder recognisably an export (so a later export may replace it)
        (tmp / METADATA_FILE).write_text(json.dumps({'timm_cff': __version__, **(metadata or {})}, indent=2,
                                                    default=str))
        for path in tmp.iterdir():  # safetensors writes its file 0600
            follow_umask(path)
        if directory.exists():  # an earlier export (checked above) or an empty folder
            shutil.rmtree(directory)
        tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _logger.info('Exported %s to %s', arch, directory)
    return directory


def check_replaceable(directory: Path) -> None:
    """Refuse an output folder that holds anything but an earlier export (marked by ``timm_cff.json``): timm-cff
    never deletes what it did not write, a run folder least of all."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise FileExistsError(f'{directory} is a file; give a folder path for the export.')
    if any(directory.iterdir()) and not (directory / METADATA_FILE).is_file():
        what = 'a run folder' if (directory / 'config.yaml').is_file() else 'files timm-cff did not write'
        raise FileExistsError(f'{directory} holds {what}; an export replaces only an earlier export. Give a new or '
                              'empty folder.')


def load_encoder(directory: str | Path, **kwargs: Any) -> nn.Module:
    """The exported model, rebuilt by timm alone: ``timm.create_model('local-dir:DIR', pretrained=True)``."""
    import timm

    directory = Path(directory)
    if not (directory / 'config.json').is_file():
        raise FileNotFoundError(f'{directory} holds no config.json; give a folder written by export_model.')
    model = timm.create_model(f'local-dir:{directory}', pretrained=True, **kwargs)
    return model.to(torch.device('cpu'))
