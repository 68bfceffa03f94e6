"""Data: in-memory and streamed datasets, the paper's split/corruption protocol, batched on-device augmentation."""
from .augment import STATS as STATS
from .augment import BatchAugment as BatchAugment
from .loader import ImageLoader as ImageLoader
from .named import dataset_defaults as dataset_defaults
from .named import open_dataset as open_dataset
from .resize import fit_image as fit_image
from .sources import ArrayDataset as ArrayDataset
from .sources import DataError as DataError
from .sources import list_datasets as list_datasets
from .sources import load_dataset as load_dataset
from .sources import prepare_tiny_imagenet as prepare_tiny_imagenet
from .splits import corrupt_labels as corrupt_labels
from .splits import keep_fraction as keep_fraction
from .splits import split_train_val as split_train_val
from .streaming import ImageStream as ImageStream

__all__ = ['STATS', 'ArrayDataset', 'BatchAugment', 'DataError', 'ImageLoader', 'ImageStream',
           'corrupt_labels', 'dataset_defaults', 'fit_image', 'keep_fraction', 'list_datasets',
           'load_dataset', 'open_dataset', 'prepare_tiny_imagenet', 'split_train_val']
