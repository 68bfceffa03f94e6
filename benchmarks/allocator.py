"""CPU training steps under glibc's default malloc settings against the CLI's (``keep_freed_memory``): CPU time,
page faults and peak resident set per step, one fresh process per measurement, the two settings alternating.

    PYTHONPATH=. python benchmarks/allocator.py --threads 1 --repeats 3 --out benchmarks/results/allocator_cpu_1thread

Every process trains the same model from the same weights on the same batch, so the loss after the timed steps
must be identical under both settings (the allocator places tensors, it does not change the arithmetic); the
report says whether it is.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace

SETTINGS = ('default', 'tuned')


def worker(method: str, setting: str, depth: int, batch: int, steps: int) -> dict:
    """One process: warm up two steps, time ``steps`` more (process CPU time, wall time, minor faults)."""
    from timm_cff.experiment.allocator import keep_freed_memory
    applied = keep_freed_memory() if setting == 'tuned' else False
    import torch
    from harness import METHODS, BenchSetup, create_bench_batch, create_step
    setup = replace(BenchSetup(), depth=depth, batch_size=batch)
    model, step, _ = create_step(method, setup)
    data = create_bench_batch(setup, views=METHODS[method][1])
    for _ in range(2):
        step(data)
    usage, cpu, wall = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
    for _ in range(steps):
        step(data)
    after = resource.getrusage(resource.RUSAGE_SELF)
    checksum = float(sum(p.double().sum() for p in model.parameters()))  # equal weights <=> equal arithmetic
    return {'applied': applied, 'cpu_s': (time.process_time() - cpu) / steps,
            'wall_s': (time.perf_counter() - wall) / steps, 'faults': (after.ru_minflt - usage.ru_minflt) / steps,
            'sys_s': (after.ru_stime - usage.ru_stime) / steps, 'peak_rss_mib': after.ru_maxrss / 1024,
            'weights_checksum': checksum, 'threads': torch.get_num_threads()}


def measure(method: str, setting: str, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items()  # glibc's own malloc in both arms, settings only from the worker
           if not k.startswith('MALLOC_') and k not in ('GLIBC_TUNABLES', 'TIMM_CFF_MALLOC', 'LD_PRELOAD')}
    if args.threads:
        env['OMP_NUM_THREADS'] = str(args.threads)
    command = [sys.executable, __file__, '--worker', method, setting, '--depth', str(args.depth),
               '--batch', str(args.batch), '--steps', str(args.steps)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f'# glibc malloc: default against timm-cff\'s settings (ViT[128 4 {args.depth}]-shaped, batch '
             f'{args.batch}, {args.threads or "all"} thread(s), {args.steps} timed steps per process, '
             f'{args.repeats} processes per cell, median)', '',
             '| method | setting | CPU s / step | wall s / step | page faults / step | system s / step | '
             'peak RSS MiB | tuned / default CPU time (paired) | same weights |', '|---' * 9 + '|']
    for method in args.methods:
        cells = {s: [r for r in rows if r['method'] == method and r['setting'] == s] for s in SETTINGS}
        ratios = [t['cpu_s'] / d['cpu_s'] for d, t in zip(cells['default'], cells['tuned'])]
        same = len({r['weights_checksum'] for r in cells['default'] + cells['tuned']}) == 1
        for setting in SETTINGS:
            med = {k: statistics.median(r[k] for r in cells[setting])
                   for k in ('cpu_s', 'wall_s', 'faults', 'sys_s', 'peak_rss_mib')}
            ratio = f'{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})' \
                if setting == 'tuned' else ''
            lines.append(f'| {method} | {setting} | {med["cpu_s"]:.3f} | {med["wall_s"]:.3f} | {med["faults"]:,.0f} | '
                         f'{med["sys_s"]:.3f} | {med["peak_rss_mib"]:,.0f} | {ratio} | {"yes" if same else "NO"} |')
    return '\n'.join(lines) + '\n'


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--methods', default='cff_2view_unfused,bp', help='harness methods, comma-separated')
    p.add_argument('--depth', type=int, default=5)
    p.add_argument('--batch', type=int, default=512)
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--repeats', type=int, default=3, help='processes per (method, setting), alternating')
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--out', default=None, help='output prefix for .json/.md')
    p.add_argument('--worker', nargs=2, metavar=('METHOD', 'SETTING'), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.depth, args.batch, args.steps)))
        return
    args.methods = args.methods.split(',')
    rows = []
    for repeat in range(args.repeats):
        for method in args.methods:
            order = SETTINGS if repeat % 2 == 0 else SETTINGS[::-1]  # a slow spell of the machine hits both alike
            for setting in order:
                rows.append({'method': method, 'setting': setting, 'repeat': repeat,
                             **measure(method, setting, args)})
    markdown = report(rows, args)
    print(markdown)
    if args.out:
        from harness import write_report
        write_report(args.out, {'args': {k: v for k, v in vars(args).items() if k != 'worker'}, 'rows': rows},
                     markdown)


if __name__ == '__main__':
    main()
