"""From a ``DataConfig`` to the loaders of a run: load, split 90/10, corrupt (Table 4), pick stats, build loaders.

Every step works on labels and indices, so it is the same for in-memory datasets (``ArrayDataset``) and streamed ones
(an ``ArrayDataset`` over an ``ImageStream``: timm's ``torch/``, ``hfds/``, ``wds/`` names and folder paths, decoded
per image in ``data.workers``).
"""
import logging
from dataclasses import dataclass

import torch

from ..data.augment import STATS, BatchAugment
from ..data.loader import ImageLoader
from ..data.named import dataset_defaults, open_dataset
from ..data.sources import ArrayDataset, DataError
from ..data.splits import corrupt_labels, keep_fraction, split_train_val
from ..data.streaming import measure_stats
from .config import DataConfig

__all__ = ['PreparedData', 'prepare_data', 'create_loaders']

_logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """The three splits (in memory or streamed) and everything the model and transforms need to know about them."""
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    hflip: bool

    @property
    def input_size(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images."""
        return self.train.image_shape

    @property
    def label_names(self) -> list[str] | None:
        """The class names in label order (timm's ``label_names``), or ``None`` when they are only the numbers."""
        names = list(self.train.classes)
        return None if not names or names == [str(c) for c in range(len(names))] else names


def _stats(cfg: DataConfig, train: ArrayDataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if cfg.mean or cfg.std:
        if len(cfg.mean) != len(cfg.std):
            raise DataError(f'data.mean and data.std need one value per channel, got {cfg.mean} and {cfg.std}.')
        return tuple(cfg.mean), tuple(cfg.std)
    name = dataset_defaults(cfg.dataset)['stats'] if cfg.stats == 'auto' else cfg.stats
    if name == 'auto' and train.streamed:  # too large to measure whole: a fixed sample
        return measure_stats(train, cfg.workers)
    if name == 'auto':  # npz / folder without a named dataset: measure the training split
        pixels = train.x.float().div(255).transpose(0, 1).flatten(1)  # [C, N·H·W]
        return tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).tolist())
    if name not in STATS:
        raise DataError(f'Unknown data.stats {name!r}. Known: auto, {", ".join(sorted(STATS))}.')
    return STATS[name]


def _check_splits(cfg: DataConfig, train: ArrayDataset, test: ArrayDataset) -> int:
    """The class count C, from the labels; refuses data that would give no meaningful result."""
    name = cfg.root or cfg.dataset
    for split, data in (('training', train), ('test', test)):
        if len(data) == 0:
            raise DataError(f'{name}: the {split} split is empty.')
        if int(data.y.min()) < 0:
            raise DataError(f'{name}: the {split} labels must be 0..C-1, found {int(data.y.min())}.')
    if train.image_shape != test.image_shape:
        raise DataError(f'{name}: training images are {train.image_shape} (C, H, W) but test images are '
                        f'{test.image_shape}; both splits need one image shape.')
    num_classes = int(max(train.y.max(), test.y.max())) + 1
    if train.classes and len(train.classes) < num_classes:
        raise DataError(f'{name} names {len(train.classes)} classes but its labels have {num_classes}; the names '
                        'must match the labels 0..C-1.')
    # the names count the classes: a subset (data.train_subset of a class-sorted folder) may lack the last ones
    num_classes = max(num_classes, len(train.classes))
    seen = set(train.y.unique().tolist())
    if len(seen) < 2:
        raise DataError(f'{name}: the training split has a single class ({seen.pop()}); training needs at least 2 '
                        '(check data.train_subset).')
    unseen = sorted(set(test.y.unique().tolist()) - seen)
    if unseen:
        raise DataError(f'{name}: test labels {unseen[:5]} never occur in the training split (check '
                        'data.train_subset or the labels).')
    return num_classes


def prepare_data(cfg: DataConfig, img_size: int | None = None) -> PreparedData:
    """Load ``cfg.dataset`` and apply the paper's protocol; the test split is never corrupted.

    ``img_size`` is the model's input side (``model.img_size``): streamed images and the mixed sizes of a ``folder``
    are resized and centre-cropped to it (None: the dataset's own size).
    """
    full, test = open_dataset(cfg.dataset, cfg.root, cfg.download, cfg.train_split, cfg.test_split, img_size)
    if cfg.train_subset:
        full = full.subset(torch.arange(min(cfg.train_subset, len(full))))
    if cfg.test_subset:
        test = test.subset(torch.arange(min(cfg.test_subset, len(test))))
    num_classes = _check_splits(cfg, full, test)
    train_idx, val_idx = split_train_val(len(full), cfg.val_fraction, cfg.split_seed)
    train, val = full.subset(train_idx), full.subset(val_idx)
    generator = torch.Generator().manual_seed(cfg.corruption_seed)
    train, val = keep_fraction(train, cfg.data_fraction, generator), keep_fraction(val, cfg.data_fraction, generator)
    if cfg.label_noise:
        train.y = corrupt_labels(train.y, cfg.label_noise, num_classes, generator)
        val.y = corrupt_labels(val.y, cfg.label_noise, num_classes, generator)
    for split, data, keys in (('training', train, 'data.val_fraction, data.data_fraction or data.train_subset'),
                              ('validation', val, 'data.val_fraction or data.data_fraction')):
        if len(data) == 0:
            raise DataError(f'The {split} split has 0 images after the split and corruption settings; raise {keys}.')
    mean, std = _stats(cfg, train)
    if len(mean) != full.image_shape[0]:
        raise DataError(f'{len(mean)} normalisation channels for {full.image_shape[0]}-channel images; set data.stats '
                        'or data.mean/data.std to match.')
    defaults = dataset_defaults(cfg.dataset)
    padding = defaults['crop_padding'] if cfg.crop_padding is None else cfg.crop_padding
    hflip = defaults['hflip'] if cfg.hflip is None else cfg.hflip
    _logger.info('%s: %d train / %d val / %d test images of %s, %d classes', cfg.dataset, len(train), len(val),
                 len(test), full.image_shape, num_classes)
    if full.streamed and cfg.workers == 0:
        _logger.warning('%s is decoded image by image in the training process (data.workers=0); set '
                        '--data.workers=N (e.g. the number of CPU cores) to decode in parallel.', cfg.dataset)
    return PreparedData(train, val, test, num_classes, mean, std, padding, hflip)


def create_loaders(data: PreparedData, cfg: DataConfig, *, num_views: int, seed: int,
                   device: torch.device | str = 'cpu', shard: tuple[int, int] = (0, 1)) -> dict[str, ImageLoader]:
    """Loaders of a run: ``train``/``val`` (stage 1, augmented, ``num_views``, this replica's ``shard`` of every
    batch), ``probe_train``/``probe_val`` (augmented view 1, as the official probe), ``test`` (normalised only)."""
    augment = BatchAugment(data.mean, data.std, data.crop_padding, data.hflip)
    plain = BatchAugment(data.mean, data.std, train=False)
    randaugment = None
    if cfg.randaugment:
        from torchvision.transforms import v2
        randaugment = v2.RandAugment(cfg.ra_num_ops, cfg.ra_magnitude)
    common = dict(device=device, randaugment=randaugment, workers=cfg.workers)
    return {
        'train': ImageLoader(data.train, cfg.batch_size, augment, num_views=num_views, shuffle=True, seed=seed,
                             shard=shard, **common),
        'val': ImageLoader(data.val, cfg.batch_size, augment, num_views=num_views, shuffle=True, seed=seed + 1,
                           shard=shard, **common),
        'probe_train': ImageLoader(data.train, cfg.batch_size, augment, shuffle=True, seed=seed + 2, **common),
        'probe_val': ImageLoader(data.val, cfg.batch_size, augment, shuffle=True, seed=seed + 3, **common),
        'test': ImageLoader(data.test, cfg.batch_size, plain, device=device, workers=cfg.workers),
    }
