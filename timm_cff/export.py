"""Export a trained encoder + probe as a plain timm folder, loadable without timm-cff.

The folder is what ``timm.models.save_for_hf`` writes (``config.json`` + ``model.safetensors``): a built-in timm
architecture name, the constructor arguments (``model_args``) and the data config (input size, mean/std), so that
``timm.create_model('local-dir:DIR', pretrained=True)`` and timm's ``validate.py --model local-dir:DIR`` rebuild it.
"""
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ['export_model', 'load_encoder', 'METADATA_FILE']

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
        description: str = 'Trained layer-locally with Contrastive Forward-Forward (timm-cff).',
        metadata: dict | None = None,
) -> Path:
    """Write ``model`` (encoder + probe) as a timm ``local-dir:`` folder, atomically.

    Args:
        model: a model built by ``timm.create_model``, unmodified by training (timm-cff never adds modules).
        directory: the output folder; an existing export there is replaced only once the new one is complete.
        data_config: ``input_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation`` used by the data pipeline.
        model_args: constructor arguments overriding those timm recorded (``model._model_args``).
        description: stored as ``pretrained_cfg.description``.
        metadata: extra JSON-serialisable training facts, written to ``timm_cff.json``.

    Returns:
        The export folder.
    """
    from timm.models import save_for_hf

    arch = _architecture(model)
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    model_config = {'pretrained_cfg': {'tag': 'timm_cff', 'description': description, 'license': 'apache-2.0'}}
    tmp = Path(tempfile.mkdtemp(prefix=f'.{directory.name}.', dir=directory.parent))
    try:
        try:
            save_for_hf(model, tmp, model_config=model_config, model_args=model_args, safe_serialization=True,
                        data_config=_data_config(model, data_config))
        except ValueError as e:  # e.g. a custom embed layer: config.json cannot describe it
            raise ValueError(f'{arch} cannot be exported as a plain timm model: {e}') from e
        if metadata is not None:
            (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str))
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _logger.info('Exported %s to %s', arch, directory)
    return directory


def load_encoder(directory: str | Path, **kwargs: Any) -> nn.Module:
    """The exported model, rebuilt by timm alone: ``timm.create_model('local-dir:DIR', pretrained=True)``."""
    import timm

    directory = Path(directory)
    if not (directory / 'config.json').is_file():
        raise FileNotFoundError(f'{directory} holds no config.json; give a folder written by export_model.')
    model = timm.create_model(f'local-dir:{directory}', pretrained=True, **kwargs)
    return model.to(torch.device('cpu'))
