"""Supervised contrastive losses of Contrastive Forward-Forward.

- ``supcon``: Khosla et al., "Supervised Contrastive Learning" (NeurIPS 2020), Eq. 3 of the CFF paper, the "L_out"
  form: the mean over positives sits outside the log, self is excluded, anchors without positives add 0.
- ``marginal_supcon``: the CFF+M loss, Eqs. 14/15 of Aghagolzadeh & Ezoji, "Contrastive Forward-Forward"
  (Neural Networks 2025, arXiv 2502.00571): positive similarities become ``min(cos + m, 1)`` in the numerator and
  the denominator; negatives are untouched. ``margin=0`` is exactly ``supcon``.

``marginal_supcon_loss`` (what both loss classes call) computes the same numbers as ``supcon_from_similarity`` with a
hand-written backward: it keeps no [V·B, V·B] tensor between the forward and the backward pass (only the features and
two [V·B] vectors) and recomputes the similarities in the backward, so a stage never holds more than one such matrix
at a time (plus boolean masks). ``supcon_from_similarity`` stays as the readable autograd reference.

Identical views (no augmentation) arrive as one ``[B, D]`` tensor expanded over the view axis (stride 0, what
``LocalTrainer`` passes then). The loss of V copies of a sample set equals the same sums over the ``[B, B]``
similarities with multiplicities (V per other sample, V - 1 for the sample's own copies, which are positives), so it
is computed on ``[B, B]`` instead of ``[V·B, V·B]``: a quarter of the work for two views, the same numbers.
"""
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register_loss

__all__ = ['SupConLoss', 'MarginalSupConLoss', 'marginal_supcon_loss', 'supcon_from_similarity', 'pairwise_cosine',
           'stack_views', 'identical_view_copies']


def stack_views(features: Tensor | Sequence[Tensor]) -> Tensor:
    """Views as one tensor: ``[B, V, D]`` stays, a list of V ``[B, D]`` tensors is stacked, ``[B, D]`` is V = 1."""
    if not isinstance(features, Tensor):
        features = torch.stack(list(features), dim=1)
    if features.dim() == 2:
        features = features.unsqueeze(1)
    if features.dim() != 3:
        raise ValueError(f'Features must be [B, V, D] or a list of [B, D] views, got shape {tuple(features.shape)}.')
    check_features(features)
    return features


def check_features(features: Tensor) -> None:
    """Refuse what would give a meaningless loss: an empty batch or non-float features."""
    if not features.is_floating_point():
        raise TypeError(f'Features must be floating point, got {features.dtype}.')
    if features.shape[0] == 0:
        raise ValueError('The batch is empty: a loss needs at least one sample.')


def identical_view_copies(features: Tensor) -> int:
    """V when the views of ``features [B, V, D]`` are one tensor expanded over the view axis (stride 0), else 1.

    ``features[:, :V // copies]`` is then the distinct part: the losses and R(k) count it ``copies`` times.
    """
    views = features.shape[1]
    return views if views > 1 and features.stride(1) == 0 else 1


def _check_labels(features: Tensor, labels: Tensor | None) -> Tensor:
    """``[B]`` labels on the features' device; ``None`` gives every sample its own class (SimCLR)."""
    batch = features.shape[0]
    if labels is None:
        return torch.arange(batch, device=features.device)
    if labels.shape != (batch,):
        raise ValueError(f'Labels must have shape [{batch}] to match features {tuple(features.shape)}, '
                         f'got {tuple(labels.shape)}.')
    return labels.to(features.device)


def pairwise_cosine(features: Tensor | Sequence[Tensor], labels: Tensor | None) -> tuple[Tensor, Tensor]:
    """Cosine similarities of all V·B anchors (view-major) and which pairs are positives.

    Args:
        features: ``[B, V, D]`` un-normalised features (or a list of V ``[B, D]``).
        labels: ``[B]`` integer classes; ``None`` makes the other views of a sample its only positives (SimCLR).

    Returns:
        ``sim [VB, VB]`` and ``pos [VB, VB]`` (bool, same label, self excluded).
    """
    features = stack_views(features)
    batch, views, _ = features.shape
    z = F.normalize(features.transpose(0, 1).reshape(views * batch, -1), dim=1)  # view-major [VB, D]
    tiled = _check_labels(features, labels).repeat(views)  # [VB]
    pos = tiled[:, None] == tiled[None, :]
    pos.fill_diagonal_(False)
    return z @ z.T, pos


