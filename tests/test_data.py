"""The data protocol: split, corruption, transforms and loaders against direct references."""
import numpy as np
import pytest
import torch
from torchvision.io import write_png
from torchvision.transforms import v2

from timm_cff.experiment.config import DataConfig
from timm_cff.data import (ArrayDataset, BatchAugment, DataError, ImageLoader, corrupt_labels, keep_fraction,
                           load_dataset, split_train_val)
from timm_cff.experiment.data import create_loaders, prepare_data
from timm_cff.data.augment import random_crop, random_hflip


def images(n=20, size=8, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)


def write_npz(folder, n_train=50, n_test=20, classes=5):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in (('train', n_train), ('test', n_test)):
        np.savez(folder / f'{name}.npz', x=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
                 y=np.arange(n) % classes)
    return folder


def test_split_is_the_official_permutation():
    torch.manual_seed(1)
    official = torch.randperm(1000)
    train, val = split_train_val(1000, 0.1, seed=1)
    assert torch.equal(torch.cat([train, val]), official) and (len(train), len(val)) == (900, 100)


def test_label_noise_is_always_wrong_and_exact_in_count():
    labels = torch.arange(1000) % 10
    noisy = corrupt_labels(labels, 0.4, 10, torch.Generator().manual_seed(0))
    changed = noisy != labels
    assert int(changed.sum()) == 400  # every relabelled sample changed class
    shifts = (noisy[changed] - labels[changed]) % 10
    assert set(shifts.tolist()) == set(range(1, 10))  # every wrong class is reachable


def test_keep_fraction_sizes_and_order():
    data = ArrayDataset(images(100), torch.arange(100), [])
    kept = keep_fraction(data, 0.2, torch.Generator().manual_seed(0))
    assert len(kept) == 20 and torch.all(kept.y[1:] > kept.y[:-1])


def test_prepare_data_corrupts_train_and_val_never_test(tmp_path):
    root = write_npz(tmp_path / 'd', n_train=200, n_test=40)
    clean = prepare_data(DataConfig(dataset='npz', root=str(root)))
    cfg = DataConfig(dataset='npz', root=str(root), label_noise=0.5, data_fraction=0.5)
    noisy = prepare_data(cfg)
    assert (len(noisy.train), len(noisy.val)) == (90, 10) and (len(clean.train), len(clean.val)) == (180, 20)
    assert torch.equal(noisy.test.y, clean.test.y) and torch.equal(noisy.test.x, clean.test.x)
    # the kept training samples are a subset of the clean split; half of them have a wrong label
    truth = {bytes(x.flatten().tolist()): int(y) for x, y in zip(clean.train.x, clean.train.y)}
    wrong = sum(truth[bytes(x.flatten().tolist())] != int(y) for x, y in zip(noisy.train.x, noisy.train.y))
    assert wrong == 45


def test_random_crop_windows_match_torchvision_padding():
    x = images(16, size=8)
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    padded = v2.Pad(2)(x)  # torchvision's zero padding, the reference of RandomCrop(padding=2)
    offsets = set()
    for i in range(16):
        found = [(r, c) for r in range(5) for c in range(5) if torch.equal(padded[i, :, r:r + 8, c:c + 8], out[i])]
        assert found, f'sample {i} is not a window of the padded image'
        offsets.add(found[0])
    assert len(offsets) > 4  # offsets vary across samples


def test_flip_and_normalize_match_torchvision():
    x = images(32)
    flipped = random_hflip(x, torch.Generator().manual_seed(0))
    same = [torch.equal(a, b) for a, b in zip(flipped, x)]
    mirrored = [torch.equal(a, b.flip(-1)) for a, b in zip(flipped, x)]
    assert all(s or m for s, m in zip(same, mirrored)) and 0 < sum(mirrored) < 32
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])(x)
    ours = BatchAugment(mean, std, train=False)(x, torch.Generator())
    assert torch.allclose(ours, reference, atol=1e-6)


def test_two_views_differ_and_are_deterministic_per_epoch():
    data = ArrayDataset(images(40), torch.arange(40) % 4, [])
    loader = ImageLoader(data, 16, BatchAugment((0.5,) * 3, (0.25,) * 3, padding=2, hflip=True), num_views=2,
                         shuffle=True, seed=3)
    (v1, v2_), y = next(iter(loader))
    assert v1.shape == (16, 3, 8, 8) and not torch.equal(v1, v2_)
    (w1, w2), y2 = next(iter(loader))
    assert torch.equal(v1, w1) and torch.equal(y, y2)
    loader.set_epoch(1)
    (u1, _), _ = next(iter(loader))
    assert not torch.equal(u1, v1)
    assert len(loader) == 3 and sum(len(b[1]) for b in loader) == 40  # no drop_last


