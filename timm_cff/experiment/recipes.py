"""The recipes shipped in the package (``timm_cff/recipes/*.yaml``): found by name, listed with the paper row each
reproduces.

``--config quickstart`` and ``--config cifar10_vit128-4-5_rc`` work from any folder after ``pip install timm-cff``;
a path to a YAML file still works and wins when both exist.
"""
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .config import ConfigError

__all__ = ['Recipe', 'list_recipes', 'resolve_recipe']


#: In a recipe header: "Reproduces Table 1 & 3, row ...: CFF+M 80.42 (top1 test accuracy" ("i.e. 79.00" in Table 6).
_PAPER_ROW = re.compile(r'Reproduces (Table [\d &]*\d).*?(?:CFF\+M |i\.e\. )([\d.]+) .*?\((top\d+)')


@dataclass(frozen=True)
class Recipe:
    """A shipped recipe: its ``name`` (the file stem), its file, its title (the first header line: data set, model,
    augmentation) and the paper's number it reproduces (e.g. ``'Table 1 & 3: 80.42 top1'``; empty for the
    quickstart)."""
    name: str
    path: Path
    title: str
    paper: str


def _folder() -> Path:
    return Path(str(resources.files('timm_cff') / 'recipes'))


def _header(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith('#'):
            break
        lines.append(line.lstrip('# ').strip())
    return lines


def _recipe(path: Path) -> Recipe:
    header = _header(path)
    row = _PAPER_ROW.search(' '.join(header))
    paper = f'{row[1]}: {row[2]} {row[3]}' if row else ''
    return Recipe(path.stem, path, header[0].rstrip('.') if header else '', paper)


def list_recipes(filter: str = '') -> list[Recipe]:
    """Every shipped recipe whose name contains ``filter``, sorted by name."""
    return [_recipe(p) for p in sorted(_folder().glob('*.yaml')) if filter in p.stem]


def resolve_recipe(config: str) -> Path:
    """``--config`` value -> YAML file: an existing path as given, else the shipped recipe of that name (with or
    without ``.yaml``)."""
    path = Path(config).expanduser()
    if path.is_file():
        return path
    shipped = _folder() / f'{path.name.removesuffix(".yaml")}.yaml'
    if path.parent == Path('.') and shipped.is_file():
        return shipped
    names = [r.name for r in list_recipes()]
    raise ConfigError(f'--config {config}: no such file and no shipped recipe of that name. Recipes: '
                      f'{", ".join(names)} (timm-cff recipes lists them).')
