"""Step time and peak memory of CFF against backpropagation, in one run; writes JSON, Markdown and (optionally) a plot.

    PYTHONPATH=. python benchmarks/run_benchmark.py --out benchmarks/results/cpu          # the full benchmark
    PYTHONPATH=. python benchmarks/run_benchmark.py --quick --out /tmp/bench_quick        # a few steps, tiny model

See docs/performance.md for what is measured and how; the measuring code is ``benchmarks/harness.py``.
"""
import argparse
import json
import logging
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from timm_cff.experiment.rundir import cpu_model

from harness import METHODS, BenchSetup, count_flops, memory_vs_depth, time_methods, write_report

TARGETS = {  # the performance targets on ViT[128 4 5], batch 256, 32x32 inputs
    'cff_2view_time_ratio': 2.0, 'cff_1view_time_ratio': 1.0, 'activation_ratio_at_16': 0.35, 'activation_growth': 0.10,
}
QUICK = dict(embed_dim=32, num_heads=2, depth=2, img_size=16, batch_size=8)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--threads', type=int, default=None, help='torch threads (CPU); default: torch default')
    p.add_argument('--embed-dim', type=int, default=128)
    p.add_argument('--num-heads', type=int, default=4)
    p.add_argument('--depth', type=int, default=5, help='depth of the timing model')
    p.add_argument('--img-size', type=int, default=32)
    p.add_argument('--patch-size', type=int, default=4)
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--methods', default='cff_2view,cff_2view_unfused,cff_1view,ff,bp,bp_ckpt',
                   help=f'of {sorted(METHODS)}')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--repeats', type=int, default=9)
    p.add_argument('--steps', type=int, default=1, help='steps per timed repeat')
    p.add_argument('--memory-methods', default='cff_2view,cff_1view,bp,bp_ckpt')
    p.add_argument('--memory-depths', default='4,8,16,32')
    p.add_argument('--memory-repeats', type=int, default=3)
    p.add_argument('--malloc', default='mmap', choices=['mmap', 'default'],
                   help="CPU memory: 'mmap' = resident set follows live tensors; 'default' = glibc defaults")
    p.add_argument('--autocast-dtype', default=None, choices=[None, 'bfloat16', 'float16'])
    p.add_argument('--compile', action='store_true', help='torch.compile every block, for every method (timing)')
    p.add_argument('--skip-time', action='store_true')
    p.add_argument('--skip-memory', action='store_true')
    p.add_argument('--quick', action='store_true', help='tiny model, a few steps: checks that the benchmark runs')
    p.add_argument('--plot', action='store_true', help='also write <out>.png (needs the plot extra)')
    p.add_argument('--out', default='benchmarks/results/benchmark', help='output prefix for .json/.md(/.png)')
    p.add_argument('--from-json', default=None, help='re-render the Markdown (and plot) of a saved result')
    return p.parse_args(argv)


def _csv(text: str, cast=str) -> list:
    return [cast(v) for v in text.split(',') if v]


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = BenchSetup(args.embed_dim, args.num_heads, args.depth, args.img_size, args.patch_size,
                       batch_size=args.batch_size, device=args.device, autocast_dtype=args.autocast_dtype,
                       compile=args.compile)
    depths = _csv(args.memory_depths, int)
    repeats = dict(warmup=args.warmup, repeats=args.repeats, steps=args.steps, memory_repeats=args.memory_repeats)
    if args.quick:
        setup, depths = replace(setup, **QUICK), [1, 2]
        repeats = dict(warmup=1, repeats=2, steps=1, memory_repeats=1)
    result = {'setup': asdict(setup), 'environment': _environment(args), 'repeats': repeats, 'malloc': args.malloc}
    start = time.perf_counter()
    if not args.skip_time:
        result['time'] = time_methods(setup, _csv(args.methods), warmup=repeats['warmup'],
                                      repeats=repeats['repeats'], steps=repeats['steps'])
        result['flops'] = count_flops(setup, _csv(args.methods))
    if not args.skip_memory:
        result['memory'] = memory_vs_depth(setup, _csv(args.memory_methods), depths,
                                           repeats=repeats['memory_repeats'], threads=args.threads,
                                           malloc=args.malloc)
    result['wall_time_s'] = time.perf_counter() - start
    result['targets'] = check_targets(result)
    return result


