"""Batched augmentation on the training device: pad-and-crop, horizontal flip, normalisation.

These are torchvision's ``RandomCrop(size, padding=p)`` (fill 0), ``RandomHorizontalFlip(0.5)``,
``ToDtype(float32, scale=True)`` and ``Normalize`` applied to a whole uint8 batch at once with tensor ops, with
every random draw taken from an explicit CPU generator (so a run is reproducible on any device).
"""
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['random_crop', 'random_hflip', 'normalize', 'BatchAugment', 'STATS']

#: Normalisation statistics (official code: CIFAR-100 uses the CIFAR-10 values; MNIST the usual ones).
STATS = {
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    'cifar100': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    'mnist': ((0.1307,), (0.3081,)),
    'fashion_mnist': ((0.2860,), (0.3530,)),
}


def _rows(part: tuple[int, int] | None, batch: int) -> tuple[slice, int]:
    """``part = (start, total)``: ``x`` holds rows ``start..start+B`` of a batch of ``total``; draws are taken for
    all ``total`` rows, so a replica's slice is augmented as the whole batch would be in one process."""
    start, total = part or (0, batch)
    return slice(start, start + batch), total


def random_crop(x: Tensor, padding: int, generator: torch.Generator, part: tuple[int, int] | None = None) -> Tensor:
    """Zero-pad by ``padding`` and crop back at a uniform offset in [0, 2·padding] per sample: ``[B, C, H, W]``."""
    if padding == 0:
        return x
    batch, _, height, width = x.shape
    rows, total = _rows(part, batch)
    offsets = torch.randint(0, 2 * padding + 1, (2, total), generator=generator)[:, rows].to(x.device,
                                                                                            non_blocking=True)
    padded = F.pad(x, (padding, padding, padding, padding))
    ys = offsets[0, :, None] + torch.arange(height, device=x.device)  # [B, H]
    xs = offsets[1, :, None] + torch.arange(width, device=x.device)  # [B, W]
    index = torch.arange(batch, device=x.device)[:, None, None]
    return padded[index, :, ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2)  # [B, H, W, C] -> NCHW


def random_hflip(x: Tensor, generator: torch.Generator, part: tuple[int, int] | None = None) -> Tensor:
    """Mirror each sample of ``[B, C, H, W]`` with probability 0.5 (``part`` as for ``random_crop``)."""
    rows, total = _rows(part, len(x))
    flip = (torch.rand(total, generator=generator)[rows] < 0.5).to(x.device, non_blocking=True)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 ``[B, C, H, W]`` -> float32 ``(x / 255 - mean) / std``."""
    return (x.float().div_(255) - mean.to(x.device)[:, None, None]) / std.to(x.device)[:, None, None]


class BatchAugment:
    """Crop + flip + normalise a uint8 batch ``[B, C, H, W]`` -> float ``[B, C, H, W]``; ``train=False`` only
    normalises."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], padding: int = 0, hflip: bool = False,
                 train: bool = True):
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)
        self.padding, self.hflip, self.train = padding, hflip, train

    @property
    def is_random(self) -> bool:
        """Whether two calls on one batch can differ (``False``: every view of an image is the same)."""
        return self.train and (self.padding > 0 or self.hflip)

    def __call__(self, x: Tensor, generator: torch.Generator, part: tuple[int, int] | None = None) -> Tensor:
        """``x`` uint8 ``[B, C, H, W]``, rows ``part = (start, total)`` of a larger batch (default: all of it)."""
        if self.train:
            x = random_crop(x, self.padding, generator, part)
            if self.hflip:
                x = random_hflip(x, generator, part)
        return normalize(x, self.mean, self.std)
