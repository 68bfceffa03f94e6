"""Datasets as in-memory uint8 arrays: torchvision sets, ``npz`` folders, ImageFolder trees, the bundled MNIST subset.

Every source returns ``ArrayDataset(x uint8 [N, C, H, W], y int64 [N], classes)``; the loaders augment batches of it
on the training device, so small datasets (CIFAR, MNIST, Tiny ImageNet at 1.2 GB) never wait on per-image decoding.
Datasets too large for memory are streamed instead (``streaming.py``, ``named.py``).
"""
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .resize import fit_image

__all__ = ['DATASET_DEFAULTS', 'ArrayDataset', 'DataError', 'candidate_test_splits', 'folder_splits', 'image_folder',
           'list_datasets', 'load_dataset', 'prepare_tiny_imagenet', 'read_image', 'resolve_root']

_logger = logging.getLogger(__name__)

#: Per-dataset protocol defaults (cff-method.md §7): normalisation stats name, crop padding, horizontal flip.
DATASET_DEFAULTS = {
    'cifar10': dict(stats='cifar10', crop_padding=4, hflip=True),
    'cifar100': dict(stats='cifar100', crop_padding=4, hflip=True),
    'mnist': dict(stats='mnist', crop_padding=0, hflip=False),
    'fashion_mnist': dict(stats='fashion_mnist', crop_padding=0, hflip=False),
    'mnist_subset': dict(stats='mnist', crop_padding=0, hflip=False),
    'npz': dict(stats='auto', crop_padding=0, hflip=True),
    'folder': dict(stats='auto', crop_padding=0, hflip=True),
}

_TORCHVISION = {'cifar10': 'CIFAR10', 'cifar100': 'CIFAR100', 'mnist': 'MNIST', 'fashion_mnist': 'FashionMNIST'}


class DataError(ValueError):
    """A dataset cannot be found or read; the message says what to do."""


