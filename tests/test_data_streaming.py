"""Streamed datasets (timm's ``torch/``, ``hfds/`` names, folder paths) against direct references: the files written
here, the in-memory loader on the same images, timm's own eval transform, and the refusals before training."""
import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import QUICKSTART, TINY
from torchvision.io import write_jpeg, write_png
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from timm_cff.data import (
    STATS,
    ArrayDataset,
    BatchAugment,
    DataError,
    ImageLoader,
    fit_image,
    load_dataset,
    open_dataset,
    sources,
    split_train_val,
)
from timm_cff.experiment.cli import main
from timm_cff.experiment.commands import train_run
from timm_cff.experiment.config import Config, DataConfig, apply_overrides
from timm_cff.experiment.data import prepare_data


def random_images(n, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=g)


def write_folder(root, splits, size=8, classes=('ant', 'bee', 'cat'), seed=0):
    """PNG ImageFolder ``root/<split>/<class>/<i>.png`` of fixed-size images; returns, per split, the images and
    labels in ImageFolder order (classes sorted, files sorted by name)."""
    out = {}
    for s, (split, per_class) in enumerate(splits.items()):
        xs, ys = [], []
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            x = random_images(per_class[c] if isinstance(per_class, tuple) else per_class, size, size,
                              seed=seed + 10 * s + c)
            for i, image in enumerate(x):
                write_png(image, str(folder / f'{i:03d}.png'))
            xs.append(x)
            ys += [c] * len(x)
        out[split] = (torch.cat(xs), torch.tensor(ys))
    return out


def write_idx(path, array):
    """The IDX format torchvision's MNIST reads: big-endian magic (0x08 = uint8, number of dims), dims, data."""
    header = np.array([0x0800 + array.ndim, *array.shape], dtype='>i4').tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torch_mnist_is_read_from_torchvision_files_offline(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    arrays = {}
    for prefix, n in (('train', 40), ('t10k', 12)):
        x, y = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10
        write_idx(raw / f'{prefix}-images-idx3-ubyte', x)
        write_idx(raw / f'{prefix}-labels-idx1-ubyte', y)
        arrays[prefix] = torch.from_numpy(x), torch.from_numpy(y)
    train, test = open_dataset('torch/mnist', str(tmp_path))
    assert train.streamed and train.image_shape == (1, 28, 28)
    for data, (x, y) in ((train, arrays['train']), (test, arrays['t10k'])):
        assert len(data) == len(x) and torch.equal(data.y, y.long())
        for i in range(len(x)):
            assert torch.equal(data.x[i], x[i][None]), f'image {i}'
    # the protocol on top: the official 90/10 permutation, MNIST's own normalisation
    prepared = prepare_data(DataConfig(dataset='torch/mnist', root=str(tmp_path)))
    train_idx, val_idx = split_train_val(40, 0.1, seed=1)
    assert torch.equal(prepared.train.y, arrays['train'][1][train_idx].long())
    assert torch.equal(prepared.val.x[0], arrays['train'][0][val_idx[0]][None])
    assert (prepared.mean, prepared.std) == STATS['mnist'] and prepared.input_size == (1, 28, 28)


def test_fit_image_is_timms_eval_transform():
    """Shorter side to S (bicubic, antialiased), centre crop: timm's create_transform(S, crop_pct=1.0) on PIL."""
    from timm.data import create_transform
    resize, crop = create_transform(16, crop_pct=1.0, interpolation='bicubic').transforms[:2]
    for height, width in ((20, 37), (40, 23), (31, 31)):
        rows, cols = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing='ij')
        x = torch.stack([rows * 200, cols * 150 + 50, rows * cols * 255]).to(torch.uint8)  # a smooth image
        reference = pil_to_tensor(crop(resize(Image.fromarray(x.permute(1, 2, 0).numpy()))))
        ours = fit_image(x, 16)
        assert ours.shape == reference.shape == (3, 16, 16)
        assert (ours.int() - reference.int()).abs().max() <= 1  # PIL and torch round differently
    x = random_images(1, 16, 16)[0]
    assert fit_image(x, 16) is x  # already the model's size: untouched


