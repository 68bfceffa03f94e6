"""Fisher's criterion ``J = Tr(S_w⁻¹ S_B)`` of class-labelled features (CFF paper, Eqs. 19-22, Fig. 5 row 2).

With class means ``μ_c``, the overall mean ``μ`` and ``N_c`` samples in class c out of N:

    S_w = (1/N) Σ_c Σ_{i∈c} (x_i − μ_c)(x_i − μ_c)ᵀ       within-class scatter
    S_B = (1/N) Σ_c N_c (μ_c − μ)(μ_c − μ)ᵀ               between-class scatter
    J   = Tr(S_w⁻¹ S_B)

The common 1/N cancels in J, so J is the same with plain sums. J is unchanged by any invertible linear map of the
features, so it compares blocks whose outputs live at different scales. It is large when classes are far apart
relative to their spread. ``S_w⁻¹ S_B`` is never formed by inversion: J comes from a linear solve in float64. When S_w
is singular (fewer samples than dimensions, collapsed features) a ridge ``δ·I`` is added and ``δ`` is reported.
"""
import torch
from torch import Tensor

__all__ = ['scatter_matrices', 'fisher_criterion']


def scatter_matrices(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Within- and between-class scatter, both divided by N.

    Args:
        features: ``[N, D]``.
        labels: ``[N]`` integer classes.

    Returns:
        ``S_w [D, D]`` and ``S_B [D, D]`` in float64.
    """
    x = features.double()
    _, classes = torch.unique(labels, return_inverse=True)  # [N] in 0..C-1
    num_classes = int(classes.max()) + 1
    counts = torch.bincount(classes, minlength=num_classes).to(x)  # [C]
    means = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, classes, x)
    means /= counts[:, None]  # [C, D]
    within = x - means[classes]  # [N, D]
    between = means - x.mean(0)  # [C, D]
    s_w = within.T @ within / len(x)
    s_b = (between.T * counts) @ between / len(x)
    return s_w, s_b


def fisher_criterion(features: Tensor, labels: Tensor, ridge: float = 1e-6) -> dict[str, float]:
    """``Tr(S_w⁻¹ S_B)`` of ``features [N, D]`` with ``labels [N]``, by a float64 solve.

    Args:
        features: ``[N, D]``.
        labels: ``[N]``; at least two classes.
        ridge: S_w counts as singular when its smallest eigenvalue is below ``ridge`` times its mean eigenvalue;
            then ``δ = ridge · mean eigenvalue`` is added to its diagonal. A well-conditioned S_w is used as it is.

    Returns:
        ``{'value': J, 'ridge': δ}`` (``δ = 0.0`` when no ridge was needed).
    """
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f'Expected features [N, D] and labels [N], got {tuple(features.shape)} and '
                         f'{tuple(labels.shape)}.')
    if len(torch.unique(labels)) < 2:
        raise ValueError('Fisher\'s criterion needs samples of at least two classes.')
    s_w, s_b = scatter_matrices(features, labels)
    eigenvalues = torch.linalg.eigvalsh(s_w)  # ascending
    scale = float(eigenvalues.mean())
    if scale <= 0:  # every sample equals its class mean: no spread to divide by
        return {'value': float('inf'), 'ridge': 0.0}
    delta = ridge * scale if float(eigenvalues[0]) < ridge * scale else 0.0
    s_w = s_w + delta * torch.eye(len(s_w), dtype=s_w.dtype, device=s_w.device)
    return {'value': float(torch.linalg.solve(s_w, s_b).trace()), 'ridge': delta}
