"""Which way a ``data.dataset`` value is read: in memory, or streamed through timm's / torchvision's own datasets.

- In memory (``sources.load_dataset``, decoded once, batches indexed on the device): ``cifar10``, ``cifar100``,
  ``mnist``, ``fashion_mnist``, ``npz``, ``folder``, ``mnist_subset``. The fast path for small sets.
- Streamed (an ``ArrayDataset`` over an ``ImageStream``, decoded per image in DataLoader workers and fitted to the
  model's input size): timm's ``timm.data.create_dataset`` names ``torch/<name>`` and ``hfds/<name>``, a folder path
  (an ImageFolder tree ``<path>/<split>/<class>/...``, read like ``folder``), and ``wds/<name>``: WebDataset tar
  shards under ``data.root`` (or ``data.root/<name>``), indexed up front and read by seeking (``tarshards``), not
  through timm's iterable reader.

timm's iterable readers (``hfids/``, ``tfds/``, and timm's own for ``wds/``) are not used: they split the data by
process rank and shuffle it themselves, while the layer pipeline needs every stage group of a replica to see the same
batches, and the protocol's 90/10 train/validation split and Table 4's corruptions are index operations.
"""
import importlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .sources import (
    DATASET_DEFAULTS,
    ArrayDataset,
    DataError,
    candidate_test_splits,
    folder_splits,
    image_folder,
    list_datasets,
    load_dataset,
    resolve_root,
)
from .streaming import ImageStream, read_source
from .tarshards import TarShards, shard_files

__all__ = ['TORCH_DATASETS', 'dataset_defaults', 'open_dataset']

_logger = logging.getLogger(__name__)

#: ``torch/<name>`` datasets of timm's ``create_dataset`` (torchvision classes).
TORCH_DATASETS = ('cifar10', 'cifar100', 'mnist', 'kmnist', 'fashion_mnist', 'qmnist', 'imagenet', 'places365',
                  'inaturalist', 'inat', 'folder', 'image_folder')
#: torchvision sets with a fixed train/test pair: every split name but a training one gives their test set.
_TRAIN_TEST_PAIRS = ('cifar10', 'cifar100', 'mnist', 'kmnist', 'fashion_mnist', 'qmnist')
_ITERABLE = ('hfids', 'tfds')
#: prefix -> (module to import, what to pip install)
_PACKAGES = {'hfds': ('datasets', 'datasets')}  # also: pip install "timm-cff[hf]"


def _parse(dataset: str) -> tuple[str, str]:
    """``(kind, name)``: kind is 'memory', 'torch', 'hfds', 'wds', 'iterable' or 'path'."""
    if dataset in DATASET_DEFAULTS:
        return 'memory', dataset
    prefix, sep, rest = dataset.partition('/')
    if sep and prefix.lower() in ('torch', 'hfds', 'wds'):
        return prefix.lower(), rest
    if sep and prefix.lower() in _ITERABLE:
        return 'iterable', rest
    if resolve_root(dataset, dataset).is_dir():
        return 'path', dataset
    if dataset.startswith(('/', '.', '~')):
        raise DataError(f'data.dataset={dataset!r}: no such folder (nor under $TIMM_CFF_DATA); a folder dataset is an '
                        'ImageFolder tree <path>/<split>/<class>/*.jpg.')
    what = f'prefix {prefix + "/"!r}' if sep else 'name'
    raise DataError(f'Unknown dataset {dataset!r} (unknown {what}, and no such folder). In memory: '
                    f'{", ".join(list_datasets())}; streamed: torch/<name> ({", ".join(TORCH_DATASETS[:7])}, ...), '
                    'hfds/<name>, wds/<name> or a folder path.')


def dataset_defaults(dataset: str) -> dict[str, Any]:
    """Normalisation stats name, crop padding and flip of ``dataset``: those of the named torchvision set
    (``torch/cifar10`` as ``cifar10``), else those of ``folder`` (measured stats, no padding, flips)."""
    if dataset in DATASET_DEFAULTS:
        return DATASET_DEFAULTS[dataset]
    prefix, _, name = dataset.partition('/')
    name = name.lower() if prefix.lower() == 'torch' else ''
    if name in DATASET_DEFAULTS:
        return DATASET_DEFAULTS[name]
    if name in ('kmnist', 'qmnist'):
        return {'stats': 'mnist' if name == 'qmnist' else 'auto', 'crop_padding': 0, 'hflip': False}
    if name == 'imagenet':
        return {**DATASET_DEFAULTS['folder'], 'stats': 'imagenet'}
    return DATASET_DEFAULTS['folder']


