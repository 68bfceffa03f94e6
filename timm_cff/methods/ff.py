"""Forward-Forward family baselines of the CFF paper (Tables 1-2): FF, SymBa and FF-Collab, one implementation.

- FF (Hinton 2022; CFF paper Eq. 2): per stage, ``softplus(θ - G_pos)`` and ``softplus(G_neg - θ)`` with goodness
  G the mean of squares of the pooled output and θ = 2.
- SymBa (Lee & Song 2023; CFF paper Eq. 7): ``softplus(-α (G_pos - G_neg))``.
- FF-Collab (Lorberbom et al., AAAI 2024): stage k's goodness is complemented by ``γ_k = Σ_{j≠k} G_j``, the
  goodness of the other stages from a no-grad pass with the current weights, held constant, so gradients stay local.

Positives carry the true label, negatives a fresh random wrong one. Each stage takes the previous output detached
and L2-normalised, and has its own optimizer. A prediction runs C passes, one per candidate label, and scores a
label by the goodness summed over stages 2..L (Hinton's choice and the official code's intent; stage 1 optionally),
except for FF-Collab, which scores every stage: each of its stages is trained on the total goodness Σ_j G_j, so the
total is what the method learns to make large for positives. The checkpoint is selected on the sum of validation
losses over the same stages, as the official code does.
"""
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..families import StageAdapter, create_labelled_stages, create_stages, draw_negative_labels
from ..loss import create_loss, goodness
from .base import StageOptimizers, TrainerBase, name_by_stage, stage_key
from .registry import MethodInfo, register_method

__all__ = ['ForwardForwardTrainer', 'scores_first_stage']

_logger = logging.getLogger(__name__)

_STAGE_STATISTICS = ('loss', 'goodness_pos', 'goodness_neg')  # per stage, in stage_loss's order


def scores_first_stage(collab: bool, score_first_stage: bool | None = None) -> bool:
    """Whether stage 1 is scored: ``score_first_stage``, or by default on for FF-Collab (its stages train the total
    goodness of all stages) and off for FF and SymBa (Hinton and the official code)."""
    return collab if score_first_stage is None else score_first_stage


