"""Checkpoints of a multi-process pipeline: each stage group writes its own file, rank 0 marks the folder complete.

A checkpoint folder holds ``group{g}.pt`` (``PipelineWorker.state_dict`` of group g, written by its first replica;
the replicas are identical) and, once every group's file is on disk, ``complete.json``. A folder without the
marker is an interrupted save and is never resumed from, so a run killed at any moment resumes from the last
complete checkpoint. The folder must be on a file system that every rank sees (one node, or a shared one).
"""
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..files import atomic_write
from .comm import peer_guard
from .worker import PipelineWorker

__all__ = ['save_pipeline_checkpoint', 'load_pipeline_checkpoint', 'latest_checkpoint', 'prune_checkpoints',
           'merge_stage_states', 'load_merged_state', 'COMPLETE_FILE']

_logger = logging.getLogger(__name__)

#: Written last, by rank 0, when every group's file is complete.
COMPLETE_FILE = 'complete.json'


def _group_file(directory: Path, group: int) -> Path:
    return directory / f'group{group}.pt'


def _atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _barrier(what: str) -> None:
    with peer_guard(what, 'all ranks'):
        dist.barrier()


def save_pipeline_checkpoint(worker: PipelineWorker, directory: str | Path) -> Path:
    """Save every group's state into ``directory`` (called by all ranks together, e.g. at the end of an epoch)."""
    directory = Path(directory)
    rank = dist.get_rank()
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / COMPLETE_FILE).unlink(missing_ok=True)  # the folder is incomplete until rewritten
    _barrier('starting a checkpoint')
    if worker.replica == 0:
        _atomic_save(worker.state_dict(), _group_file(directory, worker.group_index))
    _barrier('writing a checkpoint')
    if rank == 0:
        info = {'epoch': worker.epoch, 'num_updates': worker.num_updates, 'stage_counts': worker.stage_counts,
                'replicas': worker.num_replicas}
        tmp = directory / f'.{COMPLETE_FILE}.tmp'
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, directory / COMPLETE_FILE)
        _logger.info('Pipeline checkpoint of epoch %d in %s', worker.epoch, directory)
    _barrier('completing a checkpoint')
    return directory


def _read_info(directory: Path) -> dict[str, Any]:
    marker = directory / COMPLETE_FILE
    if not marker.is_file():
        raise FileNotFoundError(f'{directory} is not a complete pipeline checkpoint (no {COMPLETE_FILE}); use '
                                'latest_checkpoint() to find the last complete one.')
    return json.loads(marker.read_text())


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint folder under ``root`` with the highest epoch, or ``None`` if there is none."""
    root = Path(root)
    folders = [d for d in root.iterdir() if (d / COMPLETE_FILE).is_file()] if root.is_dir() else []
    return max(folders, key=lambda d: (_read_info(d)['epoch'], d.name), default=None)


def prune_checkpoints(root: str | Path, keep: int = 2, pattern: str = 'epoch*') -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoint folders matching ``pattern`` (call on one rank).

    Incomplete folders older than the newest kept one go too; a ``best`` folder does not match the default pattern.
    """
    if keep < 1:
        raise ValueError(f'keep must be >= 1 so that a run can resume, got {keep}.')
    folders = sorted(Path(root).glob(pattern), key=lambda d: d.name)
    complete = [d for d in folders if (d / COMPLETE_FILE).is_file()]
    if len(complete) <= keep:
        return []
    oldest_kept = complete[-keep]
    removed = [d for d in folders if d.name < oldest_kept.name]
    for folder in removed:
        shutil.rmtree(folder)
    return removed


def load_pipeline_checkpoint(worker: PipelineWorker, directory: str | Path) -> None:
    """Load this rank's group state from a complete checkpoint written with the same stage groups."""
    directory = Path(directory)
    info = _read_info(directory)
    if info['stage_counts'] != worker.stage_counts:
        raise ValueError(f'{directory} was written with stage groups {info["stage_counts"]}, this run uses '
                         f'{worker.stage_counts}; pass stage_counts={info["stage_counts"]} to resume it.')
    state = torch.load(_group_file(directory, worker.group_index), map_location='cpu', weights_only=True)
    worker.load_state_dict(state)
    _logger.info('Rank %d resumed stages %s from %s (epoch %d)', dist.get_rank(), state['stages'], directory,
                 state['epoch'])


def merge_stage_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """The groups' states (in group order) -> one ``LocalTrainer.state_dict()``, e.g. to probe and export."""
    stages = [i for s in states for i in range(*s['stages'])]
    if stages != list(range(len(stages))):
        raise ValueError(f'The group states cover stages {stages}; give every group once, in order.')
    if len({(s['num_updates'], s['epoch']) for s in states}) != 1:
        raise ValueError('The group states come from different epochs; take them from one complete checkpoint.')
    model = {k: v for s in states for k, v in s['model'].items()}
    return {
        'model': model,
        'optimizers': [s['optimizers'][i] for s in states for i in range(*s['stages'])],
        'schedulers': [s['schedulers'][i] for s in states for i in range(*s['stages']) if s['schedulers']],
        'num_updates': states[0]['num_updates'],
        'epoch': states[0]['epoch'],
    }


def load_merged_state(directory: str | Path) -> dict[str, Any]:
    """A complete pipeline checkpoint as one ``LocalTrainer.state_dict()`` (no process group needed)."""
    directory = Path(directory)
    info = _read_info(directory)
    states = [torch.load(_group_file(directory, g), map_location='cpu', weights_only=True)
              for g in range(len(info['stage_counts']))]
    return merge_stage_states(states)
