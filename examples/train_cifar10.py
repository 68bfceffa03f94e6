"""CFF+M on CIFAR-10 with the Python API only: a stock timm ViT, LocalTrainer, the linear probe, a timm export.

    python examples/train_cifar10.py --data ../shared/data/cifar10_jpeg --steps 200 --train-images 10000

The data folder holds train.npz / test.npz (x uint8 [N, 32, 32, 3], y int64 [N]). Prints every block's loss, the
probe's test accuracy and where the export went; `timm.create_model('local-dir:OUT', pretrained=True)` reloads it.
"""
import argparse
import time

import timm
import torch

import timm_cff
from timm_cff.data import STATS, BatchAugment, ImageLoader, load_dataset, split_train_val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', required=True, help='folder with train.npz and test.npz')
    parser.add_argument('--steps', type=int, default=200, help='stage-1 updates')
    parser.add_argument('--train-images', type=int, default=10000, help='size of the training subset')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--probe-epochs', type=int, default=5)
    parser.add_argument('--out', default='runs/cifar10_example_export')
    args = parser.parse_args()
    torch.manual_seed(0)

    full, test = load_dataset('npz', args.data)
    train_idx, val_idx = split_train_val(len(full), 0.1, seed=1)  # the paper's 90/10 split
    train, val = full.subset(train_idx[:args.train_images]), full.subset(val_idx[:2000])
    mean, std = STATS['cifar10']
    augment = BatchAugment(mean, std, padding=4, hflip=True)  # RandomCrop(32, pad 4) + flip, as the paper's RC
    views = ImageLoader(train, args.batch_size, augment, num_views=2, shuffle=True, seed=0)

    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=4, embed_dim=128, depth=5, num_heads=4,
                            mlp_ratio=2, num_classes=10, global_pool='avg', class_token=False)
    trainer = timm_cff.LocalTrainer(vit, loss='marginal_supcon', margins=timm_cff.linear_margins(0.4, 0.1), lr=4e-3)

    start, step, first = time.perf_counter(), 0, None
    while step < args.steps:
        views.set_epoch(step)
        for (view1, view2), y in views:
            out = trainer.step((view1, view2), y)
            first = first or {k: float(v) for k, v in out.items()}
            step += 1
            if step % 25 == 0 or step == args.steps:
                blocks = ' '.join(f'{float(out[f"loss_stage{i}"]):.3f}' for i in range(trainer.num_stages))
                print(f'step {step}: block losses {blocks} ({time.perf_counter() - start:.0f}s)', flush=True)
            if step == args.steps:
                break
    print('first step block losses', ' '.join(f'{first[f"loss_stage{i}"]:.3f}' for i in range(trainer.num_stages)))

    probe_train = ImageLoader(train, 256, augment, shuffle=True, seed=1)
    probe_val = ImageLoader(val, 256, augment, shuffle=True, seed=2)
    result = timm_cff.train_linear_probe(vit, probe_train, probe_val, epochs=args.probe_epochs, lr=2e-3)
    test_loader = ImageLoader(test, 512, BatchAugment(mean, std, train=False))
    metrics = timm_cff.evaluate_accuracy(vit, test_loader, topk=(1, 5))
    print(f'probe best epoch {result.best_epoch}; test top-1 {metrics["top1"]:.2f}%, top-5 {metrics["top5"]:.2f}%')
    folder = timm_cff.export_model(vit, args.out, data_config=dict(mean=mean, std=std))
    print(f'exported to {folder}; total {time.perf_counter() - start:.0f}s')


if __name__ == '__main__':
    main()
