"""timm habits: a model is a timm name (its own sizes unless given), recipes resolve by name from any folder, LR
schedules and warmup from the command line (closed form, exact resume), and the export names what it is."""
import csv
import json
import math
import sys

import numpy as np
import pytest
import timm
import torch

from test_cli import TINY, final_weights, train
from test_commit import kill_at_epoch
from timm_cff.experiment import fit
from timm_cff.experiment.build import create_model
from timm_cff.experiment.cli import main
from timm_cff.experiment.config import ConfigError, load_config
from timm_cff.experiment.compare import summarize_run
from timm_cff.experiment.recipes import list_recipes, recorded_recipe, resolve_recipe
from timm_cff.methods import LocalTrainer, schedule
from timm_cff.probe import train_linear_probe


def lrs(run) -> list[float]:
    with (run / 'metrics.csv').open(newline='') as f:
        return [float(r['lr']) for r in csv.DictReader(f)]


# ------------------------------------------------------------------------------------------ models by timm name
def test_a_timm_name_builds_its_own_size_and_fields_override_only_when_given():
    cfg = load_config(None, {'model.name': 'vit_small_patch16_224', 'model.img_size': 32, 'model.patch_size': 4})
    model = create_model(cfg.model, num_classes=10, input_size=(3, 32, 32))
    reference = timm.create_model('vit_small_patch16_224', img_size=32, patch_size=4, num_classes=10,
                                  global_pool='avg', class_token=False)
    assert {k: v.shape for k, v in model.state_dict().items()} == \
           {k: v.shape for k, v in reference.state_dict().items()}
    assert (model.embed_dim, model.blocks[0].attn.num_heads, len(model.blocks)) == (384, 6, 12)
    assert model.blocks[0].mlp.fc1.out_features == 4 * 384  # timm's own MLP ratio, not the CFF recipes' 2
    small = load_config(None, {'model.name': 'vit_small_patch16_224', 'model.depth': 2, 'model.patch_size': 8})
    model = create_model(small.model, num_classes=3, input_size=(3, 16, 16))
    assert (model.embed_dim, len(model.blocks), model.patch_embed.patch_size) == (384, 2, (8, 8))


def test_an_mlp_needs_its_sizes():
    with pytest.raises(ConfigError, match='model.embed_dim'):
        from timm_cff.experiment.config import check_values
        check_values(load_config(None, {'model.name': 'mlp', 'model.depth': 2}))


def test_the_export_names_the_architecture_and_the_class_names(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / 'data'
    root.mkdir()
    for split, n in (('train', 60), ('test', 20)):
        np.savez(root / f'{split}.npz', x=rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
                 y=np.arange(n) % 3)
    (root / 'classes.txt').write_text('cat\ndog\nsea lion\n')
    assert main(['train', '--config', 'quickstart', *TINY, '--data.dataset=npz', f'--data.root={root}',
                 '--model.name=vit_small_patch16_224', '--model.embed_dim=16', '--model.num_heads=2',
                 '--model.patch_size=4', '--data.train_subset=60', f'--run.output={tmp_path}', '--run.name=s']) == 0
    config = json.loads((tmp_path / 's' / 'export' / 'config.json').read_text())
    meta = json.loads((tmp_path / 's' / 'export' / 'timm_cff.json').read_text())
    assert config['architecture'] == 'vit_small_patch16_224' and config['label_names'] == ['cat', 'dog', 'sea lion']
    assert meta['model'] == 'ViT[16 2 2]'  # E H L of the model as built (depth 2 from TINY)
    model = timm.create_model(f'local-dir:{tmp_path / "s" / "export"}', pretrained=True)
    assert model.pretrained_cfg['label_names'] == ['cat', 'dog', 'sea lion']
    rows = json.loads((tmp_path / 's' / 'dataset.json').read_text())
    assert rows['model'] == 'ViT[16 2 2]' and rows['architecture'] == 'vit_small_patch16_224'


# ------------------------------------------------------------------------------------------------- recipes
def test_a_recipe_is_found_by_name_from_an_empty_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert resolve_recipe('quickstart') == resolve_recipe('quickstart.yaml') == \
           next(r.path for r in list_recipes() if r.name == 'quickstart')
    argv = ['train', '--config', 'cifar10_vit128-4-5_rc', '--data.dataset=mnist_subset', '--model.img_size=28',
            '--model.patch_size=7', '--data.stats=mnist', *TINY, '--run.name=byname', '--train.method=bp']
    monkeypatch.setattr(sys, 'argv', ['timm-cff', *argv])  # what environment.json records of the command line
    assert main(argv) == 0
    cfg = load_config(tmp_path / 'runs' / 'byname' / 'config.yaml')
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.train.m0) == (32, 2, 0.4)  # the recipe's, then the overrides
    row = summarize_run(tmp_path / 'runs' / 'byname')  # compare finds the recipe and its paper number for BP+CE
    assert (row['method'], row['recipe'], row['paper']) == ('BP+CE', 'cifar10_vit128-4-5_rc', 76.92)
    capsys.readouterr()
    assert main(['compare', str(tmp_path / 'runs' / 'byname')]) == 0
    header, _, cells = (line.strip('|').split('|') for line in capsys.readouterr().out.strip().splitlines())
    assert dict(zip((h.strip() for h in header), (c.strip() for c in cells)))['paper'] == 'top1 76.92'
    assert main(['train', '--config', 'no_such_recipe']) == 1
    assert 'no shipped recipe of that name' in capsys.readouterr().err


