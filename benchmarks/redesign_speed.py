"""Step time before and after a change of the package: the two-view CFF step and the BP step of two checkouts,
timed in alternating short subprocesses.

    python benchmarks/redesign_speed.py --out benchmarks/results/redesign_speed_cpu_1thread
    python benchmarks/redesign_speed.py --old-root /path/to/checkout --old-python /path/to/venv/bin/python

Model: the CFF paper's CIFAR-10 ViT[128 4 5] as a stock timm model (32x32 inputs, patch 4, MLP ratio 2, token-mean
pooling), batch 128, random images, one thread per process. Each checkout runs in its own interpreter with its tree
first on ``PYTHONPATH``; every worker reports the ``timm_cff`` it imported, and a worker that imported another tree
fails the run. A worker builds ``LocalTrainer(model)`` (its defaults: CFF+M, two views, on CPU one pass per view)
and ``create_trainer('bp', model)`` (AdamW, cross-entropy, one view) on two copies of one model, warms both up, then
times ``--steps`` steps of each, alternating which goes first. Rounds alternate which checkout starts, so load from
other jobs spreads over both; after two rounds, no round starts that would end after ``--budget-s``. Reported per
checkout: the median wall and process-CPU milliseconds per step over all timed steps, with quartiles, and the CFF/BP
ratio paired per step within a process (the CPU-time columns are the ones to read on a shared machine).
"""
import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD_ROOT = '/work/long/wt'  # the checkout before the redesign (commit 320504b)
OLD_PYTHON = '/work/long/venv/bin/python'


# ------------------------------------------------------------------------------------------------ the worker
def worker(spec: dict) -> dict:
    """Runs in the checkout's interpreter: only ``LocalTrainer`` and ``create_trainer``, which both layouts export."""
    import torch
    torch.set_num_threads(spec['threads'])
    import timm
    import timm_cff
    from timm_cff import LocalTrainer, create_trainer

    def model():
        torch.manual_seed(0)
        return timm.create_model('vit_tiny_patch16_224', img_size=spec['img_size'], patch_size=spec['patch_size'],
                                 embed_dim=spec['embed_dim'], depth=spec['depth'], num_heads=spec['num_heads'],
                                 mlp_ratio=spec['mlp_ratio'], num_classes=10, global_pool='avg', class_token=False)

    g = torch.Generator().manual_seed(0)
    shape = (spec['batch_size'], 3, spec['img_size'], spec['img_size'])
    views = (torch.randn(*shape, generator=g), torch.randn(*shape, generator=g))
    labels = torch.randint(0, 10, (spec['batch_size'],), generator=g)
    cff, bp = LocalTrainer(model()), create_trainer('bp', model())
    steps = {'cff': lambda: cff.step(views, labels), 'bp': lambda: bp.step(views[0], labels)}
    for _ in range(spec['warmup']):
        for step in steps.values():
            step()
    out = {name: {'wall_ms': [], 'cpu_ms': []} for name in steps}
    for i in range(spec['steps']):
        for name in (('cff', 'bp') if i % 2 == 0 else ('bp', 'cff')):
            w0, c0 = time.perf_counter(), time.process_time()
            float(next(iter(steps[name]().values())))  # a statistic on the host, as a training loop reads it
            out[name]['wall_ms'].append(1e3 * (time.perf_counter() - w0))
            out[name]['cpu_ms'].append(1e3 * (time.process_time() - c0))
    return {'timm_cff': timm_cff.__file__, 'torch': torch.__version__, 'timm': timm.__version__,
            'threads': torch.get_num_threads(), **out}


