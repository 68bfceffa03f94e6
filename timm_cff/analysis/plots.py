"""Pictures of the layer-wise analysis (CFF paper, Fig. 5), drawn with matplotlib's object API.

Figures are built with ``matplotlib.figure.Figure`` and saved directly, so no pyplot state or GUI backend is
touched. matplotlib is the optional ``plot`` extra: ``pip install "timm-cff[plot]"``.
"""
import importlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor

from .history import block_series

__all__ = ['plot_depth_metrics', 'plot_tsne', 'plot_training_curves', 'plot_clamped_curves', 'missing_plot_packages',
           'PLOT_INSTALL_HINT']

_DPI = 100
#: What to run when the pictures are missing.
PLOT_INSTALL_HINT = 'pip install "timm-cff[plot]"'


def missing_plot_packages() -> list[str]:
    """The packages of the ``plot`` extra (matplotlib, scikit-learn) that cannot be imported."""
    missing = []
    for module, package in (('matplotlib', 'matplotlib'), ('sklearn', 'scikit-learn')):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    return missing


def _figure(nrows: int, ncols: int, panel_size: tuple[float, float] = (4.2, 3.2)):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout='constrained')
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes.ravel()


def _save(fig, path: str | Path) -> Path:
    fig.savefig(path, dpi=_DPI)
    return Path(path)


def _block_colors(num_blocks: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps['viridis']
    return [cmap(0.85 * i / max(num_blocks - 1, 1)) for i in range(num_blocks)]  # dark = early, light = late


def _run_colors(num_runs: int) -> list[str]:
    return [f'C{i}' for i in range(num_runs)]


def _depth_axes(ax, num_blocks: int, title: str, ylabel: str) -> None:
    ax.set(title=title, xlabel='block', ylabel=ylabel, xticks=range(num_blocks))
    ax.grid(alpha=0.3)


def _depth_panel(ax, runs: Mapping[str, dict], key: str, title: str, ylabel: str, log_if_wide: bool = False) -> None:
    values = []
    for metrics, color in zip(runs.values(), _run_colors(len(runs))):
        if metrics.get(key):
            ax.plot(range(len(metrics[key])), metrics[key], 'o-', color=color)
            values += [v for v in metrics[key] if v > 0 and math.isfinite(v)]
    if log_if_wide and values and max(values) > 20 * min(values):  # orders of magnitude apart (e.g. a ridged J)
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.set_yscale('log')
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ylabel += ' (log scale)'
    _depth_axes(ax, max(len(m['fisher']) for m in runs.values()), title, ylabel)


def _similarity_panel(ax, runs: Mapping[str, dict]) -> None:
    for metrics, color in zip(runs.values(), _run_colors(len(runs))):
        for kind, style in (('same', '-'), ('different', '--')):
            mean, std = metrics[f'{kind}_class_cosine'], metrics[f'{kind}_class_cosine_std']
            blocks = range(len(mean))
            ax.plot(blocks, mean, 'o' + style, color=color)
            ax.fill_between(blocks, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=color, alpha=0.12, linewidth=0)
    ax.plot([], [], 'k-', label='same class')
    ax.plot([], [], 'k--', label='other classes')
    ax.legend(fontsize='small')
    _depth_axes(ax, max(len(m['fisher']) for m in runs.values()), 'anchor cosine (mean ± std over anchors)',
                'cosine')


def plot_depth_metrics(runs: Mapping[str, dict], path: str | Path) -> Path:
    """Fisher's criterion, probe accuracy, anchor cosines and R(k) versus depth; one colour per run.

    Args:
        runs: ``{label: layerwise_metrics(...)}``; several runs are overlaid (e.g. CFF+M next to BP).
        path: the PNG to write.
    """
    fig, axes = _figure(2, 2)
    _depth_panel(axes[0], runs, 'fisher', "Fisher's criterion Tr(S_w⁻¹ S_B)", 'J', log_if_wide=True)
    _depth_panel(axes[1], runs, 'probe_accuracy', 'linear probe (LDA), held out', 'top-1 (%)')
    _similarity_panel(axes[2], runs)
    if any(m.get('clamped_fraction') for m in runs.values()):
        _depth_panel(axes[3], runs, 'clamped_fraction', 'same-class pairs in R(k): cos + m > 1', 'fraction')
    else:
        axes[3].set_axis_off()
    if len(runs) > 1:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], marker='o', color=c) for c in _run_colors(len(runs))]
        fig.legend(handles, list(runs), loc='outside lower center', ncols=len(runs), frameon=False)
    else:
        fig.suptitle(next(iter(runs)), fontsize='medium')
    return _save(fig, path)


