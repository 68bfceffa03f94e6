"""One row per run folder, for comparison tables such as the paper's Tables 1-3: ``timm-cff compare RUN...``.

A finished run is read from its ``summary.json``; a run still training, interrupted or being extended from
``metrics.csv`` and the best epoch so far saved at its resume point, so a table can be drawn while long runs go on.
``--out`` also keeps every run's per-epoch history beside the table, so the curves outlive the run folders.
"""
import csv
import json
from pathlib import Path
from typing import Any

from ..methods import get_method_info
from ..methods.ff import scores_first_stage
from ..loss import takes_margin
from .config import Config
from .recipes import recorded_recipe
from .rundir import DATASET_FILE, ENVIRONMENT_FILE, RunDir

__all__ = ['summarize_run', 'read_histories', 'format_comparison', 'write_comparison', 'method_name', 'method_label']

def method_name(cfg: Config) -> tuple[str, str]:
    """The paper's name of the column a config trains and the settings that qualify it, e.g.
    ``('CFF+M', '0.4→0.1, τ 0.07')`` or ``('SymBa', '')``."""
    t = cfg.train
    if t.method != 'cff':
        info = get_method_info(t.method)
        name, detail = info.paper_name, ''
        collab = t.method == 'collab'
        if info.label_conditioned and scores_first_stage(collab, t.score_first_stage) != scores_first_stage(collab):
            detail = 'all stages scored' if t.score_first_stage else 'stages 2..L scored'  # not the default
        return name, detail
    details = [f'τ {t.temperature:g}']
    if t.num_views != 2:
        details.append(f'{t.num_views} view{"s" * (t.num_views != 1)}')
    if not takes_margin(t.loss):  # margins apply to a loss that takes one (as in build.build_trainer)
        return ('CFF' if t.loss == 'supcon' else f'CFF [{t.loss}]'), ', '.join(details)
    if not (t.m0 or t.m_last):
        return 'CFF', ', '.join(details)
    schedule = '' if t.margin_schedule == 'linear' else f' {t.margin_schedule}'
    return 'CFF+M', ', '.join([f'{t.m0:g}→{t.m_last:g}{schedule}', *details])


def method_label(cfg: Config) -> str:
    """The paper's name of the column with its settings, e.g. ``'CFF+M (0.4→0.1, τ 0.07)'`` or ``'SymBa'``."""
    name, detail = method_name(cfg)
    return f'{name} ({detail})' if detail else name


def model_label(cfg: Config, recorded: str | None = None) -> str:
    """``'MLP[500 3]'`` or ``'ViT[128 4 5]'`` (embed dim, heads, blocks), the paper's notation: the one the run
    recorded from its built model, else from the config (older runs, whose configs give every size)."""
    m = cfg.model
    if recorded:
        return recorded
    return f'MLP[{m.embed_dim} {m.depth}]' if m.name == 'mlp' else f'ViT[{m.embed_dim} {m.num_heads} {m.depth}]'


def summarize_run(path: str | Path) -> dict[str, Any]:
    """One run folder as a flat dict.

    Keys: ``run, method, variant, model, dataset, train_images, epochs_run, epochs, patience, finished,
    stopped_early, best_epoch, best_val_loss, test_top1, metric, test_metric, head_top1, recipe, paper, stage1_s,
    s_per_epoch``.
    ``method`` is the paper's name (``CFF+M``, ``CFF``, ``BP+CE``, ``FF``, ``SymBa``, ``FF-Collab``) and ``variant``
    its settings; ``best_val_loss`` is the selection loss (the summary's ``selection_key``) at ``best_epoch``;
    ``metric`` is the paper's metric of the row (``run.metric``, e.g. top5 for CIFAR-100); ``recipe`` the recipe the
    run was started from (``--config``: a shipped name, or a YAML file by absolute path) and ``paper`` the paper's
    number for ``method`` in that recipe's row (its header), where known. Accuracies are in percent, None where the
    run has none (yet): an unfinished run has its best epoch so far and no test accuracy.
    """
    run = RunDir(path)
    cfg = run.read_config()
    epochs = run.read_rows('metrics.csv')
    seconds = sum(float(r['time_s']) for r in epochs)
    name, variant = method_name(cfg)
    dataset = run.read_json(DATASET_FILE, missing={})
    row = {'run': run.path.name, 'method': name, 'variant': variant, 'model': model_label(cfg, dataset.get('model')),
           'dataset': Path(cfg.data.root).name if cfg.data.root else cfg.data.dataset,
           'train_images': dataset.get('num_images', {}).get('train'), 'epochs_run': len(epochs),
           'epochs': cfg.train.epochs, 'patience': cfg.train.patience, 'finished': False, 'stopped_early': False,
           'best_epoch': None, 'best_val_loss': None, 'test_top1': None, 'metric': cfg.run.metric, 'test_metric': None,
           'head_top1': None, **_paper(run, name),
           'stage1_s': round(seconds, 2), 's_per_epoch': round(seconds / len(epochs), 2) if epochs else None}
    summary = _current_summary(run, len(epochs))
    if summary:
        row.update(finished=True, best_epoch=summary['best_epoch'], best_val_loss=summary.get('best_val_loss'),
                   stopped_early=len(epochs) < cfg.train.epochs,
                   train_images=summary.get('num_images', {}).get('train', row['train_images']),
                   test_top1=summary['test'].get('top1'), test_metric=summary['test'].get(cfg.run.metric),
                   head_top1=summary.get('test_one_pass_head', {}).get('top1'))
    else:
        state = _fit_state_so_far(run)
        row.update(best_epoch=state.get('best_epoch'), best_val_loss=state.get('best_loss'))
    return row


