"""Training methods, one registry: ``create_trainer(method, model, **kwargs)`` picks a column of the CFF paper's
comparison tables.

``cff`` is layer-local contrastive training (``LocalTrainer``; CFF+M by default, plain CFF with ``margins=0``);
``ff``, ``symba`` and ``collab`` are the Forward-Forward family; ``bp`` is end-to-end backpropagation. Each method
registers itself (``register_method``) with a ``MethodInfo``; every list of methods is derived from the registry.
Every trainer speaks the same ``TrainerBase`` protocol, so one run loop drives any method unchanged.
"""
from .base import EPOCH_LENGTH_SCHEDULES as EPOCH_LENGTH_SCHEDULES
from .base import NonFiniteLossError as NonFiniteLossError
from .base import SCHEDULES as SCHEDULES
from .base import StageOptimizers as StageOptimizers
from .base import TrainerBase as TrainerBase
from .base import schedule as schedule
from .base import split_batch as split_batch
from .registry import MethodInfo as MethodInfo
from .registry import create_trainer as create_trainer
from .registry import get_method_info as get_method_info
from .registry import list_methods as list_methods
from .registry import register_method as register_method
from .cff import LocalTrainer as LocalTrainer  # noqa: E402  (each method module registers itself on import)
from .ff import ForwardForwardTrainer as ForwardForwardTrainer
from .bp import BackpropTrainer as BackpropTrainer
from .head import OnePassClassifier as OnePassClassifier
from .head import train_one_pass_head as train_one_pass_head

__all__ = ['EPOCH_LENGTH_SCHEDULES', 'SCHEDULES', 'schedule', 'NonFiniteLossError', 'StageOptimizers', 'TrainerBase',
           'split_batch', 'MethodInfo', 'create_trainer', 'get_method_info', 'list_methods', 'register_method',
           'LocalTrainer', 'ForwardForwardTrainer', 'BackpropTrainer', 'OnePassClassifier', 'train_one_pass_head']
