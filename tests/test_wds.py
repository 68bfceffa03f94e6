"""``wds/<name>``: WebDataset tar shards written here with ``tarfile``, read as a map-style dataset, against the same
JPEG files read as an ImageFolder (labels, pixels, a whole training run) and the refusals before training."""
import csv
import io
import json
import tarfile

import pytest
import torch
from test_data_streaming import random_images, refused, tiny_config
from torchvision.io import encode_jpeg

from timm_cff.data import DataError, open_dataset
from timm_cff.data.tarshards import TarShards, expand_braces
from timm_cff.experiment.commands import train_run

CLASSES = ('ant', 'bee', 'cat')


def write_tar(path, members):
    """An uncompressed tar file of ``members`` (name -> bytes), in the order given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, 'w') as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_split(root, folder, split, per_class, shards, shard_name, seed):
    """``per_class`` 16x16 JPEGs of each class, as WebDataset shards ``root/shard_name(split, i)`` (keys
    ``sample000000``, ... in class-major order, cut into ``shards`` consecutive shards) and as the ImageFolder tree
    ``folder/<split>/<class>/<key>.jpg`` of the same bytes, whose order (classes sorted, files sorted) is the same.
    Returns the labels and the JPEG bytes in that order."""
    images = random_images(len(CLASSES) * per_class, 16, 16, seed=seed)
    labels = [c for c in range(len(CLASSES)) for _ in range(per_class)]
    jpegs = [encode_jpeg(x).numpy().tobytes() for x in images]
    keys = [f'sample{seed * 1000 + i:06d}' for i in range(len(jpegs))]
    for key, jpeg, label in zip(keys, jpegs, labels):
        (folder / split / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        (folder / split / CLASSES[label] / f'{key}.jpg').write_bytes(jpeg)
    cut = torch.arange(len(keys)).chunk(shards)
    for s, part in enumerate(cut):
        members = {}
        for i in part.tolist():  # the label before the image: a sample's members may come in any order
            members[f'{keys[i]}.cls'] = str(labels[i]).encode()
            members[f'{keys[i]}.jpg'] = jpegs[i]
            members[f'{keys[i]}.json'] = b'{"ignored": true}'
        write_tar(root / shard_name(split, s), members)
    return labels, jpegs


def write_dataset(tmp_path, shard_name=lambda split, s: f'{split}-{s:06d}.tar'):
    """3 classes x 8 training images in 3 shards and 3 x 2 test images in 2, as shards and as an ImageFolder."""
    root, folder = tmp_path / 'shards', tmp_path / 'folder'
    written = {'train': write_split(root, folder, 'train', 8, 3, shard_name, seed=1),
               'test': write_split(root, folder, 'test', 2, 2, shard_name, seed=2)}
    return root, folder, written


def test_shards_read_as_the_imagefolder_of_the_same_files(tmp_path):
    root, folder, written = write_dataset(tmp_path)
    (root / '_info.json').write_text(json.dumps({'name': 'tiny', 'classes': list(CLASSES)}))
    shards = TarShards(root, 'train')
    assert [p.name for p in shards.shards] == ['train-000000.tar', 'train-000001.tar', 'train-000002.tar']
    assert shards.targets == written['train'][0] and shards.classes == list(CLASSES)
    assert all(shards[i] == (jpeg, label) for i, (label, jpeg) in enumerate(zip(*written['train'])))

    train, test = open_dataset('wds/tiny', str(root))
    ref_train, ref_test = open_dataset(str(folder))
    assert train.streamed and train.image_shape == ref_train.image_shape == (3, 16, 16)
    for ours, reference, split in ((train, ref_train, 'train'), (test, ref_test, 'test')):
        assert ours.y.tolist() == written[split][0] and torch.equal(ours.y, reference.y)
        assert ours.classes == reference.classes == list(CLASSES)
        for i in range(len(reference)):
            assert torch.equal(ours.x[i], reference.x[i]), f'{split} image {i}'


def test_info_json_lists_the_shards_of_a_split(tmp_path):
    """timm's _info.json: brace patterns expanded, the test split found as 'validation', the shards under
    data.root/<name>; without class names the classes are '0' .. 'C-1'."""
    assert expand_braces('a-{08..10}-{0..1}.tar') == ['a-08-0.tar', 'a-08-1.tar', 'a-09-0.tar', 'a-09-1.tar',
                                                       'a-10-0.tar', 'a-10-1.tar']
    names = {'train': 'tiny-train-{000..002}.tar', 'test': 'tiny-validation-{0..1}.tar'}
    root, _, written = write_dataset(tmp_path / 'data', lambda split, s: expand_braces(names[split])[s])
    (root / 'tiny').mkdir()
    for tar in root.glob('*.tar'):
        tar.rename(root / 'tiny' / tar.name)
    (root / 'tiny' / '_info.json').write_text(json.dumps(
        {'splits': {'train': {'filenames': [names['train']]}, 'validation': {'filenames': [names['test']]}}}))
    train, test = open_dataset('wds/tiny', str(root), img_size=8)
    assert train.y.tolist() == written['train'][0] and test.y.tolist() == written['test'][0]
    assert train.classes == ['0', '1', '2'] and train.image_shape == (3, 8, 8)


def metrics(run):
    with (run / 'metrics.csv').open(newline='') as f:
        return [{k: v for k, v in row.items() if k != 'time_s'} for row in csv.DictReader(f)]


def test_a_wds_run_equals_the_run_on_the_imagefolder(tmp_path):
    """Same images, same labels, same order: the same stage-1 metrics and test result; the shards are read in a
    forked DataLoader worker, the folder in the training process."""
    root, folder, _ = write_dataset(tmp_path)
    (root / '_info.json').write_text(json.dumps({'classes': list(CLASSES)}))
    ours = train_run(tiny_config(tmp_path, dataset='wds/tiny', root=str(root), workers=1), tmp_path / 'wds')
    reference = train_run(tiny_config(tmp_path, dataset=str(folder)), tmp_path / 'folder_run')
    rows = metrics(tmp_path / 'wds')
    assert len(rows) == 1 and rows == metrics(tmp_path / 'folder_run')
    assert ours['test'] == reference['test']


def test_refusals_name_what_is_wrong(tmp_path, capsys):
    root, _, _ = write_dataset(tmp_path)
    assert 'set data.root to the folder of the WebDataset shards' in refused(tmp_path, capsys, '--data.dataset=wds/x')
    line = refused(tmp_path, capsys, '--data.dataset=wds/x', f'--data.root={root}', '--data.test_split=holdout')
    assert 'has no test split: no shards of holdout, validation, val' in line  # 'test' shards exist, but are not asked
    line = refused(tmp_path, capsys, '--data.dataset=wds/x', f'--data.root={root}', '--data.train_split=training')
    assert "has no shards of the training split 'training'" in line

    gz = tmp_path / 'gz'
    write_tar(gz / 'train-000.tar', {'a.jpg': b'x', 'a.cls': b'0'})
    (gz / 'train-000.tar').rename(gz / 'train-001.tar.gz')
    with pytest.raises(DataError, match=r'train-001.tar.gz is a compressed shard; .* decompress the shards'):
        open_dataset('wds/x', str(gz))


@pytest.mark.parametrize('members, message', [
    ({'a.jpg': b'x', 'a.cls': b'0', 'b.jpg': b'x'}, "sample 'b' has no .cls label"),
    ({'a.jpg': b'x', 'a.cls': b'0', 'b.cls': b'1'}, "sample 'b' has no image"),
    ({'a.jpg': b'x', 'a.cls': b'cat'}, r"a.cls holds b'cat', not a class index"),
])
def test_bad_samples_are_refused(tmp_path, members, message):
    write_tar(tmp_path / 'train-000.tar', members)
    write_tar(tmp_path / 'test-000.tar', {'t.jpg': b'x', 't.cls': b'0'})
    with pytest.raises(DataError, match=message):
        open_dataset('wds/x', str(tmp_path))
