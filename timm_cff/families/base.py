"""How a model splits into stages: the ``StageAdapter`` interface and the registry of model families.

A *stage* is the unit that owns a loss and an optimizer. ``families.vit`` splits a timm ``VisionTransformer``,
``families.mlp`` the paper's MLP[E L]; other model families plug in with ``register_stages(model_class)`` on a class
with the same four members.
"""
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from ..registry import Registry

__all__ = ['StageAdapter', 'FamilyInfo', 'create_stages', 'describe_model', 'register_stages', 'get_family',
           'list_families', 'HEAD_MODULES', 'UNOWNED_MODULES']

#: Modules after the last stage, trained by the linear probe (timm's classifier path with ``global_pool='avg'``).
HEAD_MODULES = ('fc_norm', 'head')
#: Modules after the last stage that stay frozen in both stages (``Identity`` in the CFF configuration).
UNOWNED_MODULES = ('norm', 'head_drop') + HEAD_MODULES


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

    def describe(self) -> str:
        """The paper's name of the architecture, e.g. ``'ViT[128 4 5]'`` (E H L) or ``'MLP[500 3]'`` (E L)."""
        return f'{type(self.model).__name__}[{self.num_stages} stages]'

    def compile(self, **kwargs) -> None:
        """Optional: run ``forward_stage`` through ``torch.compile`` (``kwargs`` go to it); the model is unchanged."""
        raise NotImplementedError(f'{type(self).__name__} does not support compiling its stages.')


@dataclass
class FamilyInfo:
    """A model family: its model class, how it splits into stages and (for the FF family) how a label enters it."""
    name: str
    model_class: type
    stages_class: type | None = None
    labels_class: type | None = None


_FAMILIES: Registry[FamilyInfo] = Registry('model family', 'model families', ordered=True)


def _family_of(model_class: type) -> FamilyInfo | None:
    """The family of the most specific registered class in ``model_class``'s MRO."""
    for cls in model_class.__mro__:
        info = _FAMILIES.find(lambda f: f.model_class is cls)
        if info is not None:
            return info
    return None


def register_stages(model_class: type, name: str | None = None) -> Callable[[type], type]:
    """Class decorator: use the decorated adapter for instances of ``model_class`` (the most specific registered
    class of a model wins); ``name`` defaults to the model class name in lower case."""
    def _register(adapter_class: type) -> type:
        info = next((f for f in _FAMILIES if f.model_class is model_class), None)
        if info is None:
            info = _FAMILIES.register(name or model_class.__name__.lower(), FamilyInfo(
                name or model_class.__name__.lower(), model_class))
        info.stages_class = adapter_class
        return adapter_class
    return _register


def get_family(model: nn.Module | type) -> FamilyInfo:
    """The family of a model (instance or class); ``TypeError`` naming the supported families otherwise."""
    model_class = model if isinstance(model, type) else type(model)
    info = _family_of(model_class)
    if info is None or info.stages_class is None:
        supported = ', '.join(f.model_class.__name__ for f in _FAMILIES)
        raise TypeError(f'Cannot split a {model_class.__name__} into local-training stages. Supported model classes: '
                        f'{supported}. Build one with timm.create_model("vit_...", global_pool="avg", '
                        f'class_token=False).')
    return info


def list_families(filter: str = '') -> list[str]:
    """Registered model families (``['vit', 'mlp']``), fnmatch-filtered."""
    return _FAMILIES.names(filter)


def create_stages(model: nn.Module) -> StageAdapter:
    """The stage adapter for ``model``; ``TypeError`` naming the supported families otherwise."""
    return get_family(model).stages_class(model)


def describe_model(model: nn.Module) -> str:
    """``'ViT[E H L]'`` / ``'MLP[E L]'``: the architecture as the paper names it (``StageAdapter.describe``)."""
    return create_stages(model).describe()
