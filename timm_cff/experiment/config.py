"""Run configuration: a dataclass tree with defaults < YAML file < ``--section.key=value`` overrides.

Training defaults are the official CFF hyperparameters (cff-method.md §8); the comments say where a value comes
from. The model's size is the timm model's own (``model.name``) unless a size field is given: every recipe gives
its ViT[E H L] explicitly. A resolved config written by ``save_config`` is itself a valid ``--config``.
"""
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..methods import SCHEDULES, get_method_info, list_methods

__all__ = ['Config', 'ModelConfig', 'DataConfig', 'TrainConfig', 'ProbeConfig', 'RunConfig', 'PipelineConfig',
           'ConfigError',
           'check_values', 'load_config', 'save_config', 'apply_overrides', 'config_to_dict', 'iter_fields', 'flatten',
           'parse_override']


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key."""


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a help text (shown by ``--help``); lists/dicts get a fresh copy per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={'help': help})
    return field(default=default, metadata={'help': help})


@dataclass
class ModelConfig:
    name: str = opt('vit_tiny_patch16_224', "timm architecture (any VisionTransformer, e.g. vit_small_patch16_224: "
                                           "its own sizes unless the fields below are given), or 'mlp' for MLP[E L] "
                                           "(embed_dim = E, depth = L)")
    img_size: int | None = opt(None, 'input size (streamed and mixed-size folder images are fitted to it); None: the '
                                     'dataset image size (streamed: the first training image, which must be square)')
    patch_size: int | None = opt(None, "patch size; None: the timm model's (recipes: 4 for 32 px, 8 for 64 px: "
                                       '64 tokens as in the paper)')
    embed_dim: int | None = opt(None, "E of ViT[E H L]; None: the timm model's")
    num_heads: int | None = opt(None, "H of ViT[E H L]; None: the timm model's")
    depth: int | None = opt(None, "L of ViT[E H L] (number of blocks = stages); None: the timm model's")
    mlp_ratio: float | None = opt(None, "MLP hidden size / E; None: the timm model's (official CFF: 2)")
    global_pool: str = opt('avg', "pooling for the stage losses and the probe ('avg' = token mean, Eq. 13)")
    class_token: bool = opt(False, 'prepend a class token (the CFF ViT has none)')
    init: str = opt('torch', "'torch': PyTorch default init + pos_embed N(0, pos_embed_std) (official); 'timm'")
    pos_embed_std: float = opt(1.0, "std of the pos_embed init with init='torch' (official: 1.0)")
    patch_act: str = opt('', "'relu' after the patch projection (official code; such a model cannot be exported "
                             "as stock timm) or '' (none)")
    kwargs: dict = opt({}, 'extra keyword arguments for timm.create_model')


@dataclass
class DataConfig:
    dataset: str = opt('cifar10', 'in memory (decoded once, batches augmented on the device; the fast path): '
                                  'cifar10 | cifar100 | mnist | fashion_mnist (torchvision), npz (folder with '
                                  'train.npz/test.npz), folder (ImageFolder tree at data.root; mixed image sizes are '
                                  'resized to model.img_size), mnist_subset (bundled); streamed (decoded per image '
                                  'in data.workers, resized + centre-cropped to model.img_size): timm names '
                                  'torch/<name> (torch/cifar10, torch/mnist, torch/imagenet, ...), hfds/<name> '
                                  '(Hugging Face, pip install datasets), wds/<name> (uncompressed WebDataset .tar '
                                  'shards with .cls labels under data.root or data.root/<name>: <split>-*.tar or '
                                  'listed in _info.json), or an ImageFolder path')
    root: str | None = opt(None, 'data folder (torch/: where torchvision finds the files; hfds/: the HF cache; '
                                 'wds/: the shards, or the folder holding <name>/ with them); relative paths are '
                                 'also looked up under $TIMM_CFF_DATA')
    download: bool = opt(False, 'let torchvision download the dataset')
    train_split: str = opt('train', 'folder datasets: sub-folder with the training images; streamed: the split name')
    test_split: str = opt('test', "sub-folder / split with the test images; if it does not exist, 'validation' then "
                                  "'val' (ImageNet, Hugging Face) are tried (Tiny ImageNet: 'val_by_class')")
    stats: str = opt('auto', 'normalisation statistics: cifar10 | cifar100 | mnist | fashion_mnist | imagenet | '
                             'auto (the dataset\'s own, or computed on the training split for npz/folder, on a fixed '
                             'sample of 2,000 training images for streamed datasets)')
    mean: list = opt([], 'explicit per-channel mean (overrides stats)')
    std: list = opt([], 'explicit per-channel std (overrides stats)')
    val_fraction: float = opt(0.1, 'validation share of the training set (official 90/10 split)')
    split_seed: int = opt(1, "seed of the split permutation (official: torch.manual_seed(trial), trial = 1)")
    crop_padding: int | None = opt(None, 'RandomCrop padding; None: per dataset (CIFAR 4, Tiny ImageNet 6, MNIST 0)')
    hflip: bool | None = opt(None, 'random horizontal flip; None: per dataset (on, except MNIST-like)')
    randaugment: bool = opt(False, 'torchvision RandAugment before the crop (the "+RA" rows)')
    ra_num_ops: int = opt(3, 'RandAugment num_ops (official 3)')
    ra_magnitude: int = opt(14, 'RandAugment magnitude (official 14 of 31 bins)')
    label_noise: float = opt(0.0, 'fraction of train+val labels replaced by a random wrong class (Table 4)')
    data_fraction: float = opt(1.0, 'fraction of train+val kept (Table 4: 0.5 = 50% missing)')
    corruption_seed: int = opt(0, 'seed of label_noise / data_fraction, separate from the split seed')
    train_subset: int | None = opt(None, 'use only the first N images of the training file (quick runs)')
    test_subset: int | None = opt(None, 'use only the first N test images (quick runs)')
    batch_size: int = opt(512, 'batch size for train, validation, probe and test (official 512)')
    workers: int = opt(0, 'DataLoader workers for per-sample work (RandAugment, decoding streamed datasets: set it '
                          'to the CPU cores for those)')


@dataclass
class TrainConfig:
    method: str = opt('cff', ' | '.join(f'{name} ({get_method_info(name).paper_name})' for name in list_methods()))
    epochs: int = opt(600, 'stage-1 epochs; the best validation checkpoint acts as early stopping (official 600)')
    patience: int | None = opt(None, 'stop stage 1 once the selection loss has not improved for N epochs; '
                                     'None: run every epoch (official)')
    lr: float | None = opt(None, 'learning rate; None: the official value of the method (4e-3 per stage, bp 5e-4)')
    optimizer: str = opt('adamw', 'timm.optim name; adamw decays every parameter as the official code')
    weight_decay: float = opt(0.01, 'weight decay (official 0.01 on all parameters)')
    sched: str = opt('constant', f'LR schedule per epoch: {" | ".join(SCHEDULES)} (timm.scheduler; official: '
                                 'constant)')
    warmup_epochs: int = opt(0, 'epochs of linear warmup from train.warmup_lr to train.lr')
    warmup_lr: float = opt(1e-5, 'LR at the start of the warmup')
    min_lr: float = opt(0.0, 'lowest LR of cosine / tanh / poly')
    decay_epochs: float = opt(90, "step: epochs between decays")
    decay_rate: float = opt(0.1, 'step: LR factor at each decay')
    loss: str = opt('marginal_supcon', 'stage loss (timm_cff.list_losses())')
    temperature: float = opt(0.15, 'contrastive temperature (official 0.15)')
    margin_schedule: str = opt('linear', 'linear | parabolic | cosine | exponential')
    m0: float = opt(0.4, 'first-stage margin (0 = plain CFF)')
    m_last: float = opt(0.1, 'last-stage margin')
    num_views: int = opt(2, 'cff: 2 views per image, or 1 (one-forward variant, Table 6); other methods use 1')
    threshold: float = opt(2.0, 'ff/collab: goodness threshold θ (official 2, mean-of-squares goodness)')
    alpha: float = opt(1.0, 'symba: α of Eq. 7 (official 1)')
    score_first_stage: bool | None = opt(None, 'ff family: also score stage 1 in prediction, selection and the '
                                                'one-pass head; None: on for collab (it trains the total goodness), '
                                                'off for ff/symba (stages 2..L, Hinton and the official code)')
    select_on: str = opt('last', "validation loss that picks the best checkpoint: 'last' stage (official) or 'sum'")
    autocast: str | None = opt(None, "cff: run the stages under torch.autocast in 'bfloat16' or 'float16' (GPU speed)")
    compile: bool = opt(False, 'cff: torch.compile every block (pays off on GPUs; minutes of compiling on CPU)')
    log_clamped: bool = opt(True, 'cff: log the fraction of positive pairs in the clamped set R(k) per block and epoch')
    max_steps: int | None = opt(None, 'stop each epoch after N batches (smoke runs)')


@dataclass
class ProbeConfig:
    epochs: int = opt(50, 'linear-probe epochs (official 50); ff family: the one-pass head; bp: unused')
    lr: float = opt(5e-4, 'probe learning rate (official 5e-4)')
    weight_decay: float = opt(0.01, 'probe weight decay (official 0.01)')
    sched: str = opt('constant', f'probe LR schedule: {" | ".join(SCHEDULES)} (official: constant)')
    warmup_epochs: int = opt(0, 'probe warmup epochs (from 1e-5)')
    min_lr: float = opt(0.0, 'lowest probe LR of cosine / tanh / poly')


@dataclass
class RunConfig:
    output: str = opt('runs', 'parent folder of run folders')
    name: str | None = opt(None, 'run folder name; None: <config name>-<timestamp>')
    seed: int = opt(1, 'seed of model init, augmentation and shuffling')
    device: str = opt('auto', "'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    topk: list = opt([1, 5, 10], 'top-k accuracies to report')
    metric: str = opt('top1', "the paper's metric: top1 (MNIST, CIFAR-10), top5 (CIFAR-100), top10 (Tiny ImageNet)")
    export: bool = opt(True, 'write the timm export folder at the end')
    quiet: bool = opt(False, 'no progress bars')


@dataclass
class PipelineConfig:
    stages: int = opt(1, 'stage groups K trained concurrently, one process each: launch with torchrun '
                         '--nproc-per-node K x replicas (the extra processes become data-parallel replicas)')
    devices: list = opt([], "one process: place stage groups on these devices, e.g. ['cuda:0', 'cuda:1']")
    max_in_flight: int = opt(2, 'batches a stage group may send ahead of the next one')
    timeout_s: float = opt(600.0, 'seconds a process waits for a peer before stopping with an error')


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    run: RunConfig = field(default_factory=RunConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


#: Allowed values of numeric keys: (low, high, whether low itself is allowed); None is always allowed where the
#: key's type admits it. Checked by ``check_values`` before anything is built.
_RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    'model.img_size': (1, None, True), 'model.patch_size': (1, None, True), 'model.embed_dim': (1, None, True),
    'model.num_heads': (1, None, True), 'model.depth': (1, None, True), 'model.mlp_ratio': (0, None, False),
    'model.pos_embed_std': (0, None, True),
    'data.val_fraction': (0, 1, False), 'data.crop_padding': (0, None, True), 'data.ra_num_ops': (0, None, True),
    'data.ra_magnitude': (0, 30, True), 'data.label_noise': (0, 1, True), 'data.data_fraction': (0, 1, False),
    'data.train_subset': (1, None, True), 'data.test_subset': (1, None, True), 'data.batch_size': (1, None, True),
    'data.workers': (0, None, True),
    'train.epochs': (1, None, True), 'train.patience': (1, None, True), 'train.lr': (0, None, False),
    'train.weight_decay': (0, None, True), 'train.temperature': (0, None, False), 'train.m0': (0, 1, True),
    'train.m_last': (0, 1, True), 'train.num_views': (1, None, True), 'train.alpha': (0, None, False),
    'train.max_steps': (1, None, True), 'train.warmup_epochs': (0, None, True), 'train.warmup_lr': (0, None, True),
    'train.min_lr': (0, None, True), 'train.decay_epochs': (0, None, False), 'train.decay_rate': (0, None, False),
    'probe.epochs': (0, None, True), 'probe.lr': (0, None, False), 'probe.weight_decay': (0, None, True),
    'probe.warmup_epochs': (0, None, True), 'probe.min_lr': (0, None, True),
    'pipeline.stages': (1, None, True), 'pipeline.max_in_flight': (1, None, True),
    'pipeline.timeout_s': (0, None, False),
}
_CHOICES = {'train.select_on': ('last', 'sum'), 'train.autocast': (None, 'float32', 'bfloat16', 'float16'),
            'model.init': ('torch', 'timm'), 'model.patch_act': ('', 'relu'), 'train.sched': SCHEDULES,
            'probe.sched': SCHEDULES}
_UPPER_INCLUSIVE = {'data.ra_magnitude', 'data.data_fraction', 'train.m0', 'train.m_last'}


def check_values(config: 'Config') -> None:
    """Refuse out-of-range or inconsistent values before training, naming the key and what it accepts."""
    for key, _, value in iter_fields(config):
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f'{key} must be one of {", ".join(map(repr, _CHOICES[key]))}, got {value!r}.')
        if key not in _RANGES or value is None:
            continue
        low, high, low_ok = _RANGES[key]
        too_low = low is not None and (value < low or (value == low and not low_ok))
        too_high = high is not None and (value > high or (value == high and key not in _UPPER_INCLUSIVE))
        if too_low or too_high:
            lo = '' if low is None else f'{">=" if low_ok else ">"} {low}'
            hi = '' if high is None else f'{"<=" if key in _UPPER_INCLUSIVE else "<"} {high}'
            raise ConfigError(f'{key} must be {" and ".join(filter(None, (lo, hi)))}, got {value!r}.')
    m, r = config.model, config.run
    if m.name == 'mlp' and (m.embed_dim is None or m.depth is None):
        raise ConfigError('model.name=mlp needs model.embed_dim (E) and model.depth (L) of MLP[E L].')
    if m.name != 'mlp' and m.embed_dim and m.num_heads and m.embed_dim % m.num_heads:
        raise ConfigError(f'model.num_heads={m.num_heads} must divide model.embed_dim={m.embed_dim}.')
    if any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in r.topk) or not r.topk:
        raise ConfigError(f'run.topk must be a list of positive integers, got {r.topk!r}.')
    if r.metric not in {f'top{k}' for k in r.topk}:
        raise ConfigError(f'run.metric={r.metric!r} is not among run.topk={r.topk}; add {r.metric[3:]} to run.topk '
                          'or pick one of them.')


def iter_fields(config: Any, prefix: str = ''):
    """``(dotted key, dataclass field, current value)`` for every leaf of a config tree."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from iter_fields(value, f'{prefix}{f.name}.')
        else:
            yield f'{prefix}{f.name}', f, value


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """``value`` checked against ``annotation`` (int, float, bool, str, list, dict, X | None); ints pass as floats."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(annotation):
            return None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads 4e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is bool and not isinstance(value, bool) or \
            annotation is not bool and (not isinstance(value, annotation) or isinstance(value, bool)):
        raise ConfigError(f'{key} must be {annotation.__name__}, got {value!r} ({type(value).__name__}).')
    return value


def _field_names(node: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(node)}


def _set(config: Config, key: str, value: Any) -> None:
    *path, name = key.split('.')
    node = config
    for part in path:
        child = getattr(node, part) if part in _field_names(node) else None
        if not dataclasses.is_dataclass(child):
            raise ConfigError(f'Unknown config key {key!r}: no section {".".join(path)!r}. Sections: '
                              f'{", ".join(sorted(_field_names(config)))}.')
        node = child
    if name in _field_names(node) and dataclasses.is_dataclass(getattr(node, name)):
        first = dataclasses.fields(getattr(node, name))[0].name
        raise ConfigError(f'{key!r} is a section; set its keys, e.g. --{key}.{first}=...')
    if name not in _field_names(node):
        known = ', '.join(k for k, _, _ in iter_fields(node, ''.join(p + '.' for p in path)))
        raise ConfigError(f'Unknown config key {key!r}. Known keys: {known}.')
    setattr(node, name, _check_type(key, value, typing.get_type_hints(type(node))[name]))


def flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
    """Nested sections -> dotted keys (``model.kwargs`` stays one value)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and f'{prefix}{k}' not in ('model.kwargs',):
            out.update(flatten(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out


def apply_overrides(config: Config, values: dict[str, Any]) -> Config:
    """Set dotted keys (``{'train.epochs': 5}``) or nested dicts on ``config``; unknown keys raise ``ConfigError``."""
    for key, value in flatten(values).items():
        _set(config, key, value)
    return config


def parse_override(text: str) -> tuple[str, Any]:
    """``'train.epochs=5'`` -> ``('train.epochs', 5)``; the value is parsed as YAML (numbers, bools, lists, null)."""
    key, sep, raw = text.partition('=')
    if not sep:
        raise ConfigError(f'Override {text!r} must look like --section.key=value.')
    try:
        return key.strip().lstrip('-'), yaml.safe_load(raw) if raw.strip() else ''
    except yaml.YAMLError as e:
        raise ConfigError(f'Cannot parse the value of {key!r}: {e}') from e


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then ``overrides``."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f'Config file {path} does not exist.')
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f'{path} is not valid YAML: {e}') from e
        if not isinstance(tree, dict):
            raise ConfigError(f'{path} must hold a mapping of sections (model:, data:, train:, ...).')
        apply_overrides(config, tree)
    return apply_overrides(config, overrides or {})


def config_to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
