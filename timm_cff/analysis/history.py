"""A run's training history: the per-epoch ``metrics.csv`` written by ``timm-cff train``.

Columns are ``epoch, time_s, lr, train_loss, train_loss_stage{i}..., val_loss, val_loss_stage{i}...`` plus any other
``train_*`` / ``val_*`` entries the trainer reports, such as ``train_clamped_stage{i}`` (the clamped fraction R(k)).
Runs written before the per-stage statistics were named ``_stage{i}`` have ``_block{i}`` columns
(``val_loss_block2``); ``current_column`` maps those names to the current ones, and ``read_history`` returns the
current names (looking an old name up still finds its column).
"""
import csv
import math
import re
from pathlib import Path

__all__ = ['read_history', 'block_series', 'current_column', 'History']

_OLD_STAGE_SUFFIX = re.compile(r'(.+)_block(\d+)')


def current_column(name: str) -> str:
    """A column name as runs write it now: ``'val_loss_block2' -> 'val_loss_stage2'``; other names unchanged."""
    match = _OLD_STAGE_SUFFIX.fullmatch(name)
    return f'{match.group(1)}_stage{match.group(2)}' if match else name


class History(dict):
    """``{column: [one float per epoch]}`` under the current column names; an old name (``val_loss_block2``) finds
    the column it became."""

    def __missing__(self, key: str) -> list[float]:
        current = current_column(key)
        if current == key:
            raise KeyError(key)
        return self[current]

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key) or (isinstance(key, str) and super().__contains__(current_column(key)))

    def get(self, key: str, default=None):
        try:
            return self[key]
        except KeyError:
            return default


def _number(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def read_history(path: str | Path) -> History:
    """``metrics.csv`` as ``{column: [one float per epoch]}``; empty or non-numeric cells become NaN."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'No training history at {path}; give the metrics.csv of a run folder, or None.')
    with path.open(newline='') as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f'{path} has a header but no epochs yet.')
    return History({current_column(column): [_number(row.get(column)) for row in rows] for column in rows[0]})


def block_series(history: dict[str, list[float]], name: str) -> list[list[float]]:
    """The per-stage columns ``{name}_stage{i}``, ordered by stage: ``block_series(h, 'val_loss')[i]`` is stage i
    (for a ViT, block i). Old ``{name}_block{i}`` columns count as stage i."""
    pattern = re.compile(rf'{re.escape(name)}_stage(\d+)')
    found = {int(m.group(1)): values for column, values in history.items()
             if (m := pattern.fullmatch(current_column(column)))}
    return [found[i] for i in sorted(found)]
