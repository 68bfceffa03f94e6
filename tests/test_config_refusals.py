"""Every value that can be checked before training is, in one line naming the key; nothing is created."""
import pytest

from test_cli import QUICKSTART, TINY
from timm_cff.experiment.cli import main


@pytest.mark.parametrize('override, expect', [
    ('--train.epochs=0', 'train.epochs must be >= 1'),
    ('--train.patience=0', 'train.patience must be >= 1'),
    ('--train.lr=-1', 'train.lr must be > 0'),
    ('--train.temperature=0', 'train.temperature must be > 0'),
    ('--train.m0=1.5', 'train.m0 must be >= 0 and <= 1'),
    ('--probe.epochs=-1', 'probe.epochs must be >= 0'),
    ('--data.val_fraction=1', 'data.val_fraction must be > 0 and < 1'),
    ('--data.val_fraction=0.004 --data.data_fraction=0.2', 'The validation split has 0 images'),
    ('--data.data_fraction=0', 'data.data_fraction must be > 0 and <= 1'),
    ('--data.label_noise=1', 'data.label_noise must be >= 0 and < 1'),
    ('--data.batch_size=0', 'data.batch_size must be >= 1'),
    ('--data.train_subset=0', 'data.train_subset must be >= 1'),
    ('--model.num_heads=3', 'model.num_heads=3 must divide model.embed_dim=32'),
    ('--model.depth=0', 'model.depth must be >= 1'),
    ('--run.metric=top10', "run.metric='top10' is not among run.topk=[1, 5]"),
    ('--run.topk=[0]', 'run.topk must be a list of positive integers'),
    ('--train.select_on=first', "train.select_on must be one of 'last', 'sum'"),
    ('--train.method=bp --train.temperature=0.1', 'train.temperature is set but train.method=bp does not read it'),
    ('--train.loss=supcon --train.m0=0.2', 'train.m0 is set but train.loss=supcon takes no margin'),
    ('--train.method=dfa', "Unknown method 'dfa'. Known methods: cff, ff, symba, collab, bp"),
    ('--model.name=resnet18', 'timm-cff trains VisionTransformer and MLP models; resnet18 is a ResNet'),
    ('--model.name=vit_nonexistent', "model.name='vit_nonexistent' is no timm model"),
])
def test_bad_values_are_refused_in_one_line(tmp_path, capsys, override, expect):
    code = main(['train', '--config', QUICKSTART, *TINY, f'--run.output={tmp_path}', '--run.name=r',
                 *override.split()])
    err = capsys.readouterr().err
    assert code == 1 and 'Traceback' not in err and not (tmp_path / 'r').exists()
    [line] = [line for line in err.splitlines() if line.startswith('timm-cff: error:')]
    assert expect in line