def _require(prefix: str) -> None:
    module, pip_name = _PACKAGES[prefix]
    try:
        importlib.import_module(module)
    except ImportError:
        raise DataError(f'{prefix}/ datasets need the {module!r} package, which is not installed: pip install '
                        f'{pip_name}') from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f'{type(error).__name__}: {text[0][:200]}' if text else type(error).__name__


def _labels(source: Any, name: str) -> Tensor:
    """int64 ``[N]`` labels of a map-style dataset, read without decoding any image."""
    from timm.data import ImageDataset
    if isinstance(source, ImageDataset):
        targets = list(source.reader.iter_targets())
    elif getattr(source, 'targets', None) is not None:
        targets = source.targets
    elif getattr(source, 'target_type', None) == ['full'] and hasattr(source, 'index'):  # torchvision INaturalist
        targets = [category for category, _ in source.index]
    else:
        raise DataError(f'{name}: its labels cannot be read without decoding every image; use a dataset with a '
                        'class per sample (torch/<name>, hfds/<name>, an ImageFolder).')
    if any(t is None for t in targets):
        raise DataError(f'{name}: some samples have no label; pick a labelled split (data.train_split / '
                        'data.test_split).')
    labels = torch.as_tensor(targets, dtype=torch.int64)
    return labels[:, 0] if labels.dim() == 2 else labels  # QMNIST's extended targets: the class is column 0


def _class_names(source: Any) -> list[str]:
    from timm.data import ImageDataset
    if isinstance(source, ImageDataset):
        mapping = getattr(source.reader, 'class_to_idx', None) or {}
        return [name for name, _ in sorted(mapping.items(), key=lambda item: item[1])]
    names = getattr(source, 'classes', None) or getattr(source, 'all_categories', None) or []
    return [c if isinstance(c, str) else str(c[0]) for c in names]  # ImageNet: a tuple of synonyms per class


def _channels(source: Any) -> int:
    """1 for a dataset of grey PIL images (MNIST and kin), else 3 (files and shards are decoded to RGB)."""
    from timm.data import ImageDataset
    if getattr(source, 'samples', None) is not None or isinstance(source, (ImageDataset, TarShards)):
        return 3
    return 1 if source[0][0].mode in ('1', 'L', 'I', 'I;16', 'F') else 3


def _open_torch(name: str, root: Path, split: str, download: bool) -> Any:
    from timm.data import create_dataset
    return create_dataset(f'torch/{name}', root=str(root), split=split, download=download)


def _open_hfds(name: str, root: Path | None, split: str, download: bool) -> Any:
    from timm.data import create_dataset
    return create_dataset(f'hfds/{name}', root=None if root is None else str(root), split=split)


def _open_wds(name: str, root: Path | None, train_split: str, test_split: str) -> tuple[TarShards, TarShards]:
    """The training and test shards of ``wds/<name>``: under ``root/<name>`` if that is a folder, else ``root``."""
    if root is None:
        raise DataError(f'data.dataset=wds/{name}: set data.root to the folder of the WebDataset shards '
                        '(<split>-*.tar, or listed in _info.json).')
    folder = root / name if (root / name).is_dir() else root
    if not folder.is_dir():
        raise DataError(f'wds/{name}: data.root={root} is not a folder; set it to the folder of the shards.')
    if not shard_files(folder, train_split):
        raise DataError(f'wds/{name}: {folder} has no shards of the training split {train_split!r} (no '
                        f'{train_split}-*.tar, {train_split}_*.tar, *-{train_split}-*.tar, {train_split}/*.tar, nor '
                        'a list in _info.json); set data.train_split.')
    candidates = candidate_test_splits(test_split)
    for split in candidates:
        if shard_files(folder, split):
            return TarShards(folder, train_split), TarShards(folder, split)
    raise DataError(f'wds/{name}: {folder} has no test split: no shards of {", ".join(candidates)}; set '
                    'data.test_split.')


