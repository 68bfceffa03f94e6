"""glibc malloc settings for CPU training: freed tensor memory stays in the heap for the next step.

With glibc's defaults a block above the (dynamic, at most 32 MiB) mmap threshold gets fresh pages from the kernel
and gives them back when freed, and free memory at the top of the heap is trimmed. A CPU training step frees and
re-allocates the same activations every step, so every step faults them back in: the kernel zeroes up to a
gigabyte of pages per step of CIFAR-10 ViT[128 4 5] at batch 512 (~220,000 page faults). Thresholds of 1 GiB keep
that memory in the heap, where the next step reuses it: no page faults, CPU time per step 0.84x (BP) and 0.97x
(CFF) of the default's there, the same arithmetic (PyTorch aligns CPU tensors to 64 bytes under any allocator) and
about the same peak resident set (``benchmarks/allocator.py``, docs/performance.md "CPU allocator").

The CLI applies this at start; library users may call :func:`keep_freed_memory` themselves. Settings the user gave
(``MALLOC_*_`` variables, ``GLIBC_TUNABLES``, a preloaded allocator) win, and ``TIMM_CFF_MALLOC=default`` keeps
glibc's defaults.
"""
import ctypes
import ctypes.util
import logging
import os
import platform
import sys
from collections.abc import Mapping

__all__ = ['MALLOC_SETTINGS', 'keep_freed_memory', 'malloc_state']

_logger = logging.getLogger(__name__)

#: mallopt parameters of <malloc.h> and the values set: (name, parameter, bytes).
MALLOC_SETTINGS = (('M_MMAP_THRESHOLD', -3, 1 << 30), ('M_TRIM_THRESHOLD', -1, 1 << 30), ('M_TOP_PAD', -2, 1 << 28))
#: Environment variables through which a user has already chosen the allocator's behaviour.
_USER_CHOICES = ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_TOP_PAD_', 'MALLOC_MMAP_MAX_',
                 'GLIBC_TUNABLES')
_state = 'not set by timm-cff'  # what this process did, for RUN/environment.json


def _skip_reason(environ: Mapping[str, str]) -> str | None:
    if environ.get('TIMM_CFF_MALLOC', '').lower() == 'default':
        return 'TIMM_CFF_MALLOC=default'
    given = [name for name in _USER_CHOICES if name in environ]
    if given:
        return f'{given[0]} is set'
    if 'malloc' in environ.get('LD_PRELOAD', ''):  # jemalloc, tcmalloc, mimalloc: glibc's settings do not apply
        return 'another allocator is preloaded'
    if not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc':
        return 'not glibc'
    return None


def keep_freed_memory(environ: Mapping[str, str] | None = None) -> bool:
    """Raise glibc's mmap and trim thresholds (``MALLOC_SETTINGS``) for this process; whether they were set.

    Nothing changes when the environment (default: ``os.environ``) already chooses allocator settings, with
    ``TIMM_CFF_MALLOC=default``, or off Linux/glibc.
    """
    global _state
    reason = _skip_reason(os.environ if environ is None else environ)
    if reason is not None:
        _state = f'left as it was: {reason}'
        _logger.debug('glibc malloc settings %s', _state)
        return False
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    done = {name: bool(libc.mallopt(parameter, value)) for name, parameter, value in MALLOC_SETTINGS}
    _state = ', '.join(f'{name}={value}' if done[name] else f'{name} refused' for name, _, value in MALLOC_SETTINGS)
    _logger.debug('glibc mallopt: %s', _state)
    return all(done.values())  # mallopt returns 0 for a value it refuses


def malloc_state() -> str:
    """What :func:`keep_freed_memory` did in this process (``'M_MMAP_THRESHOLD=1073741824, ...'``, ``'left as
    it was: <why>'``, or ``'not set by timm-cff'``)."""
    return _state