def _environment(args) -> dict:
    return {'torch': torch.__version__, 'python': platform.python_version(), 'machine': platform.machine(),
            'cpu_model': cpu_model(), 'cpu_capability': torch.backends.cpu.get_cpu_capability(),
            'threads': torch.get_num_threads(), 'device': args.device,
            'cuda_device': torch.cuda.get_device_name() if args.device.startswith('cuda') else None,
            'command': ' '.join(sys.argv)}


def check_targets(result: dict) -> dict:
    """The measured quantities behind each target, and whether the target is met."""
    out, timing, memory = {}, result.get('time', {}), result.get('memory', {})
    for method, target in (('cff_2view', 'cff_2view'), ('cff_2view_unfused', 'cff_2view'), ('cff_1view', 'cff_1view')):
        if 'wall_ratio' in timing.get(method, {}):
            value, limit = timing[method]['wall_ratio']['median'], TARGETS[f'{target}_time_ratio']
            out[f'{method}_time_ratio'] = {'value': value, 'target': limit, 'met': value <= limit}
    cff, bp = memory.get('cff_2view', {}), memory.get('bp', {})
    depths = sorted(cff)
    if 16 in cff and 16 in bp:
        value = cff[16]['activation_bytes'] / bp[16]['activation_bytes']
        out['activation_ratio_at_16'] = {'value': value, 'target': TARGETS['activation_ratio_at_16'],
                                         'met': value <= TARGETS['activation_ratio_at_16']}
    if len(depths) > 1:
        first, last = cff[depths[0]]['activation_bytes'], cff[depths[-1]]['activation_bytes']
        value = last / first - 1
        out['activation_growth'] = {'value': value, 'target': TARGETS['activation_growth'], 'depths': [
            depths[0], depths[-1]], 'met': value < TARGETS['activation_growth']}
    return out


def to_markdown(result: dict) -> str:
    s, lines = result['setup'], []
    lines.append(f"ViT[{s['embed_dim']} {s['num_heads']} L], batch {s['batch_size']}, {s['img_size']}x{s['img_size']} "
                 f"inputs, device {s['device']}, {result['environment']['threads']} threads, autocast "
                 f"{s['autocast_dtype'] or 'off'}, compile {'on' if s['compile'] else 'off'}, torch "
                 f"{result['environment']['torch']}.\n")
    if 'time' in result:
        lines += [f"Step time at depth {s['depth']} (median of {result['repeats']['repeats']} interleaved repeats; "
                  'quartiles in brackets; ratios paired per repeat):\n',
                  '| method | wall ms | CPU ms | wall / BP | CPU time / BP | GFLOP | GFLOP / BP |',
                  '|---|---|---|---|---|---|---|']
        flops = result.get('flops', {})
        for method, r in result['time'].items():
            gflop, flop_ratio = '', ''
            if method in flops:
                gflop = f'{flops[method] / 1e9:.2f}'
                flop_ratio = f"{flops[method] / flops['bp']:.3f}" if flops.get('bp') else ''
            lines.append(f"| {method} | {_ms(r['wall'])} | {_ms(r['cpu'])} | {_ratio(r.get('wall_ratio'))} | "
                         f"{_ratio(r.get('cpu_ratio'))} | {gflop} | {flop_ratio} |")
    if 'memory' in result:
        how = 'max_memory_allocated' if s['device'].startswith('cuda') else f"resident set, malloc={result['malloc']}"
        lines += _memory_table(result['memory'], how)
    if result.get('targets'):
        lines += ['\nTargets:\n', '| quantity | measured | target | met |', '|---|---|---|---|']
        for name, t in result['targets'].items():
            lines.append(f"| {name} | {t['value']:.3f} | {'<' if name == 'activation_growth' else '<='} "
                         f"{t['target']} | {'yes' if t['met'] else 'no'} |")
    return '\n'.join(lines) + '\n'


