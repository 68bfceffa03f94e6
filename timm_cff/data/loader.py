"""``ImageLoader``: (views, labels) batches of a uint8 dataset, augmented in batches on the device.

The per-image work the official pipeline does in DataLoader workers (crop, flip, normalise, twice per image) is
done here on a whole batch with tensor ops, so data loading never dominates a step. RandAugment, which is
per-image by nature, runs per sample on uint8 tensors (optionally in DataLoader workers) before the batched part.
Every random draw depends only on (seed, epoch, sample), so results do not depend on the number of workers.

An in-memory dataset (``ArrayDataset``) lives on the device and a batch is an index operation there; a streamed one
(``ArrayDataset.streamed``) is decoded image by image in DataLoader workers. Both take the same permutation and the same
augmentation draws, so the same images give the same batches, bit for bit, whichever way they are held.
"""
import functools
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .augment import BatchAugment
from .sources import ArrayDataset
from .streaming import decode_batches

__all__ = ['ImageLoader']


class _RandAugmentViews(Dataset):
    """Sample ``i`` -> ``[V, C, H, W]`` uint8: V independent draws of ``transform``, seeded by (seed, i)."""

    def __init__(self, x: Tensor, transform: Callable[[Tensor], Tensor], num_views: int, seed: int):
        self.x, self.transform, self.num_views, self.seed = x, transform, num_views, seed

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> Tensor:
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global RNG; keep it untouched
            torch.manual_seed(self.seed * 1_000_003 + index)
            return torch.stack([self.transform(self.x[index]) for _ in range(self.num_views)])


class ImageLoader:
    """Iterate ``(views, labels)``: views is a tuple of V float tensors ``[B, C, H, W]`` (one tensor when V = 1).

    Without random augmentation the V views are one tensor object repeated, which ``LocalTrainer`` runs once.

    Args:
        data: the images and labels: in memory (``ArrayDataset``, uint8 ``[N, C, H, W]``) or streamed
            (``x`` an ``ImageStream``, decoded in ``workers``).
        batch_size: samples per batch; the last batch may be smaller (official: no drop_last).
        augment: the batched crop/flip/normalise transform.
        num_views: independent augmentations per image (2 for CFF).
        shuffle: a fresh permutation every epoch.
        seed: base seed of the shuffling and augmentation draws; ``set_epoch`` mixes in the epoch.
        device: where batches are augmented and returned.
        randaugment: optional per-image transform on uint8 ``[C, H, W]`` applied before ``augment``.
        workers: DataLoader workers for ``randaugment`` and for decoding a streamed dataset.
        shard: ``(index, count)``: yield only part ``index`` of ``count`` of every batch (data-parallel replicas
            share one permutation and the global batch's augmentation draws, and split each global batch: the
            replicas' parts together are exactly the one-process batch).
    """

    def __init__(self, data: ArrayDataset, batch_size: int, augment: BatchAugment, *,
                 num_views: int = 1, shuffle: bool = False, seed: int = 0, device: torch.device | str = 'cpu',
                 randaugment: Callable[[Tensor], Tensor] | None = None, workers: int = 0,
                 shard: tuple[int, int] = (0, 1)):
        if batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
        self.data, self.batch_size, self.augment = data, batch_size, augment
        self.num_views, self.shuffle, self.seed = num_views, shuffle, seed
        self.device = torch.device(device)
        self.randaugment, self.workers = randaugment, workers
        self.shard = shard
        self.epoch = 0

    @functools.cached_property
    def _x(self) -> Tensor:
        """Small datasets live on the accelerator once, so a batch is an index operation there."""
        return self.data.x.to(self.device)

    def __len__(self) -> int:
        return math.ceil(len(self.data) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _epoch_seed(self) -> int:
        return (self.seed * 1_000_003 + self.epoch) % (2 ** 62)

    def _batches(self, generator: torch.Generator) -> list[tuple[Tensor, tuple[int, int]]]:
        """This loader's sample indices of every batch of the epoch (its shard of each global batch), each with
        its rows ``(start, global batch size)``."""
        n = len(self.data)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        index, count = self.shard
        out = []
        for batch in order.split(self.batch_size):
            parts = batch.tensor_split(count)
            out.append((parts[index], (sum(len(p) for p in parts[:index]), len(batch))))
        return out

    def _raw_batches(self, batches: list[Tensor]) -> Iterator[Tensor]:
        """uint8 ``[B, C, H, W]`` (shared by the views) or ``[B, V, C, H, W]`` (per-view RandAugment)."""
        if self.randaugment is None and not self.data.streamed:
            for index in batches:
                yield self._x[index.to(self._x.device)]
            return
        dataset: Dataset = self.data.x  # an ImageStream: decoded per image
        if self.randaugment is not None:
            dataset = _RandAugmentViews(self.data.x, self.randaugment, self.num_views, self._epoch_seed())
        per_view = (self.num_views,) if self.randaugment is not None else ()
        # a replica's share of a last batch smaller than the replica count may be empty
        empty = torch.empty((0, *per_view, *self.data.image_shape), dtype=torch.uint8)
        decoded = decode_batches(dataset, [b.tolist() for b in batches if len(b)], self.workers,
                                 pin_memory=self.device.type == 'cuda')
        for index in batches:
            yield next(decoded) if len(index) else empty

    def __iter__(self) -> Iterator[tuple[Tensor | tuple[Tensor, ...], Tensor]]:
        generator = torch.Generator().manual_seed(self._epoch_seed())
        batches = self._batches(generator)
        # the augmentation draws are the global batch's on every replica; each applies its own rows of them
        generator.manual_seed(self._epoch_seed() + 7919)
        indices = [index for index, _ in batches]
        for (index, part), raw in zip(batches, self._raw_batches(indices)):
            raw = raw.to(self.device, non_blocking=True)
            if raw.dim() == 4 and not self.augment.is_random:  # identical views: one tensor (trainers run it once)
                views = (self.augment(raw, generator, part),) * self.num_views
            else:
                per_view = raw.unbind(1) if raw.dim() == 5 else [raw] * self.num_views
                views = tuple(self.augment(v, generator, part) for v in per_view)
            labels = self.data.y[index].to(self.device, non_blocking=True)
            yield (views[0] if self.num_views == 1 else views), labels
