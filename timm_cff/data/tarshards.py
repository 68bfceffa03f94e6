"""WebDataset tar shards read as a map-style dataset (``data.dataset=wds/<name>``), with Python's ``tarfile`` only.

A WebDataset shard (https://github.com/webdataset/webdataset) is an uncompressed tar file whose members are grouped
into samples by key: the member name up to the first dot of its basename, directory included
(``train/n01440764_10026.jpg`` and ``train/n01440764_10026.cls`` are one sample). The shards of a split are indexed
once, up front: their tar headers (no image is read) and the small ``.cls`` payloads, the labels. An image is then
read by seeking to its bytes, so a wds/ set is indexed like any other streamed dataset: the 90/10 split, subsets and
corruptions are index operations, and every replica and stage group sees the same batches (timm's own wds/ reader
shuffles and splits by process rank instead).

Sample order: the shards in order (sorted by name, or as listed in ``_info.json``), then the samples in the order
they are stored in each shard (that of each key's first member), which is the order WebDataset reads them in when
it does not shuffle.
"""
import json
import logging
import os
import re
import tarfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .sources import DataError

__all__ = ['IMAGE_EXTENSIONS', 'TarShards', 'expand_braces', 'shard_files']

_logger = logging.getLogger(__name__)

#: Extensions of a sample's image member (the first one found in the shard is the image).
IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')
_COMPRESSED = ('.tar.gz', '.tgz')
#: Shards one process keeps open (ImageNet has ~1,000; a DataLoader worker reads them in a random order).
_OPEN_FILES = 64
_RANGE = re.compile(r'\{(\d+)\.\.(\d+)\}')


def expand_braces(pattern: str) -> list[str]:
    """The names of a numeric brace pattern: ``'a-{000..002}.tar'`` -> ``['a-000.tar', 'a-001.tar', 'a-002.tar']``
    (zero-padded to the width of the first bound; several ranges expand in turn). Other text stays as it is."""
    match = _RANGE.search(pattern)
    if match is None:
        return [pattern]
    first, last = match.groups()
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [name for i in range(int(first), int(last) + 1)
            for name in expand_braces(f'{head}{i:0{len(first)}d}{tail}')]


def _read_info(folder: Path) -> dict[str, Any]:
    """timm's ``_info.json`` (or ``info.json``) of the shard folder; {} when there is none."""
    for name in ('_info.json', 'info.json'):
        path = folder / name
        if path.is_file():
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise DataError(f'{path} is not readable JSON ({str(e)[:120]}); repair or remove it.') from None
            return info if isinstance(info, dict) else {}
    return {}


def _listed(folder: Path, split: str, info: dict[str, Any]) -> list[Path] | None:
    """The shards ``_info.json`` lists for ``split`` (brace patterns expanded), or None when it lists none."""
    entry = (info.get('splits') or {}).get(split)
    if not isinstance(entry, dict) or not entry.get('filenames'):
        return None
    names = entry['filenames']
    return [folder / name for pattern in ([names] if isinstance(names, str) else names)
            for name in expand_braces(pattern)]


def shard_files(folder: Path, split: str) -> list[Path]:
    """The shards of ``split`` under ``folder``: those ``_info.json`` lists for it, else the ``.tar`` files named
    ``<split>-*``, ``<split>_*``, ``*-<split>-*`` or ``<split>/*``, sorted by name; [] when there are none. Compressed
    shards are refused (an image could not be read by seeking)."""
    listed = _listed(folder, split, _read_info(folder))
    if listed is not None:
        missing = [path.name for path in listed if not path.is_file()]
        if missing:
            raise DataError(f'{folder / "_info.json"} lists {len(missing)} shard(s) of split {split!r} that do not '
                            f'exist (first: {missing[0]}); fix the list or copy the shards.')
        paths = listed
    else:
        patterns = (f'{split}-*', f'{split}_*', f'*-{split}-*', f'{split}/*')
        paths = sorted({path for p in patterns for suffix in ('.tar', *_COMPRESSED) for path in folder.glob(p + suffix)
                        if path.is_file()}, key=lambda path: path.relative_to(folder).as_posix())
    compressed = [path for path in paths if path.name.endswith(_COMPRESSED)]
    if compressed:
        raise DataError(f'{compressed[0]} is a compressed shard; wds/ reads images by seeking into uncompressed tar '
                        'files: decompress the shards (gunzip, then name them .tar).')
    return paths


def _label(tar: tarfile.TarFile, member: tarfile.TarInfo, shard: Path) -> int:
    """The class index in a ``.cls`` member: an ASCII int (WebDataset's encoding), read without the image."""
    data = tar.extractfile(member).read(64) if member.size <= 64 else b'(too long)'
    text = data.decode('ascii', errors='replace').strip()
    if not text.isdigit():
        raise DataError(f'{shard}: {member.name} holds {data[:20]!r}, not a class index; a .cls member must hold a '
                        'non-negative ASCII int (timm\'s JSON-sidecar labels are not read).')
    return int(text)


