"""MLP[E L]: stages against a hand-written forward, CFF through the unchanged LocalTrainer, probe, refusals."""
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import make_batch
from timm_cff import (MLP, LocalTrainer, MlpStages, create_mlp, create_stages, evaluate_accuracy, linear_margins,
                      train_linear_probe)
from timm_cff.loss import marginal_supcon_loss


def tiny_mlp(depth=3, width=24, num_classes=5, **kwargs):
    torch.manual_seed(0)
    return create_mlp(width, depth, num_classes, img_size=16, in_chans=3, **kwargs)


def plain_forward(model, x):
    """relu(h @ W.T + b) layer by layer, written out from the weights."""
    h = x.reshape(len(x), -1)
    for layer in model.layers:
        h = torch.clamp(h @ layer.fc.weight.T + layer.fc.bias, min=0)
    return h


def test_stages_compose_to_the_plain_mlp_forward():
    model = tiny_mlp()
    stages = create_stages(model)
    assert isinstance(stages, MlpStages) and stages.num_stages == 3
    x = torch.randn(4, 3, 16, 16)
    h = x
    for i in range(stages.num_stages):
        h = stages.forward_stage(i, h.detach() if i else h)
    with torch.no_grad():
        reference = plain_forward(model, x)
        assert torch.allclose(h, reference, atol=1e-6)
        assert torch.allclose(model.forward_features(x), reference, atol=1e-6)
        assert torch.allclose(model(x), reference @ model.head.weight.T + model.head.bias, atol=1e-6)
        assert torch.equal(stages.pool(h), h)


def test_paper_sizes_and_parameter_ownership():
    model = create_mlp(500, 3)  # MNIST MLP[500 3]
    encoder = sum(p.numel() for layer in model.layers for p in layer.parameters())
    assert encoder == 784 * 500 + 500 + 2 * (500 * 500 + 500)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert create_mlp(800, 4, img_size=32, in_chans=3).layers[0].fc.in_features == 3072  # CIFAR-10 MLP[800 4]
    stages = create_stages(model)
    owned = [id(p) for i in range(stages.num_stages) for p in stages.stage_parameters(i)]
    assert len(owned) == len(set(owned)) == 6
    rest = {n.split('.')[0] for n, p in model.named_parameters() if id(p) not in set(owned)}
    assert rest == {'head'}


def official_style_loop(model, batches, lr, margins, temperature=0.15):
    """CFF on an MLP written out: two forwards per layer, each layer stepped right after its own backward."""
    opts = [torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=0.01) for layer in model.layers]
    for (x1, x2), y in batches:
        h1, h2 = x1.flatten(1), x2.flatten(1)
        for l, layer in enumerate(model.layers):
            h1 = F.relu(F.linear(h1.detach(), layer.fc.weight, layer.fc.bias))
            h2 = F.relu(F.linear(h2.detach(), layer.fc.weight, layer.fc.bias))
            loss = marginal_supcon_loss([h1, h2], y, temperature, margins[l])
            opts[l].zero_grad()
            loss.backward()
            opts[l].step()


def test_local_trainer_does_cff_on_an_mlp_unchanged():
    model = tiny_mlp()
    reference = copy.deepcopy(model)
    batches = [make_batch(seed=s) for s in range(3)]
    trainer = LocalTrainer(model, margins=linear_margins(0.4, 0.1), lr=1e-3)
    for views, y in batches:
        out = trainer.step(views, y)
    assert set(out) == {'loss', 'loss_stage0', 'loss_stage1', 'loss_stage2'}
    official_style_loop(reference, batches, 1e-3, [0.4, 0.25, 0.1])
    for (n, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-5), n


def separable(n_batches=4, batch=32, num_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, num_classes, (batch,), generator=g)
        x = 0.1 * torch.randn(batch, 3, 16, 16, generator=g)
        x[:, 0] += (y.float() - 2)[:, None, None]
        out.append((x, y))
    return out


@pytest.mark.parametrize('fc_norm', [False, True])
def test_linear_probe_trains_only_the_head(fc_norm):
    model = tiny_mlp(fc_norm=fc_norm)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_linear_probe(model, separable(), separable(seed=1), epochs=15, lr=5e-2)
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p.detach()) != n.startswith(('fc_norm', 'head')), n
    assert evaluate_accuracy(model, separable(seed=1), topk=(1,))['top1'] > 90
    assert result.best_val_loss is not None


def test_reset_classifier_and_input_checks():
    model = tiny_mlp()
    model.reset_classifier(7)
    assert model.num_classes == 7 and model(torch.zeros(1, 3, 16, 16)).shape == (1, 7)
    model.reset_classifier(0)
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 24)
    with pytest.raises(ValueError, match='expects 768 values per sample \\(input \\[3, 16, 16\\]\\), got 784'):
        model(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match='depth >= 1'):
        MLP(784, 500, depth=0)
