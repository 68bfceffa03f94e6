"""The contrastive loss alone: the autograd reference against the memory-lean ``marginal_supcon_loss``.

    PYTHONPATH=. python benchmarks/bench_loss.py --sizes 512,2048,8192 --out benchmarks/results/loss_cpu

For each anchor count N = V·B: forward + backward time (median of interleaved repeats) and the bytes autograd keeps
between the forward and the backward pass (exact, from ``saved_tensors_hooks``); on CUDA also the peak allocated.
"""
import argparse
import statistics
import time

import torch

from harness import write_report
from timm_cff.loss import marginal_supcon_loss, pairwise_cosine, supcon_from_similarity


def reference(features, labels, temperature, margin):
    return supcon_from_similarity(*pairwise_cosine(features, labels), temperature, margin)


IMPLEMENTATIONS = {'autograd_reference': reference, 'lean': marginal_supcon_loss}


def saved_bytes(fn, features, labels) -> int:
    total = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        fn(features, labels, 0.15, 0.4)
    return sum(total)


def run_once(fn, features, labels) -> float:
    sync = torch.cuda.synchronize if features.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    fn(features, labels, 0.15, 0.4).backward()
    sync()
    return time.perf_counter() - start


def measure(size: int, dim: int, device: str, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    features = torch.randn(size // 2, 2, dim, generator=g).to(device).requires_grad_(True)
    labels = torch.randint(0, 10, (size // 2,), generator=g).to(device)
    times = {name: [] for name in IMPLEMENTATIONS}
    for r in range(repeats + 1):
        for name, fn in IMPLEMENTATIONS.items():
            elapsed = run_once(fn, features, labels)
            if r:  # the first round warms up
                times[name].append(elapsed)
    out = {}
    for name, fn in IMPLEMENTATIONS.items():
        out[name] = {'ms': 1e3 * statistics.median(times[name]), 'saved_bytes': saved_bytes(fn, features, labels)}
        if device.startswith('cuda'):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run_once(fn, features, labels)
            out[name]['cuda_peak_bytes'] = torch.cuda.max_memory_allocated() - base
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--sizes', default='512,2048,8192', help='anchor counts N = V·B')
    p.add_argument('--dim', type=int, default=128)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--out', default=None, help='output prefix for .json/.md')
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {n: measure(n, args.dim, args.device, args.repeats) for n in map(int, args.sizes.split(','))}
    lines = [f'Contrastive loss forward + backward, D = {args.dim}, device {args.device}, '
             f'{torch.get_num_threads()} threads:\n',
             '| N = V·B | reference ms | lean ms | reference kept MiB | lean kept MiB |', '|---|---|---|---|---|']
    for n, r in results.items():
        ref, lean = r['autograd_reference'], r['lean']
        lines.append(f"| {n} | {ref['ms']:.1f} | {lean['ms']:.1f} | {ref['saved_bytes'] / 2**20:.2f} | "
                     f"{lean['saved_bytes'] / 2**20:.2f} |")
    markdown = '\n'.join(lines) + '\n'
    print(markdown)
    if args.out:
        write_report(args.out, {'args': vars(args), 'results': results}, markdown)


if __name__ == '__main__':
    main()
