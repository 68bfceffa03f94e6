"""FF / SymBa / FF-Collab / BP baselines against plain-loop references, hand-built cases and the run-loop protocol."""
import copy
import io
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import make_batch, make_vit
from timm_cff import (BackpropTrainer, ForwardForwardTrainer, LocalTrainer, NonFiniteLossError, OnePassClassifier,
                      create_mlp, create_trainer, evaluate_accuracy, list_methods, time_inference,
                      train_one_pass_head)
from timm_cff.families import MlpOneHotLabel, VitLabelToken, draw_negative_labels

FF_METHODS = ['ff', 'symba', 'collab']
C = 5


def make_model(family, depth=3, seed=0):
    torch.manual_seed(seed)
    if family == 'vit':
        return make_vit(depth=depth, num_classes=C)
    return create_mlp(24, depth, C, img_size=16, in_chans=3)


def params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# ----------------------------------------------------------------------------------------------- label embeddings
def test_vit_label_patches_are_distinct_seeded_and_projected_by_the_model():
    model = make_model('vit')
    trainer = ForwardForwardTrainer(model, seed=3)
    labelled = trainer.labelled
    assert isinstance(labelled, VitLabelToken) and labelled.patches.shape == (C, 3, 4, 4)
    flat = labelled.patches.flatten(1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(C) for j in range(i + 1, C))
    assert torch.equal(ForwardForwardTrainer(make_model('vit'), seed=3).labelled.patches, labelled.patches)
    assert not torch.equal(ForwardForwardTrainer(make_model('vit'), seed=4).labelled.patches, labelled.patches)
    y = torch.tensor([2, 0, 2, 4])
    with torch.no_grad():
        tokens = labelled.label_tokens(y, 4)
        assert torch.equal(tokens, labelled.label_tokens(y, 4))  # identical across calls
        proj = model.patch_embed.proj  # the patch projection as a matrix on (C, ph, pw)-ordered patch vectors
        expected = flat[y] @ proj.weight.flatten(1).T + proj.bias + labelled.pos_embed[0]
        assert torch.allclose(tokens[:, 0], expected, atol=1e-5)
        zero = labelled.label_tokens(None, 3)
        assert torch.allclose(zero, (proj.bias + labelled.pos_embed[0]).expand(3, 1, -1), atol=1e-6)
    assert list(model.state_dict()) == list(make_model('vit').state_dict())  # the timm model stays untouched


def reference_first_stage(model, patches, label_pos, x, labels):
    """Stage 0 of FF on a timm ViT written out: [label token, patch tokens + pos_embed] through block 0."""
    proj = model.patch_embed.proj
    tokens = F.conv2d(x, proj.weight, proj.bias, stride=proj.stride).flatten(2).transpose(1, 2) + model.pos_embed
    code = patches[labels].flatten(1) if labels is not None else torch.zeros(len(x), patches[0].numel())
    label = (code @ proj.weight.flatten(1).T + proj.bias)[:, None] + label_pos
    return model.blocks[0](torch.cat([label, tokens], dim=1))


def test_vit_label_token_is_prepended_and_left_out_of_the_goodness():
    model = make_model('vit')
    labelled = ForwardForwardTrainer(model).labelled
    (x, _), y = make_batch(batch=4)
    with torch.no_grad():
        h = labelled.forward_first(x, y[:4])
        assert h.shape == (4, 1 + 16, 32)
        assert torch.allclose(h, reference_first_stage(model, labelled.patches, labelled.pos_embed, x, y), atol=1e-5)
        assert torch.allclose(labelled.pool(h), h[:, 1:].mean(1))
        with_label = ForwardForwardTrainer(model, label_kwargs={'pool_label_token': True}).labelled
        assert torch.allclose(with_label.pool(h), h.mean(1))


