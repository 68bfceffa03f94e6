"""All per-block metrics of the layer-wise analysis from cached features (CFF paper, Sec. 4.2, Fig. 5).

``layerwise_metrics`` turns the pooled block outputs of ``extract_block_features`` into plain lists, one value per
block: Fisher's criterion, closed-form (LDA) probe accuracy, the clamped fraction R(k) at each block's margin and the
anchor same-/different-class cosines. ``tsne_embeddings`` gives the 2-D t-SNE maps (scikit-learn, the ``plot`` extra).
"""
import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..loss import pairwise_cosine
from ..margins import resolve_margins
from .fisher import fisher_criterion
from .pairs import anchor_similarity_from_similarity, clamped_fraction_from_similarity
from .lda import linear_probe_accuracy

__all__ = ['layerwise_metrics', 'subsample', 'tsne_embeddings', 'separable_block']

_logger = logging.getLogger(__name__)


def subsample(num_samples: int, size: int | None, seed: int = 0) -> Tensor:
    """Sorted indices of a seeded random subset of ``size`` out of ``num_samples`` (all of them if fewer)."""
    if size is None or num_samples <= size:
        return torch.arange(num_samples)
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))[:size].sort().values


def separable_block(probe_accuracy: Sequence[float], tolerance: float = 1.0) -> int:
    """The first block whose probe accuracy is within ``tolerance`` points of the best block's."""
    best = max(probe_accuracy)
    return next(i for i, acc in enumerate(probe_accuracy) if acc >= best - tolerance)


def _pair_metrics(features: Tensor, labels: Tensor, margin: float | None) -> dict[str, float]:
    sim, pos = pairwise_cosine(features.double(), labels)  # [n, n], single view
    out = anchor_similarity_from_similarity(sim, pos)
    if margin is not None:
        out['clamped_fraction'] = float(clamped_fraction_from_similarity(sim, pos, margin))
    return out


def layerwise_metrics(
        features: Sequence[Tensor],
        labels: Tensor,
        margins: float | Sequence[float] | Callable[[int], Sequence[float]] | None = None,
        *,
        pair_samples: int | None = 2000,
        probe_holdout: float = 0.5,
        probe_shrinkage: float = 1e-2,
        fisher_ridge: float = 1e-6,
        seed: int = 0,
) -> dict:
    """Per-block metrics of cached features.

    Args:
        features: L tensors ``[N, D_l]`` (``extract_block_features``).
        labels: ``[N]``.
        margins: each block's margin for the clamped fraction R(k) (a list, a constant or a schedule such as
            ``linear_margins(0.4, 0.1)``); ``None`` leaves R(k) out.
        pair_samples: samples (seeded subset) for the pairwise metrics, whose cost grows with its square.
        probe_holdout, probe_shrinkage: see ``linear_probe_accuracy``.
        fisher_ridge: see ``fisher_criterion``.
        seed: seeds the subset and the probe split.

    Returns:
        ``{'fisher': [L], 'fisher_ridge': [L], 'probe_accuracy': [L] (percent), 'same_class_cosine': [L],
        'same_class_cosine_std', 'different_class_cosine', 'different_class_cosine_std', 'clamped_fraction': [L]
        (with margins), 'margins', 'separable_block', 'num_blocks', 'num_samples', 'num_classes', 'feature_dims',
        'settings'}``.
    """
    margin_list = resolve_margins(margins, len(features))
    pairs = subsample(len(labels), pair_samples, seed).to(labels.device)
    out: dict = {'num_blocks': len(features), 'num_samples': len(labels), 'num_classes': len(torch.unique(labels)),
                 'feature_dims': [block.shape[1] for block in features], 'margins': margin_list}
    for index, block in enumerate(features):
        fisher = fisher_criterion(block, labels, fisher_ridge)
        row = {'fisher': fisher['value'], 'fisher_ridge': fisher['ridge'],
               'probe_accuracy': linear_probe_accuracy(block, labels, probe_holdout, probe_shrinkage, seed),
               **_pair_metrics(block[pairs], labels[pairs], margin_list[index] if margin_list else None)}
        for key, value in row.items():
            out.setdefault(key, []).append(value)
        _logger.debug('block %d: %s', index, row)
    out['separable_block'] = separable_block(out['probe_accuracy'])
    out['settings'] = {'pair_samples': len(pairs), 'probe_holdout': probe_holdout, 'probe_shrinkage': probe_shrinkage,
                       'fisher_ridge': fisher_ridge, 'seed': seed}
    return out


def tsne_embeddings(features: Sequence[Tensor], labels: Tensor, num_samples: int | None = 1000, seed: int = 0,
                    perplexity: float = 30.0) -> tuple[list[Tensor], Tensor]:
    """2-D t-SNE of every block's features on one seeded subset (scikit-learn, ``pip install "timm-cff[plot]"``).

    Runs single-threaded: with PyTorch's OpenMP runtime loaded next to scikit-learn's, their threads contend in each
    of the 1,000 gradient steps (1,000 points: 9 s with one thread, 31 s with two, on a 2-core machine).

    Returns:
        L tensors ``[n, 2]`` and the subset's labels ``[n]``.
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    index = subsample(len(labels), num_samples, seed)
    perplexity = min(perplexity, (len(index) - 1) / 3)  # scikit-learn needs perplexity < n
    tsne = TSNE(perplexity=perplexity, init='pca', random_state=seed)
    with threadpool_limits(limits=1):
        maps = [tsne.fit_transform(block.cpu()[index].double().numpy()) for block in features]
    return [torch.from_numpy(m).float() for m in maps], labels.cpu()[index]