def _index_shard(shard: Path) -> dict[str, dict[str, Any]]:
    """key -> ``{'image': (offset, size), 'label': int}`` of every sample of ``shard``, in stored order."""
    samples: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(shard, 'r:') as tar:
            while (member := tar.next()) is not None:
                directory, _, base = member.name.rpartition('/')
                stem, dot, ext = base.partition('.')
                if not member.isfile() or not stem or not dot:  # as WebDataset: no key or no extension, no sample
                    continue
                sample = samples.setdefault(f'{directory}/{stem}' if directory else stem, {})
                ext = ext.lower()
                if ext in IMAGE_EXTENSIONS and 'image' not in sample:
                    sample['image'] = (member.offset_data, member.size)
                elif ext == 'cls':
                    sample['label'] = _label(tar, member, shard)
    except (tarfile.TarError, OSError) as e:
        raise DataError(f'{shard} is not a readable tar file ({str(e)[:120]}); repair or remove it.') from None
    for key, sample in samples.items():
        if 'image' not in sample:
            raise DataError(f'{shard}: sample {key!r} has no image (.{", .".join(IMAGE_EXTENSIONS)}); every sample '
                            'of a wds/ dataset needs one.')
        if 'label' not in sample:
            raise DataError(f'{shard}: sample {key!r} has no .cls label; every sample of a wds/ dataset needs its '
                            'class index in a .cls member.')
    return samples


class TarShards:
    """``shards[i]`` -> ``(bytes, label)``: the encoded image and class index of sample ``i`` of one split.

    Args:
        root: the shard folder (with ``_info.json``, if any).
        split: the split name (``train``, ``validation``, ...).

    Attributes:
        targets: the ``N`` labels (ints), read up front.
        classes: ``_info.json``'s ``classes`` (or ``label_names``), else ``'0'`` ... ``'C-1'`` (C = largest label + 1).
    """

    def __init__(self, root: str | Path, split: str):
        self.root, self.split = Path(root), split
        self.shards = shard_files(self.root, split)
        if not self.shards:
            raise DataError(f'{self.root} has no WebDataset shards for split {split!r} (no {split}-*.tar, '
                            f'{split}_*.tar, *-{split}-*.tar, {split}/*.tar, nor a list in _info.json).')
        shard_ids, offsets, sizes, self.keys, self.targets = [], [], [], [], []
        for s, shard in enumerate(self.shards):
            for key, sample in _index_shard(shard).items():
                shard_ids.append(s)
                offsets.append(sample['image'][0])
                sizes.append(sample['image'][1])
                self.keys.append(key)
                self.targets.append(sample['label'])
        # tensors, not lists of ints: forked workers then share these pages instead of copying them on refcounts
        self._shard, self._offset, self._size = (torch.tensor(v, dtype=torch.int64)
                                                 for v in (shard_ids, offsets, sizes))
        info = _read_info(self.root)
        names = info.get('classes') or info.get('label_names')
        self.classes = [str(c) for c in names] if names else [str(c) for c in range(max(self.targets, default=-1) + 1)]
        self._files: dict[int, BinaryIO] = {}
        self._pid = os.getpid()
        _logger.info('%s, split %s: %d samples in %d shards', self.root, split, len(self), len(self.shards))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[bytes, int]:
        return self.read(i), self.targets[i]

    def describe(self, i: int) -> str:
        """Where sample ``i`` is, for error messages."""
        return f'sample {self.keys[i]!r} of {self.shards[int(self._shard[i])]}'

    def read(self, i: int) -> bytes:
        """The encoded image of sample ``i``: ``size`` bytes at its offset in its shard."""
        shard, offset, size = int(self._shard[i]), int(self._offset[i]), int(self._size[i])
        try:
            f = self._file(shard)
            f.seek(offset)
            data = f.read(size)
        except OSError as e:
            raise DataError(f'{self.describe(i)} cannot be read ({str(e)[:120]}).') from None
        if len(data) != size:
            raise DataError(f'{self.describe(i)} is cut short (the shard changed since it was indexed); restart.')
        return data

    def _file(self, shard: int) -> BinaryIO:
        """The open shard, one handle per process: a forked DataLoader worker opens its own (a file offset shared
        with the parent would race), and keeps it open for the next image."""
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            if len(self._files) >= _OPEN_FILES:
                self._files.pop(next(iter(self._files))).close()
            f = self._files[shard] = open(self.shards[shard], 'rb')  # noqa: SIM115 (kept open on purpose)
        return f

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (spawned workers) without the open files."""
        return {**self.__dict__, '_files': {}, '_pid': None}
