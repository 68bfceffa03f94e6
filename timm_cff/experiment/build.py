"""From a config to the parts of a run: device, seeds, data, model, trainer and loaders (``RunSetup``).

The model is a stock timm ViT with the official CFF initialisation (cff-method.md §2): PyTorch defaults everywhere
(timm ``weight_init='skip'``) and ``pos_embed`` drawn from N(0, 1). It only changes initial values, so the model
stays a plain timm model that exports as such. The trainer is the method's registered class with the run's
hyperparameters; keys that the method does not read are refused before anything is built.
"""
import functools
import logging
import os
import random
from typing import Any

import numpy as np
import timm
import torch
from timm.layers import PatchEmbed
from torch import nn

from ..analysis import clamped_fraction_metric
from ..families import create_mlp, get_family, init_official_
from ..loss import takes_margin
from ..margins import MarginSchedule
from ..methods import create_trainer, get_method_info, list_methods, schedule
from ..pipeline.session import start_distributed
from .config import Config, ConfigError, ModelConfig, TrainConfig, iter_fields
from .data import PreparedData, create_loaders, prepare_data
from .rundir import RunDir

__all__ = ['create_model', 'launched_by_torchrun', 'build_trainer', 'check_train_keys', 'unused_train_keys',
           'RunSetup', 'resolve_device', 'seed_all', 'data_config']

_logger = logging.getLogger(__name__)


def _relu_patch_embed() -> functools.partial:
    """timm's PatchEmbed with a ReLU after the projection (the official ViT), via its ``norm_layer`` slot."""
    return functools.partial(PatchEmbed, norm_layer=lambda dim, **_: nn.ReLU())


def _check_trainable(name: str) -> None:
    """Refuse an architecture no model family covers, before its arguments can fail in confusing ways."""
    try:
        with torch.device('meta'):  # the class only: no memory, no initialisation
            model_class = type(timm.create_model(name))
    except Exception:  # noqa: BLE001  (a model that cannot be built on 'meta' is checked when really built)
        return
    try:
        get_family(model_class)
    except TypeError:
        raise ConfigError(f'timm-cff trains VisionTransformer and MLP models; {name} is a '
                          f'{model_class.__name__}.') from None


#: ``model.*`` fields that override the timm architecture's own size only when given.
_SIZE_FIELDS = ('patch_size', 'embed_dim', 'depth', 'num_heads', 'mlp_ratio')


def create_model(cfg: ModelConfig, num_classes: int, input_size: tuple[int, int, int]) -> nn.Module:
    """``timm.create_model(cfg.name, ...)`` for images of ``input_size`` (C, H, W) and ``num_classes`` classes: the
    architecture's own sizes, overridden by the size fields that are set; ``cfg.name='mlp'`` gives
    MLP[embed_dim depth] on the flattened image."""
    in_chans, height, width = input_size
    if cfg.name == 'mlp':
        return create_mlp(cfg.embed_dim, cfg.depth, num_classes, img_size=(height, width), in_chans=in_chans)
    sizes = {key: getattr(cfg, key) for key in _SIZE_FIELDS if getattr(cfg, key) is not None}
    kwargs = dict(img_size=cfg.img_size or height, **sizes, num_classes=num_classes, global_pool=cfg.global_pool,
                  class_token=cfg.class_token, in_chans=in_chans)
    if cfg.init not in ('torch', 'timm'):
        raise ValueError(f"model.init must be 'torch' or 'timm', got {cfg.init!r}.")
    if cfg.init == 'torch':
        kwargs['weight_init'] = 'skip'
    if cfg.patch_act not in ('', 'relu'):
        raise ValueError(f"model.patch_act must be '' or 'relu', got {cfg.patch_act!r}.")
    if cfg.patch_act == 'relu':
        kwargs['embed_layer'] = _relu_patch_embed()
    kwargs.update(cfg.kwargs)
    if not timm.is_model(cfg.name):
        raise ConfigError(f'model.name={cfg.name!r} is no timm model; pick a VisionTransformer from '
                          'timm.list_models("vit_*"), or mlp.')
    _check_trainable(cfg.name)
    try:
        model = timm.create_model(cfg.name, **kwargs)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f'timm cannot build {cfg.name!r} with {kwargs}: {e}') from e
    return init_official_(model, cfg.pos_embed_std) if cfg.init == 'torch' else model


def launched_by_torchrun() -> bool:
    """Several processes started by torchrun (``WORLD_SIZE`` > 1): one run, trained by all of them."""
    return int(os.environ.get('WORLD_SIZE', '1')) > 1


def resolve_device(name: str) -> torch.device:
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'run.device={name!r} but CUDA is not available; use run.device=cpu.')
    return device


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


#: ``train.*`` keys every method reads; the others belong to the methods that declare them (``MethodInfo``).
COMMON_TRAIN_KEYS = ('method', 'epochs', 'patience', 'lr', 'optimizer', 'weight_decay', 'max_steps', 'sched',
                     'warmup_epochs', 'warmup_lr', 'min_lr', 'decay_epochs', 'decay_rate')
#: Keys of the margin schedule, read only with a loss that takes a margin.
MARGIN_KEYS = ('margin_schedule', 'm0', 'm_last')