@dataclass
class ArrayDataset:
    """Images ``x`` uint8 ``[N, C, H, W]``, labels ``y`` int64 ``[N]`` and the class names.

    ``x`` is a tensor in memory, or a ``streaming.ImageStream`` that decodes each image on demand and is indexed
    the same way (a streamed dataset).
    """
    x: Tensor  # or an ImageStream
    y: Tensor
    classes: list[str]

    @property
    def streamed(self) -> bool:
        """Whether the images are decoded on demand (``x`` is an ``ImageStream``)."""
        return not isinstance(self.x, Tensor)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: Tensor) -> 'ArrayDataset':
        return ArrayDataset(self.x[index], self.y[index], self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        return tuple(self.x.shape[1:])


def list_datasets() -> list[str]:
    return sorted(DATASET_DEFAULTS)


def resolve_root(root: str | None, dataset: str) -> Path:
    """``root`` as given if it exists, else under ``$TIMM_CFF_DATA``; default ``$TIMM_CFF_DATA`` or ``./data``."""
    base = os.environ.get('TIMM_CFF_DATA')
    if root is None:
        return Path(base or 'data')
    path = Path(root).expanduser()
    if not path.exists() and base and not path.is_absolute() and (Path(base) / path).exists():
        return Path(base) / path
    return path


def _from_nhwc(x: np.ndarray, source: str = 'the images') -> Tensor:
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise DataError(f'{source}: images must be uint8 [N, H, W, C], got {x.dtype}; convert them with '
                        '(x * 255).round().astype(np.uint8) if they are floats in [0, 1].')
    if x.ndim == 3:  # [N, H, W] grey
        x = x[..., None]
    if x.ndim != 4 or len(x) == 0:
        raise DataError(f'{source}: images must be a non-empty uint8 [N, H, W, C] array, got shape {x.shape}.')
    if x.shape[1] in (1, 3, 4) and x.shape[3] not in (1, 3, 4):
        raise DataError(f'{source}: shape {x.shape} looks like [N, C, H, W]; store [N, H, W, C] '
                        '(x.transpose(0, 2, 3, 1)).')
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()


def _classes(num_classes: int, names_file: Path | None = None) -> list[str]:
    """Class names: one per line of ``names_file`` (names may hold spaces), else ``'0'..'C-1'``. The count comes from
    the labels; a names file that disagrees is refused."""
    if names_file is None or not names_file.is_file():
        return [str(c) for c in range(num_classes)]
    names = names_file.read_text().rstrip('\n').split('\n')
    if any(not name.strip() for name in names):
        raise DataError(f'{names_file} has an empty line; it must hold one class name per line.')
    if len(names) != num_classes:
        raise DataError(f'{names_file} names {len(names)} classes but the labels have {num_classes} (0..'
                        f'{num_classes - 1}); give one name per line, in label order.')
    return [name.strip() for name in names]


def _load_npz_file(path: Path) -> tuple[Tensor, Tensor]:
    if not path.is_file():
        raise DataError(f'{path} not found: an npz dataset folder holds train.npz and test.npz with arrays x '
                        '(uint8 [N, H, W, C]) and y (int64 [N]).')
    with np.load(path) as f:
        if 'x' not in f or 'y' not in f:
            raise DataError(f'{path} must hold arrays x and y, found {sorted(f.files)}.')
        labels = f['y']
        if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
            raise DataError(f'{path}: labels y must be a 1-d integer array, got {labels.dtype} {labels.shape}.')
        x, y = _from_nhwc(f['x'], str(path)), torch.from_numpy(labels.astype(np.int64))
    if len(x) != len(y):
        raise DataError(f'{path}: {len(x)} images but {len(y)} labels.')
    return x, y


def _load_npz(root: Path) -> tuple[ArrayDataset, ArrayDataset]:
    (x, y), (tx, ty) = _load_npz_file(root / 'train.npz'), _load_npz_file(root / 'test.npz')
    classes = _classes(int(max(y.max(), ty.max())) + 1, root / 'classes.txt')
    return ArrayDataset(x, y, classes), ArrayDataset(tx, ty, classes)


def _load_bundled() -> tuple[ArrayDataset, ArrayDataset]:
    with resources.as_file(resources.files('timm_cff.data') / 'mnist_subset.npz') as path:
        with np.load(path) as f:
            train = ArrayDataset(_from_nhwc(f['x_train']), torch.from_numpy(f['y_train']), [])
            test = ArrayDataset(_from_nhwc(f['x_test']), torch.from_numpy(f['y_test']), [])
    train.classes = test.classes = _classes(10)
    return train, test


def _load_torchvision(name: str, root: Path, download: bool) -> tuple[ArrayDataset, ArrayDataset]:
    import torchvision
    cls = getattr(torchvision.datasets, _TORCHVISION[name])
    try:
        splits = [cls(str(root), train=train, download=download) for train in (True, False)]
    except RuntimeError as e:
        raise DataError(f'{cls.__name__} not found under {root} ({e}). Pass --data.download=true (needs internet), '
                        f'or --data.root=DIR pointing at a copy, or use --data.dataset=npz with a local npz folder.'
                        ) from e
    out = []
    for ds in splits:
        data = ds.data.numpy() if isinstance(ds.data, Tensor) else ds.data
        out.append(ArrayDataset(_from_nhwc(data), torch.as_tensor(ds.targets, dtype=torch.int64), list(ds.classes)))
    return out[0], out[1]


def read_image(image: str | Path | bytes, name: str | None = None) -> Tensor:
    """An image file (its path) or its encoded ``bytes`` as uint8 RGB ``[3, H, W]`` (torchvision's decoder); one that
    does not decode is named (``name``, default the path)."""
    from torchvision.io import ImageReadMode, decode_image
    data = torch.frombuffer(bytearray(image), dtype=torch.uint8) if isinstance(image, bytes) else str(image)
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError, OSError) as e:
        raise DataError(f'{name or image} is not a readable image ({str(e).splitlines()[0][:120]}); repair or '
                        'remove it.') from None


def candidate_test_splits(test_split: str) -> list[str]:
    """The test split's names to try, in order: ``test_split``, then ImageNet's / Hugging Face's ``validation``,
    ``val``."""
    return list(dict.fromkeys((test_split, 'validation', 'val')))


def image_folder(folder: Path, classes: list[str] | None = None):
    """torchvision's ``ImageFolder`` of ``folder`` (class = top-level sub-folder, files found recursively, so Tiny
    ImageNet's ``train/<wnid>/images/*.JPEG`` keeps its 200 classes); a test split must name the training classes."""
    from torchvision.datasets import ImageFolder
    if not folder.is_dir():
        raise DataError(f'Image folder {folder} does not exist; a folder dataset needs <root>/<split>/<class>/*.jpg.')
    try:
        tree = ImageFolder(str(folder), loader=str)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f'{folder}: {e}; a folder dataset needs <root>/<split>/<class>/*.jpg.') from None
    if classes is not None and tree.classes != classes:
        raise DataError(f'{folder} has classes {tree.classes[:5]}..., the training split has {classes[:5]}...')
    return tree


