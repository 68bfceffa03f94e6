"""Config precedence, validation and the YAML round trip."""

import pytest

from timm_cff.experiment.config import Config, ConfigError, apply_overrides, load_config, parse_override, save_config
from timm_cff.experiment.recipes import list_recipes


def test_precedence_defaults_yaml_overrides(tmp_path):
    path = tmp_path / 'recipe.yaml'
    path.write_text('model:\n  depth: 7\ntrain:\n  epochs: 20\n  lr: 0.001\n')
    cfg = load_config(path, {'train.epochs': 3})
    assert cfg.model.depth == 7  # YAML over default
    assert cfg.train.epochs == 3  # override over YAML
    assert cfg.train.lr == 0.001 and cfg.model.embed_dim == Config().model.embed_dim  # untouched default


def test_saved_config_is_a_valid_config(tmp_path):
    cfg = load_config(None, {'data.mean': [0.5], 'model.kwargs': {'drop_rate': 0.1}, 'data.train_subset': 10})
    save_config(cfg, tmp_path / 'config.yaml')
    assert load_config(tmp_path / 'config.yaml') == cfg


@pytest.mark.parametrize('overrides,message', [
    ({'train.epoch': 1}, "Unknown config key 'train.epoch'"),
    ({'trian.epochs': 1}, "no section 'trian'"),
    ({'train.epochs': 'ten'}, 'train.epochs must be int'),
    ({'train.lr': True}, 'train.lr must be float'),
    ({'run.quiet': 'yes'}, 'run.quiet must be bool'),
    ({'train': 5}, "'train' is a section"),
])
def test_bad_keys_and_types_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), overrides)


def test_yaml_errors_name_the_key(tmp_path):
    path = tmp_path / 'bad.yaml'
    path.write_text('model:\n  dept: 3\n')
    with pytest.raises(ConfigError, match="'model.dept'"):
        load_config(path)
    with pytest.raises(ConfigError, match='does not exist'):
        load_config(tmp_path / 'missing.yaml')


def test_parse_override_values():
    assert parse_override('train.epochs=5') == ('train.epochs', 5)
    assert parse_override('--run.topk=[1, 5]') == ('run.topk', [1, 5])
    assert parse_override('data.root=null') == ('data.root', None)
    assert apply_overrides(Config(), dict([parse_override('train.lr=4e-3')])).train.lr == 0.004  # YAML: '4e-3'
    with pytest.raises(ConfigError, match='--section.key=value'):
        parse_override('train.epochs')


def test_ints_are_accepted_for_floats_and_none_for_optionals():
    cfg = apply_overrides(Config(), {'train.m0': 0, 'model.img_size': None, 'data.crop_padding': 2})
    assert cfg.train.m0 == 0.0 and isinstance(cfg.train.m0, float)
    assert cfg.model.img_size is None and cfg.data.crop_padding == 2


RECIPES = [recipe.path for recipe in list_recipes()]


@pytest.mark.parametrize('recipe', RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_says_what_it_reproduces(recipe):
    cfg = load_config(recipe)
    header = recipe.read_text().split('\n', 3)
    if recipe.name != 'quickstart.yaml':
        assert 'Reproduces' in ''.join(header[:3]) and cfg.run.metric in ''.join(header[:3])
        # τ is the official 0.15 except where the header documents a validation-selected value (MNIST MLP[500 3])
        tau = 0.07 if recipe.name == 'mnist_mlp500-3.yaml' else 0.15
        assert (cfg.data.batch_size, cfg.probe.lr, cfg.train.temperature) == (512, 5e-4, tau)
        assert cfg.train.lr in (None, 4e-3)  # None: the method's official value
        assert cfg.train.epochs == 600 and cfg.probe.epochs == 50
    m = cfg.model
    if m.name == 'mlp':
        assert None not in (m.embed_dim, m.depth)
    else:  # every ViT recipe states its ViT[E H L] and the official MLP ratio (timm's own ViT sizes are others)
        assert None not in (m.embed_dim, m.num_heads, m.depth, m.patch_size) and m.mlp_ratio == 2


def test_autocast_and_compile_reach_the_cff_trainer_only():
    import timm
    import torch

    from timm_cff.experiment.build import build_trainer, check_train_keys, unused_train_keys

    def vit():
        return timm.create_model('vit_tiny_patch16_224', img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                                 num_classes=3, global_pool='avg', class_token=False)
    trainer = build_trainer(load_config(None, {'train.autocast': 'bfloat16'}), vit())
    assert trainer.autocast_dtype == torch.bfloat16 and trainer.scaler is None
    assert build_trainer(load_config(None, {'train.autocast': 'float16'}), vit()).scaler is not None
    # a key the method does not read: refused when the user set it, logged when it comes from a recipe
    bp = load_config(None, {'train.method': 'bp', 'train.autocast': 'bfloat16'})
    with pytest.raises(ConfigError,
                       match=r'train.autocast is set but train.method=bp does not read it \(it is for cff\)'):
        check_train_keys(bp, {'train.autocast'})
    check_train_keys(bp, set())
    assert not hasattr(build_trainer(bp, vit()), 'autocast_dtype')
    supcon = load_config(None, {'train.loss': 'supcon', 'train.m0': 0.2})
    assert unused_train_keys(supcon) == [('m0', 'train.loss=supcon takes no margin (use marginal_supcon for CFF+M)')]
    with pytest.raises(ConfigError, match='train.m0 is set but train.loss=supcon takes no margin'):
        check_train_keys(supcon, {'train.m0'})
    symba = load_config(None, {'train.method': 'symba', 'train.threshold': 3.0, 'train.alpha': 2.0})
    assert [k for k, _ in unused_train_keys(symba)] == ['threshold']
    with pytest.raises(ValueError, match="autocast_dtype must be None, 'bfloat16' or 'float16'"):
        build_trainer(load_config(None, {'train.autocast': 'bf16'}), vit())
