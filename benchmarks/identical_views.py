"""CFF step time when the two views are identical (no augmentation: Table 1's MNIST MLP rows): two equal tensors
(the general path, 2B rows and [2B, 2B] similarities) against one tensor given twice (one B-row pass per stage and
the loss on [B, B] with multiplicities), interleaved in one process.

    PYTHONPATH=. python benchmarks/identical_views.py --threads 1 --out benchmarks/results/identical_views_cpu_1thread

Both paths start from the same weights and see the same batches; the script also reports the largest difference
between their first-step per-block losses and R(k) fractions (the same numbers up to float rounding).
"""
import argparse
import copy
import statistics
import time

import torch

from harness import BenchSetup, create_bench_model, write_report
from timm_cff import LocalTrainer
from timm_cff.analysis import clamped_fraction_metric
from timm_cff.families import create_mlp


def build_model(name: str) -> torch.nn.Module:
    if name == 'mlp':  # MNIST MLP[500 3]
        return create_mlp(500, 3, 10, img_size=28)
    return create_bench_model(BenchSetup())  # CIFAR-10 ViT[128 4 5]


def measure(model_name: str, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model(model_name)
    trainers = {name: LocalTrainer(copy.deepcopy(model), stage_metrics={'clamped': clamped_fraction_metric})
                for name in ('two_tensors', 'one_tensor')}
    size = (1, 28, 28) if model_name == 'mlp' else (3, 32, 32)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, *size, generator=g), torch.randint(0, 10, (batch,), generator=g))
               for _ in range(repeats + 1)]
    times, gap = {name: [] for name in trainers}, None
    for r, (x, y) in enumerate(batches):
        out = {}
        for name, trainer in trainers.items():
            views = (x, x.clone()) if name == 'two_tensors' else (x, x)
            start = time.perf_counter()
            out[name] = trainer.step(views, y)
            elapsed = time.perf_counter() - start
            if r:  # the first round warms up
                times[name].append(elapsed)
        if not r:  # the first step starts from the same weights; later ones drift as Adam amplifies rounding
            gap = max(abs(float(out['two_tensors'][k] - out['one_tensor'][k])) for k in out['one_tensor'])
    result = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return {'ms': result, 'speedup': result['two_tensors'] / result['one_tensor'], 'first_step_max_difference': gap}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', default='mlp,vit', help='mlp (MNIST MLP[500 3]) and/or vit (ViT[128 4 5])')
    p.add_argument('--batch', type=int, default=512)
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--repeats', type=int, default=10)
    p.add_argument('--out', default=None, help='output prefix for .json/.md')
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {m: measure(m, args.batch, args.repeats) for m in args.models.split(',')}
    lines = [f'CFF+M step with identical views, batch {args.batch}, {torch.get_num_threads()} threads, median of '
             f'{args.repeats} interleaved steps:\n',
             '| model | two equal tensors ms | one tensor twice ms | speed-up | '
             'first step: max difference of the per-block losses and R(k) |',
             '|---|---|---|---|---|']
    for m, r in results.items():
        lines.append(f"| {m} | {r['ms']['two_tensors']:.1f} | {r['ms']['one_tensor']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['first_step_max_difference']:.1e} |")
    markdown = '\n'.join(lines) + '\n'
    print(markdown)
    if args.out:
        write_report(args.out, {'args': vars(args), 'results': results}, markdown)


if __name__ == '__main__':
    main()