def plot_tsne(maps: Sequence[Tensor], labels: Tensor, path: str | Path,
              class_names: Sequence[str] | None = None) -> Path:
    """One t-SNE scatter per block (``maps``: L tensors ``[n, 2]``), points coloured by class ``labels [n]``."""
    from matplotlib import colormaps

    ncols = min(len(maps), 3)
    fig, axes = _figure(math.ceil(len(maps) / ncols), ncols, (3.4, 3.2))
    classes = sorted(int(c) for c in labels.unique())
    palette = colormaps['tab10' if len(classes) <= 10 else 'tab20'].colors
    for index, ax in enumerate(axes):
        ax.set_axis_off()
        if index >= len(maps):
            continue
        ax.set_title(f'block {index}')
        for rank, c in enumerate(classes):
            points = maps[index][labels == c].numpy()
            name = class_names[c] if class_names else str(c)
            ax.scatter(points[:, 0], points[:, 1], s=3, color=palette[rank % len(palette)], label=name,
                       linewidths=0, rasterized=True)
    if len(classes) <= 20:
        fig.legend(*axes[0].get_legend_handles_labels(), loc='outside right center', fontsize='small',
                   frameon=False, markerscale=3)
    return _save(fig, path)


def _curve_panels(axes, history: dict[str, list[float]], name: str, titles: tuple[str, str], ylabel: str) -> bool:
    """Per-block ``train_{name}`` and ``val_{name}`` curves; falls back to the un-blocked column. False if none."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    epochs = history.get('epoch') or list(range(1, len(next(iter(history.values()))) + 1))
    drawn = False
    for ax, split, title in zip(axes, ('train', 'val'), titles):
        series = block_series(history, f'{split}_{name}')
        labels = [f'block {i}' for i in range(len(series))]
        if not series and f'{split}_{name}' in history:
            series, labels = [history[f'{split}_{name}']], [name]
        for values, label, color in zip(series, labels, _block_colors(len(series))):
            ax.plot(epochs, values, '.-' if len(values) < 30 else '-', color=color, label=label)
        drawn = drawn or bool(series)
        ax.set(title=title, xlabel='epoch', ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True) if len(epochs) > 1 else FixedLocator(epochs))
        ax.grid(alpha=0.3)
    handles = max((ax.get_legend_handles_labels() for ax in axes), key=lambda hl: len(hl[0]))
    if handles[0]:  # one legend beside the panels, where it hides no curve
        axes[0].figure.legend(*handles, loc='outside right center', fontsize='small', frameon=False)
    return drawn


def plot_training_curves(history: dict[str, list[float]], path: str | Path) -> Path | None:
    """Train and validation loss per block over epochs (a run's ``metrics.csv``); None if it has no losses."""
    fig, axes = _figure(1, 2)
    drawn = _curve_panels(axes, history, 'loss', ('training loss', 'validation loss'), 'loss')
    return _save(fig, path) if drawn else None


def plot_clamped_curves(history: dict[str, list[float]], path: str | Path) -> Path | None:
    """Fraction of positives in R(k) per block over epochs; None if the run did not log ``*_clamped_stage{i}``."""
    if not block_series(history, 'train_clamped') and not block_series(history, 'val_clamped'):
        return None
    fig, axes = _figure(1, 2)
    _curve_panels(axes, history, 'clamped', ('R(k) fraction, training', 'R(k) fraction, validation'), 'fraction')
    return _save(fig, path)
