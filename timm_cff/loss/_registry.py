"""A loss registry that speaks timm's verbs: ``register_loss``, ``create_loss``, ``list_losses``, ``get_loss_class``.

timm has registries for models and optimizers but a fixed ``if/elif`` for losses; this copies the shape of
``timm.optim``'s registry (an info record, list/get/create verbs) so that YAML strings, classes and partials take one
path.
"""
import fnmatch
import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

__all__ = ['LossInfo', 'register_loss', 'create_loss', 'list_losses', 'get_loss_class', 'get_loss_info']

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LossInfo:
    """What the registry knows about one loss."""
    name: str
    loss_class: type[nn.Module]
    description: str = ''
    defaults: dict[str, Any] = field(default_factory=dict)


_LOSSES: dict[str, LossInfo] = {}


def register_loss(name: str, description: str = '', **defaults: Any) -> Callable[[type], type]:
    """Class decorator: ``@register_loss('supcon', description='...')``. Re-registering a name warns and replaces."""
    def _register(cls: type) -> type:
        key = name.lower()
        if key in _LOSSES:
            _logger.warning('Loss %r is registered again; %s replaces %s.', key, cls, _LOSSES[key].loss_class)
        _LOSSES[key] = LossInfo(key, cls, description or (cls.__doc__ or '').strip().split('\n')[0], dict(defaults))
        return cls
    return _register


def list_losses(
        filter: str | list[str] = '',
        exclude_filters: str | list[str] | None = None,
        with_description: bool = False,
) -> list[str] | list[tuple[str, str]]:
    """Registered loss names (sorted), filtered with fnmatch wildcards like ``timm.list_models``."""
    names = sorted(_LOSSES)
    if filter:
        patterns = [filter] if isinstance(filter, str) else filter
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
    if exclude_filters:
        patterns = [exclude_filters] if isinstance(exclude_filters, str) else exclude_filters
        names = [n for n in names if not any(fnmatch.fnmatch(n, p) for p in patterns)]
    if with_description:
        return [(n, _LOSSES[n].description) for n in names]
    return names


def get_loss_info(name: str) -> LossInfo:
    """The ``LossInfo`` of a registered name; ``ValueError`` naming the known losses otherwise."""
    key = name.lower()
    if key not in _LOSSES:
        raise ValueError(f'Unknown loss {name!r}. Known losses: {", ".join(list_losses())}.')
    return _LOSSES[key]


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
