"""The CFF+M step of the CIFAR-10 recipe eagerly and with ``torch.compile`` per block (``--train.compile=true``),
interleaved in one process, plus the seconds the first compiled step takes (the compilation).

    PYTHONPATH=. python benchmarks/compile_step.py --threads 1 --out benchmarks/results/compile_step_cpu_1thread

Both trainers start from the same weights (ViT[128 4 5], margins 0.4 -> 0.1, τ 0.15, the CLI's view passes) and see
the same batch; the order alternates every repeat.
"""
import argparse
import statistics
import time

import torch

from harness import BenchSetup, create_bench_batch, create_bench_model, write_report
from timm_cff import LocalTrainer, linear_margins


def trainer(setup: BenchSetup, compiled: bool) -> LocalTrainer:
    return LocalTrainer(create_bench_model(setup), loss='marginal_supcon', margins=linear_margins(0.4, 0.1), lr=4e-3,
                        loss_kwargs={'temperature': 0.15}, compile_stages=compiled)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--threads', type=int, default=None, help='torch threads; default: torch default')
    p.add_argument('--batch-size', type=int, default=512, help='the recipe\'s batch (default 512)')
    p.add_argument('--repeats', type=int, default=6)
    p.add_argument('--out', help='write OUT.json and OUT.md')
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = BenchSetup(batch_size=args.batch_size)
    views, labels = create_bench_batch(setup)
    runs = {'eager': trainer(setup, False), 'compiled': trainer(setup, True)}
    t0 = time.perf_counter()
    runs['compiled'].step(views, labels)
    compile_s = time.perf_counter() - t0
    runs['eager'].step(views, labels)
    seconds = {name: [] for name in runs}
    for r in range(args.repeats):
        for name in list(runs)[r % 2:] + list(runs)[:r % 2]:
            t0 = time.perf_counter()
            runs[name].step(views, labels)
            seconds[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    result = {'threads': torch.get_num_threads(), 'batch_size': args.batch_size, 'first_compiled_step_s': compile_s,
              'step_s': seconds, 'median_s': median, 'compiled_over_eager': median['compiled'] / median['eager'],
              'torch': torch.__version__}
    markdown = (f"CFF+M step, ViT[128 4 5], batch {args.batch_size} x 2 views, {result['threads']} thread(s), "
                f"torch {torch.__version__}: first compiled step {compile_s:.1f} s; then median eager "
                f"{median['eager']:.2f} s, compiled {median['compiled']:.2f} s (x{result['compiled_over_eager']:.3f}, "
                f"{args.repeats} interleaved steps each)\n")
    print(markdown, end='')
    if args.out:
        write_report(args.out, result, markdown)
    return result


if __name__ == '__main__':
    main()
