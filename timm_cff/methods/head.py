"""FF's one-pass softmax head (CFF paper, Table 2, "Head ✓"; Hinton 2022, Sec. 3.3).

Instead of C labelled passes, one pass with an all-zero label: a linear layer reads the concatenated pooled outputs
of the scored stages (2..L by default) and is trained with cross-entropy on the frozen FF-trained encoder.
``OnePassClassifier`` has timm's classifier interface (``forward_features`` / ``forward_head`` with ``fc_norm`` +
``head``), so the ordinary linear probe trains it and ``evaluate_accuracy`` / ``time_inference`` measure it.
"""
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..families import LabelledStages
from ..probe import ProbeResult, train_linear_probe
from .ff import ForwardForwardTrainer

__all__ = ['OnePassClassifier', 'train_one_pass_head']


class OnePassClassifier(nn.Module):
    """Zero-label forward of an FF-trained model, then ``head`` on the concatenated pooled stage outputs.

    Args:
        labelled: the trainer's ``LabelledStages`` (label embedding and the model's stages).
        stage_indices: stages whose pooled outputs are concatenated (the FF trainer's ``scored_stages``).
        num_classes: C.
        norm: a LayerNorm before the head (off: the paper's head is linear).

    Shape:
        input ``[B, ...]``; features ``[B, S·D]`` for S stages of width D; logits ``[B, C]``.
    """

    def __init__(self, labelled: LabelledStages, stage_indices: list[int], num_classes: int, norm: bool = False):
        super().__init__()
        self.encoder = labelled.stages.model
        self.labelled = labelled
        self.stage_indices = list(stage_indices)
        self.num_classes = num_classes
        self.num_features = len(self.stage_indices) * self.encoder.num_features  # S·D
        self.fc_norm = nn.LayerNorm(self.num_features) if norm else nn.Identity()
        self.head = nn.Linear(self.num_features, num_classes)
        self.to(next(self.encoder.parameters()).device)

    @classmethod
    def from_trainer(cls, trainer: ForwardForwardTrainer, norm: bool = False) -> 'OnePassClassifier':
        return cls(trainer.labelled, trainer.scored_stages, trainer.num_classes, norm)

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, ...] -> [B, S·D]``: pooled outputs of the chosen stages for the all-zero label."""
        pooled = self.labelled.pooled_outputs(x, None)
        return torch.cat([pooled[i] for i in self.stage_indices], dim=1)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))



def train_one_pass_head(
        trainer: ForwardForwardTrainer,
        train_loader: Iterable,
        val_loader: Iterable | None = None,
        *,
        epochs: int = 50,
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        scheduler: dict | None = None,
        norm: bool = False,
        on_epoch=None,
) -> tuple[OnePassClassifier, ProbeResult]:
    """Train the one-pass head of an FF-trained model (after stage 1, on its frozen encoder).

    Same protocol as the CFF probe (``train_linear_probe``): AdamW lr 5e-4, wd 0.01, 50 epochs, the epoch with the
    best validation cross-entropy kept; ``scheduler`` as there.

    Returns:
        The classifier (its ``head`` holds the best epoch) and the probe's ``ProbeResult``.
    """
    classifier = OnePassClassifier.from_trainer(trainer, norm)
    result = train_linear_probe(classifier, train_loader, val_loader, epochs=epochs, lr=lr,
                                weight_decay=weight_decay, scheduler=scheduler, reinit=False, on_epoch=on_epoch)
    return classifier, result
