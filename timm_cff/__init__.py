"""timm-cff: layer-local training of timm Vision Transformers with Contrastive Forward-Forward.

Aghagolzadeh & Ezoji, "Contrastive Forward-Forward: a training algorithm of Vision Transformer",
Neural Networks 192:107867 (2025), arXiv 2502.00571.
"""
from .export import export_model as export_model
from .export import load_encoder as load_encoder
from .families import MLP as MLP
from .families import MlpStages as MlpStages
from .families import StageAdapter as StageAdapter
from .families import VitStages as VitStages
from .families import create_mlp as create_mlp
from .families import create_stages as create_stages
from .families import list_families as list_families
from .families import register_stages as register_stages
from .loss import create_loss as create_loss
from .loss import get_loss_class as get_loss_class
from .loss import list_losses as list_losses
from .loss import register_loss as register_loss
from .margins import MarginSchedule as MarginSchedule
from .margins import create_margins as create_margins
from .margins import linear_margins as linear_margins
from .margins import list_margin_schedules as list_margin_schedules
from .methods import BackpropTrainer as BackpropTrainer
from .methods import ForwardForwardTrainer as ForwardForwardTrainer
from .methods import LocalTrainer as LocalTrainer
from .methods import MethodInfo as MethodInfo
from .methods import NonFiniteLossError as NonFiniteLossError
from .methods import OnePassClassifier as OnePassClassifier
from .methods import TrainerBase as TrainerBase
from .methods import create_trainer as create_trainer
from .methods import get_method_info as get_method_info
from .methods import list_methods as list_methods
from .methods import register_method as register_method
from .methods import train_one_pass_head as train_one_pass_head
from .metrics import accuracy as accuracy
from .metrics import evaluate_accuracy as evaluate_accuracy
from .probe import ProbeResult as ProbeResult
from .probe import train_linear_probe as train_linear_probe
from .timing import time_inference as time_inference
from .version import __version__ as __version__

__all__ = [
    'BackpropTrainer', 'ForwardForwardTrainer', 'OnePassClassifier', 'create_trainer', 'list_methods',
    'time_inference', 'train_one_pass_head', 'MLP', 'MlpStages', 'create_mlp', 'TrainerBase',
    'export_model', 'load_encoder', 'create_loss', 'get_loss_class', 'list_losses', 'register_loss',
    'MarginSchedule', 'create_margins', 'linear_margins', 'accuracy', 'evaluate_accuracy', 'ProbeResult',
    'train_linear_probe', 'StageAdapter', 'VitStages', 'create_stages', 'register_stages', 'LocalTrainer',
    'NonFiniteLossError', 'MethodInfo', 'get_method_info', 'register_method', 'list_families',
    'list_margin_schedules', '__version__',
]