def folder_splits(root: Path, train_split: str, test_split: str) -> tuple[Path, Path]:
    """The training and test folders of an ImageFolder dataset: ``<root>/<train_split>`` and the first of
    ``test_split``, ``validation``, ``val`` that exists (ImageNet / Hugging Face names)."""
    if not root.is_dir():
        raise DataError(f'Image folder {root} does not exist; a folder dataset needs <root>/<split>/<class>/*.jpg.')
    if not (root / test_split).exists() and (root / 'val' / 'val_annotations.txt').is_file():
        prepare_tiny_imagenet(root, test_split)  # Tiny ImageNet ships its val split unsorted
    if not (root / train_split).is_dir():
        raise DataError(f'{root} has no training split folder {train_split!r}; a folder dataset needs '
                        '<root>/<train_split>/<class>/*.jpg (set data.train_split).')
    candidates = candidate_test_splits(test_split)
    for split in candidates:
        if (root / split).is_dir():
            return root / train_split, root / split
    raise DataError(f'{root} has no test split: none of {", ".join(candidates)} is a folder there; set '
                    'data.test_split.')


def _memory_bytes() -> int:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def _decode_folder(folder: Path, classes: list[str] | None = None, size: int | None = None) -> ArrayDataset:
    """Every image of an ImageFolder tree, decoded once to uint8 ``[N, 3, H, W]``. With ``size`` every image that is
    not ``size x size`` is resized and centre-cropped to it (``fit_image``); without, they must share one size.

    Mixed sizes are decoded once resized rather than streamed: a folder that fits in memory (Tiny ImageNet is 1.4 GB
    at 64 px) then trains on the fast in-memory path and decodes no JPEG per epoch; one that does not fit is refused
    with the streamed way to read it (the folder path as data.dataset).
    """
    tree = image_folder(folder, classes)
    samples = tree.samples
    first = read_image(samples[0][0])
    shape = (3, size, size) if size else tuple(first.shape)
    need = len(samples) * shape[0] * shape[1] * shape[2]
    if need > _memory_bytes() // 2:
        raise DataError(f'{folder}: {len(samples)} images of {shape} (C, H, W) need {need / 2 ** 30:.1f} GiB, more '
                        f'than half of this machine\'s memory; stream them instead: data.dataset={folder.parent} '
                        '(a folder path is decoded per image in data.workers).')
    images = torch.empty((len(samples), *shape), dtype=torch.uint8)
    for i, (path, _) in enumerate(samples):
        image = first if i == 0 else read_image(path)
        if size:
            image = fit_image(image, size)
        elif image.shape != first.shape:
            raise DataError(f'Images in {folder} have several sizes ({samples[0][0]} is {tuple(first.shape[1:])}, '
                            f'{path} is {tuple(image.shape[1:])}); set model.img_size=N to resize them (shorter side '
                            'to N, centre crop).')
        images[i] = image
    targets = torch.tensor([target for _, target in samples], dtype=torch.int64)
    return ArrayDataset(images, targets, tree.classes)


def prepare_tiny_imagenet(root: str | Path, out_split: str = 'val_by_class') -> Path:
    """Link Tiny ImageNet's flat ``val/images`` into ``<root>/<out_split>/<wnid>/`` from ``val_annotations.txt``.

    The official test split of the paper is this validation set (50 images per class); the originals are untouched.
    """
    root = Path(root)
    annotations = root / 'val' / 'val_annotations.txt'
    if not annotations.is_file():
        raise DataError(f'{annotations} not found; is {root} the unpacked tiny-imagenet-200 folder?')
    out = root / out_split
    for line in annotations.read_text().splitlines():
        image, wnid = line.split('\t')[:2]
        target = out / wnid / image
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to((root / 'val' / 'images' / image).resolve())
    _logger.info('Linked the Tiny ImageNet validation images into %s', out)
    return out


def load_dataset(dataset: str, root: str | None = None, download: bool = False, train_split: str = 'train',
                 test_split: str = 'test', img_size: int | None = None) -> tuple[ArrayDataset, ArrayDataset]:
    """The full training set and the test set of ``dataset`` (see ``list_datasets()``); ``img_size`` resizes the images
    of a ``folder`` dataset that are not that size (``fit_image``)."""
    if dataset not in DATASET_DEFAULTS:
        raise DataError(f'Unknown dataset {dataset!r}. Known: {", ".join(list_datasets())}.')
    path = resolve_root(root, dataset)
    if dataset == 'mnist_subset':
        return _load_bundled()
    if dataset in _TORCHVISION:
        return _load_torchvision(dataset, path, download)
    if root is None:
        raise DataError(f'--data.root is required for dataset {dataset!r}.')
    if dataset == 'npz':
        return _load_npz(path)
    train_dir, test_dir = folder_splits(path, train_split, test_split)
    train = _decode_folder(train_dir, size=img_size)
    return train, _decode_folder(test_dir, train.classes, size=img_size)
