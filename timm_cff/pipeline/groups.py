"""Stage groups: consecutive stages that share one device and train as a unit in a layer pipeline.

A layer pipeline (CFF paper, Sec. 5.1) gives every device a group of consecutive stages. A group runs its stages
one after another on a batch, exactly as ``LocalTrainer.step`` does, so the per-stage operations are literally the
trainer's own: ``LocalTrainer.forward_backward_stage`` per stage, then the trainer's ``StageOptimizers`` for the
finite guard and the steps. Groups are balanced by measured cost: stage 0 also carries the patch and position
embedding, and the partition minimises the slowest group, which sets the pipeline's pace.
"""
import logging
import time
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from ..methods.base import name_by_stage, stage_key
from ..methods.cff import LocalTrainer

__all__ = ['StageGroup', 'GroupedTrainer', 'balance_stages', 'measure_stage_costs', 'stage_ranges',
           'place_groups']

_logger = logging.getLogger(__name__)


def stage_ranges(counts: Sequence[int]) -> list[range]:
    """Stage counts per group ``[3, 4]`` -> consecutive stage ranges ``[range(0, 3), range(3, 7)]``."""
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f'Every stage group needs at least one stage, got counts {list(counts)}.')
    bounds = [0]
    for count in counts:
        bounds.append(bounds[-1] + count)
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def balance_stages(costs: Sequence[float], num_groups: int) -> list[int]:
    """Split stages with ``costs`` into ``num_groups`` consecutive groups minimising the costliest group.

    Returns:
        The number of stages in each group, e.g. ``[3, 4]``. Among equally good splits, earlier groups get fewer
        stages (stage 0 carries the embedding).
    """
    num_stages = len(costs)
    if not 1 <= num_groups <= num_stages:
        raise ValueError(f'Cannot split {num_stages} stages into {num_groups} groups: use 1 to {num_stages} groups, '
                         'and data-parallel replicas for more devices.')
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + float(cost))
    # best[k][j]: the smallest possible costliest group when the first j stages form k groups; cut[k][j]: its last cut
    inf = float('inf')
    best = [[inf] * (num_stages + 1) for _ in range(num_groups + 1)]
    cut = [[0] * (num_stages + 1) for _ in range(num_groups + 1)]
    best[0][0] = 0.0
    for k in range(1, num_groups + 1):
        for j in range(k, num_stages + 1):
            for i in range(k - 1, j):  # earliest cut first: among ties, the last group takes the most stages
                value = max(best[k - 1][i], prefix[j] - prefix[i])
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    counts, j = [], num_stages
    for k in range(num_groups, 0, -1):
        counts.append(j - cut[k][j])
        j = cut[k][j]
    return counts[::-1]


def _synchronize(device: torch.device) -> None:
    torch.get_device_module(device).synchronize()


def measure_stage_costs(trainer: LocalTrainer, views: Tensor | Sequence[Tensor], labels: Tensor,
                        repeats: int = 3) -> list[float]:
    """Seconds per stage for forward, loss and backward on one batch (fastest of ``repeats`` after a warm-up).

    The weights, the optimizer state and the random state are left untouched, so a run that measures first stays
    bit-identical to one that does not. The optimizer step (elementwise, small next to the stage) is not timed.
    Measure before the model is spread over devices: the batch goes to the trainer's device.
    """
    x, y = trainer.views.inputs(views, labels, trainer.device)
    device = x.device
    was_training = trainer.model.training
    trainer.model.train()
    costs = [float('inf')] * trainer.num_stages
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        for attempt in range(repeats + 1):  # attempt 0 warms up allocators and kernels
            h = x
            trainer.stage_optimizers.zero_grad()  # as in training: each backward allocates its gradients
            for index in range(trainer.num_stages):
                _synchronize(device)
                start = time.perf_counter()
                h, _ = trainer.forward_backward_stage(index, h, y)
                _synchronize(device)
                if attempt:
                    costs[index] = min(costs[index], time.perf_counter() - start)
    trainer.stage_optimizers.zero_grad()
    trainer.model.train(was_training)
    _logger.info('Measured stage costs (ms): %s', [round(1e3 * c, 2) for c in costs])
    return costs


def _move_module_tensors(module: nn.Module, device: torch.device) -> None:
    """Move a module's own (non-recursive) parameters and buffers, keeping the parameter objects."""
    for param in module.parameters(recurse=False):
        param.data = param.data.to(device)
        if param.grad is not None:
            param.grad = param.grad.to(device)
    for name, buffer in list(module.named_buffers(recurse=False)):
        setattr(module, name, buffer.to(device))


def _move_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state follows its parameter (``step`` counters stay where torch keeps them)."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, Tensor) and key != 'step':
                state[key] = value.to(param.device)


