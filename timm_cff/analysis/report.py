"""The layer-wise analysis report: ``analyze(model, loader, out_dir=...)`` writes ``report.md``, ``metrics.json``
and PNG pictures (CFF paper, Sec. 4.2 / Fig. 5).

``report.md`` embeds the pictures next to the numbers. Without the ``plot`` extra (matplotlib, scikit-learn) the
numbers are still written and the report says how to get the pictures.
"""
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from torch import nn

from ..families import StageAdapter
from .features import extract_block_features
from .history import block_series, read_history
from .layerwise import layerwise_metrics, tsne_embeddings
from .plots import (PLOT_INSTALL_HINT, missing_plot_packages, plot_clamped_curves, plot_depth_metrics, plot_tsne,
                    plot_training_curves)

__all__ = ['analyze', 'write_report']

_logger = logging.getLogger(__name__)

_FIGURES = {
    'depth.png': ('Metrics versus depth',
                  "Fisher's criterion and the held-out accuracy of a linear probe rise where a block adds class "
                  'information. Anchor cosines: the gap between same class (solid) and other classes (dashed) is '
                  'what separates classes; both rising together is a shared direction, not separation. R(k): the '
                  "share of same-class pairs that the block's margin no longer pulls together."),
    'tsne.png': ('t-SNE of each block, coloured by class',
                 'A class that gathers into its own cluster from one block to the next is becoming separable. '
                 'Distances between far-apart clusters mean little in t-SNE.'),
    'training_curves.png': ('Training curves',
                            'Training and validation loss per epoch, one curve per block when the run logged them.'),
    'clamped_curves.png': ('R(k) during training',
                           'Share of positive pairs with cos + m > 1 per block and epoch (they get no gradient).'),
}


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '–'
    return f'{value:.{digits}g}' if abs(value) >= 1000 else f'{value:.{digits}f}'


def _metrics_table(m: dict) -> list[str]:
    columns = [('block', None), ('margin', 'margins'), ("Fisher Tr(S_w⁻¹S_B)", 'fisher'),
               ('probe acc. (%)', 'probe_accuracy'), ('R(k) fraction', 'clamped_fraction'),
               ('cos same class', 'same_class_cosine'), ('cos other class', 'different_class_cosine')]
    columns = [(title, key) for title, key in columns if key is None or m.get(key) is not None]
    lines = ['| ' + ' | '.join(t for t, _ in columns) + ' |', '|' + '---:|' * len(columns)]
    for i in range(m['num_blocks']):
        cells = [str(i)] + [_fmt(m[key][i], 1 if key == 'probe_accuracy' else 3) for _, key in columns[1:]]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines


def _widths(dims: list[int]) -> str:
    return str(dims[0]) if len(set(dims)) == 1 else ', '.join(map(str, dims))


def _summary(m: dict, title: str) -> list[str]:
    k, acc = m['separable_block'], m['probe_accuracy']
    best = max(range(len(acc)), key=acc.__getitem__)
    lines = [f'# {title}', '',
             f"{m['num_samples']} samples of {m['num_classes']} classes through {m['num_blocks']} blocks "
             f"(features of width {_widths(m['feature_dims'])}). "
             f"Fisher's criterion goes from {_fmt(m['fisher'][0], 1)} at block 0 to {_fmt(m['fisher'][-1], 1)} at "
             f"block {m['num_blocks'] - 1}; the linear probe from {acc[0]:.1f} % to {acc[-1]:.1f} % "
             f'(best {acc[best]:.1f} % at block {best}).',
             f'The probe comes within 1 point of its best at **block {k}**: an encoder truncated after block {k} '
             f'({k + 1} of {m["num_blocks"]} blocks) reads out {acc[k]:.1f} %.', '']
    return lines