def test_mlp_label_is_a_one_hot_code_in_the_first_inputs():
    model = make_model('mlp')
    labelled = ForwardForwardTrainer(model, label_kwargs={'value': 2.5}).labelled
    assert isinstance(labelled, MlpOneHotLabel)
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([4, 0, 1])
    seen = []
    hook = model.layers[0].register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    with torch.no_grad():
        labelled.forward_first(x, y)
        labelled.forward_first(x, None)
    hook.remove()
    expected = x.flatten(1).clone()
    expected[:, :C] = 2.5 * F.one_hot(y, C)
    assert torch.equal(seen[0], expected)
    expected[:, :C] = 0
    assert torch.equal(seen[1], expected)


def test_negative_labels_are_never_true_and_uniform_over_the_others():
    y = torch.arange(C).repeat(6000)
    negatives = draw_negative_labels(y, C, torch.Generator().manual_seed(0))
    assert not (negatives == y).any()
    counts = torch.zeros(C, C)
    counts.index_put_((y, negatives), torch.ones(len(y)), accumulate=True)
    expected = 6000 / (C - 1)
    off_diagonal = counts[~torch.eye(C, dtype=torch.bool)]
    assert ((off_diagonal - expected).abs() < 0.1 * expected).all(), counts
    with pytest.raises(ValueError, match='at least 2 classes'):
        draw_negative_labels(y, 1)


# ----------------------------------------------------------------------------------------------- prediction
def hand_built_trainer(score_first_stage):
    """MLP with 3 inputs, two layers of 3 units and 3 classes, weights diagonal: every goodness is known."""
    model = create_mlp(3, 2, 3, img_size=(1, 3), in_chans=1)
    with torch.no_grad():
        for layer, diagonal in zip(model.layers, ([3.0, 2.0, 1.0], [1.0, 1.0, 2.0])):
            layer.fc.weight.copy_(torch.diag(torch.tensor(diagonal)))
            layer.fc.bias.zero_()
    return ForwardForwardTrainer(model, score_first_stage=score_first_stage)


def test_prediction_picks_the_label_with_the_highest_summed_goodness():
    # Label c writes e_c: layer 0 gives w0_c e_c, goodness w0_c² / 3 = (9, 4, 1) / 3; normalised to e_c, layer 1
    # gives w1_c e_c, goodness (1, 1, 4) / 3. Stages 2..L pick class 2; all stages, (10, 5, 5) / 3, pick class 0.
    x = torch.zeros(2, 1, 1, 3)
    scores = hand_built_trainer(score_first_stage=False).predict(x)
    assert torch.allclose(scores, torch.tensor([[1.0, 1.0, 4.0]] * 2) / 3)
    assert scores.argmax(1).tolist() == [2, 2]
    scores = hand_built_trainer(score_first_stage=True).predict(x)
    assert torch.allclose(scores, torch.tensor([[10.0, 5.0, 5.0]] * 2) / 3)
    assert scores.argmax(1).tolist() == [0, 0]


def test_collab_scores_every_stage_by_default_and_ff_symba_skip_the_first():
    # FF-Collab's stages all train the total goodness, so its default prediction sums every stage.
    model = create_mlp(3, 3, 3, img_size=(1, 3), in_chans=1)
    assert create_trainer('collab', model).scored_stages == [0, 1, 2]
    assert create_trainer('ff', model).scored_stages == [1, 2]
    assert create_trainer('symba', model).scored_stages == [1, 2]
    assert create_trainer('collab', model, score_first_stage=False).scored_stages == [1, 2]
    assert create_trainer('ff', model, score_first_stage=True).scored_stages == [0, 1, 2]


def reference_goodness(model, patches, label_pos, x, labels):
    """Goodness of every stage of FF on a ViT, written out: [L, B]."""
    h = reference_first_stage(model, patches, label_pos, x, labels)
    out = [h[:, 1:].mean(1).pow(2).mean(1)]
    for block in model.blocks[1:]:
        h = block((h.flatten(1) / h.flatten(1).norm(dim=1, keepdim=True)).view_as(h))
        out.append(h[:, 1:].mean(1).pow(2).mean(1))
    return torch.stack(out)