def test_recipes_lists_every_recipe_with_the_paper_number_of_its_header(capsys):
    assert main(['recipes']) == 0
    out = capsys.readouterr().out.splitlines()
    recipes = list_recipes()
    assert [line.split()[0] for line in out] == [r.name for r in recipes]
    for recipe in recipes:
        if recipe.name == 'quickstart':
            continue
        metric = load_config(recipe.path).run.metric  # the header's metric is the one the recipe reports
        assert recipe.paper.endswith(f' {metric}') and recipe.paper.startswith('Table ')
    row = next(r for r in recipes if r.name == 'cifar10_vit128-4-5_rc')
    assert row.paper == 'Table 1 & 3: 80.42 top1'


# The paper's Tables 1 and 3 (method columns per row) and the CFF+M cells of Tables 4 and 6, transcribed from the
# paper, against which the hand-written recipe headers are checked.
TABLE1 = {'mnist_mlp500-3': (97.12, 97.82, 97.70, 96.33, 97.69),
          'cifar10_mlp800-4_rc': (50.35, 56.80, 54.33, 54.32, 57.33),
          'cifar10_vit128-4-5_rc': (76.21, 69.13, 70.66, 78.70, 80.42),
          'cifar100_vit192-6-6_rc': (72.15, 68.78, 71.79, 79.23, 80.39),
          'tiny_imagenet_vit240-6-7_rc': (62.11, 59.46, 62.15, 72.43, 73.23)}  # FF, SymBa, FF-Collab, CFF, CFF+M
TABLE3 = {'mnist_mlp500-3_flip': (98.00, 97.30), 'mnist_mlp800-4_flip': (98.13, 97.62),
          'cifar10_mlp800-4_flip': (54.20, 54.55), 'cifar10_vit128-4-5_rc': (76.92, 80.42),
          'cifar10_vit192-6-6_rc': (76.68, 79.74), 'cifar10_vit240-6-7_rc': (77.04, 79.96),
          'cifar100_vit192-6-6_rc': (78.12, 80.39), 'cifar100_vit240-6-7_rc': (77.75, 78.44),
          'tiny_imagenet_vit240-6-7_rc': (74.01, 73.23), 'cifar10_vit128-4-5_rcra': (86.33, 81.73),
          'cifar10_vit192-6-6_rcra': (86.95, 85.17), 'cifar10_vit240-6-7_rcra': (87.62, 85.37),
          'cifar100_vit192-6-6_rcra': (84.13, 84.28), 'cifar100_vit240-6-7_rcra': (82.88, 84.29),
          'tiny_imagenet_vit240-6-7_rcra': (78.95, 76.06),  # BP+CE, CFF+M
          'table4_cifar10_vit192-6-6_missing50': (78.27, 80.58), 'table4_cifar10_vit192-6-6_missing80': (69.19, 73.26),
          'table4_cifar10_vit192-6-6_noise20': (78.10, 78.33), 'table4_cifar10_vit192-6-6_noise40': (70.36, 71.20)}
TABLE6 = {'table6_cifar10_vit128-4-5_rc_onefwd': 79.00, 'table6_cifar10_vit192-6-6_rc_onefwd': 79.70,
          'table6_cifar10_vit192-6-6_rcra_onefwd': 83.25, 'table6_cifar100_vit192-6-6_rcra_onefwd': 82.63,
          'table6_cifar100_vit240-6-7_rc_onefwd': 77.36, 'table6_tiny_imagenet_vit240-6-7_rcra_onefwd': 73.86}


def test_each_recipe_reports_the_papers_number_for_every_column_of_its_row():
    for recipe in list_recipes():
        expected = {}
        if recipe.name in TABLE1:
            expected.update(zip(('FF', 'SymBa', 'FF-Collab', 'CFF', 'CFF+M'), TABLE1[recipe.name]))
        if recipe.name in TABLE3:
            expected.update(zip(('BP+CE', 'CFF+M'), TABLE3[recipe.name]))
        if recipe.name in TABLE6:
            expected['CFF+M'] = TABLE6[recipe.name]
        assert recipe.reported == expected, recipe.name  # quickstart: {}
    assert len([r for r in list_recipes() if r.reported]) == len(TABLE1.keys() | TABLE3.keys() | TABLE6.keys())


