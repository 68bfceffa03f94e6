"""Baselines of the CFF paper's comparisons: FF, SymBa, FF-Collab and BP+CE, their prediction and timing."""
from .bp import BackpropTrainer as BackpropTrainer
from .factory import create_trainer as create_trainer
from .factory import list_methods as list_methods
from .ff import ForwardForwardTrainer as ForwardForwardTrainer
from .head import OnePassClassifier as OnePassClassifier
from .head import train_one_pass_head as train_one_pass_head
from .labels import LabelledStages as LabelledStages
from .labels import MlpOneHotLabel as MlpOneHotLabel
from .labels import VitLabelToken as VitLabelToken
from .labels import create_labelled_stages as create_labelled_stages
from .labels import draw_negative_labels as draw_negative_labels
from .labels import register_labelled_stages as register_labelled_stages
from .timing import time_inference as time_inference

__all__ = [
    'BackpropTrainer', 'create_trainer', 'list_methods', 'ForwardForwardTrainer', 'OnePassClassifier',
    'train_one_pass_head', 'LabelledStages', 'MlpOneHotLabel', 'VitLabelToken', 'create_labelled_stages',
    'draw_negative_labels', 'register_labelled_stages', 'time_inference',
]