def _notes(m: dict) -> list[str]:
    s = m['settings']
    ridged = [i for i, r in enumerate(m['fisher_ridge']) if r > 0]
    ridge = (f"S_w was singular at blocks {ridged}, so δ·I was added (δ = {s['fisher_ridge']:g} × its mean eigenvalue, "
             'listed as `fisher_ridge` in metrics.json); J is inflated there.' if ridged else
             'S_w was well conditioned at every block, so no ridge was added.')
    lines = ['How the numbers were computed:', '',
             '- Features: the pooled (token-mean) output of each block; in a CFF model, the vector its loss sees.',
             f"- Fisher: Tr(S_w⁻¹ S_B) by a float64 linear solve over all {m['num_samples']} samples. {ridge} "
             'J is biased upwards when samples are few for the width, so compare runs on the same samples.',
             f"- Probe: closed-form linear discriminant (LDA, covariance shrinkage {s['probe_shrinkage']:g}), "
             f"fitted on {100 * (1 - s['probe_holdout']):.0f} % of the samples and scored on the other "
             f"{100 * s['probe_holdout']:.0f} % (seed {s['seed']}).",
             f"- Pairs: cosines among {s['pair_samples']} samples (one view); every sample is an anchor."]
    if m.get('clamped_fraction') is not None:
        lines.append("- R(k) fraction: share of same-class pairs with cos + m > 1 at the block's margin m.")
    return lines + ['']


def _last_epoch_line(history: dict[str, list[float]]) -> list[str]:
    values = [f'{k} {_fmt(v[-1])}' for k, v in history.items() if k not in ('epoch', 'time_s', 'lr')]
    return [f"Last epoch ({len(next(iter(history.values())))}): {', '.join(values)}.", '']


def _history_table(history: dict[str, list[float]]) -> list[str]:
    """Per block: last train/val loss, best val loss and its epoch, last train/val R(k) when logged."""
    val = block_series(history, 'val_loss')
    if not val:
        return _last_epoch_line(history)
    series = {name: block_series(history, name) for name in ('train_loss', 'train_clamped', 'val_clamped')}
    header = ['block', 'last train loss', 'last val loss', 'best val loss (epoch)'] + \
        [title for name, title in (('train_clamped', 'last train R(k)'), ('val_clamped', 'last val R(k)'))
         if series[name]]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---:|' * len(header)]
    epochs = history.get('epoch') or list(range(1, len(val[0]) + 1))
    for i, values in enumerate(val):
        best = min(range(len(values)), key=lambda e: math.inf if math.isnan(values[e]) else values[e])
        cells = [str(i), _fmt(series['train_loss'][i][-1]) if series['train_loss'] else '–', _fmt(values[-1]),
                 f'{_fmt(values[best])} ({epochs[best]:.0f})']
        cells += [_fmt(series[name][i][-1]) for name in ('train_clamped', 'val_clamped') if series[name]]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines + ['']


def _draw_figures(out_dir: Path, metrics: dict, history: dict | None, tsne: tuple | None,
                  class_names: Sequence[str] | None, label: str) -> list[str]:
    drawn = [plot_depth_metrics({label: metrics}, out_dir / 'depth.png')]
    if tsne is not None:
        drawn.append(plot_tsne(*tsne, out_dir / 'tsne.png', class_names))
    if history is not None:
        drawn.append(plot_training_curves(history, out_dir / 'training_curves.png'))
        drawn.append(plot_clamped_curves(history, out_dir / 'clamped_curves.png'))
    return [p.name for p in drawn if p is not None]


def _figure_lines(figures: list[str]) -> list[str]:
    lines = []
    for name in figures:
        caption, how_to_read = _FIGURES[name]
        lines += [f'### {caption}', '', f'![{caption}]({name})', '', how_to_read, '']
    return lines


def _missing_lines(missing: list[str]) -> list[str]:
    return [f"Pictures were not drawn: {' and '.join(missing)} could not be imported. Install the plot extra with "
            f'`{PLOT_INSTALL_HINT}` and run the analysis again.', '']


_REPORT_FILES = ('report.md', 'metrics.json', 'depth.png', 'tsne.png', 'training_curves.png', 'clamped_curves.png')


def _check_replaceable(out_dir: Path) -> None:
    """The report overwrites its own file names only in an earlier report's folder (its ``metrics.json`` says so);
    any other file of those names is a user's and is refused (other files in the folder are never touched)."""
    taken = [name for name in _REPORT_FILES if (out_dir / name).exists()]
    if not taken:
        return
    try:
        earlier = 'figures' in json.loads((out_dir / 'metrics.json').read_text())
    except (OSError, ValueError, TypeError):
        earlier = False
    if not earlier:
        raise FileExistsError(f'{out_dir} holds {", ".join(taken)} that no earlier report wrote; give another --out.')