def supcon_from_similarity(sim: Tensor, pos: Tensor, temperature: float = 0.15, margin: float = 0.0,
                           reduction: str = 'mean') -> Tensor:
    """Eq. 15 (Eq. 3 at ``margin=0``) from a cosine matrix ``sim [N, N]`` and positive mask ``pos [N, N]``.

    ``reduction='none'`` gives the per-anchor losses ``ℓ_i [N]``.
    """
    if margin:  # q = min(s + m, 1) on positives only, used in the numerator and the denominator
        sim = torch.where(pos, (sim + margin).clamp(max=1.0), sim)
    logits = sim / temperature
    # The denominator runs over A(i) = every entry but self; logsumexp is the stable form of log Σ exp.
    self_mask = torch.eye(len(sim), dtype=torch.bool, device=sim.device)
    log_denominator = torch.logsumexp(logits.masked_fill(self_mask, float('-inf')), dim=1)
    num_pos = pos.sum(dim=1)
    # Σ_p [q_ip/τ − log Σ_a exp(q_ia/τ)] / |P(i)|; anchors with no positive give 0 and still count in the mean.
    mean_log_prob_pos = ((logits * pos).sum(dim=1) - num_pos * log_denominator) / num_pos.clamp(min=1)
    loss = -mean_log_prob_pos
    if reduction == 'none':
        return loss
    return loss.mean() if reduction == 'mean' else loss.sum()


