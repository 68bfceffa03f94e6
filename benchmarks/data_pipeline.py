"""Data pipeline throughput: timm-cff's batched on-device augmentation vs a per-image torchvision DataLoader.

Both produce the same thing: two independently augmented views (RandomCrop(32, padding=4) + horizontal flip, then
ToDtype + Normalize; optionally RandAugment(3, 14) first) of every CIFAR-10 training image, in batches of 512.
Runs the configurations interleaved, several rounds, and prints the median images/s of each.

    python benchmarks/data_pipeline.py --data ../shared/data/cifar10_jpeg --batches 20 --rounds 3
"""
import argparse
import json
import statistics
import time

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from timm_cff.data import STATS, BatchAugment, ImageLoader, load_dataset


class TwoViews(Dataset):
    """The official pipeline: a per-image v2 transform drawn twice per image."""

    def __init__(self, x, y, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return (self.transform(self.x[i]), self.transform(self.x[i])), self.y[i]


def images_per_second(loader, batches: int) -> float:
    start, count = time.perf_counter(), 0
    for i, ((v1, _), y) in enumerate(loader):
        count += len(y)
        if i + 1 == batches:
            break
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', required=True)
    parser.add_argument('--batches', type=int, default=20)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--randaugment', action='store_true')
    args = parser.parse_args()
    train, _ = load_dataset('npz', args.data)
    mean, std = STATS['cifar10']
    ra = [v2.RandAugment(3, 14)] if args.randaugment else []
    official = v2.Compose(ra + [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                                v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    dataset = TwoViews(train.x, train.y, official)
    configs = {
        'timm-cff ImageLoader (batched)': lambda: ImageLoader(
            train, 512, BatchAugment(mean, std, 4, True), num_views=2, shuffle=True, seed=0,
            randaugment=ra[0] if ra else None, workers=args.workers if ra else 0),
        'DataLoader per image, 0 workers': lambda: DataLoader(dataset, 512, shuffle=True, num_workers=0),
        f'DataLoader per image, {args.workers} workers': lambda: DataLoader(dataset, 512, shuffle=True,
                                                                             num_workers=args.workers),
    }
    results = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, make in configs.items():
            results[name].append(images_per_second(make(), args.batches))
    table = {name: round(statistics.median(v), 1) for name, v in results.items()}
    base = table['timm-cff ImageLoader (batched)']
    for name, value in table.items():
        print(f'{name:40s} {value:10.1f} images/s  (batched is {base / value:.2f}x this)' if value != base
              else f'{name:40s} {value:10.1f} images/s')
    print(json.dumps({'randaugment': args.randaugment, 'threads': torch.get_num_threads(), 'images_per_s': results}))


if __name__ == '__main__':
    main()
