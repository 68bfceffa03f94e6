"""The loss registry: ``register_loss``, ``create_loss``, ``list_losses``, ``get_loss_class``, ``takes_margin``.

timm has registries for models and optimizers but a fixed ``if/elif`` for losses; this one has the shape of every
timm-cff registry (``timm_cff.registry``), so that YAML strings, classes and partials take one path.
"""
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..registry import Registry

__all__ = ['LossInfo', 'register_loss', 'create_loss', 'list_losses', 'get_loss_class', 'get_loss_info',
           'takes_margin']


@dataclass(frozen=True)
class LossInfo:
    """What the registry knows about one loss."""
    name: str
    loss_class: type[nn.Module]
    description: str = ''
    defaults: dict[str, Any] = field(default_factory=dict)


    @property
    def takes_margin(self) -> bool:
        """Whether the loss has a per-stage ``margin`` (the CFF+M margin schedule applies to it)."""
        return _has_margin(self.loss_class)


def _has_margin(factory: Callable[..., nn.Module]) -> bool:
    try:
        return 'margin' in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a callable without a signature: assume it may take one
        return True


def takes_margin(loss: str | Callable[..., nn.Module]) -> bool:
    """Whether a registered name, class or partial takes a ``margin`` argument."""
    return get_loss_info(loss).takes_margin if isinstance(loss, str) else _has_margin(loss)


_LOSSES: Registry[LossInfo] = Registry('loss')


def register_loss(name: str, description: str = '', **defaults: Any) -> Callable[[type], type]:
    """Class decorator: ``@register_loss('supcon', description='...')``. Re-registering a name warns and replaces."""
    def _register(cls: type) -> type:
        key = name.lower()
        _LOSSES.register(key, LossInfo(key, cls, description or (cls.__doc__ or '').strip().split('\n')[0],
                                       dict(defaults)))
        return cls
    return _register


def list_losses(
        filter: str | list[str] = '',
        exclude_filters: str | list[str] | None = None,
        with_description: bool = False,
) -> list[str] | list[tuple[str, str]]:
    """Registered loss names (sorted), filtered with fnmatch wildcards like ``timm.list_models``."""
    names = _LOSSES.names(filter, exclude_filters)
    return [(n, _LOSSES.get(n).description) for n in names] if with_description else names


def get_loss_info(name: str) -> LossInfo:
    """The ``LossInfo`` of a registered name; ``ValueError`` naming the known losses otherwise."""
    return _LOSSES.get(name)


def get_loss_class(name: str, bind_defaults: bool = True) -> Callable[..., nn.Module]:
    """The class registered as ``name``; with ``bind_defaults`` its registered defaults are bound by a partial."""
    info = get_loss_info(name)
    if bind_defaults and info.defaults:
        return functools.partial(info.loss_class, **info.defaults)
    return info.loss_class


def create_loss(name_or_class: str | type | Callable[..., nn.Module], **kwargs: Any) -> nn.Module:
    """Build a loss from a registered name, a class or a partial; ``kwargs`` override the defaults.

    Example: ``create_loss('marginal_supcon', margin=0.4, temperature=0.15)``.
    """
    factory = get_loss_class(name_or_class) if isinstance(name_or_class, str) else name_or_class
    if not callable(factory):
        raise TypeError(f'A loss must be a registered name, a class or a partial, got {type(name_or_class)}.')
    try:
        return factory(**kwargs)
    except TypeError as e:
        raise TypeError(f'Cannot build loss {name_or_class!r} with arguments {sorted(kwargs)}: {e}') from e
