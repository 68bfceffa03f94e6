"""Stage 2 (linear probe) and the timm export: only the head trains; timm alone reloads identical logits."""
import json
import subprocess
import sys

import pytest
import timm
import torch

from conftest import make_vit
from timm_cff import accuracy, evaluate_accuracy, export_model, load_encoder, train_linear_probe


def separable_batches(n_batches=4, batch=32, num_classes=5, seed=0):
    """Images whose class sets the mean brightness of one colour channel: linearly separable after any encoder."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, num_classes, (batch,), generator=g)
        x = 0.1 * torch.randn(batch, 3, 16, 16, generator=g)
        x[:, 0] += (y.float() - 2)[:, None, None]
        out.append((x, y))
    return out


def test_accuracy_topk_closed_form():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    y = torch.tensor([1, 2, 0])
    assert accuracy(logits, y, topk=(1, 2, 10)) == pytest.approx([100 / 3, 200 / 3, 100.0])


def test_probe_trains_only_the_head_and_learns(vit):
    before = {n: p.detach().clone() for n, p in vit.named_parameters()}
    result = train_linear_probe(vit, separable_batches(), separable_batches(seed=1), epochs=25, lr=2e-2)
    for n, p in vit.named_parameters():
        head = n.startswith(('fc_norm', 'head'))
        assert torch.equal(before[n], p.detach()) != head, n
    val_losses = [h['val_loss'] for h in result.history]
    assert result.best_val_loss == min(val_losses) and val_losses[result.best_epoch - 1] == result.best_val_loss
    metrics = evaluate_accuracy(vit, separable_batches(seed=1), topk=(1, 5))
    assert metrics['loss'] == pytest.approx(result.best_val_loss, rel=1e-5)  # the best epoch's head is restored
    assert metrics['top1'] > 90 and metrics['top5'] == 100.0


def test_probe_uses_first_view_of_multi_view_batches():
    """A probe on (x, zeros) batches ends where a probe on x alone does, weight for weight."""
    torch.manual_seed(0)
    single, multi = make_vit(), make_vit()
    multi.load_state_dict(single.state_dict())
    batches = separable_batches(n_batches=2)
    torch.manual_seed(1)
    reference = train_linear_probe(single, batches, epochs=2, lr=1e-2)
    torch.manual_seed(1)
    result = train_linear_probe(multi, [((x, torch.zeros_like(x)), y) for x, y in batches], epochs=2, lr=1e-2)
    assert len(result.history) == 2 and result.best_val_loss is None
    assert result.history == reference.history
    for (name, a), b in zip(single.state_dict().items(), multi.state_dict().values()):
        assert torch.equal(a, b), name


def test_export_reloads_identically_with_plain_timm(vit, tmp_path):
    vit.eval()
    x = torch.randn(4, 3, 16, 16)
    data_config = dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))
    out = export_model(vit, tmp_path / 'export', data_config=data_config, metadata={'method': 'cff'})
    assert sorted(p.name for p in out.iterdir()) == ['config.json', 'model.safetensors', 'timm_cff.json']
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'vit_tiny_patch16_224'
    assert config['model_args']['depth'] == 3 and config['model_args']['mlp_ratio'] == 2
    assert config['pretrained_cfg']['mean'] == list(data_config['mean'])
    reloaded = load_encoder(out).eval()
    assert type(reloaded) is type(vit) and list(reloaded.state_dict()) == list(vit.state_dict())
    with torch.no_grad():
        assert torch.equal(reloaded(x), vit(x))
    cfg = timm.data.resolve_data_config(model=reloaded)
    assert cfg['input_size'] == (3, 16, 16) and cfg['crop_pct'] == 1.0


def test_export_loads_without_timm_cff(vit, tmp_path):
    """A fresh interpreter that cannot import timm_cff rebuilds the export with timm.create_model alone."""
    vit.eval()
    x = torch.randn(2, 3, 16, 16)
    torch.save(x, tmp_path / 'x.pt')
    export_model(vit, tmp_path / 'export', data_config=dict(mean=(0.5,) * 3, std=(0.5,) * 3))
    code = (
        "import sys; sys.modules['timm_cff'] = None\n"
        "import timm, torch\n"
        f"m = timm.create_model('local-dir:{tmp_path / 'export'}', pretrained=True).eval()\n"
        f"torch.save(m(torch.load('{tmp_path / 'x.pt'}')), '{tmp_path / 'y.pt'}')\n")
    subprocess.run([sys.executable, '-c', code], check=True, cwd=tmp_path, env={'HF_HUB_OFFLINE': '1',
                                                                                'PATH': '/usr/bin:/bin'})
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / 'y.pt'), vit(x))


def test_export_replaces_an_earlier_export_and_refuses_unbuildable_models(vit, tmp_path):
    target = tmp_path / 'export'
    export_model(vit, target, data_config=dict(mean=(0.5,) * 3, std=(0.5,) * 3))
    (target / 'stale.txt').write_text('old')  # left in an earlier export: the new one replaces the whole folder
    export_model(vit, target, data_config=dict(mean=(0.5,) * 3, std=(0.5,) * 3))
    assert not (target / 'stale.txt').exists() and (target / 'model.safetensors').exists()
    assert [p.name for p in tmp_path.iterdir()] == ['export']  # no temporary folder left behind
    from timm.models.vision_transformer import VisionTransformer
    with pytest.raises(TypeError, match='not built by timm.create_model'):
        export_model(VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2), tmp_path / 'x')


def test_export_roundtrip_after_training_and_probe(tmp_path):
    from conftest import make_batch
    from timm_cff import LocalTrainer
    torch.manual_seed(0)
    model = make_vit()
    trainer = LocalTrainer(model, lr=1e-3)
    trainer.step(*make_batch())
    train_linear_probe(model, separable_batches(n_batches=1), epochs=1)
    reloaded = load_encoder(export_model(model, tmp_path / 'e', data_config=dict(mean=(0.5,) * 3, std=(0.5,) * 3)))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x), model.eval()(x))


def test_cached_features_give_the_same_probe_on_fixed_inputs():
    """Without augmentation, encoding once equals encoding every epoch (up to the batch order)."""
    torch.manual_seed(0)
    a = make_vit()
    b = make_vit()
    b.load_state_dict(a.state_dict())
    batches = separable_batches(n_batches=1, batch=64)
    torch.manual_seed(1)
    plain = train_linear_probe(a, batches, batches, epochs=3, lr=1e-2)
    torch.manual_seed(1)
    cached = train_linear_probe(b, batches, batches, epochs=3, lr=1e-2, cache_features=True)
    # one batch per epoch: the order inside it does not change the mean loss or the gradient
    for h1, h2 in zip(plain.history, cached.history):
        assert h1['val_loss'] == pytest.approx(h2['val_loss'], rel=1e-4)
    assert torch.allclose(a.head.weight, b.head.weight, atol=1e-5)
