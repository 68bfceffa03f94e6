"""The timm ``VisionTransformer`` family: its stages, its FF label token and the official CFF initialisation.

The only place that touches timm's ViT internals. Stages (CFF paper, Sec. 3):

- stage 0 = ``patch_embed`` -> ``_pos_embed`` (class/register tokens + position embedding) -> ``patch_drop`` ->
  ``norm_pre`` -> ``blocks[0]``;
- stage l = ``blocks[l]``.

Composing the stages (detached or not) and applying ``model.norm`` equals ``model.forward_features`` exactly; the
tests pin that. ``norm``, ``fc_norm`` and ``head`` belong to no stage: the stage-2 probe trains ``fc_norm`` + ``head``.
"""
import torch
from torch import Tensor, nn

from .base import UNOWNED_MODULES, StageAdapter, register_stages
from .labels import LabelledStages, register_labelled_stages

__all__ = ['VitStages', 'VitLabelToken', 'init_official_']


def init_official_(model: nn.Module, pos_embed_std: float = 1.0) -> nn.Module:
    """Re-draw ``pos_embed`` (and class/register tokens) from N(0, std²); the rest keeps PyTorch defaults."""
    with torch.no_grad():
        for name in ('pos_embed', 'cls_token', 'reg_token'):
            param = getattr(model, name, None)
            if param is not None:
                param.normal_(0.0, pos_embed_std)
    return model


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

    def describe(self) -> str:
        return f'ViT[{self.model.embed_dim} {self.model.blocks[0].attn.num_heads} {self.num_stages}]'

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
                 if id(p) not in owned and n.split('.')[0] not in UNOWNED_MODULES]
        if stray:
            raise TypeError(f'{type(self.model).__name__} has parameters that belong to no stage: {stray[:5]}. '
                            'Only the standard VisionTransformer layout is supported.')


register_stages(_vit_class(), name='vit')(VitStages)


@register_labelled_stages(VitStages)
class VitLabelToken(LabelledStages):
    """ViT: a fixed random label patch per class, projected by the model's own ``patch_embed.proj``, plus a
    learnable label position embedding, prepended to the image tokens.

    Args:
        stages: ``VitStages`` of a timm ``VisionTransformer``.
        num_classes: C.
        seed: seeds the label patches (standard normal, in normalised-pixel units) and the position init.
        pos_std: std of the label position embedding init; ``None`` matches the model's own ``pos_embed``
            (about 1.0 with the official N(0, 1) init, 0.02 with timm's).
        pool_label_token: include the label token in the goodness mean (the paper's Alg. 1; the code leaves it out).
        normalize: see ``LabelledStages``.
    """

    def __init__(self, stages: VitStages, num_classes: int, *, seed: int = 0, pos_std: float | None = None,
                 pool_label_token: bool = False, normalize: str = 'sample'):
        super().__init__(stages, num_classes, normalize)
        proj = stages.model.patch_embed.proj
        if not isinstance(proj, nn.Conv2d):
            raise TypeError(f'The label patch needs a Conv2d patch projection, got {type(proj).__name__}.')
        generator = torch.Generator().manual_seed(seed)
        patches = torch.randn(num_classes, proj.in_channels, *proj.kernel_size, generator=generator)
        if len(torch.unique(patches.flatten(1), dim=0)) != num_classes:
            raise RuntimeError(f'Label patches drawn with seed {seed} collide; use another seed.')
        std = _pos_std(stages.model) if pos_std is None else pos_std
        pos = torch.randn(1, 1, proj.out_channels, generator=generator) * std
        self.register_buffer('patches', patches.to(proj.weight))  # [C, in_chans, p, p], fixed
        self.pos_embed = nn.Parameter(pos.to(proj.weight))  # [1, 1, E], trained with stage 0
        self.pool_label_token = pool_label_token

    def label_tokens(self, labels: Tensor | None, batch_size: int) -> Tensor:
        """``[B, 1, E]``: the projected label patch (all zeros for ``None``) plus the label position."""
        patch_embed = self.stages.model.patch_embed
        patches = self.patches if labels is not None else torch.zeros_like(self.patches[:1])
        tokens = patch_embed.proj(patches).flatten(2).transpose(1, 2)  # [C or 1, 1, E], as PatchEmbed does
        tokens = patch_embed.norm(tokens) + self.pos_embed
        tokens = tokens[labels] if labels is not None else tokens.expand(batch_size, -1, -1)
        return self.stages.model.norm_pre(tokens)

    def forward_first(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """Images ``[B, C, H, W]`` -> ``[B, 1 + N, E]``: block 0 on [label token, image tokens]."""
        tokens = self.stages.embed(x)  # [B, N, E]
        h = torch.cat([self.label_tokens(labels, len(x)), tokens], dim=1)
        return self.stages.model.blocks[0](h)

    def pool(self, h: Tensor) -> Tensor:
        """``[B, 1 + N, E] -> [B, E]``: the model's pooling (token mean) over the image tokens."""
        return self.stages.pool(h if self.pool_label_token else h[:, 1:])


def _pos_std(model: nn.Module) -> float:
    pos_embed = getattr(model, 'pos_embed', None)
    if pos_embed is None or pos_embed.numel() < 2 or float(pos_embed.detach().std()) == 0.0:
        return 0.02  # timm's pos_embed init
    return float(pos_embed.detach().std())
