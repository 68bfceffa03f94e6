"""Label-conditioned stages for the Forward-Forward family (FF, SymBa, FF-Collab).

FF scores an (input, label) pair, so the label must enter the network (CFF paper, Alg. 1, right side):

- ViT: a fixed random patch per class goes through the model's own patch projection, gets a learnable position
  embedding owned by the baseline and is prepended to the image tokens. The patches are distinct Gaussian draws
  from a seed ("randomly initialized and fixed", as in SymBa), never the colliding one-hot codes of the official
  code. Goodness reads the token mean of the image tokens only (the label token is left out, as in the code).
- MLP: Hinton's FF writes a one-hot label into the first C input values.

Between stages every sample is L2-normalised as a whole (``'sample'``: over tokens × E, as the official code), so
a stage cannot pass its goodness on. ``LabelledStages`` wraps a model family's ``StageAdapter``; a new family
registers its own with ``register_labelled_stages``.
"""
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..loss import goodness
from ..mlp import MlpStages
from ..stages import StageAdapter, VitStages

__all__ = ['LabelledStages', 'VitLabelToken', 'MlpOneHotLabel', 'register_labelled_stages',
           'create_labelled_stages', 'draw_negative_labels']

_NORMALIZE = ('sample', 'token')


def draw_negative_labels(labels: Tensor, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
    """A wrong label per sample, uniform over the ``C - 1`` other classes: ``[B] -> [B]``.

    Drawn on the generator's device (CPU by default) and moved to ``labels.device``.
    """
    if num_classes < 2:
        raise ValueError(f'Negative labels need at least 2 classes, got {num_classes}.')
    device = generator.device if generator is not None else torch.device('cpu')
    shift = torch.randint(1, num_classes, labels.shape, generator=generator, device=device)
    return (labels + shift.to(labels.device)) % num_classes


class LabelledStages(nn.Module):
    """A model's stages with a label written into the input: the forward pass of the FF family.

    Holds the label parameters and buffers (not part of the timm model's state dict, so they are saved with the
    trainer); the model itself is reached through ``stages`` and is not a submodule.

    Args:
        stages: the model family's ``StageAdapter``.
        num_classes: C.
        normalize: between stages, unit L2 per ``'sample'`` (whole output, official) or per ``'token'``.
    """

    def __init__(self, stages: StageAdapter, num_classes: int, normalize: str = 'sample'):
        super().__init__()
        if normalize not in _NORMALIZE:
            raise ValueError(f'normalize must be one of {_NORMALIZE}, got {normalize!r}.')
        if num_classes < 2:
            raise ValueError(f'The FF family needs at least 2 classes, got num_classes={num_classes}.')
        self.stages = stages
        self.num_stages = stages.num_stages
        self.num_classes = num_classes
        self.normalize = normalize

    def forward_first(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """Stage 0 on inputs ``[B, ...]`` with ``labels [B]`` (``None``: the all-zero label) written in."""
        raise NotImplementedError

    def pool(self, h: Tensor) -> Tensor:
        """A stage output ``[B, ...]`` -> the features whose goodness is scored ``[B, D]``."""
        return self.stages.pool(h)

    def forward_stage(self, index: int, h: Tensor, labels: Tensor | None = None) -> Tensor:
        """Stage ``index``: inputs and labels for stage 0; otherwise the previous output, detached and normalised."""
        if index == 0:
            return self.forward_first(h, labels)
        return self.stages.forward_stage(index, self._normalize(h.detach()))

    def pooled_outputs(self, x: Tensor, labels: Tensor | None) -> list[Tensor]:
        """The pooled output ``[B, D]`` of every stage for inputs ``[B, ...]`` labelled ``labels``."""
        h, outputs = x, []
        for index in range(self.num_stages):
            h = self.forward_stage(index, h, labels)
            outputs.append(self.pool(h))
        return outputs

    def goodness(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """Goodness (mean of squares of the pooled output) of every stage: ``[L, B]``."""
        return torch.stack([goodness(z) for z in self.pooled_outputs(x, labels)])

    def _normalize(self, h: Tensor) -> Tensor:
        if self.normalize == 'token':
            return F.normalize(h, dim=-1)
        return F.normalize(h.flatten(1), dim=1).view_as(h)

    def extra_repr(self) -> str:
        return f'num_classes={self.num_classes}, normalize={self.normalize!r}'


_LABELLED: dict[type, Callable[..., LabelledStages]] = {}


def register_labelled_stages(stages_class: type) -> Callable[[type], type]:
    """Class decorator: use the decorated ``LabelledStages`` for adapters of ``stages_class`` (and subclasses)."""
    def _register(cls: type) -> type:
        _LABELLED[stages_class] = cls
        return cls
    return _register


def create_labelled_stages(stages: StageAdapter, num_classes: int, **kwargs) -> LabelledStages:
    """The FF-family forward for a model family's stages; ``kwargs`` go to the family's class."""
    for stages_class, cls in _LABELLED.items():
        if isinstance(stages, stages_class):
            return cls(stages, num_classes, **kwargs)
    supported = ', '.join(c.__name__ for c in _LABELLED)
    raise TypeError(f'No FF label embedding for {type(stages).__name__}; supported stage adapters: {supported}. '
                    'Register one with register_labelled_stages.')


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


@register_labelled_stages(MlpStages)
class MlpOneHotLabel(LabelledStages):
    """MLP: the label as a one-hot code of height ``value`` in the first C input values (Hinton's FF).

    Args:
        stages: ``MlpStages``.
        num_classes: C (at most the number of input values).
        value: the height of the one-hot entry.
        seed: unused (the code needs no randomness); accepted so every family takes the same arguments.
        normalize: see ``LabelledStages`` (both modes agree for vectors).
    """

    def __init__(self, stages: MlpStages, num_classes: int, *, value: float = 1.0, seed: int = 0,
                 normalize: str = 'sample'):
        super().__init__(stages, num_classes, normalize)
        if num_classes > stages.model.in_features:
            raise ValueError(f'{num_classes} classes do not fit in the {stages.model.in_features} input values.')
        self.value = value

    def forward_first(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """``[B, ...] -> [B, E]``: layer 0 on the flattened input with its first C values replaced by the label."""
        x = self.stages.embed(x)  # [B, D]
        code = x.new_zeros(len(x), self.num_classes)
        if labels is not None:
            code = F.one_hot(labels, self.num_classes).to(x.dtype) * self.value
        return self.stages.forward_stage(0, torch.cat([code, x[:, self.num_classes:]], dim=1))

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, value={self.value}'
