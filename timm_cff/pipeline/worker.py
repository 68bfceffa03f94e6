"""``PipelineWorker``: one rank of a multi-process layer pipeline with data-parallel replicas (CFF paper, Sec. 5.1).

The world is a grid of K stage groups x R replicas, laid out replica-major (``rank = replica · K + group``): a
replica's groups are consecutive ranks, so under ``torchrun`` the activations travel inside a node and only the
per-stage gradient sums cross nodes. Every rank builds the same ``LocalTrainer`` and trains its group's stages::

    rank of group 0:   loader -> stages -> send ─┐
    rank of group g:        receive <────────────┘ -> stages -> send -> ...   (each rank steps its own optimizers)

Each rank runs its group as soon as a batch arrives, so the groups work concurrently: K + N - 1 group-steps per
epoch instead of K·N. The updates are those of sequential training (see ``local.py``), so a pipelined run ends with
bit-identical weights on CPU. With replicas, each group's contrastive loss sees the global batch and gradients are
summed per stage (``replicas.py``). An ``END`` message drains the pipeline at the end of an epoch; the epoch's
losses are then summed over all ranks, so every rank returns the same metrics.
"""
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..loop import MeanMeter
from ..methods.base import split_batch
from ..methods.cff import LocalTrainer
from .comm import ActivationLink, peer_guard
from .groups import GroupedTrainer, StageGroup, balance_stages, place_groups, stage_ranges
from .replicas import GatheredLoss, GradientReducer, broadcast_parameters

__all__ = ['PipelineWorker']

_logger = logging.getLogger(__name__)