def _paper(run: RunDir, method: str) -> dict[str, Any]:
    """``recipe`` (the name of the recipe the run's first command line gave ``--config``, where sure) and ``paper``
    (that recipe's reported number for ``method``)."""
    recipe = recorded_recipe(run.read_json(ENVIRONMENT_FILE, missing={}).get('argv') or [])
    return {'recipe': recipe and recipe.name, 'paper': recipe.reported.get(method) if recipe else None}


def read_histories(paths: list[str | Path]) -> list[dict[str, str]]:
    """Every epoch of the runs' ``metrics.csv`` files, in order: one dict per epoch, ``run`` (the folder name)
    first, then the run's own columns (``epoch, time_s, lr, train_loss, ..., val_loss_stage{i}``)."""
    return [{'run': RunDir(path).path.name, **row} for path in paths for row in RunDir(path).read_rows('metrics.csv')]


def _current_summary(run: RunDir, epochs_run: int) -> dict[str, Any] | None:
    """``summary.json`` if it describes the epochs in ``metrics.csv``; a run extended with ``--train.epochs=N`` keeps
    the summary of its shorter self until it finishes. Summaries without ``epochs`` are dated by file time."""
    path = run.path / 'summary.json'
    if not path.is_file():
        return None
    summary = run.read_json('summary.json')
    if 'epochs' in summary:
        return summary if summary['epochs'] == epochs_run else None
    return summary if path.stat().st_mtime >= (run.path / 'metrics.csv').stat().st_mtime else None


def _fit_state_so_far(run: RunDir) -> dict[str, Any]:
    """The run loop's state at the resume point (``best_epoch``, ``best_loss``, ...): ``last.pt``, or a torchrun
    pipeline's newest checkpoint; empty before the first epoch."""
    if run.checkpoint_path('last').is_file():
        return run.load_checkpoint('last')['state']
    from ..pipeline.checkpoint import latest_checkpoint
    from ..pipeline.session import RUN_STATE_FILE
    latest = latest_checkpoint(run.path / 'checkpoints' / 'pipeline')
    return json.loads((latest / RUN_STATE_FILE).read_text()) if latest else {}


def _cell(value: Any) -> str:
    if value is None:
        return '–'
    return f'{value:.2f}' if isinstance(value, float) else str(value)


def format_comparison(rows: list[dict[str, Any]]) -> str:
    """A markdown table of :func:`summarize_run` rows, in the given order."""
    lines = ['| run | method | model | data | epochs | selected epoch | its val loss | test top-1 | test, paper metric '
             '| paper | one-pass head top-1 | stage-1 s | s / epoch |', '|' + '---|' * 13]
    for r in rows:
        epochs = f'{r["epochs_run"]} of {r["epochs"]}'
        if not r['finished']:
            epochs += ', unfinished'
        elif r['stopped_early']:
            epochs += f', stopped (patience {r["patience"]})'
        method = f'{r["method"]} ({r["variant"]})' if r['variant'] else r['method']
        metric = '–' if r['test_metric'] is None else f'{r["metric"]} {r["test_metric"]:.2f}'
        paper = '–' if r.get('paper') is None else f'{r["metric"]} {r["paper"]:.2f}'  # rows of older files lack it
        best = _cell(r['best_epoch']) + ('' if r['finished'] or r['best_epoch'] is None else ' so far')
        loss = '–' if r.get('best_val_loss') is None else f'{r["best_val_loss"]:.3f}'  # rows of older files lack it
        lines.append(f'| {r["run"]} | {method} | {r["model"]} | {r["dataset"]} | {epochs} | {best} | {loss} | '
                     f'{_cell(r["test_top1"])} | {metric} | {paper} | {_cell(r["head_top1"])} | '
                     f'{r["stage1_s"]:,.0f} | {_cell(r["s_per_epoch"])} |')
    return '\n'.join(lines)


def _is_rows_json(path: Path) -> bool:
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(rows, list) and all(isinstance(r, dict) and {'run', 'method', 'epochs_run'} <= r.keys()
                                          for r in rows)


def _is_table(path: Path) -> bool:
    try:
        return path.read_text().startswith('| run | method |')
    except (OSError, UnicodeDecodeError):
        return False


def _is_history(path: Path) -> bool:
    try:
        with path.open() as f:
            return f.readline().startswith('run,epoch,')
    except (OSError, UnicodeDecodeError):
        return False


def write_comparison(rows: list[dict[str, Any]], out: str | Path,
                     history: list[dict[str, str]] | None = None) -> tuple[Path, ...]:
    """``OUT.json`` (the rows) and ``OUT.md`` (the table) side by side, e.g. ``docs/results/<recipe>``, and with
    ``history`` (:func:`read_histories`) ``OUT.history.csv``: its epochs, the columns of all runs (a cell of a
    column another run has is empty)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = tuple(out.with_name(out.name + suffix) for suffix in ('.json', '.md', '.history.csv')[:2 + bool(history)])
    for path, written_here in zip(paths, (_is_rows_json, _is_table, _is_history)):
        if path.exists() and not written_here(path):
            raise FileExistsError(f'{path} exists and is no comparison written by timm-cff compare; give another '
                                  '--out.')
    paths[0].write_text(json.dumps(rows, indent=2, ensure_ascii=False) + '\n')
    paths[1].write_text(format_comparison(rows) + '\n')
    if history:
        columns = list(dict.fromkeys(column for row in history for column in row))  # first-seen order, run first
        with paths[2].open('w', newline='') as f:
            writer = csv.DictWriter(f, columns, restval='', lineterminator='\n')
            writer.writeheader()
            writer.writerows(history)
    return paths