# ------------------------------------------------------------------------------------------------ the driver
def run_worker(python: str, root: Path, spec: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    threads = str(spec['threads'])
    env.update(PYTHONPATH=str(root), OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, HF_HUB_OFFLINE='1')
    # The script is run by path, so sys.path[0] is benchmarks/ (no timm_cff there) and the tree on PYTHONPATH wins
    # over any installed timm_cff; cwd is the tree too, for code that reads relative paths.
    proc = subprocess.run([python, str(Path(__file__).resolve()), '--worker', json.dumps(spec)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f'The worker of {root} ({python}) failed:\n{proc.stderr[-3000:]}')
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not Path(result['timm_cff']).resolve().is_relative_to(root.resolve()):
        raise RuntimeError(f"The worker for {root} imported {result['timm_cff']}, another tree.")
    return result


def _tree(root: Path) -> dict:
    """The commit of a checkout, its uncommitted changes under timm_cff/ (read-only git calls) and a digest of the
    package's Python files as they were imported, so that numbers from a tree in flux name the state they measured."""
    def git(*args):
        proc = subprocess.run(['git', '-C', str(root), *args], capture_output=True, text=True)
        return proc.stdout if proc.returncode == 0 else ''
    digest = hashlib.sha256()
    for path in sorted((root / 'timm_cff').rglob('*.py')):
        digest.update(str(path.relative_to(root)).encode() + b'\0' + path.read_bytes())
    return {'root': str(root), 'commit': git('rev-parse', '--short', 'HEAD').strip() or None,
            'uncommitted_package_files': [line.strip() for line in git('status', '--porcelain', '--', 'timm_cff')
                                          .splitlines() if line.strip()],
            'package_sha256': digest.hexdigest()[:16]}


def _stats(values: list[float]) -> dict:
    q1, median, q3 = statistics.quantiles(values, n=4, method='inclusive') if len(values) > 1 else [values[0]] * 3
    return {'median': median, 'q1': q1, 'q3': q3, 'n': len(values)}


def summarise(runs: list[dict]) -> dict:
    out = {}
    for clock in ('wall_ms', 'cpu_ms'):
        cff = [v for r in runs for v in r['cff'][clock]]
        bp = [v for r in runs for v in r['bp'][clock]]
        ratio = [a / b for r in runs for a, b in zip(r['cff'][clock], r['bp'][clock])]  # paired within a process
        out[clock] = {'cff': _stats(cff), 'bp': _stats(bp), 'cff_over_bp': _stats(ratio),
                      'per_process_median_cff': [statistics.median(r['cff'][clock]) for r in runs],
                      'per_process_median_bp': [statistics.median(r['bp'][clock]) for r in runs]}
    return out


def to_markdown(result: dict) -> str:
    s, lines = result['spec'], []
    lines.append(f"ViT[{s['embed_dim']} {s['num_heads']} {s['depth']}], {s['img_size']}x{s['img_size']} inputs, patch "
                 f"{s['patch_size']}, MLP ratio {s['mlp_ratio']:g}, batch {s['batch_size']}, {s['threads']} thread(s) "
                 f"per process, {result['rounds']} rounds x {s['steps']} timed steps per method and checkout "
                 f"(after {s['warmup']} warm-up step(s)); CFF = `LocalTrainer(model)` two views, BP = "
                 "`create_trainer('bp', model)`.\n")
    lines += ['| checkout | commit | CFF wall ms | BP wall ms | CFF / BP wall | CFF CPU ms | BP CPU ms | '
              'CFF / BP CPU |', '|---|---|---|---|---|---|---|---|']
    for name in ('old', 'new'):
        r, tree = result[name], result['trees'][name]
        dirty = f" + {len(tree['uncommitted_package_files'])} uncommitted files (package digest " \
            f"{tree['package_sha256']})" if tree['uncommitted_package_files'] else ''
        dirty += ', changed during the run' if tree.get('changed_during_run') else ''
        w, c = r['wall_ms'], r['cpu_ms']
        lines.append(f"| {name} | {tree['commit']}{dirty} | {_ms(w['cff'])} | {_ms(w['bp'])} | "
                     f"{_ratio(w['cff_over_bp'])} | {_ms(c['cff'])} | {_ms(c['bp'])} | {_ratio(c['cff_over_bp'])} |")
    lines.append('\nNew / old (ratio of the medians):\n')
    lines += ['| step | wall | CPU |', '|---|---|---|']
    for method in ('cff', 'bp'):
        lines.append(f"| {method} | {result['new_over_old']['wall_ms'][method]:.3f} | "
                     f"{result['new_over_old']['cpu_ms'][method]:.3f} |")
    lines.append("\nMedian CPU ms of each process, in the order each checkout's processes ran:\n")
    for name in ('old', 'new'):
        c = result[name]['cpu_ms']
        lines.append(f"- {name}: CFF {', '.join(f'{v:.0f}' for v in c['per_process_median_cff'])}; "
                     f"BP {', '.join(f'{v:.0f}' for v in c['per_process_median_bp'])}")
    env = result['environment']
    lines.append(f"\nMachine: {env['cpu_count']} CPU cores shared with other jobs (1-minute load average "
                 f"{env['load_before'][0]:.1f} before, {env['load_after'][0]:.1f} after); the run took "
                 f"{result['wall_time_s']:.0f} s. Command: `{env['command']}`")
    return '\n'.join(lines) + '\n'


def _ms(stats: dict) -> str:
    return f"{stats['median']:.0f} [{stats['q1']:.0f}, {stats['q3']:.0f}]"


def _ratio(stats: dict) -> str:
    return f"{stats['median']:.2f} [{stats['q1']:.2f}, {stats['q3']:.2f}]"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--old-root', type=Path, default=Path(OLD_ROOT), help='the checkout before the change')
    p.add_argument('--old-python', default=OLD_PYTHON, help="the old checkout's interpreter")
    p.add_argument('--new-root', type=Path, default=ROOT, help='the checkout after the change (default: this one)')
    p.add_argument('--new-python', default=sys.executable, help="the new checkout's interpreter")
    p.add_argument('--rounds', type=int, default=6, help='at most this many rounds (one old and one new process)')
    p.add_argument('--budget-s', type=float, default=170,
                   help='after the first two rounds, start no round that would end after this many seconds')
    p.add_argument('--steps', type=int, default=2, help='timed steps per method and process')
    p.add_argument('--warmup', type=int, default=1, help='untimed steps per method and process')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--embed-dim', type=int, default=128)
    p.add_argument('--num-heads', type=int, default=4)
    p.add_argument('--depth', type=int, default=5)
    p.add_argument('--img-size', type=int, default=32)
    p.add_argument('--patch-size', type=int, default=4)
    p.add_argument('--mlp-ratio', type=float, default=2.0)
    p.add_argument('--out', default=None, help='output prefix for .json/.md')
    p.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return None
    spec = {k: getattr(args, k) for k in ('threads', 'batch_size', 'embed_dim', 'num_heads', 'depth', 'img_size',
                                          'patch_size', 'mlp_ratio', 'steps', 'warmup')}
    trees = {'old': (args.old_python, args.old_root), 'new': (args.new_python, args.new_root)}
    before = {name: _tree(root) for name, (_, root) in trees.items()}
    runs, start, load_before, round_s = {'old': [], 'new': []}, time.perf_counter(), os.getloadavg(), 0.0
    for r in range(args.rounds):
        elapsed = time.perf_counter() - start
        if r >= 2 and elapsed + round_s > args.budget_s:
            break
        t0 = time.perf_counter()
        for name in (('old', 'new') if r % 2 == 0 else ('new', 'old')):
            runs[name].append(run_worker(*trees[name], spec))
            last = runs[name][-1]
            cff, bp = (statistics.median(last[m]['cpu_ms']) for m in ('cff', 'bp'))
            print(f'round {r} {name} ({time.perf_counter() - start:.0f} s): CFF {cff:.0f} ms CPU, BP {bp:.0f} ms CPU',
                  file=sys.stderr, flush=True)
        round_s = max(round_s, time.perf_counter() - t0)
    result = {'spec': spec, 'rounds': len(runs['old']),
              'trees': {name: {**before[name], 'python': python} for name, (python, _) in trees.items()},
              **{name: summarise(r) for name, r in runs.items()}, 'runs': runs}
    result['new_over_old'] = {clock: {m: result['new'][clock][m]['median'] / result['old'][clock][m]['median']
                                      for m in ('cff', 'bp')} for clock in ('wall_ms', 'cpu_ms')}
    result['wall_time_s'] = time.perf_counter() - start
    for name, (_, root) in trees.items():
        result['trees'][name]['changed_during_run'] = _tree(root)['package_sha256'] != before[name]['package_sha256']
        if result['trees'][name]['changed_during_run']:
            print(f'warning: the {name} tree ({root}) changed during the run', file=sys.stderr)
    result['environment'] = {'cpu_count': os.cpu_count(), 'load_before': load_before, 'load_after': os.getloadavg(),
                             'python': platform.python_version(), 'machine': platform.machine(),
                             'command': 'python benchmarks/redesign_speed.py ' + ' '.join(argv or sys.argv[1:])}
    markdown = to_markdown(result)
    print(markdown)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix('.json').write_text(json.dumps(result, indent=1))
        out.with_suffix('.md').write_text(markdown)
    return result


if __name__ == '__main__':
    main()