def test_vit_prediction_sums_goodness_over_stages_2_to_L():
    model = make_model('vit')
    trainer = ForwardForwardTrainer(model)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = torch.stack([
            reference_goodness(model, trainer.labelled.patches, trainer.labelled.pos_embed, x,
                               torch.full((4,), c))[1:].sum(0) for c in range(C)], dim=1)
    assert torch.allclose(trainer.predict(x), expected, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- training step
def reference_ff_steps(family, model, labelled, batches, method, lr, seed):
    """FF / SymBa / FF-Collab written out: separate positive and negative passes, explicit goodness and losses.

    FF-Collab's offsets come from the same pass's goodness (detached); with every optimizer stepped after all
    backward passes, that pass runs on exactly the weights a separate no-grad pre-pass would see.
    """
    label_pos = labelled['pos_embed'].clone().requires_grad_() if family == 'vit' else None
    if family == 'vit':
        stage_params = [[model.pos_embed, *model.patch_embed.parameters(), *model.blocks[0].parameters(), label_pos]]
        stage_params += [list(b.parameters()) for b in model.blocks[1:]]
    else:
        stage_params = [list(layer.parameters()) for layer in model.layers]
    opts = [torch.optim.SGD(p, lr=lr) for p in stage_params]
    generator = torch.Generator().manual_seed(seed)

    def goodness_per_stage(x, labels):
        if family == 'vit':
            h = reference_first_stage(model, labelled['patches'], label_pos, x, labels)
            pooled = [h[:, 1:].mean(1)]
            for block in model.blocks[1:]:
                h = block(F.normalize(h.detach().flatten(1), dim=1).view_as(h))
                pooled.append(h[:, 1:].mean(1))
        else:
            h = torch.cat([F.one_hot(labels, C).float(), x.flatten(1)[:, C:]], dim=1)
            pooled = []
            for layer in model.layers:
                h = F.relu(F.linear(h, layer.fc.weight, layer.fc.bias))
                pooled.append(h)
                h = F.normalize(h.detach(), dim=1)
        return [z.pow(2).mean(1) for z in pooled]

    for (x,), y in batches:
        y_neg = (y + torch.randint(1, C, y.shape, generator=generator)) % C
        g_pos, g_neg = goodness_per_stage(x, y), goodness_per_stage(x, y_neg)
        losses = []
        for k in range(len(g_pos)):
            gp, gn = g_pos[k], g_neg[k]
            if method == 'collab':
                gp = gp + sum(g.detach() for j, g in enumerate(g_pos) if j != k)
                gn = gn + sum(g.detach() for j, g in enumerate(g_neg) if j != k)
            if method == 'symba':
                losses.append(torch.log1p(torch.exp(-(gp - gn))).mean())
            else:
                losses.append(0.5 * (torch.log1p(torch.exp(2.0 - gp)).mean() + torch.log1p(torch.exp(gn - 2.0)).mean()))
        for opt in opts:
            opt.zero_grad()
        sum(losses).backward()  # stages are detached from each other: per-stage gradients
        for opt in opts:
            opt.step()
    return label_pos


@pytest.mark.parametrize('family', ['vit', 'mlp'])
@pytest.mark.parametrize('method', FF_METHODS)
def test_ff_family_step_matches_the_written_out_reference(family, method):
    """SGD, because Adam turns float noise in a near-zero gradient (fused vs separate passes) into a full step."""
    model = make_model(family)
    reference = copy.deepcopy(model)
    trainer = create_trainer(method, model, seed=7, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    initial_labels = copy.deepcopy(trainer.labelled.state_dict())  # patches and position, before training
    batches = [make_batch(batch=8, num_classes=C, views=1, seed=s) for s in range(3)]
    for views, y in batches:
        out = trainer.step(views, y)
    label_pos = reference_ff_steps(family, reference, initial_labels, batches, method, 0.5, seed=7)
    for (n, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-5), n
    if family == 'vit':
        assert torch.allclose(trainer.labelled.pos_embed, label_pos, atol=1e-5)
    scored = range(3) if method == 'collab' else range(1, 3)  # collab scores every stage by default
    assert torch.allclose(out['loss_scored'], sum(out[f'loss_stage{i}'] for i in scored))
    assert {'goodness_pos_stage0', 'goodness_neg_stage2'} <= set(out) and trainer.num_updates == 3


@pytest.mark.parametrize('family', ['vit', 'mlp'])
@pytest.mark.parametrize('method', FF_METHODS)
@pytest.mark.parametrize('stage', [0, 1, 2])
def test_a_stage_loss_changes_only_its_stage(family, method, stage):
    """Every other stage's loss is zeroed; with weight decay off, everything outside the stage stays bit-identical
    (for FF-Collab this also shows that the other stages' goodness reaches the loss without a gradient)."""
    model = make_model(family)
    trainer = create_trainer(method, model, lr=1e-2, weight_decay=0.0)
    for j in range(3):
        if j != stage:
            trainer.losses[j] = lambda pos, neg, pos_offset=0.0, neg_offset=0.0: 0.0 * pos.sum()
    before = {**params(model), **{f'label.{n}': p for n, p in params(trainer.labelled).items()}}
    trainer.step(*make_batch(num_classes=C, views=1))
    owned = {id(p) for p in trainer.optimizers[stage].param_groups[0]['params']}
    current = {**dict(model.named_parameters()),
               **{f'label.{n}': p for n, p in trainer.labelled.named_parameters()}}
    for n, p in current.items():
        assert (not torch.equal(before[n], p.detach())) == (id(p) in owned), n


@pytest.mark.parametrize('method', FF_METHODS)
def test_ff_family_lowers_the_validation_loss(method):
    trainer = create_trainer(method, make_model('mlp'), lr=1e-2)
    val = prototypes(2, seed=1)
    before = trainer.evaluate(val)
    for _ in range(5):
        trainer.train_epoch(prototypes())
    after = trainer.evaluate(val)
    assert after['loss'] < before['loss'] - 0.05
    assert after['goodness_pos_stage0'] > after['goodness_neg_stage0']  # stage 1 already tells labels apart


def test_collab_offsets_are_the_other_stages_goodness():
    model = make_model('mlp')
    trainer = create_trainer('collab', model)
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, C, (6,))
    with torch.no_grad():
        offsets = trainer._collab_offsets(x, y)
        # the reference, by hand: Linear + ReLU per layer on the L2-normalised previous output, goodness = mean z^2
        h, g = trainer.labelled.forward_first(x, y), []  # stage 0 with its label embedding
        g.append(h.pow(2).mean(1))
        for layer in model.layers[1:]:
            unit = h / h.norm(dim=1, keepdim=True)
            h = torch.relu(unit @ layer.fc.weight.T + layer.fc.bias)
            g.append(h.pow(2).mean(1))
    for k in range(3):
        assert torch.allclose(offsets[k], sum(g[j] for j in range(3) if j != k), atol=1e-6)


# ----------------------------------------------------------------------------------------------- one-pass head
def prototypes(n_batches=4, batch=32, seed=0):
    """Noisy copies of one fixed random image per class: classes differ in direction, which survives FF's
    per-sample normalisation (a brightness code would not)."""
    centres = torch.randn(C, 3, 16, 16, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, C, (batch,), generator=g)
        out.append((centres[y] + 0.5 * torch.randn(batch, 3, 16, 16, generator=g), y))
    return out


def test_one_pass_features_are_zero_label_pooled_outputs_of_stages_2_to_L():
    model = make_model('vit')
    trainer = ForwardForwardTrainer(model)
    classifier = OnePassClassifier.from_trainer(trainer)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        h = reference_first_stage(model, trainer.labelled.patches, trainer.labelled.pos_embed, x, None)
        pooled = []
        for block in model.blocks[1:]:
            h = block(F.normalize(h.flatten(1), dim=1).view_as(h))
            pooled.append(h[:, 1:].mean(1))
        assert torch.allclose(classifier.forward_features(x), torch.cat(pooled, dim=1), atol=1e-5)
    assert classifier.head.in_features == 2 * 32 and classifier(x).shape == (3, C)


def test_one_pass_head_trains_only_the_head_and_learns():
    trainer = ForwardForwardTrainer(make_model('mlp'))
    before = {**params(trainer.model), **params(trainer.labelled)}
    classifier, result = train_one_pass_head(trainer, prototypes(), prototypes(seed=1), epochs=15, lr=2e-2)
    after = {**params(trainer.model), **params(trainer.labelled)}
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert result.best_val_loss < result.history[0]['val_loss']
    assert evaluate_accuracy(classifier, prototypes(seed=1), topk=(1,))['top1'] > 80  # chance: 20


# ----------------------------------------------------------------------------------------------- BP
@pytest.mark.parametrize('family', ['vit', 'mlp'])
def test_bp_gradients_reach_every_block_and_match_a_plain_adamw_step(family):
    model = make_model(family)
    reference = copy.deepcopy(model)
    trainer = BackpropTrainer(model, lr=1e-3)
    (x, _), y = make_batch(num_classes=C)
    out = trainer.step(x, y)
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.01)
    loss = F.cross_entropy(reference(x), y)
    loss.backward()
    opt.step()
    assert out['loss'] == pytest.approx(loss.item(), rel=1e-6)
    for (n, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-6), n
    with torch.no_grad():
        expected = F.cross_entropy(reference.eval()(x), y).item()
    assert trainer.evaluate([(x, y)])['loss'] == pytest.approx(expected, rel=1e-5)
    assert trainer.selection_key == 'loss' and torch.equal(trainer.predict(x), reference(x).detach())


