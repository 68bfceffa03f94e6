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

__all__ = ['Recipe', 'list_recipes', 'recorded_recipe', 'resolve_recipe']


#: In a recipe header: "Reproduces Table 1 & 3, row ...: CFF+M 80.42 (top1 test accuracy" ("i.e. 79.00" in Table 6).
_PAPER_ROW = re.compile(r'Reproduces (Table [\d &]*\d).*?(?:CFF\+M |i\.e\. )([\d.]+) .*?\((top\d+)')
#: The row's other columns in a header: "Table 1: CFF 78.70, FF 76.21, ...; Table 3: BP+CE 76.92" (the paper's
#: column names of ``MethodInfo.paper_name``; CFF+M before CFF and FF-Collab before FF, so the longer name wins).
_COLUMN = re.compile(r'(?<![\w+-])(CFF\+M|CFF|BP\+CE|FF-Collab|FF|SymBa) (\d+\.\d+)\b')


@dataclass(frozen=True)
class Recipe:
    """A shipped recipe: its ``name`` (the file stem), its file, its title (the first header line: data set, model,
    augmentation), the paper's number it reproduces (e.g. ``'Table 1 & 3: 80.42 top1'``; empty for the quickstart)
    and ``reported``, the paper's number for each column of that row in its metric, e.g. ``{'CFF+M': 80.42, 'CFF':
    78.70, ..., 'BP+CE': 76.92}`` (the recipe trains CFF+M; one key on the command line trains another column)."""
    name: str
    path: Path
    title: str
    paper: str
    reported: dict[str, float]


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
    text = ' '.join(header)
    row = _PAPER_ROW.search(text)
    paper = f'{row[1]}: {row[2]} {row[3]}' if row else ''
    reported = {'CFF+M': float(row[2])} if row else {}
    for name, value in _COLUMN.findall(text):
        reported.setdefault(name, float(value))  # the first number of a column is its number of this row
    return Recipe(path.stem, path, header[0].rstrip('.') if header else '', paper, reported)


def list_recipes(filter: str = '') -> list[Recipe]:
    """Every shipped recipe whose name contains ``filter``, sorted by name."""
    return [_recipe(p) for p in sorted(_folder().glob('*.yaml')) if filter in p.stem]


def recorded_recipe(argv: list[str]) -> Recipe | None:
    """The recipe of the ``--config`` in a recorded command line (a run's ``environment.json`` ``argv``) where it is
    sure: a shipped recipe's name, or an absolute path to a file still there. ``None`` otherwise (no ``--config``,
    or a relative path: the folder it was relative to is not recorded)."""
    config = None
    for option, value in zip(argv, argv[1:] + ['']):  # the last --config counts, as for argparse
        if option == '--config':
            config = value
        elif option.startswith('--config='):
            config = option.partition('=')[2]
    if not config:
        return None
    path = Path(config)
    path = path if path.is_absolute() else _shipped(path)
    return _recipe(path) if path is not None and path.is_file() else None


def _shipped(path: Path) -> Path | None:
    """The shipped recipe a bare ``--config`` name means (``quickstart`` or ``quickstart.yaml``), else ``None``."""
    return _folder() / f'{path.name.removesuffix(".yaml")}.yaml' if path.parent == Path('.') else None


def resolve_recipe(config: str) -> Path:
    """``--config`` value -> YAML file: an existing path as given, else the shipped recipe of that name (with or
    without ``.yaml``)."""
    path = Path(config).expanduser()
    if path.is_file():
        return path
    shipped = _shipped(path)
    if shipped is not None and shipped.is_file():
        return shipped
    names = [r.name for r in list_recipes()]
    raise ConfigError(f'--config {config}: no such file and no shipped recipe of that name. Recipes: '
                      f'{", ".join(names)} (timm-cff recipes lists them).')
