"""Benchmark: the layer-local training step against backpropagation, side by side on one timm ViT, batch and device.

The CFF paper (Aghagolzadeh & Ezoji, Neural Networks 2025, arXiv 2502.00571, Table 6) reports seconds per epoch for
CIFAR-10 ViT[128 4 5]: one view 9, two views 18, BP 8 (two views = 2.25x BP), and never measures memory.

- **Speed** (``time_methods``): every method trains its own copy of one model on one batch held on the device. After
  warm-up, repeats are interleaved and the method order rotates every repeat, so a noisy, shared machine slows all
  methods alike. Each repeat gives a wall time and a process CPU time (user + system, all threads) per step; ratios
  to BP are taken per repeat (paired) and summarised by their median and quartiles.
- **Memory** (``measure_memory``, one fresh process per configuration with ``memory_in_subprocess``): a warm-up step
  on a 4-sample batch creates the optimizer state and initialises the kernels, gradients are released, then one
  full step is measured. *Total peak* counts everything training holds: parameters, gradients, optimizer state,
  the batch and activations. *Activation peak* = total peak − (parameters + gradients + optimizer state), those
  three summed exactly from the tensors.
  - CUDA: ``torch.cuda.max_memory_allocated`` over the step.
  - CPU: the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) above the resident set just
    before the step (``VmRSS``, after ``malloc_trim``), plus the parameter, optimizer-state and batch bytes that
    were already resident. Linux only. With ``malloc='mmap'`` (default) the process runs with glibc's
    ``MALLOC_MMAP_THRESHOLD_=65536``: every tensor above 64 KiB gets its own pages and returns them when freed, so
    the resident set follows the live tensors. With ``malloc='default'`` it also shows heap fragmentation, which
    grows with the number of stages for layer-local training (freed activations interleave with gradients that
    stay alive until the optimizers step).
"""
import contextlib
import ctypes
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timm_cff import LocalTrainer

__all__ = ['BenchSetup', 'METHODS', 'create_bench_model', 'create_bench_batch', 'create_step',
           'time_methods', 'count_flops', 'measure_memory', 'memory_in_subprocess', 'memory_vs_depth', 'state_bytes',
           'write_report']

_logger = logging.getLogger(__name__)

Batch = tuple[tuple[Tensor, ...], Tensor]
Step = Callable[[Batch], None]


@dataclass(frozen=True)
class BenchSetup:
    """One model, batch and device shared by every method. Defaults: the paper's CIFAR-10 ViT[128 4 5]."""
    embed_dim: int = 128
    num_heads: int = 4
    depth: int = 5
    img_size: int = 32
    patch_size: int = 4
    num_classes: int = 10
    batch_size: int = 256
    device: str = 'cpu'
    autocast_dtype: str | None = None  # 'bfloat16' / 'float16', applied to every method alike
    compile: bool = False  # torch.compile every block, for every method alike (timing only)
    seed: int = 0


def create_bench_model(setup: BenchSetup) -> nn.Module:
    """The CFF ViT[E H L] of the paper as a stock timm model (avg pool, no class token, MLP ratio 2)."""
    import timm
    torch.manual_seed(setup.seed)
    model = timm.create_model(
        'vit_tiny_patch16_224', img_size=setup.img_size, patch_size=setup.patch_size, embed_dim=setup.embed_dim,
        depth=setup.depth, num_heads=setup.num_heads, mlp_ratio=2, num_classes=setup.num_classes,
        global_pool='avg', class_token=False)
    return model.to(setup.device)


def create_bench_batch(setup: BenchSetup, views: int = 2, batch_size: int | None = None) -> Batch:
    """``views`` random image tensors ``[B, 3, H, W]`` and labels ``[B]``, created on the device (no host copies)."""
    g = torch.Generator().manual_seed(setup.seed)
    size = batch_size or setup.batch_size
    xs = tuple(torch.randn(size, 3, setup.img_size, setup.img_size, generator=g) for _ in range(views))
    labels = torch.randint(0, setup.num_classes, (size,), generator=g)
    return tuple(x.to(setup.device) for x in xs), labels.to(setup.device)


def _cff(num_views: int, fuse_views: bool | None = True):
    def build(model: nn.Module, setup: BenchSetup) -> tuple[Step, list[torch.optim.Optimizer]]:
        trainer = LocalTrainer(model, num_views=num_views, fuse_views=fuse_views,
                               autocast_dtype=setup.autocast_dtype, compile_stages=setup.compile)
        return (lambda batch: trainer.step(*batch)), trainer.optimizers
    return build