class ForwardForwardTrainer(TrainerBase):
    """FF, SymBa or FF-Collab training of a model with a registered label embedding (timm ViT, ``MLP``).

    Args:
        model: a timm ``VisionTransformer`` or an ``MLP`` (any model whose stage adapter has ``LabelledStages``).
        loss: ``'ff'`` (θ-threshold, FF and FF-Collab) or ``'symba'``, a class or a partial; called as
            ``loss(pos [B, D], neg [B, D], pos_offset [B], neg_offset [B])``.
        lr: learning rate of every stage (4e-3, the official value for FF and SymBa).
        collab: add the detached goodness of the other stages (FF-Collab).
        num_classes: C; ``None`` takes ``model.num_classes``.
        loss_kwargs: e.g. ``{'threshold': 2.0}`` or ``{'alpha': 1.0}``.
        optimizer, weight_decay, optimizer_kwargs, scheduler: as for ``LocalTrainer``.
        score_first_stage: include stage 1 in prediction scores, the selection loss and the one-pass head (the
            paper's literal "all layers"). ``None``: on for FF-Collab (its stages train the total goodness of all
            stages), off for FF and SymBa (Hinton's choice and the official selection rule).
        label_kwargs: family options, e.g. ``{'pos_std': 0.02}`` (ViT) or ``{'value': 1.0}`` (MLP).
        normalize: unit L2 between stages per ``'sample'`` (official) or per ``'token'``.
        seed: seeds the label patches and the negative labels (one generator, saved for exact resumption).
        check_finite: refuse a NaN/inf loss before any weight changes.
    """

    def __init__(
            self,
            model: nn.Module,
            loss: str | Callable[..., nn.Module] = 'ff',
            lr: float = 4e-3,
            *,
            collab: bool = False,
            num_classes: int | None = None,
            loss_kwargs: dict | None = None,
            optimizer: str | Callable = 'adamw',
            weight_decay: float = 0.01,
            optimizer_kwargs: dict | None = None,
            scheduler: dict | None = None,
            score_first_stage: bool | None = None,
            label_kwargs: dict | None = None,
            normalize: str = 'sample',
            seed: int = 0,
            check_finite: bool = True,
            stages: StageAdapter | None = None,
    ):
        self.model = model
        self.stages = stages or create_stages(model)
        self.num_stages = self.stages.num_stages
        self.num_classes = num_classes if num_classes is not None else getattr(model, 'num_classes', 0)
        self.scored_stages = list(range(0 if scores_first_stage(collab, score_first_stage) else 1, self.num_stages))
        if not self.scored_stages:
            raise ValueError('With one stage there are no stages 2..L to score; set score_first_stage=True.')
        self.labelled = create_labelled_stages(self.stages, self.num_classes, seed=seed, normalize=normalize,
                                               **(label_kwargs or {})).to(self.device)
        self.losses = [create_loss(loss, **(loss_kwargs or {})) for _ in range(self.num_stages)]
        self.collab = collab
        params = [self.stages.stage_parameters(i) for i in range(self.num_stages)]
        params[0] = params[0] + list(self.labelled.parameters())  # the label position embedding is stage 0's
        self.stage_optimizers = StageOptimizers.create(
            params, optimizer, lr=lr, weight_decay=weight_decay, optimizer_kwargs=optimizer_kwargs,
            scheduler=scheduler, finite_guard=check_finite)
        self.num_views = 1
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)  # negatives of training steps
        self._eval_generator = torch.Generator()  # negatives of evaluate(), re-seeded per call
        self.num_updates = 0
        self.epoch = 0

    @property
    def selection_key(self) -> str:
        """``'loss_scored'``: the validation loss summed over the scored stages (2..L by default)."""
        return 'loss_scored'

    # ----------------------------------------------------------------------------------------------- the algorithm
    def step(self, views: Tensor | Sequence[Tensor], labels: Tensor) -> dict[str, Tensor]:
        """One local update of every stage on positives and fresh negatives.

        Returns:
            ``{'loss', 'loss_scored', 'loss_stage{i}', 'goodness_pos_stage{i}', 'goodness_neg_stage{i}'}`` as
            detached 0-d tensors.
        """
        x, y = self.prepare_batch(views, labels)
        self.model.train()
        self.stage_optimizers.zero_grad()
        h, y2, offsets = self._positives_and_negatives(x, y, self.generator)
        per_stage = {}
        for index in range(self.num_stages):
            h, loss, per_stage[index] = self.stage_loss(index, h, y2, offsets)
            self.stage_optimizers.backward(loss)  # stage `index` only: input detached, offsets without graph
        losses = torch.stack([stats['loss'] for stats in per_stage.values()])  # [L]
        self.stage_optimizers.check_finite(losses, step=self.num_updates)  # before any weight changes
        self.num_updates += 1
        self.stage_optimizers.step(self.num_updates)
        return self.with_totals(name_by_stage(per_stage))

    def evaluate_batch(self, views: Tensor | Sequence[Tensor], labels: Tensor) -> dict[str, Tensor]:
        """The statistics of ``step`` without gradients or updates (negatives from the evaluation generator)."""
        x, y = self.prepare_batch(views, labels)
        h, y2, offsets = self._positives_and_negatives(x, y, self._eval_generator)
        per_stage = {}
        for index in range(self.num_stages):
            h, _, per_stage[index] = self.stage_loss(index, h, y2, offsets)
        return self.with_totals(name_by_stage(per_stage))

    def evaluate(self, loader) -> dict[str, float]:
        """Per-sample mean losses and goodness on a loader; negatives come from a generator re-seeded per call,
        so validation never moves the training draws."""
        self._eval_generator.manual_seed(self.seed + 1)
        return super().evaluate(loader)

    def _positives_and_negatives(self, x: Tensor, labels: Tensor, generator: torch.Generator
                                 ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Inputs ``[B, ...]`` -> ``[2B, ...]`` (positives first), labels ``[2B]`` (true, then a fresh wrong one)
        and FF-Collab's offsets ``[L, 2B]`` (``None`` for FF and SymBa)."""
        negatives = draw_negative_labels(labels, self.num_classes, generator)
        x2, y2 = torch.cat([x, x]), torch.cat([labels, negatives])
        return x2, y2, self._collab_offsets(x2, y2) if self.collab else None

    @torch.no_grad()
    def _collab_offsets(self, x: Tensor, labels: Tensor) -> Tensor:
        """FF-Collab's ``γ_k = Σ_{j≠k} G_j`` from a no-grad pass with the current weights: ``[L, 2B]``."""
        g = self.labelled.goodness(x, labels)  # [L, 2B]
        return g.sum(0, keepdim=True) - g

    def stage_loss(self, index: int, h: Tensor, labels: Tensor, offsets: Tensor | None = None
                   ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Stage ``index`` alone on a positive/negative batch: forward and loss (no backward, no step).

        Args:
            h: ``[2B, ...]``, positives then negatives: the inputs (stage 0) or the previous stage's output (the
                stage detaches and normalises it).
            labels: ``[2B]`` true then wrong labels (read by stage 0 only).
            offsets: ``[L, 2B]`` goodness added before the loss (FF-Collab), or ``None``.

        Returns:
            The stage output ``[2B, ...]``, the loss (0-d, with its graph) and the detached statistics
            ``{'loss', 'goodness_pos', 'goodness_neg'}`` (mean goodness of positives and negatives).
        """
        h = self.labelled.forward_stage(index, h, labels)
        z_pos, z_neg = self.labelled.pool(h).chunk(2)  # [B, D] each
        pos_offset, neg_offset = offsets[index].chunk(2) if offsets is not None else (0.0, 0.0)
        loss = self.losses[index](z_pos, z_neg, pos_offset, neg_offset)
        with torch.no_grad():
            stats = {'loss': loss.detach(), 'goodness_pos': goodness(z_pos).mean(),
                     'goodness_neg': goodness(z_neg).mean()}
        return h, loss, stats

    # ----------------------------------------------------------------------------------------------- prediction
    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Scores ``[B, C]``: for each candidate label, the goodness summed over the scored stages (C passes)."""
        self.model.eval()
        x = x.to(self.device)
        scores = []
        for label in range(self.num_classes):
            labels = torch.full((len(x),), label, dtype=torch.long, device=x.device)
            scores.append(self.labelled.goodness(x, labels)[self.scored_stages].sum(0))  # [B]
        return torch.stack(scores, dim=1)

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Model, optimizers, schedulers and counters, plus the label patches / position and the negatives' RNG."""
        return {**super().state_dict(), 'labels': self.labelled.state_dict(),
                'generator': self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.labelled.load_state_dict(state['labels'])
        self.generator.set_state(state['generator'])

    def with_totals(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-stage statistics -> ``{'loss': Σ_l, 'loss_scored': Σ over the scored stages, per-stage ...}``."""
        losses = torch.stack([stats[stage_key('loss', i)] for i in range(self.num_stages)])
        keys = [stage_key(name, i) for name in _STAGE_STATISTICS for i in range(self.num_stages)]
        return {'loss': losses.sum(), 'loss_scored': losses[self.scored_stages].sum(), **{k: stats[k] for k in keys}}


_FF_KEYS = ('score_first_stage',)
register_method(MethodInfo('ff', 'FF', ForwardForwardTrainer, {'loss': 'ff'}, label_conditioned=True,
                           description='Forward-Forward with label tokens, threshold loss',
                           config_keys=('threshold', *_FF_KEYS)))
register_method(MethodInfo('symba', 'SymBa', ForwardForwardTrainer, {'loss': 'symba'}, label_conditioned=True,
                           description='SymBa: symmetric loss on the goodness gap', config_keys=('alpha', *_FF_KEYS)))
register_method(MethodInfo('collab', 'FF-Collab', ForwardForwardTrainer, {'loss': 'ff', 'collab': True},
                           label_conditioned=True, description='FF-Collab: FF with the detached goodness of the '
                           'other stages', config_keys=('threshold', *_FF_KEYS)))