# ----------------------------------------------------------------------------------------------- the protocol
def run_steps(method, family, steps, seed=0, state=None):
    trainer = create_trainer(method, make_model(family, seed=seed), lr=1e-3, seed=seed) if method != 'bp' and \
        method != 'cff' else create_trainer(method, make_model(family, seed=seed), lr=1e-3)
    if state is not None:
        trainer.load_state_dict(state)
    views = 2 if method == 'cff' else 1
    for s in steps:
        trainer.step(*make_batch(num_classes=C, views=views, seed=s))
        if s % 2 == 1:
            trainer.end_epoch()
    return trainer


@pytest.mark.parametrize('family', ['vit', 'mlp'])
@pytest.mark.parametrize('method', ['ff', 'symba', 'collab', 'bp'])
def test_resume_from_state_dict_equals_an_uninterrupted_run(method, family):
    """The resumed trainer starts from another seed: label patches, label position and negatives are restored."""
    full = run_steps(method, family, range(4))
    buffer = io.BytesIO()
    torch.save(run_steps(method, family, range(2)).state_dict(), buffer)
    buffer.seek(0)
    resumed = run_steps(method, family, range(2, 4), seed=11, state=torch.load(buffer))
    assert resumed.num_updates == full.num_updates == 4 and resumed.epoch == full.epoch == 2
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n
    if method != 'bp':
        for (n, a), b in zip(full.labelled.state_dict().items(), resumed.labelled.state_dict().values()):
            assert torch.equal(a, b), n


