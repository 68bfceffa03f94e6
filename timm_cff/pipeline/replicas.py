"""Data-parallel replicas of a stage group: the contrastive loss sees the global batch, gradients are summed.

A supervised-contrastive loss couples every sample of a batch, so averaging per-replica losses is *not* training on
the global batch. Instead every replica gathers the pooled features ``[B, V, D]`` and labels of all replicas,
computes the loss of the global batch (the same value everywhere), and back-propagates it through its own slice
only (the other slices are constants). Replica r's gradient is then the part of dL/dθ that flows through its own
samples, and the sum over replicas (one all-reduce per stage) is exactly the global-batch gradient that
single-process training computes, up to float summation order.
"""
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .comm import peer_guard

__all__ = ['GatheredLoss', 'GradientReducer', 'broadcast_parameters', 'all_gather_batch']


def all_gather_batch(tensor: Tensor, group: dist.ProcessGroup) -> list[Tensor]:
    """Every replica's ``tensor`` (sizes along dim 0 may differ), in replica order; no gradient flows back."""
    with peer_guard('gathering the global batch', 'the replica group'):
        size = torch.tensor([len(tensor)], device=tensor.device)
        sizes = [torch.empty_like(size) for _ in range(dist.get_world_size(group))]
        dist.all_gather(sizes, size, group=group)
        sizes = [int(s) for s in sizes]
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[:len(tensor)] = tensor.detach()
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
    return [part[:n] for part, n in zip(parts, sizes)]


class GatheredLoss(nn.Module):
    """A stage loss evaluated on the global batch of all replicas, with gradients for this replica's slice.

    Args:
        loss: the stage loss ``(features [B, V, D], labels [B]) -> 0-d``.
        group: the process group of the replicas that hold this stage.
    """

    def __init__(self, loss: nn.Module, group: dist.ProcessGroup):
        super().__init__()
        self.loss = loss
        self.group = group

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        """``[B, V, D]`` and ``[B]`` of this replica -> the loss of the concatenated global batch."""
        parts = all_gather_batch(features, self.group)
        parts[dist.get_rank(self.group)] = features  # this slice keeps its graph
        return self.loss(torch.cat(parts), torch.cat(all_gather_batch(labels, self.group)))

    def __getattr__(self, name: str):
        """The wrapped loss's settings (``margin``, ``temperature``, ...), as stage metrics read them."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith('_') or name == 'loss':
                raise
            return getattr(self.loss, name)


class GradientReducer:
    """Sums each stage's gradients over the replicas, one flat all-reduce per stage, overlapped with compute.

    Args:
        group: the process group of the replicas that hold the stages.
    """

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self._pending: list[tuple[dist.Work, Tensor, list[nn.Parameter]]] = []

    def start(self, params: Sequence[nn.Parameter]) -> None:
        """Launch the all-reduce of the gradients of ``params`` (those that have one: the same on every replica)."""
        params = [p for p in params if p.grad is not None]
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        with peer_guard('summing gradients', 'the replica group'):
            work = dist.all_reduce(flat, group=self.group, async_op=True)
        self._pending.append((work, flat, params))

    def finish(self) -> None:
        """Wait for the launched reductions and write the sums back into ``.grad``."""
        for work, flat, params in self._pending:
            with peer_guard('summing gradients', 'the replica group'):
                work.wait()
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        self._pending.clear()


def broadcast_parameters(params: Sequence[nn.Parameter], group: dist.ProcessGroup) -> None:
    """Give every replica the parameters of the group's first rank, so that replicas start identical."""
    src = dist.get_global_rank(group, 0)
    with peer_guard('broadcasting the initial weights', 'the replica group'):
        for p in params:
            dist.broadcast(p.data, src=src, group=group)
