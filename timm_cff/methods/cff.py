"""``LocalTrainer``: layer-local (Contrastive Forward-Forward) training of an unmodified timm model.

Every stage has its own loss on its pooled output and its own optimizer, and receives the previous stage's output
detached, so no gradient crosses stages (CFF paper, Alg. 1). The whole algorithm is ``step()``:

    h = views (all V views as one V·B batch)
    for each stage l:
        h = stage_l(h.detach())                      # [VB, N, D]
        loss_l = loss_l(pool(h) as [B, V, D], y)     # its own margin
        loss_l.backward()                            # reaches stage l only
    check every loss is finite, then step every stage's optimizer

Stepping the optimizers after all backward passes gives the same updates as stepping each right after its
backward: stage l+1's input was computed before stage l's update either way, and the parameter sets are disjoint.
It also lets a non-finite loss be refused before any weight changes. A layer pipeline runs the loop's body per stage
(``forward_backward_stage``) and steps each group's optimizers itself. ``ViewPasses`` decides how a stage runs on the
views (precision, fused or per-view passes, identical views once); ``StageOptimizers`` (``methods.base``) holds the
per-stage optimizers, schedulers, gradient scaler and finite guard; ``TrainerBase`` the run-loop protocol (epochs,
evaluation, state) that every method shares.
"""
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..families import StageAdapter, create_stages
from ..loss import create_loss, takes_margin
from ..margins import PAPER_MARGINS, MarginSchedule, resolve_margins
from .base import StageOptimizers, TrainerBase, check_views, name_by_stage, resolve_autocast_dtype, stage_key
from .registry import MethodInfo, register_method

__all__ = ['LocalTrainer', 'ViewPasses']


def _build_losses(loss: Any, margins: Any, loss_kwargs: dict, num_stages: int) -> list[nn.Module]:
    """One loss module per stage; the margin schedule gives each its own ``margin``."""
    if isinstance(loss, nn.Module):
        loss = [loss] * num_stages
    if isinstance(loss, Sequence) and not isinstance(loss, str):
        if len(loss) != num_stages or margins is not None:
            raise ValueError(f'A list of loss modules needs one per stage ({num_stages}) and margins=None.')
        return list(loss)
    if not takes_margin(loss):
        values = resolve_margins(margins, num_stages) or [0.0]
        if any(values):
            raise ValueError(f'Loss {loss!r} takes no margin, but margins {values} were given. Use '
                             f"loss='marginal_supcon' for CFF+M, or margins=None.")
        return [create_loss(loss, **loss_kwargs) for _ in range(num_stages)]
    values = resolve_margins(PAPER_MARGINS if margins is None else margins, num_stages)
    return [create_loss(loss, margin=m, **loss_kwargs) for m in values]