def place_groups(trainer: LocalTrainer, groups: Sequence[range], devices: Sequence[torch.device],
                 rest: torch.device | None = None) -> None:
    """Put each group's parameters (and their modules' buffers) on its device, everything else on ``rest``.

    Parameters are moved in place (the optimizers keep pointing at them), so this works before or after training.

    Args:
        rest: the device of parameters outside ``groups`` (other ranks' stages, the head); the last group's device
            by default.
    """
    rest = devices[-1] if rest is None else rest
    owner = {}
    for group, device in zip(groups, devices):
        for index in group:
            owner.update({id(p): device for p in trainer.stages.stage_parameters(index)})
    for module in trainer.model.modules():
        placed = {owner.get(id(p), rest) for p in module.parameters(recurse=False)}
        if len(placed) > 1:
            raise ValueError(f'{type(module).__name__} holds parameters of several stage groups; the stage adapter '
                             'must give each module to one stage.')
        if placed:
            _move_module_tensors(module, placed.pop())
    for opt in trainer.optimizers:
        _move_optimizer_state(opt)


class StageGroup:
    """Consecutive stages of a ``LocalTrainer`` on one device, updated together as ``LocalTrainer.step`` does.

    Args:
        trainer: the trainer whose stages, losses and optimizers the group drives.
        stages: the group's stage indices.
        device: where the group's parameters live (see ``place_groups``).
    """

    def __init__(self, trainer: LocalTrainer, stages: range, device: torch.device | str):
        self.trainer = trainer
        self.stages = stages
        self.device = torch.device(device)
        self.num_updates = trainer.num_updates
        self.gradient_reducer = None  # set for data-parallel replicas: sums each stage's gradients across them

    def forward(self, h: Tensor, labels: Tensor, backward: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """Run the group's stages on a batch (and back-propagate each with ``backward``), without stepping.

        Args:
            h: the first stage's input ``[VB, ...]`` (images for stage 0), on any device.
            labels: ``[B]``.

        Returns:
            The detached output of the last stage ``[VB, ...]`` and the group's detached per-stage statistics
            ``{'loss_stage{i}': ..., '{metric}_stage{i}': ...}``.
        """
        h, labels = h.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        run_stage = self.trainer.forward_backward_stage if backward else self.trainer.evaluate_stage
        if backward:
            self.trainer.stage_optimizers.zero_grad(self.stages)
        per_stage = {}
        for index in self.stages:
            h, per_stage[index] = run_stage(index, h, labels)
            if backward and self.gradient_reducer is not None:
                self.gradient_reducer.start(self.trainer.stages.stage_parameters(index))
        return h.detach(), name_by_stage(per_stage)

    def check(self, stats: dict[str, Tensor]) -> None:
        """Wait for the gradient reduction, then refuse non-finite losses (``NonFiniteLossError``, nothing stepped)."""
        if self.gradient_reducer is not None:
            self.gradient_reducer.finish()
        losses = torch.stack([stats[stage_key('loss', i)] for i in self.stages])
        self.trainer.stage_optimizers.check_finite(losses, self.stages, self.num_updates)

    def step(self) -> None:
        """Step the group's optimizers and per-update schedulers: one more update of each of its stages."""
        self.num_updates += 1
        self.trainer.stage_optimizers.step(self.num_updates, self.stages)


class GroupedTrainer:
    """The ``LocalTrainer`` interface over stage groups, shared by ``PipelineTrainer`` and ``PipelineWorker``.

    A subclass sets ``trainer`` and ``groups`` (the stage groups it drives) and implements ``_run(loader, backward)``,
    which streams the batches through its groups and returns the per-sample mean losses of every stage.
    """
    trainer: LocalTrainer
    groups: list[StageGroup]

    @property
    def model(self) -> nn.Module:
        return self.trainer.model

    @property
    def epoch(self) -> int:
        return self.trainer.epoch

    @property
    def num_updates(self) -> int:
        return self.trainer.num_updates

    @property
    def selection_key(self) -> str:
        return self.trainer.selection_key

    def train_epoch(self, loader: Iterable | None, on_step=None) -> dict[str, float]:
        """One pipelined epoch over ``(views, labels)`` batches, drained at the end; per-sample mean losses.

        ``on_step`` is accepted for the ``Runner`` protocol and not called: a pipelined step has no single moment
        at which every stage's loss of one batch is known."""
        self.trainer.model.train()
        for group in self.groups:
            group.num_updates = self.trainer.num_updates
        means = self._run(loader, backward=True)
        self.trainer.num_updates = self.groups[0].num_updates
        self.trainer.end_epoch()
        return means

    @torch.no_grad()
    def evaluate(self, loader: Iterable | None) -> dict[str, float]:
        """Per-sample mean stage losses without updates (eval mode), streamed through the pipeline."""
        was_training = self.trainer.model.training
        self.trainer.model.eval()
        means = self._run(loader, backward=False)
        self.trainer.model.train(was_training)
        return means

    def gather(self, device: torch.device | str | None = None) -> LocalTrainer:
        """The plain trainer once training is over (a subclass moves the stages onto one device first)."""
        return self.trainer

    def _run(self, loader: Iterable | None, backward: bool) -> dict[str, float]:
        raise NotImplementedError
