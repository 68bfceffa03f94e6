"""Build the model of a run from its ``ModelConfig``: a stock timm ViT with the official CFF initialisation.

Official init (cff-method.md §2): PyTorch defaults everywhere (timm ``weight_init='skip'``) and ``pos_embed`` drawn
from N(0, 1). It only changes initial values, so the model stays a plain timm model that exports as such.
"""
import functools

import timm
import torch
from timm.layers import PatchEmbed
from torch import nn

from .config import ModelConfig
from .mlp import create_mlp

__all__ = ['create_model', 'init_official_']


def init_official_(model: nn.Module, pos_embed_std: float = 1.0) -> nn.Module:
    """Re-draw ``pos_embed`` (and class/register tokens) from N(0, std²); the rest keeps PyTorch defaults."""
    with torch.no_grad():
        for name in ('pos_embed', 'cls_token', 'reg_token'):
            param = getattr(model, name, None)
            if param is not None:
                param.normal_(0.0, pos_embed_std)
    return model


def _relu_patch_embed() -> functools.partial:
    """timm's PatchEmbed with a ReLU after the projection (the official ViT), via its ``norm_layer`` slot."""
    return functools.partial(PatchEmbed, norm_layer=lambda dim, **_: nn.ReLU())


def create_model(cfg: ModelConfig, num_classes: int, input_size: tuple[int, int, int]) -> nn.Module:
    """``timm.create_model(cfg.name, ...)`` for images of ``input_size`` (C, H, W) and ``num_classes`` classes;
    ``cfg.name='mlp'`` gives MLP[embed_dim depth] on the flattened image."""
    in_chans, height, width = input_size
    if cfg.name == 'mlp':
        return create_mlp(cfg.embed_dim, cfg.depth, num_classes, img_size=(height, width), in_chans=in_chans)
    kwargs = dict(img_size=cfg.img_size or height, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                  depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, num_classes=num_classes,
                  global_pool=cfg.global_pool, class_token=cfg.class_token, in_chans=in_chans)
    if cfg.init not in ('torch', 'timm'):
        raise ValueError(f"model.init must be 'torch' or 'timm', got {cfg.init!r}.")
    if cfg.init == 'torch':
        kwargs['weight_init'] = 'skip'
    if cfg.patch_act not in ('', 'relu'):
        raise ValueError(f"model.patch_act must be '' or 'relu', got {cfg.patch_act!r}.")
    if cfg.patch_act == 'relu':
        kwargs['embed_layer'] = _relu_patch_embed()
    kwargs.update(cfg.kwargs)
    try:
        model = timm.create_model(cfg.name, **kwargs)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f'timm cannot build {cfg.name!r} with {kwargs}: {e}') from e
    return init_official_(model, cfg.pos_embed_std) if cfg.init == 'torch' else model