class ViewPasses:
    """How a ``LocalTrainer`` stage runs on the V views of a batch: at which precision, and in how many passes.

    - Precision: with ``autocast_dtype`` the stage forward and its loss run under ``torch.autocast`` (the
      contrastive loss computes in float32 inside); ``None``: float32.
    - Fusion: the V views go through a stage as one V·B batch (``fuse=True``) or one pass per view (``False``);
      equal results up to float rounding. ``None``: one pass per view on CPU, where it measured faster with 1 and
      2 threads, one V·B batch on accelerators (docs/performance.md).
    - Identical views: when every view is one tensor object (a loader without augmentation yields them so), the
      batch is its B rows: identical inputs give identical features, so one pass serves all V views, and the pooled
      features are expanded over the view axis with stride 0 (the loss computes the same value on the ``[B, B]``
      similarities).
    """

    def __init__(self, stages: StageAdapter, num_views: int, fuse: bool | None = None,
                 autocast_dtype: torch.dtype | None = None):
        self.stages, self.num_views, self.fuse, self.autocast_dtype = stages, num_views, fuse, autocast_dtype

    def inputs(self, views: Tensor | Sequence[Tensor], labels: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        """Views -> stage 0's input on ``device``: ``[VB, ...]`` view-major, or ``[B, ...]`` for identical views;
        and the labels ``[B]``."""
        views = check_views(views, labels, self.num_views)
        x = views[0] if all(v is views[0] for v in views[1:]) else torch.cat(views)
        return x.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    def autocast(self, device: torch.device):
        """The precision context of a stage's forward and loss (a no-op for float32)."""
        return torch.autocast(device.type, self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def forward(self, index: int, h: Tensor, batch_size: int) -> Tensor:
        """Stage ``index`` on ``h [VB or B, ...]``, fused or one pass per view; the output keeps ``h``'s rows."""
        passes = len(h) // batch_size
        fuse = self.fuse if self.fuse is not None else h.device.type != 'cpu'
        if fuse or passes == 1:
            return self.stages.forward_stage(index, h)
        return torch.cat([self.stages.forward_stage(index, v) for v in h.chunk(passes)])

    def features(self, h: Tensor, batch_size: int) -> Tensor:
        """A stage output ``[VB or B, ...]`` -> the loss's pooled features ``[B, V, D]``."""
        z = self.stages.pool(h)  # [VB, D] view-major, or [B, D] for identical views
        features = z.view(-1, batch_size, z.shape[-1]).transpose(0, 1)  # [B, V or 1, D]
        return features.expand(-1, self.num_views, -1)  # a no-op unless the views are identical (stride 0)


class LocalTrainer(TrainerBase):
    """Layer-local training of an unmodified timm model with one loss and one optimizer per stage.

    Args:
        model: a timm ``VisionTransformer`` (``global_pool='avg'`` without class token is the CFF configuration;
            class-token and register-token models pool with ``model.pool``), or any model with a registered adapter.
        loss: registered loss name (``'marginal_supcon'``, ``'supcon'``), class, partial, module, or one module
            per stage.
        margins: per-stage margins: a schedule (``linear_margins(0.4, 0.1)``), a list with one value per stage or a
            constant. ``None`` means the paper's CFF+M schedule for losses that take a margin.
        lr: learning rate of every stage (4e-3 in the official code).
        loss_kwargs: extra loss arguments, e.g. ``{'temperature': 0.15}``.
        optimizer: a ``timm.optim`` name (``'adamw'``: torch AdamW, decay on all parameters as in the official code)
            or a factory ``params -> Optimizer``.
        weight_decay: 0.01 (torch's AdamW default, used by the official code).
        optimizer_kwargs: extra optimizer arguments (``betas``, ``eps``, ...).
        scheduler: ``None`` (constant LR, official) or kwargs for ``timm.scheduler.create_scheduler_v2``.
        num_views: 2 (CFF) or 1 (the one-forward variant of Table 6).
        fuse_views: run the V views as one V·B batch through each stage (``True``) or one pass per view
            (``False``); ``None`` (default): per view on CPU, fused on accelerators (``ViewPasses``).
        check_finite: refuse a NaN/inf loss before any weight changes (one host sync per step).
        select_on: which validation loss picks the best checkpoint: ``'last'`` stage (official) or ``'sum'``.
        stage_metrics: extra per-stage diagnostics ``{name: fn(features [B, V, D], labels, loss_fn) -> 0-d}``,
            computed on detached features and reported as ``{name}_stage{i}`` (e.g. the clamped fraction R(k)).
        stages: the stage adapter (default: the one registered for the model's family).
        autocast_dtype: ``'bfloat16'`` or ``'float16'`` runs the stage forwards under ``torch.autocast`` (the
            contrastive loss stays float32); float16 adds one gradient scaler shared by the stages, which skips a
            stage's update when its gradients overflow. ``None`` (default): float32.
        compile_stages: ``torch.compile`` the stages (``True``, or a dict of ``torch.compile`` kwargs). Off by
            default: compiling takes minutes on CPU and pays off only on accelerators.
    """

    def __init__(
            self,
            model: nn.Module,
            loss: Any = 'marginal_supcon',
            margins: float | Sequence[float] | MarginSchedule | None = None,
            lr: float = 4e-3,
            *,
            loss_kwargs: dict | None = None,
            optimizer: str | Callable = 'adamw',
            weight_decay: float = 0.01,
            optimizer_kwargs: dict | None = None,
            scheduler: dict | None = None,
            num_views: int = 2,
            fuse_views: bool | None = None,
            check_finite: bool = True,
            select_on: str = 'last',
            stage_metrics: dict[str, Callable[[Tensor, Tensor, nn.Module], Tensor]] | None = None,
            stages: StageAdapter | None = None,
            autocast_dtype: str | torch.dtype | None = None,
            compile_stages: bool | dict = False,
    ):
        if num_views < 1:
            raise ValueError(f'num_views must be >= 1, got {num_views}.')
        if select_on not in ('last', 'sum'):
            raise ValueError(f"select_on must be 'last' or 'sum', got {select_on!r}.")
        self.model = model
        self.stages = stages or create_stages(model)
        self.num_stages = self.stages.num_stages
        self.losses = _build_losses(loss, margins, dict(loss_kwargs or {}), self.num_stages)
        self.margins = [getattr(fn, 'margin', 0.0) for fn in self.losses]
        self.num_views = num_views
        self.views = ViewPasses(self.stages, num_views, fuse_views, resolve_autocast_dtype(autocast_dtype))
        # float16 needs a loss scale against gradient underflow; bfloat16 has float32's range
        scaler = torch.amp.GradScaler(self.device.type) if self.autocast_dtype == torch.float16 else None
        self.stage_optimizers = StageOptimizers.create(
            [self.stages.stage_parameters(i) for i in range(self.num_stages)], optimizer, lr=lr,
            weight_decay=weight_decay, optimizer_kwargs=optimizer_kwargs, scheduler=scheduler, scaler=scaler,
            finite_guard=check_finite)
        self.select_on = select_on
        self.stage_metrics = dict(stage_metrics or {})
        if compile_stages:
            self.stages.compile(**({} if compile_stages is True else dict(compile_stages)))
        self.num_updates = 0
        self.epoch = 0

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The stage forwards' autocast dtype, or ``None`` for float32."""
        return self.views.autocast_dtype

    @property
    def selection_key(self) -> str:
        """The ``evaluate()`` entry whose minimum picks the best checkpoint (official: the last stage's loss)."""
        return stage_key('loss', self.num_stages - 1) if self.select_on == 'last' else 'loss'

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Class scores ``[B, C]`` of the model in one forward pass (meaningful once the probe is trained)."""
        self.model.eval()
        return self.model(x.to(self.device))

    # ----------------------------------------------------------------------------------------------- the algorithm
    def step(self, views: Tensor | Sequence[Tensor], labels: Tensor) -> dict[str, Tensor]:
        """One layer-local update of every stage on a batch.

        Args:
            views: a tuple of V view tensors ``[B, C, H, W]`` (two augmentations of the same images), or one tensor.
            labels: ``[B]`` integer classes.

        Returns:
            ``{'loss': Σ_l loss_l, 'loss_stage0': loss_0, ...}`` as detached 0-d tensors (no host sync), plus
            ``{name}_stage{i}`` for every ``stage_metrics`` entry.
        """
        h, labels = self.views.inputs(views, labels, self.device)  # the V views as one [VB, C, H, W] batch
        self.model.train()
        self.stage_optimizers.zero_grad()
        per_stage = {}
        for index in range(self.num_stages):
            h, loss, features = self.stage_loss(index, h, labels)  # stage `index` on h.detach(), pooled, its loss
            self.stage_optimizers.backward(loss)  # the graph holds stage `index` only: its input was detached
            per_stage[index] = self.stage_statistics(index, loss, features, labels)
        losses = torch.stack([stats['loss'] for stats in per_stage.values()])  # [L]
        self.stage_optimizers.check_finite(losses, step=self.num_updates)  # before any weight changes
        self.num_updates += 1
        self.stage_optimizers.step(self.num_updates)  # every stage's optimizer, after every stage's backward
        return self.with_totals(name_by_stage(per_stage))

    def stage_loss(self, index: int, h: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Stage ``index`` on the detached input: its output, its loss and the pooled features.

        Args:
            h: the stage input, ``[VB, ...]`` view-major (images for stage 0), or ``[B, ...]`` for identical views.
            labels: ``[B]``.

        Returns:
            The output, shaped as ``h`` (attached to this stage's graph only), the loss (0-d) and the features
            ``[B, V, D]`` it was computed on.
        """
        with self.views.autocast(h.device):
            h = self.views.forward(index, h.detach(), len(labels))  # no gradient is ever computed for the input
            features = self.views.features(h, len(labels))
            loss = self.losses[index](features, labels)
        return h, loss, features

    def forward_backward_stage(self, index: int, h: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The body of ``step``'s loop for stage ``index`` alone: forward on the detached input, loss, backward;
        nothing is stepped. A layer pipeline runs it per stage and batch (``StageGroup``), then steps.

        Returns:
            The stage output (see ``stage_loss``) and its detached statistics ``{'loss': ..., **stage_metrics}``.
        """
        h, loss, features = self.stage_loss(index, h, labels)
        self.stage_optimizers.backward(loss)
        return h, self.stage_statistics(index, loss, features, labels)

    def evaluate_stage(self, index: int, h: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``forward_backward_stage`` without the backward (call under ``torch.no_grad``)."""
        h, loss, features = self.stage_loss(index, h, labels)
        return h, self.stage_statistics(index, loss, features, labels)

    def evaluate_batch(self, views: Tensor | Sequence[Tensor], labels: Tensor) -> dict[str, Tensor]:
        """The statistics of ``step`` on a batch, without gradients or updates."""
        h, labels = self.views.inputs(views, labels, self.device)
        per_stage = {}
        for index in range(self.num_stages):
            h, per_stage[index] = self.evaluate_stage(index, h, labels)
        return self.with_totals(name_by_stage(per_stage))

    # ----------------------------------------------------------------------------------------------- statistics
    def stage_statistics(self, index: int, loss: Tensor, features: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """``{'loss': ..., name: value for every stage metric}`` of stage ``index``, detached."""
        detached = features.detach()
        return {'loss': loss.detach(),
                **{name: fn(detached, labels, self.losses[index]) for name, fn in self.stage_metrics.items()}}

    def stage_keys(self, stages: Iterable[int] | None = None) -> list[str]:
        """The names of the per-stage statistics of ``stages`` (default: all), name-major as ``step`` orders them."""
        stages = list(range(self.num_stages) if stages is None else stages)
        return [stage_key(name, index) for name in ('loss', *self.stage_metrics) for index in stages]

    def with_totals(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-stage statistics -> ``{'loss': Σ_l loss_stage{l}, 'loss_stage0': ..., ...}`` in ``step``'s order."""
        losses = torch.stack([stats[stage_key('loss', i)] for i in range(self.num_stages)])
        return {'loss': losses.sum(), **{key: stats[key] for key in self.stage_keys()}}



register_method(MethodInfo(
    'cff', 'CFF', LocalTrainer, description='Contrastive Forward-Forward, layer-local (CFF+M; margins=0 for CFF)',
    config_keys=('loss', 'temperature', 'margin_schedule', 'm0', 'm_last', 'num_views', 'select_on', 'autocast',
                 'compile', 'log_clamped')))
