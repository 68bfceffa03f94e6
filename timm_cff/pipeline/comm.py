"""Rank-to-rank transport of a multi-process layer pipeline, on ``torch.distributed`` point-to-point operations.

Each message carries one batch between neighbouring stage groups: a fixed-size header (kind, dtype, label count,
shape, dimension order), the detached activation ``[VB, ...]`` and the labels ``[B]``. The activation arrives with
the sender's memory layout (a timm ViT's token stream is ``[B, N, D]`` with strides of ``[B, D, N]``), because CPU
kernels round differently on other layouts and the pipeline must reproduce sequential training bit for bit.
Sends are asynchronous with a bounded number in flight, so a fast group runs at most ``max_in_flight`` batches ahead
of the next one. An ``END`` header closes an epoch. Gloo moves CPU tensors, NCCL device tensors. Any failure of the
transport (a peer died, or no message within the process group's timeout) becomes a ``PeerFailureError`` that names
the ranks involved.
"""
import contextlib
import datetime
import os
from collections import deque
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ['PeerFailureError', 'ActivationLink', 'init_distributed', 'peer_guard']

_BATCH, _END = 1, 0
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_DIMS = 6
_HEADER = 4 + 2 * _MAX_DIMS  # kind, dtype index, label count, ndim, shape..., dimension order...


class PeerFailureError(RuntimeError):
    """Another rank of the pipeline died, failed or stopped answering; this rank stops rather than hang."""


@contextlib.contextmanager
def peer_guard(what: str, peer: int | str) -> Iterator[None]:
    """Turn a transport error during ``what`` into a ``PeerFailureError`` naming this rank and ``peer``."""
    try:
        yield
    except RuntimeError as e:  # DistBackendError and gloo/NCCL errors are RuntimeErrors
        raise PeerFailureError(
            f'Rank {dist.get_rank()} stopped: {what} with {peer} failed ({str(e).splitlines()[0][:300]}). Another '
            'rank died, raised or timed out; its log has the cause. Relaunch to resume from the last complete '
            'checkpoint.') from e


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment; returns this rank's device.

    Args:
        backend: ``'nccl'`` when CUDA is available, else ``'gloo'`` (default).
        timeout_s: how long a rank waits for a peer before raising instead of hanging.
    """
    if backend is None:
        backend = 'nccl' if torch.cuda.is_available() else 'gloo'
    device = torch.device('cpu')
    if backend == 'nccl':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if backend == 'nccl' else None)
    return device


class ActivationLink:
    """The messages of one rank to its successor and from its predecessor in a pipeline.

    Args:
        prev_rank: the rank feeding this one (``None`` for the first stage group).
        next_rank: the rank this one feeds (``None`` for the last stage group).
        device: where received tensors are placed (the stage group's device).
        max_in_flight: messages sent but not yet received before ``send`` blocks.
    """

    def __init__(self, prev_rank: int | None, next_rank: int | None, device: torch.device, max_in_flight: int = 2):
        if max_in_flight < 1:
            raise ValueError(f'max_in_flight must be >= 1, got {max_in_flight}.')
        self.prev_rank, self.next_rank, self.device = prev_rank, next_rank, device
        self.max_in_flight = max_in_flight
        # Gloo sends CPU tensors; NCCL sends tensors on the device it is bound to.
        self.wire = device if dist.get_backend() == 'nccl' else torch.device('cpu')
        self._in_flight: deque[list] = deque()

    def send(self, h: Tensor, labels: Tensor) -> None:
        """Send a batch's detached activation ``[VB, ...]`` and labels ``[B]`` to the next rank, asynchronously."""
        if h.dtype not in _DTYPES or h.dim() > _MAX_DIMS:
            raise ValueError(f'Cannot send a {h.dtype} activation of {h.dim()} dims; supported: {_DTYPES}, '
                             f'at most {_MAX_DIMS} dims.')
        order = sorted(range(h.dim()), key=lambda d: -h.stride(d))  # outermost first: h.permute(order) is contiguous
        pad = [0] * (_MAX_DIMS - h.dim())
        header = torch.tensor([_BATCH, _DTYPES.index(h.dtype), len(labels), h.dim(), *h.shape, *pad, *order, *pad],
                              dtype=torch.int64)
        self._post([header, h.detach().permute(order).contiguous(), labels.to(torch.int64)])

    def send_end(self) -> None:
        """Close the epoch for the next rank."""
        self._post([torch.tensor([_END] + [0] * (_HEADER - 1), dtype=torch.int64)])

    def receive(self) -> tuple[Tensor, Tensor] | None:
        """The next batch ``(h [VB, ...], labels [B])`` from the previous rank, or ``None`` at the end of the epoch."""
        header = torch.empty(_HEADER, dtype=torch.int64, device=self.wire)
        with peer_guard('receiving a batch', f'rank {self.prev_rank}'):
            dist.recv(header, self.prev_rank)
            kind, dtype, num_labels, ndim, *rest = header.tolist()
            if kind == _END:
                return None
            shape, order = rest[:ndim], rest[_MAX_DIMS:_MAX_DIMS + ndim]
            h = torch.empty([shape[d] for d in order], dtype=_DTYPES[dtype], device=self.wire)
            labels = torch.empty(num_labels, dtype=torch.int64, device=self.wire)
            dist.recv(h, self.prev_rank)
            dist.recv(labels, self.prev_rank)
        h = h.permute([order.index(d) for d in range(ndim)])  # the sender's shape and strides
        return h.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def flush(self) -> None:
        """Wait until every message sent has been received."""
        while self._in_flight:
            self._wait_oldest()

    def _post(self, tensors: list[Tensor]) -> None:
        tensors = [t.to(self.wire) for t in tensors]
        with peer_guard('sending a batch', f'rank {self.next_rank}'):
            works = [dist.isend(t, self.next_rank) for t in tensors]
        self._in_flight.append([works, tensors])  # the tensors must live until their send completes
        while len(self._in_flight) > self.max_in_flight:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        works, _ = self._in_flight.popleft()
        with peer_guard('sending a batch', f'rank {self.next_rank}'):
            for work in works:
                work.wait()