def _rank0_value(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (e.g. measured costs, which differ from rank to rank)."""
    box = [value]
    with peer_guard('agreeing on the stage groups', 'rank 0'):
        dist.broadcast_object_list(box, src=0)
    return box[0]


class PipelineWorker(GroupedTrainer):
    """This rank's stage group of a distributed layer pipeline; reads like a ``LocalTrainer``.

    ``train_epoch(loader)`` and ``evaluate(loader)`` return the same dict on every rank; only the ranks that
    ``reads_data`` (the first group of each replica) read their loader (their replica's shard), the others pass None.

    Args:
        trainer: a ``LocalTrainer`` built the same way on every rank (same model, seed and hyperparameters).
        num_groups: K stage groups; the world size must be K x replicas. Default: the length of ``stage_counts``,
            else the world size (no replicas).
        stage_counts: stages per group, e.g. ``[3, 4]``; by default balanced over ``costs``.
        costs: per-stage costs to balance on (``measure_stage_costs``); rank 0's are used on every rank.
        device: this rank's device (``init_distributed`` returns it); default: where the trainer's model is.
        max_in_flight: batches a group may send ahead of its successor.
    """

    def __init__(self, trainer: LocalTrainer, num_groups: int | None = None, *,
                 stage_counts: Sequence[int] | None = None, costs: Sequence[float] | None = None,
                 device: torch.device | str | None = None, max_in_flight: int = 2):
        if not dist.is_initialized():
            raise RuntimeError('PipelineWorker needs torch.distributed: launch with torchrun and call '
                               'timm_cff.pipeline.init_distributed() first.')
        world, rank = dist.get_world_size(), dist.get_rank()
        num_groups = len(stage_counts) if stage_counts is not None else (num_groups or world)
        if world % num_groups:
            raise ValueError(f'The world size {world} is not a multiple of the {num_groups} stage groups; launch '
                             'stage groups x replicas processes.')
        if stage_counts is None:
            costs = _rank0_value(list(costs) if costs is not None else [1.0] * trainer.num_stages)
            stage_counts = balance_stages(costs, num_groups)
        if sum(stage_counts) != trainer.num_stages:
            raise ValueError(f'stage_counts {list(stage_counts)} must cover all {trainer.num_stages} stages.')
        self.trainer = trainer
        self.stage_counts = list(stage_counts)
        self.num_groups, self.num_replicas = num_groups, world // num_groups
        self.replica, self.group_index = divmod(rank, num_groups)
        stages = stage_ranges(stage_counts)[self.group_index]
        device = torch.device(device) if device is not None else trainer.device
        place_groups(trainer, [stages], [device], rest=torch.device('cpu'))
        self.group = StageGroup(trainer, stages, device)
        self.groups = [self.group]
        self.link = ActivationLink(rank - 1 if self.group_index > 0 else None,
                                   rank + 1 if self.group_index < num_groups - 1 else None, device, max_in_flight)
        self.busy_s = 0.0  # seconds the last epoch spent computing; the rest of it was spent waiting for peers
        self._join_replicas()
        _logger.info('Rank %d: stages %d-%d on %s, replica %d of %d', rank, stages.start, stages.stop - 1, device,
                     self.replica, self.num_replicas)

    def _join_replicas(self) -> None:
        """With replicas: identical start, global-batch losses and summed gradients for this group's stages."""
        if self.num_replicas == 1:
            return
        group = None
        for g in range(self.num_groups):  # every rank creates every group, in the same order
            ranks = [r * self.num_groups + g for r in range(self.num_replicas)]
            new = dist.new_group(ranks)
            group = new if g == self.group_index else group
        params = [p for i in self.group.stages for p in self.trainer.stages.stage_parameters(i)]
        broadcast_parameters(params, group)
        for i in self.group.stages:
            self.trainer.losses[i] = GatheredLoss(self.trainer.losses[i], group)
        self.group.gradient_reducer = GradientReducer(group)

    # ------------------------------------------------------------------------------ epochs
    @property
    def reads_data(self) -> bool:
        """Whether this rank needs the loader (the first group of each replica); other ranks pass ``None``."""
        return self.link.prev_rank is None

    def _run(self, loader: Iterable | None, backward: bool) -> dict[str, float]:
        group, link = self.group, self.link
        meter, self.busy_s = MeanMeter(), 0.0
        for h, labels in self._inputs(loader):
            start = time.perf_counter()
            out, stats = group.forward(h, labels, backward)
            self.busy_s += time.perf_counter() - start
            if link.next_rank is not None:
                link.send(out, labels)  # before stepping: the successor starts while this group updates
            start = time.perf_counter()
            if backward:
                group.check(stats)
                group.step()
            self.busy_s += time.perf_counter() - start
            meter.add(stats, len(labels))
        if link.next_rank is not None:
            link.send_end()
        link.flush()
        return self._reduce(meter)

    def _inputs(self, loader: Iterable | None) -> Iterator[tuple[Tensor, Tensor]]:
        if not self.reads_data:
            while (item := self.link.receive()) is not None:
                yield item
            return
        if loader is None:
            raise ValueError(f'Rank {dist.get_rank()} runs the first stage group and reads the data: give it the '
                             'loader (its replica\'s shard).')
        for batch in loader:
            yield self.trainer.views.inputs(*split_batch(batch), self.group.device)

    def _reduce(self, meter: MeanMeter) -> dict[str, float]:
        """Sum every rank's per-stage sums (zero for the stages of other groups; each sample is counted once per
        group, hence the division by K) into the epoch means of all stages, the same dict on every rank."""
        keys, wire = self.trainer.stage_keys(), self.link.wire
        sums = meter.sum() if meter.count else {}
        totals = torch.stack([sums[k].to(wire) if k in sums else torch.zeros((), device=wire) for k in keys])
        count = torch.tensor([float(meter.count)], device=wire)
        with peer_guard('summing the epoch losses', 'all ranks'):
            dist.all_reduce(totals)
            dist.all_reduce(count)
        samples = int(count.item()) // self.num_groups
        if not samples:
            raise ValueError('The loader yielded no batches.')
        return self.trainer.epoch_means(dict(zip(keys, (totals / samples).unbind())))

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """This group's share of the trainer state: its stages' weights, optimizers and schedulers, the counters.

        The last group also keeps the parameters that belong to no stage (the probe head), so the groups' states
        together hold the whole model (``merge_stage_states``).
        """
        t, stages = self.trainer, self.group.stages
        keys = self._owned_keys()
        return {
            'stages': [stages.start, stages.stop],
            'model': {k: v for k, v in t.model.state_dict().items() if k in keys},
            'optimizers': {i: t.optimizers[i].state_dict() for i in stages},
            'schedulers': {i: t.schedulers[i].state_dict() for i in stages} if t.schedulers else {},
            'num_updates': t.num_updates,
            'epoch': t.epoch,
            **({'scaler': t.scaler.state_dict()} if t.scaler else {}),  # float16 autocast: this rank's loss scale
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stages = self.group.stages
        if state['stages'] != [stages.start, stages.stop]:
            raise ValueError(f'The checkpoint holds stages {state["stages"]}, this rank trains '
                             f'[{stages.start}, {stages.stop}); resume with the same stage groups.')
        t = self.trainer
        missing = self._owned_keys() - set(state['model'])
        if missing:
            raise ValueError(f'The checkpoint lacks {sorted(missing)[:5]}; it belongs to another model.')
        t.model.load_state_dict(state['model'], strict=False)
        for i in stages:
            t.stage_optimizers.load_optimizer(i, state['optimizers'][i])
        t.num_updates, t.epoch = state['num_updates'], state['epoch']
        t.stage_optimizers.resume_schedule(t.epoch, t.num_updates)
        if t.scaler and 'scaler' in state:
            t.scaler.load_state_dict(state['scaler'])

    def _owned_keys(self) -> set[str]:
        """State-dict keys of this group's stages (and of the stage-less rest, for the last group)."""
        t = self.trainer
        owner = {id(p): i for i in range(t.num_stages) for p in t.stages.stage_parameters(i)}
        last = self.group_index == self.num_groups - 1
        return {name for name, value in t.model.state_dict(keep_vars=True).items()
                if owner.get(id(value), None) in self.group.stages or (last and id(value) not in owner)}
