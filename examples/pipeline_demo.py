"""Layer-pipelined CFF training across processes (CFF paper, Sec. 5.1), launched with torchrun.

    # the reference: one process, sequential LocalTrainer
    python examples/pipeline_demo.py --stages 1
    # 2 stage groups, one process each (gloo on CPU, NCCL on GPUs)
    torchrun --standalone --nproc-per-node 2 examples/pipeline_demo.py --stages 2
    # 2 stage groups x 2 data-parallel replicas
    torchrun --standalone --nproc-per-node 4 examples/pipeline_demo.py --stages 2

Trains ViT[E H L] (default ViT[240 6 7], the paper's largest) with CFF+M on the first ``--batches`` batches of
CIFAR-10 (random crop and flip, two views) and prints one line per epoch. The stage groups are balanced by the stage
costs rank 0 measures. With ``--checkpoint-dir`` every epoch is checkpointed and a relaunch resumes from the last
complete checkpoint. ``--json`` writes the timings that ``benchmarks/pipeline_timing.py`` compares with the cost model.
"""
import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.distributed as dist

from timm_cff import LocalTrainer
from timm_cff.pipeline import (PipelineWorker, init_distributed, latest_checkpoint, load_pipeline_checkpoint,
                               measure_stage_costs, prune_checkpoints, save_pipeline_checkpoint)

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    data = Path(os.environ.get('TIMM_CFF_DATA', Path(__file__).resolve().parents[2] / 'shared' / 'data'))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', type=Path, default=data / 'cifar10_jpeg' / 'train.npz', help='CIFAR-10 train.npz')
    p.add_argument('--stages', type=int, default=1, help='stage groups K; the world size must be K x replicas')
    p.add_argument('--embed-dim', type=int, default=240)
    p.add_argument('--heads', type=int, default=6)
    p.add_argument('--depth', type=int, default=7)
    p.add_argument('--batch', type=int, default=32, help='global batch size (split over replicas)')
    p.add_argument('--batches', type=int, default=16, help='batches per epoch')
    p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--lr', type=float, default=4e-3)
    p.add_argument('--seed', type=int, default=1)
    p.add_argument('--threads', type=int, default=1, help='CPU threads per process')
    p.add_argument('--max-in-flight', type=int, default=2)
    p.add_argument('--checkpoint-dir', type=Path, default=None)
    p.add_argument('--json', type=Path, default=None, help='write timings here (rank 0)')
    return p.parse_args(argv)


def two_view_batches(path: Path, num_batches: int, batch: int, seed: int) -> list:
    """The first images of CIFAR-10, each as two random pad-4 crops with flips: ``[((v1, v2), labels), ...]``."""
    data = np.load(path)
    n = num_batches * batch
    x = torch.from_numpy(data['x'][:n]).permute(0, 3, 1, 2).float().div(255)
    x = (x - torch.tensor(CIFAR_MEAN)[:, None, None]) / torch.tensor(CIFAR_STD)[:, None, None]
    y = torch.from_numpy(data['y'][:n])
    g = torch.Generator().manual_seed(seed)

    def view(images):
        padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
        i, j = torch.randint(0, 9, (2,), generator=g).tolist()
        out = padded[..., i:i + 32, j:j + 32]
        return out.flip(-1) if torch.rand(1, generator=g).item() < 0.5 else out
    return [((view(x[s:s + batch]), view(x[s:s + batch])), y[s:s + batch]) for s in range(0, n, batch)]


def shard(batches: list, replica: int, num_replicas: int) -> list:
    """This replica's contiguous slice of every global batch."""
    def part(t):
        size = len(t) // num_replicas
        return t[replica * size:(replica + 1) * size]
    return [((part(v1), part(v2)), part(y)) for (v1, v2), y in batches]


def build_trainer(args: argparse.Namespace) -> LocalTrainer:
    torch.manual_seed(args.seed)
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=4, embed_dim=args.embed_dim,
                              depth=args.depth, num_heads=args.heads, mlp_ratio=2, num_classes=10,
                              global_pool='avg', class_token=False)
    return LocalTrainer(model, lr=args.lr)


def measure_transfer(worker: PipelineWorker, shape: tuple[int, ...], repeats: int = 5) -> list[float]:
    """Seconds to move one activation between each pair of neighbouring groups (replica 0), measured by the receiver."""
    times = []
    for g in range(worker.num_groups - 1):
        tensor = torch.zeros(shape)
        elapsed = 0.0
        for attempt in range(repeats + 1):  # attempt 0 sets up the connection
            dist.barrier()
            if worker.replica == 0 and worker.group_index == g:
                dist.send(tensor, g + 1)
            elif worker.replica == 0 and worker.group_index == g + 1:
                start = time.perf_counter()
                dist.recv(tensor, g)
                elapsed += (time.perf_counter() - start) if attempt else 0.0
        box = [elapsed / repeats]
        dist.broadcast_object_list(box, src=g + 1)
        times.append(box[0])
    return times


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    distributed = 'RANK' in os.environ
    if args.stages > 1 and not distributed:
        raise SystemExit(f'--stages {args.stages} needs {args.stages} processes: torchrun --standalone '
                         f'--nproc-per-node {args.stages} examples/pipeline_demo.py --stages {args.stages}')
    device = init_distributed() if distributed else torch.device('cpu')
    rank = dist.get_rank() if distributed else 0
    trainer = build_trainer(args)
    batches = two_view_batches(args.data, args.batches, args.batch, args.seed)
    costs = measure_stage_costs(trainer, *batches[0]) if rank == 0 else None
    runner, data, transfers = trainer, batches, []
    if distributed:
        runner = PipelineWorker(trainer, args.stages, costs=costs, device=device, max_in_flight=args.max_in_flight)
        data = shard(batches, runner.replica, runner.num_replicas) if runner.reads_data else None
        tokens = (32 // 4) ** 2
        transfers = measure_transfer(runner, (2 * args.batch // runner.num_replicas, tokens, args.embed_dim))
        if args.checkpoint_dir and (latest := latest_checkpoint(args.checkpoint_dir)):
            load_pipeline_checkpoint(runner, latest)
    epoch_times, busy, metrics = [], [], {}
    while runner.epoch < args.epochs:
        if distributed:
            dist.barrier()
        start = time.perf_counter()
        metrics = runner.train_epoch(data)
        epoch_times.append(time.perf_counter() - start)
        if distributed:  # each rank's compute time in the epoch: the rest it waited for its neighbours
            busy.append([None] * dist.get_world_size())
            dist.all_gather_object(busy[-1], runner.busy_s)
        if args.checkpoint_dir and distributed:
            save_pipeline_checkpoint(runner, args.checkpoint_dir / f'epoch{runner.epoch:04d}')
            if rank == 0:
                prune_checkpoints(args.checkpoint_dir, keep=2)
        if rank == 0:
            print(f'epoch {runner.epoch}: {epoch_times[-1]:.2f} s, loss {metrics["loss"]:.4f}, last stage '
                  f'{metrics[f"loss_stage{args.depth - 1}"]:.4f}', flush=True)
    if rank == 0 and args.json:
        args.json.write_text(json.dumps({
            'world_size': dist.get_world_size() if distributed else 1, 'stages': args.stages,
            'stage_counts': runner.stage_counts if distributed else [args.depth], 'stage_costs': costs,
            'transfers': transfers, 'num_batches': args.batches, 'epoch_times': epoch_times, 'busy_s': busy,
            'metrics': metrics,
        }, indent=2))
    if distributed:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