def test_the_recipe_of_a_recorded_command_line_only_where_it_is_sure(tmp_path):
    own = tmp_path / 'mine.yaml'
    own.write_text('# Reproduces Table 3, row X: CFF+M 12.50 (top1 test accuracy, %). Table 3: BP+CE 11.25.\n')
    assert recorded_recipe(['timm-cff', 'train', f'--config={own}']).reported == {'CFF+M': 12.5, 'BP+CE': 11.25}
    assert recorded_recipe(['timm-cff', 'train', '--config', 'quickstart.yaml', '--config', 'mnist_mlp500-3'
                            ]).name == 'mnist_mlp500-3'  # the last --config counts
    assert recorded_recipe(['timm-cff', 'train', '--config', 'configs/mine.yaml']) is None  # relative to what?
    assert recorded_recipe(['timm-cff', 'train', '--config', str(tmp_path / 'gone.yaml')]) is None
    assert recorded_recipe(['timm-cff', 'train', '--config']) is None
    assert recorded_recipe(['pytest', '-q']) is None


# ------------------------------------------------------------------------------------------------ schedules
def test_cosine_with_warmup_follows_timms_closed_form_per_epoch(tmp_path):
    lr, warmup_lr, min_lr, epochs = 4e-3, 1e-4, 1e-4, 4
    assert train(tmp_path, f'--train.epochs={epochs}', '--train.sched=cosine', '--train.warmup_epochs=1',
                 f'--train.warmup_lr={warmup_lr}', f'--train.min_lr={min_lr}', name='cos') == 0
    # epoch 1 trains at the warmup start; then timm's cosine over the whole run (warmup not prefixed): t = 1, 2, 3
    expected = [warmup_lr] + [min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / epochs))
                              for t in range(1, epochs)]
    assert lrs(tmp_path / 'cos') == pytest.approx(expected, rel=1e-12)


def test_constant_with_warmup_ramps_then_holds(tmp_path):
    assert train(tmp_path, '--train.epochs=4', '--train.warmup_epochs=2', '--train.warmup_lr=1e-3',
                 name='warm') == 0
    assert lrs(tmp_path / 'warm') == pytest.approx([1e-3, 1e-3 + (4e-3 - 1e-3) / 2, 4e-3, 4e-3], rel=1e-12)


def test_a_cosine_run_killed_and_resumed_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    args = ('--train.epochs=3', '--train.sched=cosine', '--train.min_lr=1e-4')
    assert train(tmp_path, *args, name='full') == 0
    kill_at_epoch(monkeypatch, fit.MetricsLog, 'on_epoch_end', 2)  # dies after epoch 2's checkpoint
    assert train(tmp_path, *args, name='killed') == 130
    monkeypatch.undo()
    assert main(['train', '--resume', str(tmp_path / 'killed')]) == 0
    assert lrs(tmp_path / 'killed') == lrs(tmp_path / 'full')
    full, resumed = final_weights(tmp_path / 'full'), final_weights(tmp_path / 'killed')
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    # a cosine run cannot be extended (its curve is laid out over train.epochs); a step schedule can
    assert main(['train', '--resume', str(tmp_path / 'full'), '--train.epochs=4']) == 1
    assert train(tmp_path, '--train.epochs=2', '--train.sched=step', '--train.decay_epochs=1', name='step') == 0
    assert main(['train', '--resume', str(tmp_path / 'step'), '--train.epochs=3']) == 0
    assert lrs(tmp_path / 'step') == pytest.approx([4e-3, 4e-4, 4e-5], rel=1e-12)


def test_a_resumed_trainer_uses_its_own_learning_rate_and_the_checkpoints_moments(vit):
    from conftest import make_batch, make_vit
    first = LocalTrainer(vit, lr=1e-3)
    first.step(*make_batch())
    torch.manual_seed(0)
    second = LocalTrainer(make_vit(), lr=5e-4)  # e.g. resumed with a lower train.lr after a non-finite stop
    second.load_state_dict(first.state_dict())
    assert all(g['lr'] == 5e-4 for opt in second.optimizers for g in opt.param_groups)
    for a, b in zip(first.optimizers, second.optimizers):
        for p, q in zip(a.param_groups[0]['params'], b.param_groups[0]['params']):
            assert torch.equal(a.state[p]['exp_avg'], b.state[q]['exp_avg'])


def test_a_probe_schedule_steps_every_epoch(vit):
    from conftest import make_batch
    data = [make_batch(views=1, seed=s) for s in range(3)]
    heads = []
    for epochs, sched in ((1, None), (3, schedule('step', 3, decay_epochs=1, decay_rate=0.0))):
        torch.manual_seed(0)
        train_linear_probe(vit, data, epochs=epochs, scheduler=sched)
        heads.append({k: v.clone() for k, v in vit.head.state_dict().items()})
    # LR 0 from the second epoch: the head stays where one epoch at the full LR put it
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    torch.manual_seed(0)
    train_linear_probe(vit, data, epochs=3)
    assert not torch.equal(vit.head.weight, heads[0]['weight'])  # the constant-LR probe does move on