@pytest.mark.parametrize('randaugment', [False, True])
def test_streamed_loader_equals_the_in_memory_loader_bit_for_bit(tmp_path, randaugment):
    """Same seed, same images: the same permutation, the same augmentation draws, the same batches; the two
    replicas of a shard=(i, 2) pair together cover every global batch (the last batch of 1 leaves replica 1 none)."""
    written = write_folder(tmp_path / 'f', {'train': (9, 8, 8), 'test': 2})
    memory = ArrayDataset(*written['train'], ['ant', 'bee', 'cat'])
    streamed, _ = open_dataset(str(tmp_path / 'f'))
    assert streamed.streamed and streamed.classes == memory.classes
    augment = BatchAugment((0.5,) * 3, (0.25,) * 3, padding=2, hflip=True)
    kwargs = {'num_views': 2, 'shuffle': True, 'seed': 5,
              'randaugment': v2.RandAugment(2, 9) if randaugment else None}

    def batches(data, shard=(0, 1), workers=0, epoch=1):
        loader = ImageLoader(data, 8, augment, shard=shard, workers=workers, **kwargs)
        loader.set_epoch(epoch)
        return list(loader)

    for shard in ((0, 1), (0, 2), (1, 2)):
        ours, reference = batches(streamed, shard, workers=1), batches(memory, shard)
        assert len(ours) == len(reference) == 4
        for ((a1, a2), ya), ((b1, b2), yb) in zip(ours, reference):
            assert torch.equal(a1, b1) and torch.equal(a2, b2) and torch.equal(ya, yb)
    whole, first, second = batches(memory), batches(memory, (0, 2)), batches(memory, (1, 2))
    for (_, y), (_, y0), (_, y1) in zip(whole, first, second):
        assert torch.equal(torch.cat([y0, y1]), y)
    assert len(second[-1][1]) == 0 and second[-1][0][0].shape == (0, 3, 8, 8)
    assert not torch.equal(batches(memory, epoch=2)[0][1], whole[0][1])  # a new permutation each epoch


def write_mixed_jpegs(root, per_class, seed):
    g = torch.Generator().manual_seed(seed)
    for split, n in per_class.items():
        for c in ('ant', 'bee', 'cat'):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                height, width = torch.randint(20, 41, (2,), generator=g).tolist()
                image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)
                write_jpeg(image, str(root / split / c / f'{i}.jpg'))


def tiny_config(tmp_path, **data):
    cfg = Config()
    return apply_overrides(cfg, {
        'model': {'img_size': 8, 'patch_size': 4, 'embed_dim': 16, 'depth': 2, 'num_heads': 2},
        'data': {'batch_size': 8, **data},
        'train': {'epochs': 1}, 'probe': {'epochs': 1},
        'run': {'output': str(tmp_path), 'device': 'cpu', 'topk': [1], 'quiet': True},
    })


