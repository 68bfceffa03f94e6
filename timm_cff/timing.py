"""Inference time per image (CFF paper, Table 2, "Infer. T"), measured the same way for every method.

A single forward (CFF probe, BP, FF's one-pass head) and FF's C-pass goodness prediction are all callables
``inputs [B, ...] -> scores [B, C]``; ``time_inference`` times any of them with ``torch.utils.benchmark``, which
synchronises the accelerator around each measurement and repeats until the estimate is stable.
"""
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ['time_inference']


@torch.no_grad()
def time_inference(fn: Callable[[Tensor], Tensor], inputs: Tensor, *, warmup: int = 3,
                   min_run_time: float = 1.0, num_threads: int | None = None) -> float:
    """Milliseconds per image of ``fn(inputs)``: the median time of one call divided by the batch size.

    Args:
        fn: ``[B, ...] -> [B, C]``, e.g. ``model``, ``trainer.predict`` or a ``OnePassClassifier``.
        inputs: one batch on the device to measure.
        warmup: untimed calls first (allocator, kernel selection).
        min_run_time: seconds of timed calls at least; the median over blocks of calls is used.
        num_threads: CPU threads while timing (``None``: the current ``torch.get_num_threads()``).
    """
    if warmup < 0 or min_run_time <= 0:
        raise ValueError(f'Need warmup >= 0 and min_run_time > 0, got {warmup} and {min_run_time}.')
    from torch.utils import benchmark  # imported here: its import probes for a CUDA toolkit and logs a warning

    for _ in range(warmup):
        fn(inputs)
    timer = benchmark.Timer(stmt='fn(inputs)', globals={'fn': fn, 'inputs': inputs},
                            num_threads=num_threads or torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return measurement.median * 1000.0 / len(inputs)