def _ms(stats: dict) -> str:
    return f"{stats['median'] * 1e3:.0f} [{stats['q1'] * 1e3:.0f}, {stats['q3'] * 1e3:.0f}]"


def _ratio(stats: dict | None) -> str:
    return '' if stats is None else f"{stats['median']:.2f} [{stats['q1']:.2f}, {stats['q3']:.2f}]"


def _memory_table(memory: dict, how: str) -> list[str]:
    methods = list(memory)
    depths = sorted({d for m in methods for d in memory[m]})
    lines = [f'\nPeak memory of one training step in MiB, total / activations ({how}; median of fresh processes); '
             'the ratio column is CFF two-view activations / BP activations:\n',
             '| depth | ' + ' | '.join(methods) + ' | cff_2view / bp |', '|---' * (len(methods) + 2) + '|']
    for d in depths:
        cells = [f"{memory[m][d]['total_bytes'] / 2**20:.0f} / {memory[m][d]['activation_bytes'] / 2**20:.0f}"
                 if d in memory[m] else '' for m in methods]
        ratio = ''
        if d in memory.get('cff_2view', {}) and d in memory.get('bp', {}):
            ratio = f"{memory['cff_2view'][d]['activation_bytes'] / memory['bp'][d]['activation_bytes']:.3f}"
        lines.append(f'| {d} | ' + ' | '.join(cells) + f' | {ratio} |')
    return lines


def plot(result: dict, path: Path) -> None:
    """Activation and total peak versus depth per method, and step time relative to BP."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method, by_depth in result.get('memory', {}).items():
        depths = sorted(by_depth)
        for ax, key in zip(axes[:2], ('activation_bytes', 'total_bytes')):
            ax.plot(depths, [by_depth[d][key] / 2**20 for d in depths], marker='o', label=method)
    depths = sorted({d for by_depth in result.get('memory', {}).values() for d in by_depth})
    for ax, title in zip(axes[:2], ('activation peak', 'total peak')):
        ax.set(xlabel='depth L', ylabel='MiB', title=title, yscale='log')
        ax.set_xscale('log', base=2)
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.legend()
    timed = {m: r['wall_ratio'] for m, r in result.get('time', {}).items() if 'wall_ratio' in r}
    axes[2].bar(list(timed), [r['median'] for r in timed.values()],
                yerr=[[r['median'] - r['q1'] for r in timed.values()], [r['q3'] - r['median'] for r in timed.values()]])
    axes[2].set(ylabel='step time / BP', title='step time relative to BP')
    axes[2].tick_params(axis='x', rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def load_result(path: str) -> dict:
    """A saved result with its depth keys turned back into integers.

    Results saved before FF was timed hold ``{'skipped': reason}`` for it; those entries are dropped.
    """
    result = json.loads(Path(path).read_text())
    if 'time' in result:
        result['time'] = {m: r for m, r in result['time'].items() if 'skipped' not in r}
    for method, by_depth in result.get('memory', {}).items():
        result['memory'][method] = {int(k): v for k, v in by_depth.items()}
    return result


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args = parse_args(argv)
    result = load_result(args.from_json) if args.from_json else run(args)
    out = Path(args.out)
    markdown = to_markdown(result)
    write_report(out, None if args.from_json else result, markdown)
    if args.plot:
        plot(result, out.with_suffix('.png'))
    print(markdown)
    print(f"wrote {out}.* (the measurements took {result['wall_time_s']:.0f} s)")


if __name__ == '__main__':
    main()