def test_a_mixed_size_jpeg_folder_trains_end_to_end(tmp_path):
    root = tmp_path / 'mixed'
    write_mixed_jpegs(root, {'train': 8, 'val': 2}, seed=0)
    # the folder path streams (the test split found as 'val'); folder decodes once, resized to model.img_size
    streamed = prepare_data(DataConfig(dataset=str(root)), img_size=8)
    memory = prepare_data(DataConfig(dataset='folder', root=str(root)), img_size=8)
    assert isinstance(memory.train, ArrayDataset) and memory.train.x.shape[1:] == (3, 8, 8)
    assert all(torch.equal(streamed.train.x[i], memory.train.x[i]) for i in range(len(memory.train)))
    assert torch.equal(streamed.test.y, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert streamed.mean == pytest.approx(memory.mean, abs=1e-6)  # fewer than 2,000 images: all are measured

    summary = train_run(tiny_config(tmp_path, dataset=str(root)), tmp_path / 'run')
    assert set(summary['test']) == {'loss', 'top1'} and summary['epochs'] == 1
    export = json.loads((tmp_path / 'run' / 'export' / 'config.json').read_text())
    assert export['pretrained_cfg']['input_size'] == [3, 8, 8]


def test_a_mixed_size_folder_needs_an_input_size(tmp_path):
    write_mixed_jpegs(tmp_path / 'm', {'train': 2, 'test': 1}, seed=1)
    with pytest.raises(DataError, match='have several sizes .* set model.img_size=N'):
        load_dataset('folder', str(tmp_path / 'm'))
    with pytest.raises(DataError, match='set model.img_size'):  # streamed: the first image is not square
        open_dataset(str(tmp_path / 'm'))


def test_a_folder_too_large_for_memory_points_to_streaming(tmp_path, monkeypatch):
    write_folder(tmp_path / 'f', {'train': 2, 'test': 1})
    monkeypatch.setattr(sources, '_memory_bytes', lambda: 1000)
    with pytest.raises(DataError, match=f'stream them instead: data.dataset={tmp_path / "f"}'):
        load_dataset('folder', str(tmp_path / 'f'))


def test_streamed_stats_are_measured_on_the_training_split(tmp_path):
    written = write_folder(tmp_path / 'f', {'train': 12, 'test': 2})
    data = prepare_data(DataConfig(dataset=str(tmp_path / 'f'), val_fraction=0.25))
    train_idx, _ = split_train_val(36, 0.25, seed=1)
    pixels = written['train'][0][train_idx].float().div(255).transpose(0, 1).flatten(1)
    assert data.mean == pytest.approx(pixels.mean(1).tolist(), abs=1e-6)
    assert data.std == pytest.approx(pixels.std(1).tolist(), abs=1e-6)


def test_label_noise_and_fraction_apply_to_streamed_labels(tmp_path):
    write_folder(tmp_path / 'f', {'train': 20, 'test': 2})
    clean = prepare_data(DataConfig(dataset=str(tmp_path / 'f')))
    noisy = prepare_data(DataConfig(dataset=str(tmp_path / 'f'), label_noise=0.5, data_fraction=0.5))
    assert (len(clean.train), len(noisy.train)) == (54, 27)
    # the kept images are streamed from the clean split's files; half of them carry a wrong label
    truth = {bytes(clean.train.x[i].flatten().tolist()): int(clean.train.y[i]) for i in range(len(clean.train))}
    wrong = sum(truth[bytes(noisy.train.x[i].flatten().tolist())] != int(noisy.train.y[i])
                for i in range(len(noisy.train)))
    assert wrong == round(0.5 * 27) and torch.equal(noisy.test.y, clean.test.y)


def refused(tmp_path, capsys, *args) -> str:
    """The one error line of a refused run; nothing was trained and no run folder exists."""
    capsys.readouterr()
    code = main(['train', '--config', QUICKSTART, *TINY, f'--run.output={tmp_path}', '--run.name=refused', *args])
    err = capsys.readouterr().err
    assert code == 1 and 'Traceback' not in err and not (tmp_path / 'refused').exists()
    [line] = [line for line in err.splitlines() if line.startswith('timm-cff: error:')]
    return line


def test_unknown_prefix_is_refused(tmp_path, capsys):
    line = refused(tmp_path, capsys, '--data.dataset=xyz/foo')
    assert "Unknown dataset 'xyz/foo' (unknown prefix 'xyz/'" in line and 'torch/<name>' in line
    assert 'Unknown torchvision dataset' in refused(tmp_path, capsys, '--data.dataset=torch/nope')


def test_a_missing_package_names_the_pip_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'datasets', None)  # import datasets -> ImportError, installed or not
    line = refused(tmp_path, capsys, '--data.dataset=hfds/some/images')
    assert line.endswith('pip install datasets')


def test_iterable_datasets_are_refused_saying_what_works(tmp_path, capsys):
    line = refused(tmp_path, capsys, '--data.dataset=hfids/someone/insects')
    assert 'iterable datasets' in line and line.endswith('use hfds/someone/insects (the same Hugging Face set, '
                                                         'map-style).')
    line = refused(tmp_path, capsys, '--data.dataset=tfds/mnist')
    assert 'iterable datasets' in line and 'wds/<name> or an ImageFolder path (tfds/ also needs TensorFlow' in line


