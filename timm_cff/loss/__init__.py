"""Losses of timm-cff and their registry (``create_loss``, ``list_losses``, ``register_loss``)."""
from .registry import LossInfo as LossInfo
from .registry import create_loss as create_loss
from .registry import get_loss_class as get_loss_class
from .registry import get_loss_info as get_loss_info
from .registry import list_losses as list_losses
from .registry import register_loss as register_loss
from .registry import takes_margin as takes_margin
from .ff import FFLoss as FFLoss
from .ff import SymBaLoss as SymBaLoss
from .ff import goodness as goodness
from .supcon import MarginalSupConLoss as MarginalSupConLoss
from .supcon import SupConLoss as SupConLoss
from .supcon import marginal_supcon_loss as marginal_supcon_loss
from .supcon import pairwise_cosine as pairwise_cosine
from .supcon import supcon_from_similarity as supcon_from_similarity

__all__ = [
    'LossInfo', 'create_loss', 'get_loss_class', 'get_loss_info', 'list_losses', 'register_loss', 'takes_margin',
    'FFLoss', 'SymBaLoss', 'goodness', 'MarginalSupConLoss', 'SupConLoss', 'marginal_supcon_loss',
    'pairwise_cosine', 'supcon_from_similarity',
]