def _bp(checkpointing: bool = False):
    """End-to-end BP+CE as in the official ``main_BP.py``: AdamW lr 5e-4, wd 0.01, one view."""
    def build(model: nn.Module, setup: BenchSetup) -> tuple[Step, list[torch.optim.Optimizer]]:
        model.set_grad_checkpointing(checkpointing)
        if setup.compile:
            for block in model.blocks:
                block.compile()  # the same per-block compilation the CFF trainer uses
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
        dtype = getattr(torch, setup.autocast_dtype) if setup.autocast_dtype else None
        scaler = torch.amp.GradScaler(setup.device.split(':')[0], enabled=dtype == torch.float16)

        def step(batch: Batch) -> None:
            (x, *_), labels = batch
            model.train()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(x.device.type, dtype, enabled=dtype is not None):
                loss = F.cross_entropy(model(x), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return step, [optimizer]
    return build


def _ff(model: nn.Module, setup: BenchSetup) -> tuple[Step, list[torch.optim.Optimizer]]:
    """FF on the same ViT (label patch, positive and negative pass per stage), from the FF baseline trainer."""
    from timm_cff import create_trainer
    trainer = create_trainer('ff', model)
    return (lambda batch: trainer.step(batch[0][0], batch[1])), trainer.optimizers


#: name -> (builder, number of views the method consumes)
METHODS: dict[str, tuple[Callable, int]] = {
    'cff_2view': (_cff(2), 2),  # both views as one 2B batch (the trainer's default on accelerators)
    'cff_1view': (_cff(1), 1),
    'cff_2view_unfused': (_cff(2, fuse_views=False), 2),  # one pass per view (the trainer's default on CPU)
    'ff': (_ff, 1),
    'bp': (_bp(), 1),
    'bp_ckpt': (_bp(checkpointing=True), 1),
}


def create_step(method: str, setup: BenchSetup) -> tuple[nn.Module, Step, list[torch.optim.Optimizer]]:
    """A fresh model (same init for every method) and its training step ``step(batch)``."""
    if method not in METHODS:
        raise ValueError(f'Unknown method {method!r}; choose from {sorted(METHODS)}.')
    model = create_bench_model(setup)
    step, optimizers = METHODS[method][0](model, setup)
    return model, step, optimizers


def _sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def _quartiles(values: Sequence[float]) -> dict[str, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method='inclusive') if len(values) > 1 else [values[0]] * 3
    return {'median': median, 'q1': q1, 'q3': q3, 'min': min(values), 'max': max(values)}


def time_methods(setup: BenchSetup, methods: Sequence[str], *, warmup: int = 2, repeats: int = 7, steps: int = 1,
                 reference: str = 'bp') -> dict:
    """Seconds per training step of each method, interleaved, with ratios to ``reference`` paired per repeat.

    Returns:
        ``{method: {'wall': stats, 'cpu': stats, 'wall_ratio': stats, 'cpu_ratio': stats, 'wall_s': [...],
        'cpu_s': [...]}}`` (stats: median, q1, q3, min, max; ratios only when ``reference`` ran).
    """
    batch, out = create_bench_batch(setup), {}
    runs = {method: create_step(method, setup)[1] for method in methods}
    for _ in range(warmup):
        for step in runs.values():
            step(batch)
    wall, cpu = {m: [] for m in runs}, {m: [] for m in runs}
    names = list(runs)
    for r in range(repeats):
        for method in names[r % len(names):] + names[:r % len(names)]:  # rotate the order every repeat
            _sync(setup.device)
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                runs[method](batch)
            _sync(setup.device)
            wall[method].append((time.perf_counter() - w0) / steps)
            cpu[method].append((time.process_time() - c0) / steps)
    for method in runs:
        out[method] = {'wall': _quartiles(wall[method]), 'cpu': _quartiles(cpu[method]),
                       'wall_s': wall[method], 'cpu_s': cpu[method]}
        if reference in runs:
            out[method]['wall_ratio'] = _quartiles([a / b for a, b in zip(wall[method], wall[reference])])
            out[method]['cpu_ratio'] = _quartiles([a / b for a, b in zip(cpu[method], cpu[reference])])
    return out


def count_flops(setup: BenchSetup, methods: Sequence[str]) -> dict[str, int]:
    """Floating-point operations of one training step per method (``torch.utils.flop_counter``, after a warm-up step).

    Counts matrix products and convolutions, the work that sets step time; attention kernels count alike for every
    method, since all run the same blocks. Equal FLOPs bound how far a step-time ratio can fall without new math.
    """
    from torch.utils.flop_counter import FlopCounterMode
    batch, out = create_bench_batch(setup), {}
    for method in methods:
        step = create_step(method, setup)[1]
        step(batch)
        with FlopCounterMode(display=False) as counter:
            step(batch)
        out[method] = counter.get_total_flops()
    return out


def state_bytes(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, int]:
    """Exact bytes of parameters, gradients (those present now) and optimizer state tensors."""
    params = list(model.parameters())
    state = [v for opt in optimizers for s in opt.state.values() for v in s.values() if isinstance(v, Tensor)]
    return {'param_bytes': sum(p.numel() * p.element_size() for p in params),
            'grad_bytes': sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
            'optimizer_bytes': sum(t.numel() * t.element_size() for t in state)}


def _proc_status_kib(field: str) -> int:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1])
    raise RuntimeError(f'/proc/self/status has no {field}; CPU memory is measured on Linux only.')


