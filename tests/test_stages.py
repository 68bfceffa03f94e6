"""The stage split against timm's own forward, parameter ownership, and the refusals."""
import pytest
import timm
import torch
from torch import nn

from conftest import make_vit
from timm_cff import create_stages

MODELS = {
    'cff_vit': lambda: make_vit(depth=3),
    'test_vit (class token)': lambda: timm.create_model('test_vit', img_size=32),
    'test_vit2 (register token)': lambda: timm.create_model('test_vit2', img_size=32),
    'test_vit4': lambda: timm.create_model('test_vit4', img_size=32),
    'dynamic_img_size': lambda: make_vit(depth=2, dynamic_img_size=True),
}


@pytest.mark.parametrize('name', MODELS)
def test_composed_stages_equal_forward_features(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    stages = create_stages(model)
    x = torch.randn(3, 3, model.patch_embed.img_size[0], model.patch_embed.img_size[1])
    h = x
    for i in range(stages.num_stages):
        h = stages.forward_stage(i, h.detach() if i else h)
    with torch.no_grad():
        assert torch.allclose(model.norm(h), model.forward_features(x), atol=1e-6)
        assert torch.allclose(model.forward_head(model.norm(h)), model(x), atol=1e-6)
        assert torch.equal(stages.pool(h), model.pool(h))


def test_avg_pool_is_token_mean(vit):
    h = torch.randn(2, 16, 32)
    assert torch.allclose(create_stages(vit).pool(h), h.mean(1))


@pytest.mark.parametrize('name', MODELS)
def test_stage_parameters_partition_the_encoder(name):
    model = MODELS[name]()
    stages = create_stages(model)
    ids = [id(p) for i in range(stages.num_stages) for p in stages.stage_parameters(i)]
    assert len(ids) == len(set(ids)), 'a parameter belongs to two stages'
    names = {id(p): n for n, p in model.named_parameters()}
    stage0 = {names[id(p)].split('.')[0] for p in stages.stage_parameters(0)}
    assert {'patch_embed', 'pos_embed', 'blocks'} <= stage0
    rest = {n.split('.')[0] for n, p in model.named_parameters() if id(p) not in set(ids)}
    assert rest <= {'fc_norm', 'head', 'norm'}


def test_gradient_of_a_stage_loss_stays_in_the_stage(vit):
    stages = create_stages(vit)
    h = torch.randn(2, 3, 16, 16)
    outs = []
    for i in range(stages.num_stages):
        h = stages.forward_stage(i, h.detach() if i else h)
        outs.append(h)
    outs[1].pow(2).mean().backward()
    owned = {id(p) for p in stages.stage_parameters(1)}
    for n, p in vit.named_parameters():
        assert (p.grad is not None) == (id(p) in owned), n


def test_refusals():
    with pytest.raises(TypeError, match='Cannot split a Linear'):
        create_stages(nn.Linear(3, 3))
    with pytest.raises(TypeError, match='Cannot split a VisionTransformerRelPos'):
        create_stages(timm.create_model('test_vit_relpos', img_size=32))
    with pytest.raises(ValueError, match="global_pool='map'"):
        create_stages(timm.create_model('test_vit3', img_size=32))
    with pytest.raises(ValueError, match="global_pool=''"):
        create_stages(make_vit(global_pool=''))


def test_naflexvit_is_refused():
    from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg
    model = NaFlexVit(NaFlexVitCfg(embed_dim=32, depth=1, num_heads=2), num_classes=3)
    with pytest.raises(TypeError, match='NaFlexVit'):
        create_stages(model)