def test_views_without_random_augmentation_are_one_tensor():
    """No crop, no flip: every view is the same tensor object (LocalTrainer then runs it once); with a crop they
    are distinct tensors."""
    data = ArrayDataset(images(20), torch.arange(20) % 4, [])
    plain = ImageLoader(data, 8, BatchAugment((0.5,) * 3, (0.25,) * 3), num_views=2, seed=3)
    (v1, v2), _ = next(iter(plain))
    assert v1 is v2 and torch.equal(v1, BatchAugment((0.5,) * 3, (0.25,) * 3)(data.x[:8], torch.Generator()))
    cropped = ImageLoader(data, 8, BatchAugment((0.5,) * 3, (0.25,) * 3, padding=2), num_views=2, seed=3)
    (w1, w2), _ = next(iter(cropped))
    assert w1 is not w2 and not torch.equal(w1, w2)


def test_randaugment_views_do_not_depend_on_workers():
    data = ArrayDataset(images(12, size=16), torch.arange(12) % 3, [])
    ra = v2.RandAugment(3, 14)
    kwargs = dict(num_views=2, shuffle=True, seed=0, randaugment=ra)
    augment = BatchAugment((0.5,) * 3, (0.25,) * 3, padding=2, hflip=True)
    main = list(ImageLoader(data, 6, augment, workers=0, **kwargs))
    workers = list(ImageLoader(data, 6, augment, workers=1, **kwargs))
    for ((a1, a2), ya), ((b1, b2), yb) in zip(main, workers):
        assert torch.equal(a1, b1) and torch.equal(a2, b2) and torch.equal(ya, yb)
    assert not torch.equal(main[0][0][0], main[0][0][1])


def test_npz_and_folder_sources(tmp_path):
    train, test = load_dataset('npz', str(write_npz(tmp_path / 'n')))
    assert train.x.shape == (50, 3, 8, 8) and train.x.dtype == torch.uint8 and len(test) == 20
    for split, n in (('train', 3), ('val', 2)):
        for c in ('cat', 'dog'):
            (tmp_path / 'f' / split / c).mkdir(parents=True)
            for i in range(n):
                write_png(images(1, seed=i)[0], str(tmp_path / 'f' / split / c / f'{i}.png'))
    train, test = load_dataset('folder', str(tmp_path / 'f'), test_split='val')
    assert train.classes == ['cat', 'dog'] and train.x.shape == (6, 3, 8, 8) and test.y.tolist() == [0, 0, 1, 1]
    assert torch.equal(train.x[0], images(1, seed=0)[0])


def test_source_errors_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match='train.npz not found'):
        load_dataset('npz', str(tmp_path))
    with pytest.raises(DataError, match='Unknown dataset'):
        load_dataset('imagenet22k')
    with pytest.raises(DataError, match='download=true'):
        load_dataset('cifar10', str(tmp_path))


def test_data_root_from_environment(tmp_path, monkeypatch):
    write_npz(tmp_path / 'mine')
    monkeypatch.setenv('TIMM_CFF_DATA', str(tmp_path))
    train, _ = load_dataset('npz', 'mine')
    assert len(train) == 50


def test_loaders_of_a_run_use_the_protocol(tmp_path):
    cfg = DataConfig(dataset='mnist_subset', batch_size=100, train_subset=500, test_subset=50)
    data = prepare_data(cfg)
    assert data.input_size == (1, 28, 28) and data.num_classes == 10 and data.mean == (0.1307,)
    loaders = create_loaders(data, cfg, num_views=2, seed=0)
    (v1, v2_), _ = next(iter(loaders['train']))
    assert torch.equal(v1, v2_)  # MNIST: no crop, no flip, so both views are the plain image
    x, y = next(iter(loaders['test']))
    assert torch.equal(y, data.test.y[:50]) and x.shape == (50, 1, 28, 28)


def test_tiny_imagenet_layout_is_prepared(tmp_path):
    """train/<wnid>/images/*.JPEG plus a flat val/images with val_annotations.txt, as the official archive."""
    root = tmp_path / 'tiny-imagenet-200'
    lines = []
    for k, wnid in enumerate(('n01', 'n02')):
        (root / 'train' / wnid / 'images').mkdir(parents=True)
        write_png(images(1, seed=k)[0], str(root / 'train' / wnid / 'images' / f'{wnid}_0.png'))
        (root / 'val' / 'images').mkdir(parents=True, exist_ok=True)
        write_png(images(1, seed=10 + k)[0], str(root / 'val' / 'images' / f'val_{k}.png'))
        lines.append(f'val_{k}.png\t{wnid}\t0\t0\t8\t8')
    (root / 'val' / 'val_annotations.txt').write_text('\n'.join(lines) + '\n')
    train, test = load_dataset('folder', str(root), test_split='val_by_class')
    assert train.classes == ['n01', 'n02'] and test.y.tolist() == [0, 1]
    assert torch.equal(test.x[1], images(1, seed=11)[0])