def marginal_supcon_loss(
        features: Tensor | Sequence[Tensor],
        labels: Tensor | None = None,
        temperature: float = 0.15,
        margin: float = 0.0,
        reduction: str = 'mean',
) -> Tensor:
    """Eq. 15 of the CFF paper (Eq. 3 at ``margin=0``); see ``MarginalSupConLoss``.

    Equal to ``supcon_from_similarity(*pairwise_cosine(features, labels), ...)`` in value and gradient, but held in
    memory as features only; computed in float32 (or float64) even under autocast, where exp(q/τ) needs the range.

    Returns:
        A scalar, or the per-anchor losses ``[V·B]`` (view-major) for ``reduction='none'``.
    """
    features = stack_views(features)
    labels = _check_labels(features, labels)
    views, copies = features.shape[1], identical_view_copies(features)
    features = features[:, :views // copies]  # the distinct views
    if features.dtype in (torch.float16, torch.bfloat16):
        features = features.float()
    with torch.autocast(features.device.type, enabled=False):
        z = F.normalize(features.transpose(0, 1).reshape(-1, features.shape[-1]), dim=1)  # view-major [VB or B, D]
        tiled = labels.repeat(views // copies)
        loss = _MarginalSupCon.apply(z, tiled, float(temperature), float(margin), copies).repeat(copies)  # [VB]
    if reduction == 'none':
        return loss
    return loss.mean() if reduction == 'mean' else loss.sum()


def _margined_similarity(z: Tensor, tiled: Tensor, margin: float, copies: int
                         ) -> tuple[Tensor, Tensor, Tensor | None]:
    """``q [N, N]`` of Eq. 15 (positives ``min(s + m, 1)``, others ``s``), ``pos [N, N]`` and the clamped positives.

    With ``copies > 1`` row i stands for the identical copies of sample i, so the diagonal (a sample's other copies)
    is a positive; with one copy self is excluded. ``q`` is the only float [N, N] tensor; every step after the
    product works on it in place.
    """
    q = z @ z.T
    pos = tiled[:, None] == tiled[None, :]
    if copies == 1:
        pos.fill_diagonal_(False)
    if not margin:
        return q, pos, None
    q.add_(pos, alpha=margin)
    clamped = (q > 1.0).logical_and_(pos)
    return q.masked_fill_(clamped, 1.0), pos, clamped


def _log_multiplicity(logits: Tensor, copies: int) -> Tensor:
    """Adds ``log w_ij`` in place: every pair counts ``copies`` times, a sample with its own copies ``copies - 1``
    times (never, with one copy: self is not in A(i))."""
    diagonal = math.log((copies - 1) / copies) if copies > 1 else float('-inf')
    logits.diagonal().add_(diagonal)
    return logits.add_(math.log(copies))


class _MarginalSupCon(torch.autograd.Function):
    """Per-anchor Eq. 15 on normalised features ``z [N, D]`` with tiled labels ``[N]``; the backward recomputes ``q``.

    Row i stands for ``copies`` identical anchors; pair (i, j) is weighted by ``w_ij`` (``copies`` off the
    diagonal, ``copies - 1`` on it). With ``lse_i = log Σ_j w_ij exp(q_ij/τ)`` and ``|P(i)| = Σ_j w_ij pos_ij``:
    ``ℓ_i = lse_i − Σ_j w_ij pos_ij q_ij / (τ|P(i)|)`` (0 without positives), so
    ``∂ℓ_i/∂q_ij = w_ij (exp(q_ij/τ − lse_i) − pos_ij / |P(i)|) / τ``, zero where the clamp is active (Eq. A.5), and
    ``∂/∂z = (G + Gᵀ) z`` for ``s = z zᵀ``. One copy is Eq. 15 as written: self excluded, every other anchor once.
    """

    @staticmethod
    def forward(ctx, z: Tensor, tiled: Tensor, temperature: float, margin: float, copies: int) -> Tensor:
        q, pos, _ = _margined_similarity(z, tiled, margin, copies)
        logits = q.div_(temperature)
        own = pos.diagonal()  # a sample's own copies: weight copies - 1 instead of copies
        num_pos = copies * pos.sum(dim=1) - own.long()
        pos_logits = copies * (logits * pos).sum(dim=1) - logits.diagonal() * own
        log_denominator = torch.logsumexp(_log_multiplicity(logits, copies), dim=1)
        ctx.save_for_backward(z, tiled, log_denominator, num_pos)
        ctx.temperature, ctx.margin, ctx.copies = temperature, margin, copies
        return (num_pos * log_denominator - pos_logits) / num_pos.clamp(min=1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        z, tiled, log_denominator, num_pos = ctx.saved_tensors
        copies = ctx.copies
        q, pos, clamped = _margined_similarity(z, tiled, ctx.margin, copies)
        logits = _log_multiplicity(q.div_(ctx.temperature), copies)
        g = logits.sub_(log_denominator[:, None]).exp_()  # w_ij · softmax_ij
        g.mul_((grad * (num_pos > 0))[:, None])
        per_positive = (grad / num_pos.clamp(min=1))[:, None]
        g.addcmul_(pos, per_positive, value=-float(copies))  # - w_ij pos_ij / |P(i)|
        if copies > 1:
            g.diagonal().add_(per_positive[:, 0] * pos.diagonal())  # own copies weigh copies - 1
        if clamped is not None:
            g.masked_fill_(clamped, 0.0)
        g.div_(ctx.temperature)
        return (g + g.T) @ z, None, None, None, None


def _check_args(temperature: float, margin: float, reduction: str) -> None:
    if not temperature > 0:
        raise ValueError(f'temperature must be > 0, got {temperature}.')
    if not 0.0 <= margin <= 2.0:
        raise ValueError(f'margin must be in [0, 2] (Eq. 15), got {margin}.')
    if reduction not in ('mean', 'sum', 'none'):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")


@register_loss('supcon', description='Supervised contrastive loss (Khosla et al. 2020; CFF Eq. 3)')
class SupConLoss(nn.Module):
    """Supervised contrastive loss, L_out form (CFF Eq. 3).

    Args:
        temperature: τ; 0.15 as in the official CFF code (SupContrast's own default is 0.07).
        reduction: ``'mean'`` over the V·B anchors (official code), ``'sum'`` (the paper's formula) or ``'none'``.

    Shape:
        features ``[B, V, D]`` (or a list of V ``[B, D]``), un-normalised; labels ``[B]`` or ``None``; output scalar.
    """
    margin: float = 0.0

    def __init__(self, temperature: float = 0.15, reduction: str = 'mean'):
        super().__init__()
        _check_args(temperature, self.margin, reduction)
        self.temperature = temperature
        self.reduction = reduction

    def forward(self, features: Tensor | Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        return marginal_supcon_loss(features, labels, self.temperature, self.margin, self.reduction)

    def extra_repr(self) -> str:
        return f'temperature={self.temperature}, margin={self.margin}, reduction={self.reduction!r}'


@register_loss('marginal_supcon', description='Marginal supervised contrastive loss of CFF+M (Eqs. 14/15)')
class MarginalSupConLoss(SupConLoss):
    """Marginal contrastive loss of CFF+M (Eqs. 14/15): positives scored ``min(cos + m, 1)``.

    A positive pair already within ``m`` of a perfect match is clamped to 1 and gets zero gradient (Eq. A.5), so
    learning concentrates on hard positives and on negatives.

    Args:
        temperature: τ (0.15, official code).
        margin: ``m`` in [0, 2]; 0.4 is the paper's first-stage value (the trainer uses a schedule per stage).
        reduction: ``'mean'`` (official) or ``'sum'``.
    """

    def __init__(self, temperature: float = 0.15, margin: float = 0.4, reduction: str = 'mean'):
        self.margin = float(margin)
        super().__init__(temperature, reduction)