def write_report(out_dir: str | Path, metrics: dict, *, history: dict[str, list[float]] | None = None,
                 tsne: tuple | None = None, class_names: Sequence[str] | None = None,
                 title: str = 'Layer-wise analysis') -> list[Path]:
    """Write ``report.md``, ``metrics.json`` and (with the plot extra) the PNGs into ``out_dir``.

    Args:
        metrics: ``layerwise_metrics(...)``.
        history: ``read_history(metrics.csv)`` of the run, for training curves; ``None`` leaves them out.
        tsne: ``tsne_embeddings(...)`` (maps, labels); ``None`` leaves the t-SNE picture out.
        class_names: names in label order, for the t-SNE legend.

    Returns:
        The files written.
    """
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    missing = missing_plot_packages()
    figures = [] if missing else _draw_figures(out_dir, metrics, history, tsne, class_names, title)
    depth_figures = [f for f in figures if f in ('depth.png', 'tsne.png')]
    lines = _summary(metrics, title) + ['## Per-block metrics', ''] + _metrics_table(metrics) + [''] + \
        _notes(metrics) + ['## Pictures', ''] + (_missing_lines(missing) if missing else _figure_lines(depth_figures))
    if history is not None:
        lines += ['## Training', ''] + _history_table(history) + \
            _figure_lines([f for f in figures if f not in depth_figures])
    (out_dir / 'report.md').write_text('\n'.join(lines))
    (out_dir / 'metrics.json').write_text(json.dumps({'title': title, **metrics, 'figures': figures}, indent=2))
    if missing:
        _logger.warning('Pictures not drawn (%s missing); %s', ', '.join(missing), PLOT_INSTALL_HINT)
    return [out_dir / 'report.md', out_dir / 'metrics.json'] + [out_dir / f for f in figures]


def analyze(
        model: nn.Module,
        loader: Iterable,
        *,
        margins: float | Sequence[float] | Callable[[int], Sequence[float]] | None = None,
        history_csv: str | Path | None = None,
        out_dir: str | Path | None = None,
        class_names: Sequence[str] | None = None,
        title: str = 'Layer-wise analysis',
        max_samples: int | None = 5000,
        pair_samples: int | None = 2000,
        tsne_samples: int | None = 1000,
        seed: int = 0,
        stages: StageAdapter | None = None,
) -> dict:
    """Layer-wise analysis of a trained model on a (validation) loader: metrics, and with ``out_dir`` a report.

    Args:
        model: a timm ViT or a model with a registered stage adapter.
        loader: ``(inputs, labels)`` batches, ideally without augmentation; the first view is used.
        margins: the per-block margins the run trained with (list, constant or schedule) for R(k); ``None``: no R(k).
        history_csv: the run's ``metrics.csv`` for the training curves.
        out_dir: where to write ``report.md``, ``metrics.json`` and the PNGs; ``None`` only returns the metrics.
        class_names: names in label order (t-SNE legend).
        max_samples, pair_samples, tsne_samples: samples used overall, for pairwise metrics, for t-SNE (0: none).
        seed: seeds every subset and the probe split.

    Returns:
        ``layerwise_metrics(...)``, plus ``'files'`` (paths written) when ``out_dir`` is given.
    """
    if out_dir is not None:
        _check_replaceable(Path(out_dir))  # before the work, not after it
    start = time.perf_counter()
    features, labels = extract_block_features(model, loader, max_samples, stages)
    metrics = layerwise_metrics(features, labels, margins, pair_samples=pair_samples, seed=seed)
    _logger.info('Layer-wise metrics of %d samples in %.1f s', len(labels), time.perf_counter() - start)
    if out_dir is None:
        return metrics
    history = read_history(history_csv) if history_csv is not None else None
    tsne = None
    if tsne_samples and not missing_plot_packages():
        tsne = tsne_embeddings(features, labels, tsne_samples, seed)
    files = write_report(out_dir, metrics, history=history, tsne=tsne, class_names=class_names, title=title)
    _logger.info('Wrote %s in %.1f s', out_dir, time.perf_counter() - start)
    return {**metrics, 'files': [str(f) for f in files]}
