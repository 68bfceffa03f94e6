"""A run folder: resolved config, environment, per-epoch CSV, summary, atomic checkpoints, the export.

    RUN/config.yaml            resolved config (a valid --config)
    RUN/environment.json       library versions, device, command line
    RUN/metrics.csv            one row per stage-1 epoch
    RUN/probe.csv              one row per probe epoch
    RUN/dataset.json           class count and images per split (written at each start)
    RUN/summary.json           final metrics, best epochs, why stage 1 stopped, wall time
    RUN/checkpoints/last.pt    trainer state after the last finished epoch (resume point)
    RUN/checkpoints/best.pt    model weights of the best validation epoch
    RUN/checkpoints/final.pt   model weights after the probe (encoder + fc_norm + head)
    RUN/export/                the timm folder (config.json + model.safetensors + timm_cff.json)
"""
import csv
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError, config_to_dict, flatten, load_config, save_config

__all__ = ['RunDir', 'CheckpointError', 'environment', 'DATASET_FILE']

DATASET_FILE = 'dataset.json'


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable; the message names the file."""


def environment() -> dict[str, Any]:
    """Versions and machine facts worth keeping next to a result."""
    import timm
    import torchvision

    from ..version import __version__
    return {
        'timm_cff': __version__, 'timm': timm.__version__, 'torch': torch.__version__,
        'torchvision': torchvision.__version__, 'python': platform.python_version(), 'platform': platform.platform(),
        'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        'cpu_threads': torch.get_num_threads(), 'argv': sys.argv,
    }


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class RunDir:
    """Paths and readers/writers of one run folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / 'config.yaml'

    @property
    def export_path(self) -> Path:
        return self.path / 'export'

    def checkpoint_path(self, name: str) -> Path:
        return self.path / 'checkpoints' / f'{name}.pt'

    @classmethod
    def create(cls, path: str | Path, config: Config) -> 'RunDir':
        """A new run folder holding the resolved config and the environment; refuses to reuse a used folder."""
        run = cls(path)
        if run.config_path.exists():
            raise ConfigError(f'{run.path} already holds a run; pick another --run.name or continue it with '
                              f'--resume {run.path}.')
        (run.path / 'checkpoints').mkdir(parents=True, exist_ok=True)
        save_config(config, run.config_path)
        run.write_json('environment.json', environment())
        return run

    def read_config(self) -> Config:
        if not self.config_path.is_file():
            raise ConfigError(f'{self.path} is not a run folder: it has no config.yaml.')
        return load_config(self.config_path)

    def check_resumable(self, config: Config, may_differ: tuple[str, ...] = ('run.quiet', 'run.device',
                                                                             'data.workers', 'train.epochs',
                                                                             'train.patience')) -> None:
        """Refuse to resume with a config that differs from the saved one (except ``may_differ`` keys).

        ``train.epochs`` and ``train.patience`` may change: learning rates are constant and every epoch is seeded
        by its index, so a run extended from N to M epochs (or given more patience) continues exactly as a run
        started with those settings would have. The new values are saved, so a later plain ``--resume`` keeps them.
        """
        saved, new = flatten(config_to_dict(self.read_config())), flatten(config_to_dict(config))
        changed = sorted(k for k in saved.keys() | new.keys() if saved.get(k) != new.get(k) and k not in may_differ)
        if changed:
            details = '; '.join(f'{k}: {saved.get(k)!r} -> {new.get(k)!r}' for k in changed[:5])
            raise ConfigError(f'Cannot resume {self.path} with a different config ({details}). Resume without '
                              'overrides (--train.epochs and --train.patience may change), or start a new run.')
        if any(saved.get(k) != new.get(k) for k in ('train.epochs', 'train.patience')):
            _atomic_write(self.config_path, lambda tmp: save_config(config, tmp))

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, name: str, state: dict[str, Any]) -> Path:
        path = self.checkpoint_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, lambda tmp: torch.save(state, tmp))
        return path

    def load_checkpoint(self, name: str) -> dict[str, Any]:
        path = self.checkpoint_path(name)
        if not path.is_file():
            raise CheckpointError(f'Checkpoint {path} does not exist.')
        try:
            return torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:  # torch raises several types for truncated or foreign files
            raise CheckpointError(f'Checkpoint {path} is unreadable ({type(e).__name__}: {e}); it may be corrupt. '
                                  'Delete it to restart that stage, or start a new run.') from e

    # ------------------------------------------------------------------------------------------ records
    def write_json(self, name: str, data: dict[str, Any]) -> None:
        _atomic_write(self.path / name, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2, default=str)))

    def read_json(self, name: str) -> dict[str, Any]:
        return json.loads((self.path / name).read_text())

    def append_row(self, name: str, row: dict[str, Any]) -> None:
        """Append a row to a CSV, writing the header with the first row."""
        path = self.path / name
        new = not path.exists()
        with path.open('a', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def read_rows(self, name: str) -> list[dict[str, str]]:
        path = self.path / name
        if not path.exists():
            return []
        with path.open(newline='') as f:
            return list(csv.DictReader(f))

    def truncate_rows(self, name: str, max_epoch: int) -> None:
        """Drop rows of epochs after ``max_epoch`` (written after the checkpoint a resume starts from)."""
        rows = [r for r in self.read_rows(name) if int(r['epoch']) <= max_epoch]
        path = self.path / name
        if path.exists():
            path.unlink()
        for row in rows:
            self.append_row(name, row)

