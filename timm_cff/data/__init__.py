"""Data: in-memory datasets, the paper's split/corruption protocol, batched on-device augmentation."""
from .augment import STATS as STATS
from .augment import BatchAugment as BatchAugment
from .loader import ImageLoader as ImageLoader
from .sources import ArrayDataset as ArrayDataset
from .sources import DataError as DataError
from .sources import list_datasets as list_datasets
from .sources import load_dataset as load_dataset
from .sources import prepare_tiny_imagenet as prepare_tiny_imagenet
from .splits import corrupt_labels as corrupt_labels
from .splits import keep_fraction as keep_fraction
from .splits import split_train_val as split_train_val

__all__ = ['STATS', 'BatchAugment', 'ImageLoader', 'ArrayDataset',
           'DataError', 'list_datasets', 'load_dataset', 'prepare_tiny_imagenet', 'corrupt_labels', 'keep_fraction', 'split_train_val']
