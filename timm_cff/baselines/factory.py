"""``create_trainer(method, model, **kwargs)``: one key picks the column of the CFF paper's comparison tables.

``cff`` is layer-local contrastive training (``LocalTrainer``; CFF+M by default, plain CFF with ``margins=0``);
``ff``, ``symba`` and ``collab`` are the Forward-Forward family; ``bp`` is end-to-end backpropagation.
Every trainer exposes the same run-loop protocol (``step``, ``train_epoch``, ``evaluate``, ``selection_key``,
``predict``, ``state_dict``), so a run loop drives any method unchanged.
"""
import fnmatch
from typing import Any

from torch import nn

from ..trainer import LocalTrainer, TrainerBase
from .bp import BackpropTrainer
from .ff import ForwardForwardTrainer

__all__ = ['create_trainer', 'list_methods']

#: method -> (trainer class, its defaults, description)
_METHODS: dict[str, tuple[type, dict[str, Any], str]] = {
    'cff': (LocalTrainer, {}, 'Contrastive Forward-Forward, layer-local (CFF+M; margins=0 for CFF)'),
    'ff': (ForwardForwardTrainer, {'loss': 'ff'}, 'Forward-Forward with label tokens, threshold loss'),
    'symba': (ForwardForwardTrainer, {'loss': 'symba'}, 'SymBa: symmetric loss on the goodness gap'),
    'collab': (ForwardForwardTrainer, {'loss': 'ff', 'collab': True},
               'FF-Collab: FF with the detached goodness of the other stages'),
    'bp': (BackpropTrainer, {}, 'end-to-end backpropagation with cross-entropy'),
}


def list_methods(filter: str = '', with_description: bool = False) -> list[str] | list[tuple[str, str]]:
    """Training methods ``create_trainer`` knows, optionally fnmatch-filtered."""
    names = [n for n in _METHODS if not filter or fnmatch.fnmatch(n, filter)]
    return [(n, _METHODS[n][2]) for n in names] if with_description else names


def create_trainer(method: str, model: nn.Module, **kwargs: Any) -> TrainerBase:
    """The trainer for ``method`` (``cff | ff | symba | collab | bp``); ``kwargs`` override its defaults.

    Example: ``create_trainer('symba', model, loss_kwargs={'alpha': 1.0})``.
    """
    key = method.lower()
    if key not in _METHODS:
        raise ValueError(f'Unknown method {method!r}. Known methods: {", ".join(_METHODS)}.')
    trainer_class, defaults, _ = _METHODS[key]
    try:
        return trainer_class(model, **{**defaults, **kwargs})
    except TypeError as e:
        raise TypeError(f'Cannot build the {key!r} trainer ({trainer_class.__name__}) with arguments '
                        f'{sorted(kwargs)}: {e}') from e
