"""Classes are what the data says, and data that would give no meaningful result is refused before stage 1 with
one line naming the file and the fix; the run folder is never created."""
import numpy as np
import pytest

from test_cli import QUICKSTART, TINY
from timm_cff.experiment.cli import main
from timm_cff.experiment.config import DataConfig
from timm_cff.experiment.data import prepare_data


def write_npz(root, x=None, y=None, tx=None, ty=None, classes=None):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60, 8, 8, 3), dtype=np.uint8) if x is None else x
    y = np.arange(60) % 3 if y is None else y
    tx = x[:12] if tx is None else tx
    ty = y[:12] if ty is None else ty
    root.mkdir(exist_ok=True)
    np.savez(root / 'train.npz', x=x, y=y)
    np.savez(root / 'test.npz', x=tx, y=ty)
    if classes is not None:
        (root / 'classes.txt').write_text(classes)
    return root


def refusal(tmp_path, capsys, root) -> str:
    capsys.readouterr()
    code = main(['train', '--config', QUICKSTART, *TINY, '--data.dataset=npz', f'--data.root={root}',
                 '--model.patch_size=4', f'--run.output={tmp_path}', '--run.name=refused'])
    err = capsys.readouterr().err
    assert code == 1 and 'Traceback' not in err and not (tmp_path / 'refused').exists()
    [line] = [line for line in err.splitlines() if line.startswith('timm-cff: error:')]
    return line


def test_class_names_are_one_per_line(tmp_path):
    root = write_npz(tmp_path / 'd', classes='pickup truck\nsports car\nsea lion\n')
    data = prepare_data(DataConfig(dataset='npz', root=str(root)))
    assert data.num_classes == 3 and data.train.classes == ['pickup truck', 'sports car', 'sea lion']


@pytest.mark.parametrize('case, expect', [
    ('names', 'names 4 classes but the labels have 3'),
    ('blank', 'has an empty line'),
    ('nchw', 'looks like [N, C, H, W]'),
    ('float', 'images must be uint8'),
    ('float_labels', 'labels y must be a 1-d integer array'),
    ('negative', 'labels must be 0..C-1'),
    ('one_class', 'has a single class'),
    ('unseen', 'test labels [3] never occur in the training split'),
    ('shapes', 'both splits need one image shape'),
    ('empty_test', 'images must be a non-empty'),
])
def test_bad_data_is_refused_in_one_line(tmp_path, capsys, case, expect):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (60, 8, 8, 3), dtype=np.uint8)
    y = np.arange(60) % 3
    kwargs = {'names': dict(classes='a\nb\nc\nd\n'), 'blank': dict(classes='a\n\nb\n'),
              'nchw': dict(x=x.transpose(0, 3, 1, 2).copy()), 'float': dict(x=x / 255.0),
              'float_labels': dict(y=y.astype(np.float32)), 'negative': dict(y=y - 1),
              'one_class': dict(y=np.zeros(60, dtype=np.int64)),
              'unseen': dict(ty=np.full(12, 3)), 'shapes': dict(tx=x[:12, :4]),
              'empty_test': dict(tx=x[:0], ty=y[:0])}[case]
    root = write_npz(tmp_path / case, **kwargs)
    line = refusal(tmp_path, capsys, root)
    assert expect in line and str(root) in line


def test_a_corrupt_image_file_is_named(tmp_path, capsys):
    from torchvision.io import write_png
    import torch
    for split in ('train', 'test'):
        for c in ('a', 'b'):
            folder = tmp_path / 'imgs' / split / c
            folder.mkdir(parents=True)
            for i in range(3):
                write_png(torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8), str(folder / f'{i}.png'))
    bad = tmp_path / 'imgs' / 'train' / 'b' / '9.png'
    bad.write_bytes(b'not a png')
    capsys.readouterr()
    code = main(['train', '--config', QUICKSTART, *TINY, '--data.dataset=folder', f'--data.root={tmp_path / "imgs"}',
                 '--model.patch_size=4', f'--run.output={tmp_path}', '--run.name=refused'])
    err = capsys.readouterr().err
    assert code == 1 and f'{bad} is not a readable image' in err and 'Traceback' not in err
