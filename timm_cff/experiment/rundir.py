"""A run folder: resolved config, environment, per-epoch CSV, summary, atomic checkpoints, the export.

    RUN/config.yaml            resolved config (a valid --config)
    RUN/environment.json       library versions, device, CPU kernels, command line; one entry per resume
    RUN/metrics.csv            one row per stage-1 epoch
    RUN/probe.csv              one row per probe epoch
    RUN/dataset.json           class count and images per split (written at each start)
    RUN/.lock                  held by the process that writes the run
    RUN/summary.json           final metrics, best epochs, why stage 1 stopped, wall time
    RUN/checkpoints/last.pt    trainer state after the last finished epoch (resume point)
    RUN/checkpoints/best.pt    model weights of the best validation epoch
    RUN/checkpoints/final.pt   model weights after the probe (encoder + fc_norm + head)
    RUN/export/                the timm folder (config.json + model.safetensors + timm_cff.json)
"""
import atexit
import csv
import json
import math
import os
import platform
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import torch

from ..analysis.history import current_column
from ..files import atomic_write, stray_temporaries
from ..methods import EPOCH_LENGTH_SCHEDULES
from .config import Config, ConfigError, config_to_dict, flatten, load_config, save_config

__all__ = ['RunDir', 'CheckpointError', 'RunInUseError', 'environment', 'DATASET_FILE', 'NONFINITE_FILE']