@pytest.mark.parametrize('family', ['vit', 'mlp'])
@pytest.mark.parametrize('method', ['cff', 'ff', 'symba', 'collab', 'bp'])
def test_every_method_speaks_the_run_loop_protocol(method, family):
    trainer = create_trainer(method, make_model(family), lr=1e-3)
    views = 2 if method == 'cff' else 1
    out = trainer.step(*make_batch(num_classes=C, views=views))
    assert 'loss' in out and all(v.dim() == 0 and not v.requires_grad for v in out.values())
    loader = [make_batch(num_classes=C, views=views, seed=s) for s in (1, 2)]
    train = trainer.train_epoch(loader)
    assert trainer.epoch == 1 and trainer.num_updates == 3 and trainer.num_views == views
    val = trainer.evaluate(loader)
    assert set(val) == set(train) and trainer.selection_key in val
    assert all(isinstance(v, float) for v in val.values())
    assert trainer.predict(torch.randn(4, 3, 16, 16)).shape == (4, C)


def test_validation_does_not_move_the_training_draws():
    a, b = create_trainer('ff', make_model('mlp')), create_trainer('ff', make_model('mlp'))
    a.step(*make_batch(num_classes=C, views=1, seed=0))
    b.step(*make_batch(num_classes=C, views=1, seed=0))
    first = a.evaluate([make_batch(num_classes=C, views=1, seed=5)])
    assert a.evaluate([make_batch(num_classes=C, views=1, seed=5)]) == first  # the same negatives every call
    a.step(*make_batch(num_classes=C, views=1, seed=1))
    b.step(*make_batch(num_classes=C, views=1, seed=1))
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n


