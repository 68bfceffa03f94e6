"""The paper's data protocol on index level: 90/10 split, limited data and noisy labels (cff-method.md §7, §11)."""
import torch
from torch import Tensor

from .sources import ArrayDataset

__all__ = ['split_train_val', 'keep_fraction', 'corrupt_labels']


def split_train_val(num_samples: int, val_fraction: float = 0.1, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Indices of the train and validation parts: ``randperm`` seeded like ``torch.manual_seed(seed)``, first 90% train.

    This is the official split: the same permutation as ``torch.manual_seed(trial); torch.randperm(n)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f'val_fraction must be in [0, 1), got {val_fraction}.')
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    cut = int((1.0 - val_fraction) * num_samples)
    return perm[:cut], perm[cut:]


def keep_fraction(data: ArrayDataset, fraction: float, generator: torch.Generator) -> ArrayDataset:
    """A random ``fraction`` of the samples, in their original order (Table 4's "M% missing" keeps 1 - M)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f'data_fraction must be in (0, 1], got {fraction}.')
    if fraction == 1.0:
        return data
    keep = torch.randperm(len(data), generator=generator)[:round(fraction * len(data))]
    return data.subset(keep.sort().values)


def corrupt_labels(labels: Tensor, fraction: float, num_classes: int, generator: torch.Generator) -> Tensor:
    """Relabel a random ``fraction`` of ``labels [N]`` with a uniformly drawn *wrong* class (never the true one)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f'label_noise must be in [0, 1], got {fraction}.')
    labels = labels.clone()
    chosen = torch.randperm(len(labels), generator=generator)[:round(fraction * len(labels))]
    shift = torch.randint(1, num_classes, (len(chosen),), generator=generator)  # 1..C-1: uniform over the others
    labels[chosen] = (labels[chosen] + shift) % num_classes
    return labels
