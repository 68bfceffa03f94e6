"""How ``timm-cff train`` runs stage 1 over a layer pipeline: pick the runner, checkpoint per rank, merge at the end.

    torchrun --nproc-per-node K -m timm_cff train --config ... --pipeline.stages K       # K processes, one group each
    timm-cff train --config ... --pipeline.devices="['cuda:0','cuda:1']"                # one process, two devices

The runner reads like ``LocalTrainer`` (``train_epoch``, ``evaluate``, ``state_dict``), so the run loop is the same;
only checkpoints differ: with several processes every rank writes its stage group into an epoch folder, and the
best folder is merged into one ``LocalTrainer`` state for the probe, the test and the export (on rank 0).
"""
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..loop import Callback, EpochResult
from ..methods.base import split_batch
from ..methods.cff import LocalTrainer
from .checkpoint import (COMPLETE_FILE, latest_checkpoint, load_merged_state, load_pipeline_checkpoint,
                         prune_checkpoints, save_pipeline_checkpoint)
from .comm import init_distributed
from .groups import measure_stage_costs
from .local import PipelineTrainer
from .worker import PipelineWorker

__all__ = ['start_distributed', 'create_runner', 'RankCheckpoints', 'RUN_STATE_FILE']

_logger = logging.getLogger(__name__)

#: The run loop's own state (epoch, best validation loss, ...) inside each pipeline checkpoint folder.
RUN_STATE_FILE = 'run_state.json'


def start_distributed(stages: int, timeout_s: float) -> torch.device:
    """Join the process group torchrun set up; the world must be ``stages`` x replicas processes."""
    if 'RANK' not in os.environ:
        raise ValueError(f'pipeline.stages={stages} runs one process per stage group: launch with torchrun '
                         f'--nproc-per-node {stages} -m timm_cff train ... (or use pipeline.devices in one process).')
    device = init_distributed(timeout_s=timeout_s)
    if dist.get_world_size() % stages:
        raise ValueError(f'{dist.get_world_size()} processes cannot hold {stages} stage groups: launch a multiple.')
    return device


def _resume_counts(root: Path) -> list[int] | None:
    latest = latest_checkpoint(root)
    return json.loads((latest / COMPLETE_FILE).read_text())['stage_counts'] if latest else None


def create_runner(trainer: LocalTrainer, stages: int, devices: list, first_batch: Any, checkpoints: Path,
                  max_in_flight: int = 2):
    """The stage-1 runner: ``trainer`` itself, a ``PipelineTrainer`` over ``devices``, or this rank's
    ``PipelineWorker`` (groups balanced by the stage costs measured on ``first_batch``; a resumed run keeps the
    groups of its checkpoints)."""
    if dist.is_initialized():
        counts = _resume_counts(checkpoints)
        costs = measure_stage_costs(trainer, *split_batch(first_batch)) if first_batch is not None else None
        return PipelineWorker(trainer, stages, stage_counts=counts, costs=costs, max_in_flight=max_in_flight,
                              device=trainer.device)
    if devices:
        costs = measure_stage_costs(trainer, *split_batch(first_batch))
        return PipelineTrainer(trainer, devices, costs=costs)
    return trainer


class RankCheckpoints(Callback):
    """Stage-1 checkpoints of a multi-process pipeline under ``RUN/checkpoints/pipeline``: ``epochNNNN/`` (the two
    newest kept) and ``best/``, one file per stage group, complete once ``complete.json`` is written last."""

    def __init__(self, worker: PipelineWorker, run_path: Path):
        self.worker, self.root = worker, Path(run_path) / 'checkpoints' / 'pipeline'
        self.rank = dist.get_rank()

    def resume(self) -> dict[str, Any] | None:
        latest = latest_checkpoint(self.root)
        if latest is None:
            return None
        load_pipeline_checkpoint(self.worker, latest)
        return json.loads((latest / RUN_STATE_FILE).read_text())

    def on_epoch_end(self, result: EpochResult) -> None:
        state = result.state
        folders = [self.root / f'epoch{state["epoch"]:04d}'] + ([self.root / 'best'] if result.improved else [])
        for folder in folders:
            if self.rank == 0:  # written before the group files, so a complete folder always has it
                folder.mkdir(parents=True, exist_ok=True)
                (folder / RUN_STATE_FILE).write_text(json.dumps(state))
            save_pipeline_checkpoint(self.worker, folder)
        if self.rank == 0:
            prune_checkpoints(self.root, keep=2)

    def merged_best(self) -> dict[str, Any]:
        """The best epoch as one ``LocalTrainer.state_dict()`` (read by rank 0 after all ranks finished)."""
        return load_merged_state(self.root / 'best')
