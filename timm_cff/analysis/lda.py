"""Per-block linear probes in closed form: where in depth the classes become linearly separable.

The probe is linear discriminant analysis (LDA) with a shrunk within-class covariance, solved exactly in float64:

    Σ = (1 − α) S_w + α (Tr(S_w) / D) I,     score_c(x) = xᵀ Σ⁻¹ μ_c − ½ μ_cᵀ Σ⁻¹ μ_c + log π_c

It is the linear classifier that goes with Fisher's criterion (same ``S_w``), costs one ``[D, D]`` solve per block
and is deterministic. Unlike a least-squares (ridge) regression onto one-hot labels it does not "mask" classes whose
means lie between others (Hastie et al., ESL §4.2). It equals scikit-learn's ``LinearDiscriminantAnalysis(
solver='lsqr', shrinkage=α)``. Fitted on one part of the samples and scored on the rest, a block's accuracy shows
how much class information a linear read-out recovers there, and which truncated encoder would do.
"""
from collections.abc import Callable

import torch
from torch import Tensor

from .fisher import scatter_matrices

__all__ = ['split_indices', 'fit_linear_discriminant', 'linear_probe_accuracy']


def split_indices(num_samples: int, holdout: float = 0.5, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A seeded random split of ``range(num_samples)`` into ``fit`` and ``holdout`` index tensors."""
    if not 0.0 < holdout < 1.0:
        raise ValueError(f'holdout must be a fraction in (0, 1), got {holdout}.')
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    num_holdout = min(max(1, round(num_samples * holdout)), num_samples - 1)
    return order[num_holdout:], order[:num_holdout]


def fit_linear_discriminant(features: Tensor, labels: Tensor, num_classes: int,
                            shrinkage: float = 1e-2) -> Callable[[Tensor], Tensor]:
    """Shrinkage LDA on ``features [N, D]`` with ``labels [N]`` in ``0..num_classes-1`` (every class present).

    Args:
        shrinkage: α in [0, 1], the weight of the scaled identity in the covariance.

    Returns:
        A function ``features [M, D] -> class scores [M, num_classes]`` (float64).
    """
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f'shrinkage must be in [0, 1], got {shrinkage}.')
    x = features.double()
    counts = torch.bincount(labels, minlength=num_classes).double()
    if bool((counts == 0).any()):
        raise ValueError('Every class needs at least one sample in the probe\'s fit split; use more samples.')
    means = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    means /= counts[:, None]  # [C, D]
    s_w, _ = scatter_matrices(x, labels)
    eye = torch.eye(len(s_w), dtype=x.dtype, device=x.device)
    cov = (1 - shrinkage) * s_w + shrinkage * s_w.trace() / len(s_w) * eye
    coef = torch.linalg.solve(cov, means.T)  # [D, C] = Σ⁻¹ μ_c
    intercept = -0.5 * (means * coef.T).sum(1) + torch.log(counts / counts.sum())  # [C]
    return lambda f: f.double() @ coef + intercept


def linear_probe_accuracy(features: Tensor, labels: Tensor, holdout: float = 0.5, shrinkage: float = 1e-2,
                          seed: int = 0) -> float:
    """Held-out top-1 accuracy (percent) of a closed-form LDA probe on ``features [N, D]`` with ``labels [N]``.

    Args:
        holdout: fraction of the samples scored; the probe is fitted on the others (split seeded by ``seed``).
        shrinkage: see ``fit_linear_discriminant``.
    """
    _, classes = torch.unique(labels, return_inverse=True)
    fit, test = (i.to(labels.device) for i in split_indices(len(labels), holdout, seed))
    predict = fit_linear_discriminant(features[fit], classes[fit], int(classes.max()) + 1, shrinkage)
    return float((predict(features[test]).argmax(1) == classes[test]).double().mean() * 100)
