"""A run's training history: the per-epoch ``metrics.csv`` written by ``timm-cff train``.

Columns are ``epoch, time_s, lr, train_loss, train_loss_block{i}..., val_loss, val_loss_block{i}...`` plus any other
``train_*`` / ``val_*`` entries the trainer reports, such as ``train_clamped_block{i}`` (the clamped fraction R(k)).
"""
import csv
import math
import re
from pathlib import Path

__all__ = ['read_history', 'block_series']


def _number(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def read_history(path: str | Path) -> dict[str, list[float]]:
    """``metrics.csv`` as ``{column: [one float per epoch]}``; empty or non-numeric cells become NaN."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'No training history at {path}; give the metrics.csv of a run folder, or None.')
    with path.open(newline='') as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f'{path} has a header but no epochs yet.')
    return {column: [_number(row.get(column)) for row in rows] for column in rows[0]}


def block_series(history: dict[str, list[float]], name: str) -> list[list[float]]:
    """The per-block columns ``{name}_block{i}``, ordered by block: ``block_series(h, 'val_loss')[i]`` is block i."""
    pattern = re.compile(rf'{re.escape(name)}_block(\d+)')
    found = {int(m.group(1)): values for column, values in history.items() if (m := pattern.fullmatch(column))}
    return [found[i] for i in sorted(found)]