def unused_train_keys(cfg: Config) -> list[tuple[str, str]]:
    """``(key, reason)`` for every ``train.*`` key that differs from its default but the run does not read:
    a key of another method, or a margin with a loss that takes none."""
    method, defaults = get_method_info(cfg.train.method), TrainConfig()
    unused = []
    for key, _, value in iter_fields(cfg.train):
        if key in COMMON_TRAIN_KEYS or value == getattr(defaults, key):
            continue
        if key not in method.config_keys:
            readers = [m for m in list_methods() if key in get_method_info(m).config_keys]
            unused.append((key, f'train.method={method.name} does not read it (it is for {", ".join(readers)})'))
        elif key in MARGIN_KEYS and not takes_margin(cfg.train.loss):
            unused.append((key, f'train.loss={cfg.train.loss} takes no margin (use marginal_supcon for CFF+M)'))
    return unused


def check_train_keys(cfg: Config, explicit: set[str] = frozenset()) -> None:
    """Refuse keys in ``explicit`` (e.g. set on the command line) that the run would ignore; log the others (a
    recipe's settings for another method, e.g. the CFF temperature when ``--train.method=bp`` picks another column)."""
    for key, reason in unused_train_keys(cfg):
        if f'train.{key}' in explicit:
            raise ConfigError(f'train.{key} is set but {reason}; remove it.')
        _logger.info('train.%s=%r is not used: %s.', key, getattr(cfg.train, key), reason)


def build_trainer(cfg: Config, model: nn.Module):
    """The stage-1 trainer of ``cfg.train.method`` with the run's hyperparameters."""
    t = cfg.train
    kwargs: dict[str, Any] = dict(optimizer=t.optimizer, weight_decay=t.weight_decay, scheduler=schedule(
        t.sched, t.epochs, warmup_epochs=t.warmup_epochs, warmup_lr=t.warmup_lr, min_lr=t.min_lr,
        decay_epochs=t.decay_epochs, decay_rate=t.decay_rate))
    if t.lr is not None:
        kwargs['lr'] = t.lr
    if t.method == 'cff':
        kwargs.update(loss=t.loss, loss_kwargs={'temperature': t.temperature}, num_views=t.num_views,
                      margins=MarginSchedule(t.margin_schedule, t.m0, t.m_last) if takes_margin(t.loss) else None,
                      select_on=t.select_on, autocast_dtype=t.autocast, compile_stages=t.compile,
                      stage_metrics={'clamped': clamped_fraction_metric} if t.log_clamped else None)
    elif get_method_info(t.method).label_conditioned:  # the loss parameter each FF-family method declares
        keys = get_method_info(t.method).config_keys
        kwargs.update(loss_kwargs={k: getattr(t, k) for k in ('alpha', 'threshold') if k in keys},
                      score_first_stage=t.score_first_stage, seed=cfg.run.seed)
    return create_trainer(t.method, model, **kwargs)


def _check_input_size(model: nn.Module, data: PreparedData) -> None:
    expected = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
    if expected is not None and tuple(expected) != data.input_size[1:] and not getattr(model, 'dynamic_img_size',
                                                                                         False):
        raise ValueError(f'The model expects {tuple(expected)} images but the dataset has {data.input_size[1:]}; '
                         f'set model.img_size={data.input_size[1]} (or leave it unset to follow the data).')


def data_config(data: PreparedData) -> dict[str, Any]:
    return dict(input_size=data.input_size, mean=data.mean, std=data.std, crop_pct=1.0, interpolation='bicubic')


class RunSetup:
    """Data, model, trainer and loaders of a run, built identically for a fresh start, a resume and evaluation.

    ``classifier`` is what classifies in one forward pass: the model itself (CFF, BP), or the FF family's one-pass
    head once stage 2 has built it.
    """

    def __init__(self, cfg: Config, distributed: bool = False):
        self.cfg = cfg
        self.distributed = distributed
        self.rank, shard = 0, (0, 1)
        if distributed:  # torchrun: stage groups x data-parallel replicas (one group: pure data parallelism)
            if cfg.train.method != 'cff':
                raise ConfigError(f'torchrun runs train.method=cff (a layer pipeline and/or data-parallel replicas '
                                  f'with the contrastive loss on the global batch); train.method={cfg.train.method} '
                                  'trains in one process: run it without torchrun.')
            self.device = start_distributed(cfg.pipeline.stages, cfg.pipeline.timeout_s)
            self.rank = torch.distributed.get_rank()
            shard = (self.rank // cfg.pipeline.stages, torch.distributed.get_world_size() // cfg.pipeline.stages)
        else:
            self.device = resolve_device(cfg.run.device)
        seed_all(cfg.run.seed)
        self.data = prepare_data(cfg.data, cfg.model.img_size)
        self.model = create_model(cfg.model, self.data.num_classes, self.data.input_size)
        _check_input_size(self.model, self.data)
        self.model.to(self.device)
        self.trainer = build_trainer(cfg, self.model)
        self.loaders = create_loaders(self.data, cfg.data, num_views=self.trainer.num_views, seed=cfg.run.seed,
                                      device=self.device, shard=shard)
        self.method = get_method_info(cfg.train.method)
        self.classifier: nn.Module | None = None if self.method.label_conditioned else self.model

    @property
    def is_ff(self) -> bool:
        """The FF family: C-pass prediction, and a one-pass head instead of the linear probe."""
        return self.method.label_conditioned

    def load(self, run: RunDir, checkpoint: str) -> None:
        """Trainer state (model + method extras) of ``best`` or ``final``; ``final`` also holds the FF head."""
        saved = run.load_checkpoint(checkpoint)
        self.trainer.load_state_dict(saved['trainer'])
        if saved.get('head') is not None:
            self._one_pass_head().head.load_state_dict(saved["head"])

    def _one_pass_head(self) -> nn.Module:
        if self.classifier is None:
            from ..methods import OnePassClassifier
            self.classifier = OnePassClassifier.from_trainer(self.trainer)
        return self.classifier
