"""Shared fixtures: the numeric fixture of cff-method.md §4.6 and tiny timm ViTs that run in milliseconds on CPU."""
import numpy as np
import pytest
import timm
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def cff_fixture():
    """labels [16], f1 [16, 8], f2 [16, 8] in float64, drawn in the documented order."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 16)
    f1 = rng.standard_normal((16, 8))
    f2 = f1 + 0.3 * rng.standard_normal((16, 8))
    return torch.from_numpy(labels), torch.from_numpy(f1), torch.from_numpy(f2)


def make_vit(depth: int = 3, embed_dim: int = 32, img_size: int = 16, patch_size: int = 4, num_classes: int = 5,
             **kwargs) -> torch.nn.Module:
    """A CFF-configured timm ViT (avg pool, no class token, mlp_ratio 2), tiny enough for unit tests."""
    args = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=2,
                mlp_ratio=2, num_classes=num_classes, global_pool='avg', class_token=False)
    args.update(kwargs)
    return timm.create_model('vit_tiny_patch16_224', **args)


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return make_vit()


def make_batch(batch: int = 8, num_classes: int = 5, img_size: int = 16, views: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = tuple(torch.randn(batch, 3, img_size, img_size, generator=g) for _ in range(views))
    return xs, torch.randint(0, num_classes, (batch,), generator=g)
