"""One registry shape for every pluggable kind (losses, methods, model families, margin schedules).

It copies the shape of timm's registries: an info record per name, ``register_*`` / ``create_*`` / ``list_*`` verbs
with fnmatch filters, and an error that names what is known. Each kind keeps its own verbs (``register_loss``,
``create_trainer``, ...) as thin wrappers over one ``Registry``.
"""
import fnmatch
import logging
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ['Registry']

_logger = logging.getLogger(__name__)

Info = TypeVar('Info')


class Registry(Generic[Info]):
    """Named info records of one kind (``'loss'``, ``'method'``, ...); names are case-insensitive."""

    def __init__(self, kind: str, plural: str | None = None, ordered: bool = False):
        """``ordered``: list names in registration order (e.g. the paper's column order) instead of sorted."""
        self.kind, self.plural, self.ordered = kind, plural or f'{kind}s', ordered
        self._entries: dict[str, Info] = {}

    def register(self, name: str, info: Info) -> Info:
        """Add ``info`` under ``name``; registering a name again warns and replaces the old record."""
        key = name.lower()
        if key in self._entries:
            _logger.warning('%s %r is registered again; the new record replaces the old one.', self.kind, key)
        self._entries[key] = info
        return info

    def get(self, name: str) -> Info:
        """The record of ``name``; ``ValueError`` naming the known ones otherwise."""
        key = name.lower() if isinstance(name, str) else name
        if key not in self._entries:
            raise ValueError(f'Unknown {self.kind} {name!r}. Known {self.plural}: {", ".join(self.names())}.')
        return self._entries[key]

    def names(self, filter: str | list[str] = '', exclude_filters: str | list[str] | None = None) -> list[str]:
        """Registered names, fnmatch-filtered as ``timm.list_models`` does."""
        names = list(self._entries) if self.ordered else sorted(self._entries)
        if filter:
            names = [n for n in names if _matches(n, filter)]
        if exclude_filters:
            names = [n for n in names if not _matches(n, exclude_filters)]
        return names

    def unregister(self, name: str) -> Info:
        """Remove ``name`` (e.g. a test's temporary entry) and return its record."""
        return self._entries.pop(self.get(name) and name.lower())

    def find(self, predicate: Callable[[Info], bool]) -> Info | None:
        """The first record (in registration order) for which ``predicate`` holds."""
        return next((info for info in self._entries.values() if predicate(info)), None)

    def __contains__(self, name: str) -> bool:
        return isinstance(name, str) and name.lower() in self._entries

    def __iter__(self) -> Iterator[Info]:
        return iter(list(self._entries.values()))


def _matches(name: str, patterns: str | list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in ([patterns] if isinstance(patterns, str) else patterns))
