"""Forward-Forward family losses on positive / negative features.

- ``ff``: Hinton, "The Forward-Forward Algorithm" (2022); CFF paper Eq. 2. Goodness is the mean of squares (the
  form ``mpezeshki/pytorch_forward_forward`` and the official CFF code use, for which θ = 2 is tuned; the paper's
  sum of squares is the same method at another scale).
- ``symba``: Lee & Song, "SymBa" (2023); CFF paper Eq. 7: ``softplus(-α (G_pos - G_neg))``.

Both accept optional goodness offsets, which FF-Collab (Lorberbom et al., AAAI 2024) uses to add the detached
goodness of the other layers to each layer's own.
"""
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register_loss
from .supcon import check_features

__all__ = ['goodness', 'FFLoss', 'SymBaLoss']


def goodness(features: Tensor) -> Tensor:
    """Mean of squares over every axis but the batch: ``[B, ...] -> [B]``."""
    check_features(features)
    return features.pow(2).flatten(1).mean(dim=1)


@register_loss('ff', description='Forward-Forward logistic loss with a goodness threshold (CFF Eq. 2)')
class FFLoss(nn.Module):
    """``mean over 2B of [softplus(θ - G_pos), softplus(G_neg - θ)]``.

    Args:
        threshold: θ; 2.0 in the official CFF code for mean-of-squares goodness.

    Shape:
        pos, neg ``[B, ...]`` (e.g. token-mean features ``[B, D]``); offsets ``[B]`` or scalars; output scalar.
    """

    def __init__(self, threshold: float = 2.0):
        super().__init__()
        self.threshold = float(threshold)

    def forward(self, pos: Tensor, neg: Tensor, pos_offset: Tensor | float = 0.0,
                neg_offset: Tensor | float = 0.0) -> Tensor:
        g_pos = goodness(pos) + pos_offset
        g_neg = goodness(neg) + neg_offset
        return 0.5 * (F.softplus(self.threshold - g_pos).mean() + F.softplus(g_neg - self.threshold).mean())

    def extra_repr(self) -> str:
        return f'threshold={self.threshold}'


@register_loss('symba', description='SymBa symmetric loss on the goodness gap (CFF Eq. 7)')
class SymBaLoss(nn.Module):
    """``mean softplus(-α (G_pos - G_neg))``.

    Args:
        alpha: α; 1.0 in the official CFF code (SymBa's paper treats it as a tunable scale).

    Shape:
        pos, neg ``[B, ...]``; offsets ``[B]`` or scalars; output scalar.
    """

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, pos: Tensor, neg: Tensor, pos_offset: Tensor | float = 0.0,
                neg_offset: Tensor | float = 0.0) -> Tensor:
        gap = (goodness(pos) + pos_offset) - (goodness(neg) + neg_offset)
        return F.softplus(-self.alpha * gap).mean()

    def extra_repr(self) -> str:
        return f'alpha={self.alpha}'
