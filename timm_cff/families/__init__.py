"""Model families: how a model splits into stages and how the FF family writes a label into it (ViT, MLP)."""
from .base import HEAD_MODULES as HEAD_MODULES
from .base import StageAdapter as StageAdapter
from .base import FamilyInfo as FamilyInfo
from .base import create_stages as create_stages
from .base import describe_model as describe_model
from .base import get_family as get_family
from .base import list_families as list_families
from .base import register_stages as register_stages
from .labels import LabelledStages as LabelledStages
from .labels import create_labelled_stages as create_labelled_stages
from .labels import draw_negative_labels as draw_negative_labels
from .labels import register_labelled_stages as register_labelled_stages
from .mlp import MLP as MLP
from .mlp import MlpOneHotLabel as MlpOneHotLabel
from .mlp import MlpStages as MlpStages
from .mlp import create_mlp as create_mlp
from .vit import VitLabelToken as VitLabelToken
from .vit import VitStages as VitStages
from .vit import init_official_ as init_official_

__all__ = ['FamilyInfo', 'get_family', 'list_families', 'HEAD_MODULES', 'StageAdapter', 'create_stages',
           'describe_model', 'register_stages', 'LabelledStages', 'create_labelled_stages', 'draw_negative_labels',
           'register_labelled_stages', 'MLP', 'MlpOneHotLabel', 'MlpStages', 'create_mlp', 'VitLabelToken', 'VitStages',
           'init_official_']
