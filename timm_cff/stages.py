"""How a model splits into stages: the only place that touches timm's ViT internals.

A *stage* is the unit that owns a loss and an optimizer. For a timm ``VisionTransformer`` (CFF paper, Sec. 3):

- stage 0 = ``patch_embed`` -> ``_pos_embed`` (class/register tokens + position embedding) -> ``patch_drop`` ->
  ``norm_pre`` -> ``blocks[0]``;
- stage l = ``blocks[l]``.

Composing the stages (detached or not) and applying ``model.norm`` equals ``model.forward_features`` exactly; the
tests pin that. ``norm``, ``fc_norm`` and ``head`` belong to no stage: the stage-2 probe trains ``fc_norm`` + ``head``.

Other model families plug in with ``register_stages(model_class)`` on a class with the same four members.
"""
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ['StageAdapter', 'VitStages', 'create_stages', 'register_stages', 'HEAD_MODULES']

#: Modules after the last stage, trained by the linear probe (timm's classifier path with ``global_pool='avg'``).
HEAD_MODULES = ('fc_norm', 'head')
#: Modules after the last stage that stay frozen in both stages (``Identity`` in the CFF configuration).
_UNOWNED_MODULES = ('norm', 'head_drop') + HEAD_MODULES


class StageAdapter:
    """The interface a model family implements; see ``VitStages`` for the reference implementation.

    Attributes:
        model: the wrapped, unmodified model.
        num_stages: number of stages L.
    """
    model: nn.Module
    num_stages: int

    def stage_parameters(self, index: int) -> list[nn.Parameter]:
        """Parameters owned by stage ``index`` (disjoint across stages)."""
        raise NotImplementedError

    def forward_stage(self, index: int, h: Tensor) -> Tensor:
        """Stage ``index`` on its input (images ``[B, C, H, W]`` for stage 0, the previous stage's output after)."""
        raise NotImplementedError

    def pool(self, h: Tensor) -> Tensor:
        """A stage output reduced to one feature vector per sample: ``[B, ...] -> [B, D]``."""
        raise NotImplementedError

    def compile(self, **kwargs) -> None:
        """Optional: run ``forward_stage`` through ``torch.compile`` (``kwargs`` go to it); the model is unchanged."""
        raise NotImplementedError(f'{type(self).__name__} does not support compiling its stages.')


_ADAPTERS: dict[type, Callable[[nn.Module], StageAdapter]] = {}


def register_stages(model_class: type) -> Callable[[type], type]:
    """Class decorator: use the decorated adapter for instances of ``model_class`` (and subclasses)."""
    def _register(adapter_class: type) -> type:
        _ADAPTERS[model_class] = adapter_class
        return adapter_class
    return _register


def create_stages(model: nn.Module) -> StageAdapter:
    """The stage adapter for ``model``; ``TypeError`` naming the supported families otherwise."""
    for model_class, adapter_class in _ADAPTERS.items():
        if isinstance(model, model_class):
            return adapter_class(model)
    supported = ', '.join(c.__name__ for c in _ADAPTERS)
    raise TypeError(f'Cannot split a {type(model).__name__} into local-training stages. Supported model classes: '
                    f'{supported}. Build one with timm.create_model("vit_...", global_pool="avg", class_token=False).')


def _vit_class():
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer


def _check_vit(model: nn.Module) -> None:
    name = type(model).__name__
    if name == 'NaFlexVit':
        raise TypeError('NaFlexVit is not supported: its forward packs variable-size patch sequences. Unset '
                        'TIMM_USE_NAFLEXVIT and build a plain VisionTransformer.')
    for attr in ('blocks', '_pos_embed', 'patch_embed', 'patch_drop', 'norm_pre', 'pool'):
        if not hasattr(model, attr):
            raise TypeError(f'{name} has no `{attr}`; only timm VisionTransformer models can be trained locally.')
    if getattr(model, 'attn_pool', None) is not None:
        raise ValueError(f"global_pool={model.global_pool!r} has learnable pooling that belongs to no stage; "
                         f"build the model with global_pool='avg' (or 'token' with a class token).")
    if not model.global_pool:
        raise ValueError("global_pool='' gives no per-sample feature for the stage losses; use global_pool='avg'.")


class VitStages(StageAdapter):
    """Stages of an unmodified timm ``VisionTransformer`` (global-pool, class-token and register-token variants).

    Args:
        model: a ``timm.models.vision_transformer.VisionTransformer``.
    """

    def __init__(self, model: nn.Module):
        _check_vit(model)
        self.model = model
        self.num_stages = len(model.blocks)
        self._compiled_blocks: list[nn.Module] | None = None
        if self.num_stages < 1:
            raise ValueError('The model has no transformer blocks to train.')
        self._check_ownership()

    def embed(self, x: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` -> tokens ``[B, N, D]``: everything ``forward_features`` does before the blocks."""
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))

    def forward_stage(self, index: int, h: Tensor) -> Tensor:
        """``[B, C, H, W]`` (stage 0) or ``[B, N, D]`` -> ``[B, N, D]``."""
        if index == 0:
            h = self.embed(h)
        blocks = self._compiled_blocks or self.model.blocks
        return blocks[index](h)

    def compile(self, **kwargs) -> None:
        """``torch.compile`` every block; identical blocks share one compiled graph. The embedding stays eager.

        The compiled wrappers share the blocks' parameters, so the model and its ``state_dict`` are unchanged.
        """
        self._compiled_blocks = [torch.compile(block, **kwargs) for block in self.model.blocks]

    def pool(self, h: Tensor) -> Tensor:
        """``[B, N, D] -> [B, D]`` with the model's own pooling (token mean without prefix tokens for 'avg')."""
        return self.model.pool(h)

    def stage_parameters(self, index: int) -> list[nn.Parameter]:
        m = self.model
        params = list(m.blocks[index].parameters())
        if index == 0:
            roots = [getattr(m, name, None) for name in ('pos_embed', 'cls_token', 'reg_token')]
            params = [p for p in roots if p is not None] + list(m.patch_embed.parameters()) + \
                list(m.norm_pre.parameters()) + params
        return params

    def _check_ownership(self) -> None:
        """Every parameter belongs to exactly one stage or to the head; anything else is a model we can't train."""
        owned = {id(p) for i in range(self.num_stages) for p in self.stage_parameters(i)}
        stray = [n for n, p in self.model.named_parameters()
                 if id(p) not in owned and n.split('.')[0] not in _UNOWNED_MODULES]
        if stray:
            raise TypeError(f'{type(self.model).__name__} has parameters that belong to no stage: {stray[:5]}. '
                            'Only the standard VisionTransformer layout is supported.')


register_stages(_vit_class())(VitStages)