def test_factory_and_refusals():
    assert list_methods() == ['cff', 'ff', 'symba', 'collab', 'bp']
    assert [n for n, _ in list_methods('*ff', with_description=True)] == ['cff', 'ff']
    assert isinstance(create_trainer('CFF', make_model('vit')), LocalTrainer)
    collab = create_trainer('collab', make_model('vit'))
    assert collab.collab and type(collab.losses[0]).__name__ == 'FFLoss'
    assert type(create_trainer('symba', make_model('mlp'), loss_kwargs={'alpha': 2.0}).losses[1]).__name__ == \
        'SymBaLoss'
    with pytest.raises(ValueError, match='Unknown method .dfa.. Known methods: cff, ff, symba, collab, bp'):
        create_trainer('dfa', make_model('vit'))
    with pytest.raises(TypeError, match="Cannot build the 'bp' trainer"):
        create_trainer('bp', make_model('vit'), margins=0.4)
    with pytest.raises(ValueError, match='no stages 2..L to score; set score_first_stage=True'):
        ForwardForwardTrainer(make_model('mlp', depth=1))
    with pytest.raises(ValueError, match='7 classes do not fit in the 3 input values'):
        ForwardForwardTrainer(create_mlp(3, 2, 7, img_size=(1, 3), in_chans=1))
    with pytest.raises(ValueError, match="normalize must be one of \\('sample', 'token'\\)"):
        ForwardForwardTrainer(make_model('vit'), normalize='layer')


@pytest.mark.parametrize('method', ['ff', 'bp'])
def test_non_finite_loss_raises_before_any_update(method):
    model = make_model('mlp')
    trainer = create_trainer(method, model, lr=1e-3)
    with torch.no_grad():
        model.layers[1].fc.bias.fill_(float('nan'))
    before = params(model)
    with pytest.raises(NonFiniteLossError, match='step 0'):
        trainer.step(*make_batch(num_classes=C, views=1))
    for n, p in model.named_parameters():
        assert torch.equal(before[n].nan_to_num(), p.detach().nan_to_num()), n
    assert trainer.num_updates == 0


def test_time_inference_reports_milliseconds_per_image():
    calls = []

    def slow(x):
        calls.append(len(x))
        time.sleep(0.004)  # 4 ms per call of 8 images: 0.5 ms per image
        return x

    ms = time_inference(slow, torch.zeros(8, 3), warmup=2, min_run_time=0.1)
    assert 0.5 <= ms < 1.0 and len(calls) > 10
    with pytest.raises(ValueError, match='min_run_time > 0'):
        time_inference(slow, torch.zeros(8, 3), min_run_time=0)
