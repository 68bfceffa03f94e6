"""Streamed datasets: images decoded one at a time (in DataLoader workers) and fitted to the model's input size.

A streamed dataset is an ``ArrayDataset`` whose ``x`` is an ``ImageStream`` instead of a uint8 tensor: ``x[i]`` reads
and decodes image ``i`` of a map-style dataset (torchvision's, timm's ``ImageDataset``, an ImageFolder, WebDataset
shards) and returns uint8 ``[C, S, S]``, and ``x[index]`` is the stream of those images, so ``subset`` works
unchanged. Labels are read once, up front, without decoding an image, so the split, ``train_subset``,
``data_fraction`` and ``label_noise`` are index and label operations as for in-memory data; ``ImageLoader`` then
decodes each batch in workers and augments it exactly as it augments a batch in memory.
"""
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from .resize import fit_image
from .sources import ArrayDataset, DataError, read_image
from .tarshards import TarShards

__all__ = ['STATS_SAMPLE', 'ImageStream', 'decode_batches', 'measure_stats']

_logger = logging.getLogger(__name__)

#: Images measured for ``data.stats=auto`` on a streamed dataset: a fixed random sample (seed 0) of the training split.
STATS_SAMPLE = 2000


def _pil_to_uint8(image: Any, channels: int) -> Tensor:
    from torchvision.transforms.v2.functional import pil_to_tensor
    mode = 'L' if channels == 1 else 'RGB'
    return pil_to_tensor(image if image.mode == mode else image.convert(mode))


def read_source(source: Any, index: int, channels: int) -> Tensor:
    """Image ``index`` of ``source`` as uint8 ``[C, H, W]``, not yet resized.

    ImageFolder trees (and torchvision's ImageNet, one of them) are decoded from their files with torchvision's
    decoder, as the in-memory ``folder`` path does, so both paths see the same pixels; timm's ``ImageDataset``
    (``hfds/``) is read through its reader (file or bytes; the dataset itself would skip an unreadable image and
    return the next one, whose label is another); WebDataset shards (``wds/``) give the image's bytes; other
    torchvision datasets give PIL images.
    """
    from timm.data import ImageDataset
    samples = getattr(source, 'samples', None)
    if samples is not None:
        return read_image(samples[index][0])
    if isinstance(source, TarShards):
        return read_image(source.read(index), source.describe(index))
    if isinstance(source, ImageDataset):
        handle = source.reader[index][0]
        with handle:
            data = handle.read()
        return read_image(data, f'image {index} of {getattr(source.reader, "root", None) or "the dataset"}')
    try:
        image = source[index][0]
    except (OSError, ValueError) as e:  # PIL's errors on a damaged file (Places365, iNaturalist)
        raise DataError(f'image {index} of {type(source).__name__} under {getattr(source, "root", "?")} is not '
                        f'readable ({str(e).splitlines()[0][:120]}); repair or remove it.') from None
    return _pil_to_uint8(image, channels)


class ImageStream(Dataset):
    """``stream[i]`` -> uint8 ``[C, size, size]``: image ``index[i]`` of ``source``, decoded and fitted to ``size``.

    Args:
        source: a map-style dataset (torchvision, timm ``ImageDataset``, torchvision ``ImageFolder``).
        index: int64 ``[N]``, which samples of ``source`` and in which order (a split is an index operation).
        size: the side of the model's square input.
        channels: 1 (grey, e.g. MNIST) or 3 (RGB).
    """

    def __init__(self, source: Any, index: Tensor, size: int, channels: int):
        self.source, self.index, self.size, self.channels = source, index, size, channels

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(N, C, size, size)``, as the uint8 tensor it stands for."""
        return len(self), self.channels, self.size, self.size

    def __getitem__(self, i: int | Tensor) -> 'Tensor | ImageStream':
        """Indexed like the uint8 ``[N, C, size, size]`` tensor it stands for: an int decodes that image, an index
        tensor gives the stream of those images (nothing decoded)."""
        if isinstance(i, Tensor) and i.dim() > 0:
            return ImageStream(self.source, self.index[i], self.size, self.channels)
        return fit_image(read_source(self.source, int(self.index[i]), self.channels), self.size)


class _Unreadable:
    """What a worker hands back instead of raising: the main process raises ``DataError(message)``, one line (an
    exception raised in a worker arrives wrapped in its traceback)."""

    def __init__(self, message: str):
        self.message = message


class _Guarded(Dataset):
    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        try:
            return self.dataset[i]
        except DataError as e:
            return _Unreadable(str(e))


def _collate(items: list) -> Any:
    bad = next((item for item in items if isinstance(item, _Unreadable)), None)
    return bad if bad is not None else default_collate(items)


def decode_batches(dataset: Dataset, batches: Sequence[Sequence[int]], workers: int = 0,
                   pin_memory: bool = False) -> Iterator[Tensor]:
    """``torch.stack([dataset[i] for i in batch])`` for every batch, in order, computed by ``workers`` DataLoader
    workers (0: in this process); an image that does not decode raises ``DataError`` naming it."""
    loader = DataLoader(_Guarded(dataset), batch_sampler=batches, num_workers=workers, pin_memory=pin_memory,
                        collate_fn=_collate)
    for batch in loader:
        if isinstance(batch, _Unreadable):
            raise DataError(batch.message)
        yield batch


def measure_stats(data: ArrayDataset, workers: int = 0,
                  sample: int = STATS_SAMPLE) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (of pixels in [0, 1]) over ``sample`` training images, a fixed random choice (seed 0),
    after ``fit_image``: the ``data.stats=auto`` of a dataset too large to measure whole."""
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:sample].sort().values
    total = torch.zeros(data.image_shape[0], dtype=torch.float64)
    squares, count = total.clone(), 0
    batches = [b.tolist() for b in torch.arange(len(pick)).split(64)]
    for batch in decode_batches(data.x[pick], batches, workers):
        pixels = batch.double().div_(255).transpose(0, 1).flatten(1)  # [C, B·H·W]
        total += pixels.sum(1)
        squares += pixels.square().sum(1)
        count += pixels.shape[1]
    mean = total / count
    std = ((squares - count * mean.square()) / (count - 1)).clamp_min(0).sqrt()  # unbiased, as Tensor.std
    _logger.info('Normalisation measured on %d training images: mean %s, std %s', len(pick),
                 [round(v, 4) for v in mean.tolist()], [round(v, 4) for v in std.tolist()])
    return tuple(mean.tolist()), tuple(std.tolist())
