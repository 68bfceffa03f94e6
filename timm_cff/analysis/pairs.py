"""Pair statistics of the CFF paper's layer-wise analysis (Sec. 4.2, Fig. 5 rows 3 and 4).

- The clamped fraction: the share of positive pairs in ``R(k) = {r ∈ P(k) : z_k·z_r > 1 − m}`` (Sec. 3, Eqs. 16-18),
  the pairs that the marginal loss of a stage with margin m no longer pulls together (their gradient is 0).
  ``clamped_fraction_metric`` reports it during training through ``LocalTrainer(stage_metrics=...)``.
- Anchor similarity: how close an anchor sits to samples of its own class and of other classes, block by block.
"""
from torch import Tensor, nn

from ..loss import pairwise_cosine
from ..loss.supcon import identical_view_copies, stack_views

__all__ = ['clamped_fraction', 'clamped_fraction_metric', 'clamped_fraction_from_similarity', 'anchor_similarity',
           'anchor_similarity_from_similarity']


def clamped_fraction_from_similarity(sim: Tensor, pos: Tensor, margin: float, copies: int = 1) -> Tensor:
    """``Σ_k |R(k)| / Σ_k |P(k)|`` from cosines ``sim [N, N]`` and the positive mask ``pos [N, N]``; 0-d tensor.

    A pair is clamped when ``cos + m > 1``, the same test (and float arithmetic) as the loss's ``min(cos + m, 1)``.
    With ``m = 0`` the loss clamps nothing, so the fraction is 0 even for identical views. ``copies > 1``: each row
    stands for that many identical views of a sample, so every pair of samples counts ``copies²`` times and a sample
    with its own other views ``copies·(copies − 1)`` times (the diagonal of ``sim``, not in ``pos``).
    """
    if not margin:
        return sim.new_zeros(())
    hit = sim + margin > 1.0
    clamped, positives = copies * copies * (hit & pos).sum(), copies * copies * pos.sum()
    if copies > 1:
        clamped = clamped + copies * (copies - 1) * hit.diagonal().sum()
        positives = positives + copies * (copies - 1) * len(sim)
    return clamped / positives.clamp(min=1)  # a tensor division: no host sync


def clamped_fraction(features: Tensor, labels: Tensor, margin: float) -> Tensor:
    """Fraction of positive pairs in R(k) for features ``[B, V, D]`` (or ``[B, D]``) and labels ``[B]``; 0-d tensor.

    Pairs are taken over all V·B view-major anchors as in the loss: the other views of a sample and every other
    sample of its class are positives. Identical views (one ``[B, D]`` tensor expanded over V, stride 0) are counted
    on ``[B, B]`` with their multiplicities, as the loss does.
    """
    features = stack_views(features)
    copies = identical_view_copies(features)
    sim, pos = pairwise_cosine(features[:, :features.shape[1] // copies], labels)
    return clamped_fraction_from_similarity(sim, pos, margin, copies)


def clamped_fraction_metric(features: Tensor, labels: Tensor, loss_fn: nn.Module) -> Tensor:
    """A ``LocalTrainer`` stage metric: the clamped fraction at the stage loss's margin (0 for plain SupCon).

    ``LocalTrainer(model, stage_metrics={'clamped': clamped_fraction_metric})`` reports ``clamped_stage{i}`` from
    ``step()`` and ``evaluate()`` (columns ``train_clamped_stage{i}`` / ``val_clamped_stage{i}`` of a run's
    ``metrics.csv``). It runs on the detached ``[B, V, D]`` features without a host sync.
    """
    return clamped_fraction(features, labels, float(getattr(loss_fn, 'margin', 0.0)))


def anchor_similarity_from_similarity(sim: Tensor, pos: Tensor) -> dict[str, float]:
    """Mean cosine of each anchor to its own class and to other classes, then averaged over anchors.

    Args:
        sim: ``[N, N]`` cosine similarities.
        pos: ``[N, N]`` bool, same class, self excluded.

    Returns:
        ``same_class_cosine`` / ``different_class_cosine``: the mean over anchors (those with at least one such
        partner) of the anchor's mean cosine to its same-class / different-class samples; ``..._std``: their
        spread over anchors.
    """
    neg = ~pos
    neg.fill_diagonal_(False)
    out = {}
    for name, mask in (('same', pos), ('different', neg)):
        count = mask.sum(dim=1)
        has_partner = count > 0
        per_anchor = (sim * mask).sum(dim=1)[has_partner] / count[has_partner]  # [anchors with a partner]
        empty = not len(per_anchor)
        out[f'{name}_class_cosine'] = float('nan') if empty else float(per_anchor.mean())
        out[f'{name}_class_cosine_std'] = float('nan') if empty else float(per_anchor.std(correction=0))
    return out


def anchor_similarity(features: Tensor, labels: Tensor) -> dict[str, float]:
    """``anchor_similarity_from_similarity`` for features ``[N, D]`` (every sample is an anchor) and labels ``[N]``."""
    return anchor_similarity_from_similarity(*pairwise_cosine(features, labels))
