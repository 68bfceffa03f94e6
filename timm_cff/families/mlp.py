"""MLP[E L]: a plain stack of L fully connected layers of E ReLU units, the second model family of the CFF paper.

The MNIST and CIFAR-10 MLP rows of Tables 1 and 3 (Aghagolzadeh & Ezoji, "Contrastive Forward-Forward", arXiv
2502.00571) train such networks on the flattened image. Every layer (Linear + ReLU) is a stage: CFF/CFF+M put the
loss on its output directly (there are no tokens to pool) and feed the raw output, detached, to the next layer.

``MLP`` follows timm's classifier interface (``forward_features``, ``forward_head``, ``fc_norm`` + ``head``,
``num_classes``, ``reset_classifier``), so ``train_linear_probe``, ``evaluate_accuracy`` and ``LocalTrainer`` work
on it unchanged; ``MlpStages`` is its stage adapter.
"""
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import StageAdapter, register_stages
from .labels import LabelledStages, register_labelled_stages

__all__ = ['MLP', 'MlpStages', 'MlpOneHotLabel', 'create_mlp']


class MLP(nn.Module):
    """MLP[E L] on flattened inputs, with a timm-style classifier (``fc_norm`` + ``head``) on the last layer.

    Args:
        in_features: values per input sample (784 for MNIST, 3072 for CIFAR-10).
        embed_dim: E, the width of every layer.
        depth: L, the number of Linear + ReLU layers.
        num_classes: classifier outputs; 0 makes ``head`` the identity.
        fc_norm: put a LayerNorm before the head (the paper's probe is "a linear head", so off by default).
        input_size: the expected input shape without the batch axis, e.g. ``(1, 28, 28)``; only for error messages
            and data configs.

    Shape:
        input ``[B, *input_size]`` or ``[B, in_features]``; features ``[B, E]``; logits ``[B, num_classes]``.
    """

    def __init__(self, in_features: int, embed_dim: int = 500, depth: int = 3, num_classes: int = 10, *,
                 fc_norm: bool = False, input_size: Sequence[int] | None = None):
        super().__init__()
        if min(in_features, embed_dim, depth) < 1 or num_classes < 0:
            raise ValueError(f'MLP needs in_features, embed_dim, depth >= 1 and num_classes >= 0, got in_features='
                             f'{in_features}, embed_dim={embed_dim}, depth={depth}, num_classes={num_classes}.')
        self.in_features = in_features
        self.input_size = tuple(input_size) if input_size is not None else (in_features,)
        self.num_features = self.embed_dim = embed_dim
        self.num_classes = num_classes
        widths = [in_features] + [embed_dim] * depth
        self.layers = nn.ModuleList([
            nn.Sequential(OrderedDict(fc=nn.Linear(d_in, d_out), act=nn.ReLU()))
            for d_in, d_out in zip(widths[:-1], widths[1:])])
        self.fc_norm = nn.LayerNorm(embed_dim) if fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def flatten(self, x: Tensor) -> Tensor:
        """``[B, ...] -> [B, in_features]``, with a clear error for inputs of another size."""
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(f'MLP expects {self.in_features} values per sample (input {list(self.input_size)}), '
                             f'got {x.shape[1]}; build it with create_mlp(img_size=..., in_chans=...) for this data.')
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, ...] -> [B, E]``: the last layer's (ReLU) output."""
        x = self.flatten(x)
        for layer in self.layers:
            x = layer(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``[B, E] -> [B, num_classes]`` (``[B, E]`` after ``fc_norm`` with ``pre_logits``)."""
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head with ``num_classes`` outputs (0: identity), on the device of the current one."""
        device = next(self.parameters()).device
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes).to(device) if num_classes > 0 else nn.Identity()


def create_mlp(embed_dim: int = 500, depth: int = 3, num_classes: int = 10, *, img_size: int | Sequence[int] = 28,
               in_chans: int = 1, fc_norm: bool = False) -> MLP:
    """MLP[E L] for images: ``create_mlp(500, 3)`` is MNIST MLP[500 3]; CIFAR-10 MLP[800 4] is
    ``create_mlp(800, 4, img_size=32, in_chans=3)``."""
    height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return MLP(in_chans * height * width, embed_dim, depth, num_classes, fc_norm=fc_norm,
               input_size=(in_chans, height, width))


@register_stages(MLP, name='mlp')
class MlpStages(StageAdapter):
    """Stages of an ``MLP``: stage l is layer l (Linear + ReLU); stage 0 also flattens the input.

    The stage output is already one vector per sample, so ``pool`` is the identity.
    """

    def __init__(self, model: MLP):
        self.model = model
        self.num_stages = len(model.layers)

    def describe(self) -> str:
        return f'MLP[{self.model.embed_dim} {self.num_stages}]'

    def embed(self, x: Tensor) -> Tensor:
        """Inputs ``[B, ...] -> [B, in_features]``."""
        return self.model.flatten(x)

    def forward_stage(self, index: int, h: Tensor) -> Tensor:
        """``[B, ...]`` inputs (stage 0) or ``[B, E]`` -> ``[B, E]``."""
        if index == 0:
            h = self.embed(h)
        return self.model.layers[index](h)

    def pool(self, h: Tensor) -> Tensor:
        return h

    def stage_parameters(self, index: int) -> list[nn.Parameter]:
        return list(self.model.layers[index].parameters())


@register_labelled_stages(MlpStages)
class MlpOneHotLabel(LabelledStages):
    """MLP: the label as a one-hot code of height ``value`` in the first C input values (Hinton's FF).

    Args:
        stages: ``MlpStages``.
        num_classes: C (at most the number of input values).
        value: the height of the one-hot entry.
        seed: ignored: the one-hot code draws nothing. ``ForwardForwardTrainer`` passes its seed to every
            family's label class (``create_labelled_stages(..., seed=...)``), and the ViT's draws its label
            patches from it.
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
