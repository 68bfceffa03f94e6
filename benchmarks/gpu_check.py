"""Device checks of the trainer: the same update on the accelerator as on the CPU, fused views equal per-view
passes there, and a bf16-autocast step that stays finite. Prints one line per check; exits 1 if one fails.

    python benchmarks/gpu_check.py --device cuda
    python benchmarks/gpu_check.py --device cpu      # the dry run: every check but the CPU/device comparison
"""
import argparse
import copy
import sys

import timm
import torch

from timm_cff import LocalTrainer


def vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=4, embed_dim=128, depth=5, num_heads=4,
                             mlp_ratio=2, num_classes=10, global_pool='avg', class_token=False)


def step(model: torch.nn.Module, device: str, views, labels, **kwargs) -> dict[str, float]:
    trainer = LocalTrainer(copy.deepcopy(model).to(device), **kwargs)
    out = trainer.step(tuple(v.to(device) for v in views), labels.to(device))
    return {k: float(v) for k, v in out.items()}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument('--device', default='cuda')
    p.add_argument('--batch-size', type=int, default=128)
    args = p.parse_args()
    g = torch.Generator().manual_seed(1)
    views = tuple(torch.randn(args.batch_size, 3, 32, 32, generator=g) for _ in range(2))
    labels = torch.randint(0, 10, (args.batch_size,), generator=g)
    model, failed = vit(), 0

    def check(name: str, ok: bool, detail: str) -> None:
        nonlocal failed
        failed += not ok
        print(f'{"ok  " if ok else "FAIL"} {name}: {detail}', flush=True)

    fused = step(model, args.device, views, labels, fuse_views=True)
    split = step(model, args.device, views, labels, fuse_views=False)
    gap = max(abs(fused[k] - split[k]) for k in fused)
    check('fused views = one pass per view', gap < 1e-4, f'largest loss difference {gap:.2e}')
    if args.device != 'cpu':
        cpu = step(model, 'cpu', views, labels)
        gap = max(abs(fused[k] - cpu[k]) for k in fused)
        check(f'{args.device} step = CPU step', gap < 1e-3, f'largest loss difference {gap:.2e}')
    bf16 = step(model, args.device, views, labels, autocast_dtype='bfloat16')
    finite = all(torch.isfinite(torch.tensor(v)) for v in bf16.values())
    gap = max(abs(bf16[k] - fused[k]) for k in fused)
    check('bf16 autocast step', finite and gap < 0.05, f'finite {finite}, largest loss difference to fp32 {gap:.2e}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