def _release_freed_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL('libc.so.6').malloc_trim(0)  # glibc: hand freed heap pages back, so RSS shows live memory


def measure_memory(method: str, setup: BenchSetup) -> dict[str, int]:
    """Peak memory of one full training step of ``method``; run it in a fresh process (``memory_in_subprocess``)."""
    setup = replace(setup, compile=False)
    model, step, optimizers = create_step(method, setup)
    views = METHODS[method][1]
    step(create_bench_batch(setup, views, batch_size=4))  # optimizer state and lazy initialisation
    batch = create_bench_batch(setup, views)
    model.zero_grad(set_to_none=True)
    _release_freed_memory()
    cuda = setup.device.startswith('cuda')
    if cuda:
        _sync(setup.device)
        torch.cuda.reset_peak_memory_stats()
    else:
        Path('/proc/self/clear_refs').write_text('5')  # VmHWM := VmRSS
        rss_before = _proc_status_kib('VmRSS') * 1024
    step(batch)
    _sync(setup.device)
    sizes = state_bytes(model, optimizers)
    batch_bytes = sum(t.numel() * t.element_size() for t in (*batch[0], batch[1]))
    if cuda:
        total = torch.cuda.max_memory_allocated()
    else:
        total = _proc_status_kib('VmHWM') * 1024 - rss_before + sizes['param_bytes'] + sizes['optimizer_bytes'] \
            + batch_bytes
    activation = total - sizes['param_bytes'] - sizes['grad_bytes'] - sizes['optimizer_bytes']
    return {'total_bytes': total, 'activation_bytes': activation, 'batch_bytes': batch_bytes, **sizes}


def _memory_worker(args_json: str, out_path: str) -> None:
    """Entry point of the fresh process: ``measure_memory`` with JSON arguments, result written as JSON."""
    args = json.loads(args_json)
    if args.get('threads'):
        torch.set_num_threads(args['threads'])
    result = measure_memory(args['method'], BenchSetup(**args['setup']))
    Path(out_path).write_text(json.dumps(result))


def memory_in_subprocess(method: str, setup: BenchSetup, threads: int | None = None,
                         malloc: str = 'mmap') -> dict[str, int]:
    """``measure_memory`` in a fresh Python process, so that nothing allocated before pollutes the peak.

    ``malloc``: ``'mmap'`` (resident set = live tensors) or ``'default'`` (glibc defaults); see the module notes.
    """
    if malloc not in ('mmap', 'default'):
        raise ValueError(f"malloc must be 'mmap' or 'default', got {malloc!r}.")
    here = Path(__file__).resolve().parent  # benchmarks/ (this module) and the repository root (timm_cff)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(here), str(here.parent),
                                                                     os.environ.get('PYTHONPATH')]))}
    env.pop('MALLOC_MMAP_THRESHOLD_', None)
    if malloc == 'mmap':
        env['MALLOC_MMAP_THRESHOLD_'] = '65536'
    code = 'import sys; from harness import _memory_worker; _memory_worker(sys.argv[1], sys.argv[2])'
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / 'memory.json'
        args = json.dumps({'method': method, 'setup': asdict(setup), 'threads': threads})
        proc = subprocess.run([sys.executable, '-c', code, args, str(out)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f'Memory run {method} (depth {setup.depth}) failed:\n{proc.stderr[-2000:]}')
        return json.loads(out.read_text())


def memory_vs_depth(setup: BenchSetup, methods: Sequence[str], depths: Sequence[int], *, repeats: int = 3,
                    threads: int | None = None, malloc: str = 'mmap') -> dict[str, dict[int, dict]]:
    """Median total and activation peaks per method and depth over ``repeats`` fresh processes, interleaved.

    Returns:
        ``{method: {depth: {'total_bytes': median, 'activation_bytes': median, 'runs': [...], ...}}}``.
    """
    runs = {m: {d: [] for d in depths} for m in methods}
    for r in range(repeats):
        for depth in depths:
            for method in list(methods[r % len(methods):]) + list(methods[:r % len(methods)]):
                result = memory_in_subprocess(method, replace(setup, depth=depth), threads, malloc)
                runs[method][depth].append(result)
                _logger.info('memory %s depth %d (round %d/%d): %s', method, depth, r + 1, repeats,
                             f"activations {result['activation_bytes'] / 2**20:.1f} MiB")
    return {method: {depth: {**{k: int(statistics.median(r[k] for r in results)) for k in results[0]},
                             'runs': results}
                     for depth, results in by_depth.items()}
            for method, by_depth in runs.items()}


def write_report(prefix: str | Path, result: dict | None, markdown: str) -> None:
    """A benchmark's ``PREFIX.json`` (``result``; skipped when ``None``) and ``PREFIX.md`` (the table)."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    if result is not None:
        prefix.with_suffix('.json').write_text(json.dumps(result, indent=1))
    prefix.with_suffix('.md').write_text(markdown)
