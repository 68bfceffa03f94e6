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
It also lets a non-finite loss be refused before any weight changes.

``TrainerBase`` (``methods.base``) holds the run-loop protocol (step, epochs, evaluation, state) that every method
shares.
"""
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..families import StageAdapter, create_stages
from ..loss import create_loss, takes_margin
from ..margins import PAPER_MARGINS, MarginSchedule, resolve_margins
from .base import TrainerBase, build_optimizer, build_scheduler, resolve_autocast_dtype
from .registry import MethodInfo, register_method

__all__ = ['LocalTrainer']


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
            (``False``); equal results up to float rounding. ``None`` (default): one pass per view on CPU, where it
            measured faster with 1 and 2 threads, one V·B batch on accelerators (docs/performance.md).
        check_finite: refuse a NaN/inf loss before any weight changes (one host sync per step).
        select_on: which validation loss picks the best checkpoint: ``'last'`` stage (official) or ``'sum'``.
        autocast_dtype: ``'bfloat16'`` or ``'float16'`` runs the stage forwards under ``torch.autocast`` (the
            contrastive loss stays float32); float16 adds one gradient scaler shared by the stages, which skips a
            stage's update when its gradients overflow. ``None`` (default): float32.
        compile_stages: ``torch.compile`` the stages (``True``, or a dict of ``torch.compile`` kwargs). Off by
            default: compiling takes minutes on CPU and pays off only on accelerators.
        stage_metrics: extra per-stage diagnostics ``{name: fn(features [B, V, D], labels, loss_fn) -> 0-d}``,
            computed on detached features and reported as ``{name}_block{i}`` (e.g. the clamped fraction R(k)).
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
        self.optimizers = [
            build_optimizer(self.stages.stage_parameters(i), optimizer, lr, weight_decay, dict(optimizer_kwargs or {}))
            for i in range(self.num_stages)]
        self.schedulers = [build_scheduler(opt, scheduler) for opt in self.optimizers] if scheduler else []
        self.num_views = num_views
        self.fuse_views = fuse_views
        self.check_finite = check_finite
        self.select_on = select_on
        self.stage_metrics = dict(stage_metrics or {})
        self.autocast_dtype = resolve_autocast_dtype(autocast_dtype)
        use_scaler = self.autocast_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type) if use_scaler else None
        if compile_stages:
            self.stages.compile(**({} if compile_stages is True else dict(compile_stages)))
        self.num_updates = 0
        self.epoch = 0

    @property
    def selection_key(self) -> str:
        """The ``evaluate()`` entry whose minimum picks the best checkpoint (official: the last stage's loss)."""
        return f'loss_block{self.num_stages - 1}' if self.select_on == 'last' else 'loss'

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
            ``{'loss': Σ_l loss_l, 'loss_block0': loss_0, ...}`` as detached 0-d tensors (no host sync), plus
            ``{name}_block{i}`` for every ``stage_metrics`` entry.
        """
        return self._as_dict(self._update(views, labels))

    def _update(self, views: Tensor | Sequence[Tensor], labels: Tensor) -> Tensor:
        """The body of ``step()``: ``[1 + M, L]`` detached stage losses (row 0) and stage metrics."""
        x, labels = self._prepare_views(views, labels)
        self._begin_update()
        losses = self._stage_losses(x, labels, backward=True)
        self._finish_update(losses[0])
        return losses

    def _evaluate_batch(self, views: Tensor | Sequence[Tensor], labels: Tensor) -> Tensor:
        """``[1 + M, L]`` stage losses and metrics of a batch, without gradients or updates."""
        x, labels = self._prepare_views(views, labels)
        return self._stage_losses(x, labels, backward=False)

    def _prepare_views(self, views: Tensor | Sequence[Tensor], labels: Tensor) -> tuple[Tensor, Tensor]:
        """``prepare_batch``, but views that are one tensor object (a loader without augmentation yields them so)
        give one ``[B, ...]`` copy: identical inputs make identical features, so one pass serves all V views."""
        shared = not isinstance(views, Tensor) and all(v is views[0] for v in views[1:self.num_views])
        x, labels = self.prepare_batch(views, labels)
        return (x[:len(labels)] if shared else x), labels

    def _stage_losses(self, x: Tensor, labels: Tensor, backward: bool) -> Tensor:
        """Run every stage on its detached input; ``[1 + M, L]``: losses (back-propagated if ``backward``), metrics."""
        h, columns = x, []
        for index in range(self.num_stages):
            h, column = self.stage_step(index, h, labels, backward)
            columns.append(column)
        return torch.stack(columns, dim=1)

    def stage_step(self, index: int, h: Tensor, labels: Tensor, backward: bool = True) -> tuple[Tensor, Tensor]:
        """Stage ``index`` alone: forward on the detached input, loss, and (with ``backward``) its gradients.

        The optimizer is not stepped here. Schedules other than the sequential one (e.g. a layer pipeline) call this
        per stage and batch.

        Args:
            h: the stage input, ``[VB, ...]`` view-major (images for stage 0), or ``[B, ...]`` when the V views are
                identical: the loss then gets the features expanded over the view axis (stride 0) and computes the
                same value on the ``[B, B]`` similarities.
            labels: ``[B]``.

        Returns:
            The stage output, shaped as ``h`` (still attached to this stage's graph only), and ``[1 + M]``: the
            detached loss followed by the ``stage_metrics`` values.
        """
        with torch.autocast(h.device.type, self.autocast_dtype, enabled=self.autocast_dtype is not None):
            # no gradient is ever computed for the input
            h = self._forward_stage(index, h.detach(), views=len(h) // len(labels))
            z = self.stages.pool(h)  # [VB, D] view-major, or [B, D] for identical views
            features = z.view(-1, len(labels), z.shape[-1]).transpose(0, 1)  # [B, V or 1, D]
            features = features.expand(-1, self.num_views, -1)  # [B, V, D]; a no-op unless the views are identical
            loss_fn = self.losses[index]
            loss = loss_fn(features, labels)
        if backward:  # the graph holds stage `index` only: its input is detached
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        extras = [fn(features.detach(), labels, loss_fn) for fn in self.stage_metrics.values()]
        return h, torch.stack([loss.detach(), *extras])

    def _forward_stage(self, index: int, h: Tensor, views: int) -> Tensor:
        fuse = self.fuse_views if self.fuse_views is not None else h.device.type != 'cpu'
        if fuse or views == 1:
            return self.stages.forward_stage(index, h)
        return torch.cat([self.stages.forward_stage(index, v) for v in h.chunk(views)])

    # ----------------------------------------------------------------------------------------------- helpers
    def _as_dict(self, rows: Tensor) -> dict[str, Tensor]:
        out = {'loss': rows[0].sum()}
        for name, row in zip(['loss', *self.stage_metrics], rows):
            out.update({f'{name}_block{i}': value for i, value in enumerate(row)})
        return out



register_method(MethodInfo(
    'cff', 'CFF', LocalTrainer, description='Contrastive Forward-Forward, layer-local (CFF+M; margins=0 for CFF)',
    config_keys=('loss', 'temperature', 'margin_schedule', 'm0', 'm_last', 'num_views', 'select_on', 'autocast',
                 'compile', 'log_clamped')))
