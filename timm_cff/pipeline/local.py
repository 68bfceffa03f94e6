"""``PipelineTrainer``: layer-pipelined CFF training over the devices of one process (CFF paper, Sec. 5.1).

The schedule is a wavefront. With K stage groups, group g works on batch t - g at step t, all groups at once::

    step      0    1    2    3    4
    group 0   b0   b1   b2
    group 1        b0   b1   b2
    group 2             b0   b1   b2

so an epoch of N batches takes K + N - 1 steps instead of K·N. Group g's input for batch b is group g-1's output,
computed with group g-1's weights after b updates, and group g's own weights have had b updates: exactly what
sequential training uses. The pipelined run therefore performs the same updates, bit for bit on CPU. Devices run
concurrently because kernel launches are asynchronous; transfers between devices are non-blocking; one host sync per
step refuses a non-finite loss before any group of that step updates (as ``LocalTrainer.step`` does).
"""
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ..loop import MeanMeter
from ..methods.base import split_batch
from ..methods.cff import LocalTrainer
from .groups import GroupedTrainer, StageGroup, balance_stages, place_groups, stage_ranges

__all__ = ['PipelineTrainer']

_logger = logging.getLogger(__name__)


class PipelineTrainer(GroupedTrainer):
    """A ``LocalTrainer`` whose stage groups live on several devices and train as a layer pipeline.

    It reads like the trainer it wraps (``train_epoch``, ``evaluate``, ``state_dict``, ``selection_key``, ...), and
    with one device it performs the trainer's own ``step`` sequence.

    Args:
        trainer: the trainer to drive; its parameters are moved onto ``devices`` in place.
        devices: one device per stage group, e.g. ``['cuda:0', 'cuda:1']`` (any mix, including repeated CPUs).
        stage_counts: stages per group, e.g. ``[3, 4]``; by default balanced over ``costs``.
        costs: per-stage costs (e.g. ``measure_stage_costs``) to balance on; by default every stage costs the same.
    """

    def __init__(self, trainer: LocalTrainer, devices: Sequence[torch.device | str], *,
                 stage_counts: Sequence[int] | None = None, costs: Sequence[float] | None = None):
        devices = [torch.device(d) for d in devices]
        if not devices:
            raise ValueError('Give at least one device.')
        if stage_counts is None:
            stage_counts = balance_stages(costs if costs is not None else [1.0] * trainer.num_stages, len(devices))
        if len(stage_counts) != len(devices) or sum(stage_counts) != trainer.num_stages:
            raise ValueError(f'stage_counts {list(stage_counts)} must give each of the {len(devices)} devices a '
                             f'group and cover all {trainer.num_stages} stages.')
        groups = stage_ranges(stage_counts)
        place_groups(trainer, groups, devices)
        self.trainer = trainer
        self.groups = [StageGroup(trainer, stages, device) for stages, device in zip(groups, devices)]
        self.num_steps = 0  # wavefront steps of the last epoch: K + N - 1
        _logger.info('Layer pipeline: %s', ', '.join(f'stages {g.stages.start}-{g.stages.stop - 1} on {g.device}'
                                                       for g in self.groups))

    def state_dict(self) -> dict[str, Any]:
        """The wrapped trainer's state (tensors stay on their devices; loading copies them into place)."""
        return self.trainer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.load_state_dict(state)

    def gather(self, device: torch.device | str | None = None) -> LocalTrainer:
        """Move the whole model onto one device (default: the first) and return the plain trainer, e.g. to probe."""
        device = torch.device(device) if device is not None else self.groups[0].device
        place_groups(self.trainer, [range(self.trainer.num_stages)], [device])
        return self.trainer

    # ------------------------------------------------------------------------------ epochs
    def _run(self, loader: Iterable, backward: bool) -> dict[str, float]:
        meters = [MeanMeter() for _ in self.groups]  # one per group: a step's groups run different batches
        self.num_steps = 0
        for results in self._wavefront(loader, backward):
            self.num_steps += 1
            for meter, result in zip(meters, results):
                if result is not None:
                    _, stats, labels = result
                    meter.add(stats, len(labels))
        return self.trainer.epoch_means({k: v for meter in meters for k, v in meter.mean().items()})

    def _wavefront(self, loader: Iterable, backward: bool
                   ) -> Iterator[list[tuple[Tensor, dict[str, Tensor], Tensor] | None]]:
        """Per step: for each group, ``(output, its stages' statistics, labels)`` of the batch it ran, or None."""
        batches, exhausted = iter(loader), False
        inputs: list[tuple[Tensor, Tensor] | None] = [None] * len(self.groups)
        while True:
            batch = None if exhausted else next(batches, None)
            exhausted = batch is None
            inputs[0] = None if exhausted else self.trainer.views.inputs(*split_batch(batch), self.groups[0].device)
            if all(item is None for item in inputs):
                return
            results = [None if item is None else (*group.forward(*item, backward=backward), item[1])
                       for group, item in zip(self.groups, inputs)]
            if backward:
                active = [(group, result) for group, result in zip(self.groups, results) if result is not None]
                for group, (_, stats, _) in active:
                    group.check(stats)  # every group of the step, before any of them updates
                for group, _ in active:
                    group.step()
            yield results
            inputs = [None] + [None if result is None else
                               (result[0].to(group.device, non_blocking=True),
                                result[2].to(group.device, non_blocking=True))
                               for group, result in zip(self.groups[1:], results[:-1])]