def _open_splits(kind: str, name: str, root: Path | None, download: bool, train_split: str,
                 test_split: str) -> tuple[Any, Any]:
    """The training and test datasets (unresized, as timm / torchvision give them)."""
    label = f'{kind}/{name}'
    if kind == 'wds':
        return _open_wds(name, root, train_split, test_split)
    if kind == 'path' or (kind == 'torch' and name.lower() in ('folder', 'image_folder')):
        if root is None:
            raise DataError(f'data.dataset={label}: set data.root to the ImageFolder tree.')
        train_dir, test_dir = folder_splits(root, train_split, test_split)
        train = image_folder(train_dir)
        return train, image_folder(test_dir, train.classes)
    opener = _open_torch if kind == 'torch' else _open_hfds
    if kind == 'torch' and name.lower() not in TORCH_DATASETS:
        raise DataError(f'Unknown torchvision dataset {label!r}; timm knows torch/{", torch/".join(TORCH_DATASETS)}.')
    try:
        train = opener(name, root, train_split, download)
    except (RuntimeError, OSError, ValueError, KeyError, AssertionError) as e:
        hint = 'pass --data.download=true (needs internet) or' if kind == 'torch' else 'check the name, or'
        raise DataError(f'{label}: cannot open the training split {train_split!r} under {root or "the HF cache"} '
                        f'({_first_line(e)}); {hint} set --data.root to a copy.') from None
    # torchvision's train/test pairs give their test set for any split name but a training one
    fixed_pair = kind == 'torch' and name.lower() in _TRAIN_TEST_PAIRS
    candidates = ['test'] if fixed_pair else candidate_test_splits(test_split)
    errors = []
    for split in candidates:
        try:
            return train, opener(name, root, split, download)
        except (RuntimeError, OSError, ValueError, KeyError, AssertionError) as e:
            errors.append(f'{split}: {_first_line(e)}')
    raise DataError(f'{label} has no test split: tried {"; ".join(errors)}; set data.test_split.')


def _stream(source: Any, size: int | None, name: str) -> tuple[ImageStream, int]:
    """The stream of every image of ``source`` fitted to ``size`` (None: the side of the first image, square)."""
    channels = _channels(source)
    if size is None:
        first = read_source(source, 0, channels)
        height, width = first.shape[-2:]
        if height != width:
            raise DataError(f'{name}: images are resized to the model input, but model.img_size is unset and the '
                            f'first image is {height}x{width}; set model.img_size.')
        size = int(height)
    return ImageStream(source, torch.arange(len(source)), size, channels), size


def open_dataset(dataset: str, root: str | None = None, download: bool = False, train_split: str = 'train',
                 test_split: str = 'test', img_size: int | None = None,
                 ) -> tuple[ArrayDataset, ArrayDataset]:
    """The full training set and the test set of ``dataset``: in memory for the in-memory names, streamed
    (``x`` an ``ImageStream``) for timm's names and folder paths, with every image fitted to ``img_size`` (None: the
    size of the first training image). The first image of each split is decoded here, so a missing or unreadable
    dataset is refused before training."""
    kind, name = _parse(dataset)
    if kind == 'memory':
        return load_dataset(dataset, root, download, train_split, test_split, img_size=img_size)
    if kind == 'iterable':
        instead = ('hfds/' + name + ' (the same Hugging Face set, map-style)' if dataset.lower().startswith('hfids/')
                   else 'wds/<name> or an ImageFolder path (tfds/ also needs TensorFlow; convert the set)')
        raise DataError(f'data.dataset={dataset!r}: timm\'s iterable datasets (hfids/, tfds/) are not supported '
                        '(their readers split and shuffle the data by process rank, so the 90/10 split and the layer '
                        f'pipeline\'s shared batches cannot hold); use {instead}.')
    if kind in _PACKAGES:
        _require(kind)
    if kind == 'path':
        if root is not None:
            raise DataError(f'data.dataset={dataset!r} is a folder path, so data.root={root!r} would be ignored; unset '
                            'data.root (or use data.dataset=folder with data.root).')
        path: Path | None = resolve_root(dataset, dataset)
    elif root is not None:
        path = resolve_root(root, dataset)
    else:  # torchvision's files under the default data folder; the HF cache; torch/folder names no default
        is_folder = name.lower() in ('folder', 'image_folder')
        path = resolve_root(None, dataset) if kind == 'torch' and not is_folder else None
    label = dataset if kind == 'path' else f'{kind}/{name}'
    train_source, test_source = _open_splits(kind, name, path, download, train_split, test_split)
    train_stream, size = _stream(train_source, img_size, label)
    test_stream, _ = _stream(test_source, size, label)
    train = ArrayDataset(train_stream, _labels(train_source, label), _class_names(train_source))
    test = ArrayDataset(test_stream, _labels(test_source, label), _class_names(train_source))
    for split, data in (('training', train), ('test', test)):
        if len(data) == 0:
            raise DataError(f'{label}: the {split} split is empty.')
        _ = data.x[0]  # decode one image now: a dataset that cannot be read stops here, not in epoch 1
    _logger.info('%s: streamed (decoded per image in data.workers), fitted to %dx%d', label, size, size)
    return train, test
