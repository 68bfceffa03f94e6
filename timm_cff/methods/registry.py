"""The method registry: ``register_method``, ``create_trainer``, ``list_methods``, ``get_method_info``."""
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..registry import Registry

__all__ = ['MethodInfo', 'register_method', 'create_trainer', 'list_methods', 'get_method_info']


@dataclass(frozen=True)
class MethodInfo:
    """What a run needs to know about a method.

    Attributes:
        name: the registry key (``'cff'``, ``'symba'``, ...).
        paper_name: the column of the paper's tables (``'CFF'``, ``'SymBa'``, ``'BP+CE'``, ...).
        trainer_class: the ``TrainerBase`` subclass; built as ``trainer_class(model, **defaults, **kwargs)``.
        defaults: keyword arguments that make the class this method (e.g. ``{'loss': 'symba'}``).
        description: one line for ``list_methods(with_description=True)`` and ``--help``.
        label_conditioned: the FF family: the label enters the network, prediction takes C passes and stage 2
            trains a one-pass head on the frozen stages.
        end_to_end: the classifier is trained in stage 1 (BP): no stage 2.
        config_keys: the ``train.*`` keys the method reads beyond the common ones; others are refused.
    """
    name: str
    paper_name: str
    trainer_class: type
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ''
    label_conditioned: bool = False
    end_to_end: bool = False
    config_keys: tuple[str, ...] = ()


_METHODS: Registry[MethodInfo] = Registry('method', ordered=True)  # the paper's column order


def register_method(info: MethodInfo) -> MethodInfo:
    """Add a method; ``create_trainer(info.name, model)`` then builds it and ``timm-cff train`` accepts it."""
    return _METHODS.register(info.name, info)


def get_method_info(name: str) -> MethodInfo:
    return _METHODS.get(name)


def list_methods(filter: str = '', with_description: bool = False, **properties: Any
                 ) -> list[str] | list[tuple[str, str]]:
    """Registered methods in registration order, fnmatch-filtered; ``properties`` select by ``MethodInfo`` field,
    e.g. ``list_methods(label_conditioned=True)`` -> ``['ff', 'symba', 'collab']``."""
    names = [n for n in _METHODS.names(filter)
             if all(getattr(_METHODS.get(n), k) == v for k, v in properties.items())]
    return [(n, _METHODS.get(n).description) for n in names] if with_description else names


def create_trainer(method: str, model: nn.Module, **kwargs: Any):
    """The trainer for ``method`` (``cff | ff | symba | collab | bp``); ``kwargs`` override its defaults.

    Example: ``create_trainer('symba', model, loss_kwargs={'alpha': 1.0})``.
    """
    info = _METHODS.get(method)
    try:
        return info.trainer_class(model, **{**info.defaults, **kwargs})
    except TypeError as e:
        raise TypeError(f'Cannot build the {info.name!r} trainer ({info.trainer_class.__name__}) with arguments '
                        f'{sorted(kwargs)}: {e}') from e