def test_missing_splits_and_datasets_are_refused(tmp_path, capsys):
    write_folder(tmp_path / 'f', {'train': 2})
    line = refused(tmp_path, capsys, f'--data.dataset={tmp_path / "f"}')
    assert 'has no test split: none of test, validation, val' in line
    line = refused(tmp_path, capsys, f'--data.dataset={tmp_path / "f"}', '--data.train_split=training')
    assert "has no training split folder 'training'" in line
    line = refused(tmp_path, capsys, '--data.dataset=torch/cifar10', f'--data.root={tmp_path / "none"}')
    assert "cannot open the training split 'train'" in line and 'download=true' in line
    assert 'no such folder' in refused(tmp_path, capsys, f'--data.dataset={tmp_path / "gone"}')
    line = refused(tmp_path, capsys, f'--data.dataset={tmp_path / "f"}', f'--data.root={tmp_path}')
    assert 'is a folder path' in line


def test_a_single_class_streamed_folder_is_refused(tmp_path, capsys):
    write_folder(tmp_path / 'f', {'train': 4, 'test': 2}, classes=('only',))
    assert 'has a single class' in refused(tmp_path, capsys, f'--data.dataset={tmp_path / "f"}',
                                           '--model.img_size=8', '--model.patch_size=4')


def test_an_unreadable_streamed_image_is_named_in_one_line(tmp_path):
    write_folder(tmp_path / 'f', {'train': 4, 'test': 2})
    bad = tmp_path / 'f' / 'train' / 'cat' / '009.png'
    bad.write_bytes(b'not a png')
    train, _ = open_dataset(str(tmp_path / 'f'))  # only the first image is decoded up front
    loader = ImageLoader(train, 4, BatchAugment((0.5,) * 3, (0.25,) * 3), workers=1)
    with pytest.raises(DataError) as error:
        list(loader)
    assert str(error.value).startswith(f'{bad} is not a readable image') and '\n' not in str(error.value)


class _FakeHfSplit:
    """The part of a Hugging Face ``datasets.Dataset`` that timm's ``ReaderHfds`` uses: undecoded image bytes and a
    ClassLabel column."""

    def __init__(self, images, labels, names):
        from torchvision.io import encode_png
        self.rows = [{'image': {'bytes': encode_png(x).numpy().tobytes(), 'path': None}, 'label': int(y)}
                     for x, y in zip(images, labels)]
        self.info = types.SimpleNamespace(features={'image': None, 'label': types.SimpleNamespace(names=names)},
                                          splits=None)

    def cast_column(self, column, feature):
        return self

    def remove_columns(self, column):
        return [{k: v for k, v in row.items() if k != column} for row in self.rows]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def test_hfds_is_read_through_timms_reader(monkeypatch):
    """hfds/<name> through timm's own ReaderHfds (a stand-in for the datasets package, which is not installed here):
    the images and labels as stored, the class names, and the test split found as 'validation'."""
    names = ['ant', 'bee', 'cat']
    splits = {'train': (random_images(12, 10, 10, seed=1), torch.arange(12) % 3),
              'validation': (random_images(6, 10, 10, seed=2), torch.arange(6) % 3)}

    def load_dataset(path, split, cache_dir=None, **kwargs):
        if split not in splits:
            raise ValueError(f'Unknown split "{split}". Should be one of {list(splits)}.')
        return _FakeHfSplit(*splits[split], names)

    fake = types.ModuleType('datasets')
    fake.load_dataset, fake.Image = load_dataset, lambda decode=True: None
    monkeypatch.setitem(sys.modules, 'datasets', fake)
    reader = 'timm.data.readers.reader_hfds'  # imported with the stand-in, and forgotten afterwards
    monkeypatch.delitem(sys.modules, reader, raising=False)
    try:
        train, test = open_dataset('hfds/someone/insects', img_size=10)
    finally:
        sys.modules.pop(reader, None)
    assert train.classes == names and len(test) == 6
    for data, (x, y) in ((train, splits['train']), (test, splits['validation'])):
        assert torch.equal(data.y, y) and all(torch.equal(data.x[i], x[i]) for i in range(len(x)))
