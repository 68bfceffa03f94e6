"""Writing files safely: one atomic writer for every file timm-cff writes, modes that follow the umask, and the
rule that a folder is replaced only when timm-cff wrote it.

A temporary file in the target's folder is renamed over the target once complete, so a reader (or a resumed run
after a kill) never sees half a file; ``tempfile`` creates it 0600, so it is given the mode an ordinary
``open()`` would have had under the process umask before the rename.
"""
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ['atomic_write', 'temporary_folder', 'follow_umask', 'stray_temporaries', 'TEMP_PREFIX']

#: Prefix of the temporary files and folders of an interrupted write (``.NAME.tmp-XXXX``); safe to delete.
TEMP_PREFIX = '.'
_TEMP_SUFFIX = '.tmp-'


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path, folder: bool = False) -> None:
    """Give ``path`` the mode ``open()``/``mkdir()`` would have given it: 0666 (0777 for folders) minus the umask."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f'{TEMP_PREFIX}{path.name}{_TEMP_SUFFIX}', dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        follow_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def temporary_folder(target: Path) -> Path:
    """An empty folder beside ``target`` (same file system, so it can be renamed onto it), mode per the umask."""
    tmp = Path(tempfile.mkdtemp(prefix=f'{TEMP_PREFIX}{target.name}{_TEMP_SUFFIX}', dir=target.parent))
    follow_umask(tmp, folder=True)
    return tmp


def stray_temporaries(folder: Path) -> list[Path]:
    """Temporary files and folders of writes that a kill interrupted, directly in ``folder``."""
    return [p for p in folder.glob(f'{TEMP_PREFIX}*{_TEMP_SUFFIX}*')] if folder.is_dir() else []