DATASET_FILE = 'dataset.json'
#: Versions and machine facts of the start, and of each resume under ``resumes``.
ENVIRONMENT_FILE = 'environment.json'
#: Held by the process writing the run: ``{"pid": ..., "host": ...}``.
LOCK_FILE = '.lock'
#: Written when a NaN/inf stopped the run: where, and what later resumes changed.
NONFINITE_FILE = 'nonfinite.json'


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable; the message names the file."""


class RunInUseError(RuntimeError):
    """Another process writes this run folder."""


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True


def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``), ``None`` if unknown."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment() -> dict[str, Any]:
    """Versions and machine facts worth keeping next to a result."""
    import timm
    import torchvision

    from ..version import __version__
    from .allocator import malloc_state
    return {
        'timm_cff': __version__, 'timm': timm.__version__, 'torch': torch.__version__,
        'torchvision': torchvision.__version__, 'python': platform.python_version(), 'platform': platform.platform(),
        'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        'cpu_model': cpu_model(), 'cpu_capability': torch.backends.cpu.get_cpu_capability(),
        'cpu_threads': torch.get_num_threads(), 'malloc': malloc_state(), 'argv': sys.argv,
    }


#: What decides a run's float arithmetic besides its config: another value on resume continues the run correctly,
#: but no longer bit for bit with an uninterrupted one (``cpu_capability``: the kernels PyTorch dispatches to,
#: e.g. AVX2 or AVX512, which sum in different orders; ``cpu_model``: two CPUs of one capability can still round
#: differently, as two AVX512 machines did from the first epoch of a CFF run).
ARITHMETIC_KEYS = ('torch', 'timm', 'cpu_model', 'cpu_capability', 'cpu_threads', 'gpu', 'cuda')


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
    def check_new(cls, path: str | Path) -> None:
        """Refuse a path that exists: a new run is written only into a folder of its own."""
        path = Path(path)
        if (path / 'config.yaml').exists():
            raise ConfigError(f'{path} already holds a run; pick another --run.name or continue it with '
                              f'--resume {path}.')
        if path.exists():
            raise ConfigError(f'{path} exists and is no run folder; timm-cff writes a new run only into a new '
                              'folder: pick another --run.name or --run.output.')

    @classmethod
    def create(cls, path: str | Path, config: Config) -> 'RunDir':
        """Claim a new run folder (an exclusive mkdir, so of two processes on one name only one wins) and write the
        resolved config and the environment into it; the folder stays locked by this process."""
        run = cls(path)
        cls.check_new(run.path)
        run.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            run.path.mkdir()
        except FileExistsError:
            raise RunInUseError(f'{run.path} was created by another process a moment ago; pick another '
                                '--run.name.') from None
        run.lock()
        (run.path / 'checkpoints').mkdir()
        save_config(config, run.config_path)
        run.write_json(ENVIRONMENT_FILE, environment())
        return run

    # ------------------------------------------------------------------------------------------ one writer
    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_FILE

    def lock(self) -> None:
        """Take the run for this process (exclusive create of ``.lock``); a lock left by a dead process on this
        host is taken over. ``RunInUseError`` if a live process holds it."""
        for _ in range(2):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                self.check_unlocked()
                self.lock_path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, 'w') as f:
                json.dump({'pid': os.getpid(), 'host': socket.gethostname()}, f)
            atexit.register(self.unlock)  # also released when the process ends without reaching unlock()
            for stray in stray_temporaries(self.path) + stray_temporaries(self.path / 'checkpoints'):
                shutil.rmtree(stray) if stray.is_dir() else stray.unlink()  # half-written files of a killed write
            return
        raise RunInUseError(f'Could not lock {self.path}; delete {self.lock_path} if no process uses the run.')

    def check_unlocked(self) -> None:
        """``RunInUseError`` if a live process holds the run's lock (a lock of a dead process on this host is stale)."""
        owner = self._lock_owner()
        if not self.lock_path.exists() or owner is None or \
                (owner['host'] == socket.gethostname() and not _alive(owner['pid'])):
            return
        raise RunInUseError(f'{self.path} is in use by process {owner["pid"]} on {owner["host"]}; wait for it to '
                            f'end (if no such process runs, delete {self.lock_path}).')

    def unlock(self) -> None:
        owner = self._lock_owner()
        if owner is not None and owner['pid'] == os.getpid() and owner['host'] == socket.gethostname():
            self.lock_path.unlink(missing_ok=True)

    def _lock_owner(self) -> dict[str, Any] | None:
        try:
            owner = json.loads(self.lock_path.read_text())
            return owner if isinstance(owner, dict) and {'pid', 'host'} <= owner.keys() else None
        except (OSError, ValueError):
            return None

    def read_config(self) -> Config:
        if not self.config_path.is_file():
            raise ConfigError(f'{self.path} is not a run folder: it has no config.yaml.')
        return load_config(self.config_path)

    #: Keys a resume may change: more epochs or patience (the run continues as if started with them), and the
    #: device, workers and verbosity (they change no result).
    RESUMABLE_CHANGES = ('run.quiet', 'run.device', 'data.workers', 'train.epochs', 'train.patience')
    #: After a non-finite stop (``nonfinite.json``) the learning rates may change too, as its message advises.
    AFTER_NONFINITE = ('train.lr', 'probe.lr')

    def check_resumable(self, config: Config) -> None:
        """Refuse to resume with a config that differs from the saved one, except ``RESUMABLE_CHANGES`` (and
        ``AFTER_NONFINITE`` once a run stopped on a NaN/inf).

        ``train.epochs`` and ``train.patience`` may change: every epoch is seeded by its index and the learning
        rate is constant or follows a schedule that does not depend on the run length (``train.sched`` constant or
        step), so a run extended from N to M epochs (or given more patience) continues exactly as a run started
        with those settings would have. The new values are saved, so a later plain ``--resume`` keeps them.
        """
        may_differ = self.RESUMABLE_CHANGES + (self.AFTER_NONFINITE if self.stopped_nonfinite else ())
        changes = self._changes(config)
        if 'train.epochs' in changes and config.train.sched in EPOCH_LENGTH_SCHEDULES:
            raise ConfigError(f'Cannot resume {self.path} with train.epochs {changes["train.epochs"][0]} -> '
                              f'{changes["train.epochs"][1]}: the {config.train.sched} schedule is laid out over '
                              'train.epochs, so its earlier epochs would not match; start a new run.')
        changed = [k for k in changes if k not in may_differ]
        if changed:
            details = '; '.join(f'{k}: {changes[k][0]!r} -> {changes[k][1]!r}' for k in changed[:5])
            raise ConfigError(f'Cannot resume {self.path} with a different config ({details}). Resume without '
                              'overrides (--train.epochs and --train.patience may change; after a non-finite stop '
                              'also --train.lr and --probe.lr), or start a new run.')

    @property
    def stopped_nonfinite(self) -> bool:
        return (self.path / NONFINITE_FILE).is_file()

    def _changes(self, config: Config) -> dict[str, tuple[Any, Any]]:
        """``{key: (saved value, new value)}`` of every key where ``config`` differs from the saved one, sorted."""
        saved, new = flatten(config_to_dict(self.read_config())), flatten(config_to_dict(config))
        return {k: (saved.get(k), new.get(k)) for k in sorted(saved.keys() | new.keys()) if saved.get(k) != new.get(k)}

    def save_resumed_config(self, config: Config) -> None:
        """Save what a resume changed (after ``check_resumable``); a changed learning rate is also recorded in
        ``nonfinite.json`` beside the stop it answers."""
        changes = {k: v for k, v in self._changes(config).items()
                   if k in ('train.epochs', 'train.patience') + self.AFTER_NONFINITE}
        if not changes:
            return
        if any(k in self.AFTER_NONFINITE for k in changes):
            record = self.read_json(NONFINITE_FILE)
            record.setdefault('resumed_with', []).append({k: list(v) for k, v in changes.items()})
            self.write_json(NONFINITE_FILE, record)
        atomic_write(self.config_path, lambda tmp: save_config(config, tmp))

    def record_resume(self) -> dict[str, list[Any]]:
        """Add this process's environment to ``environment.json`` (``resumes``, one entry per resume) and return
        what differs in ``ARITHMETIC_KEYS`` from the environment the run was last trained in: ``{key: [then, now]}``
        (keys an older run did not record are not compared)."""
        record = self.read_json(ENVIRONMENT_FILE, missing={})
        last = (record.get('resumes') or [record])[-1]
        now = environment()
        record.setdefault('resumes', []).append(now)
        self.write_json(ENVIRONMENT_FILE, record)
        return {k: [last[k], now[k]] for k in ARITHMETIC_KEYS if k in last and last[k] != now[k]}

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, name: str, state: dict[str, Any]) -> Path:
        path = self.checkpoint_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(state, tmp))
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
        """Strict JSON (a NaN or infinity is written as null, which every JSON reader accepts)."""
        text = json.dumps(_finite(data), indent=2, default=str, allow_nan=False)
        atomic_write(self.path / name, lambda tmp: Path(tmp).write_text(text))

    def read_json(self, name: str, missing: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON file ``name`` of the run; ``missing`` (when given) if the run has no such file."""
        path = self.path / name
        if missing is not None and not path.is_file():
            return missing
        return json.loads(path.read_text())

    def append_row(self, name: str, row: dict[str, Any]) -> None:
        """Append a row to a CSV, writing the header with the first row."""
        path = self.path / name
        new = not path.exists()
        with path.open('a', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def write_rows(self, name: str, rows: list[dict[str, Any]]) -> None:
        """Replace a CSV by ``rows`` (header from the first), atomically; no rows: no file."""
        path = self.path / name
        if not rows:
            path.unlink(missing_ok=True)
            return

        def write(tmp: str) -> None:
            with open(tmp, 'w', newline='') as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        atomic_write(path, write)

    def read_rows(self, name: str) -> list[dict[str, str]]:
        """A CSV's rows under the current column names (a run's old ``*_block{i}`` columns read as ``*_stage{i}``)."""
        path = self.path / name
        if not path.exists():
            return []
        with path.open(newline='') as f:
            return [{current_column(k): v for k, v in row.items()} for row in csv.DictReader(f)]

    def truncate_rows(self, name: str, max_epoch: int) -> None:
        """Drop rows of epochs after ``max_epoch`` (written after the checkpoint a resume starts from), and rewrite
        the header with the current column names, so that the rows a resumed run appends line up with it."""
        rows = [r for r in self.read_rows(name) if int(r['epoch']) <= max_epoch]
        path = self.path / name
        if path.exists():
            path.unlink()
        for row in rows:
            self.append_row(name, row)

