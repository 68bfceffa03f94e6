"""The benchmark keeps working (``--quick``), its byte accounting is exact, and its memory measurement can tell a
model that holds one stage's activations from one that holds them all."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from harness import (BenchSetup, count_flops, create_bench_batch, create_step, measure_memory,
                            memory_in_subprocess, state_bytes, time_methods)

TINY = BenchSetup(embed_dim=32, num_heads=2, depth=2, img_size=16, batch_size=8)
BENCHMARKS = Path(__file__).resolve().parent.parent / 'benchmarks'


def test_state_bytes_are_exact_for_adamw():
    model, step, optimizers = create_step('bp', TINY)
    step(create_bench_batch(TINY, views=1))
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    sizes = state_bytes(model, optimizers)
    assert sizes['param_bytes'] == sizes['grad_bytes'] == 4 * n
    assert sizes['optimizer_bytes'] == 2 * 4 * n + 4 * len(params)  # exp_avg, exp_avg_sq, a float32 step each


def test_cff_grads_cover_the_stages_only():
    model, step, optimizers = create_step('cff_2view', TINY)
    step(create_bench_batch(TINY))
    head = sum(p.numel() for name, p in model.named_parameters() if name.startswith(('fc_norm', 'head')))
    assert state_bytes(model, optimizers)['grad_bytes'] == 4 * (sum(p.numel() for p in model.parameters()) - head)


def test_time_methods_interleaves_and_reports_ratios():
    out = time_methods(TINY, ['cff_2view', 'cff_1view', 'ff', 'bp'], warmup=1, repeats=2)
    assert out['bp']['wall_ratio']['median'] == 1.0
    for method in ('cff_2view', 'cff_1view', 'ff'):
        assert len(out[method]['wall_s']) == 2 and out[method]['wall']['median'] > 0
        assert out[method]['wall_ratio']['median'] > 0 and out[method]['cpu']['median'] > 0


def test_flop_counts_match_the_closed_form():
    """Matrix-product and convolution FLOPs of one step, written out from the ViT's shapes (the CPU attention
    kernel is not counted by torch's flop counter, for any method alike)."""
    s = TINY
    b, e, tokens, depth = s.batch_size, s.embed_dim, (s.img_size // s.patch_size) ** 2, s.depth
    block = 2 * b * tokens * (3 * e * e + e * e + 2 * e * e + 2 * e * e)  # qkv, proj, fc1, fc2 (mlp_ratio 2)
    patch = 2 * b * tokens * 3 * s.patch_size ** 2 * e
    head = 2 * b * e * s.num_classes
    encoder = 3 * depth * block + 2 * patch  # forward + input and weight grads; the image gets no gradient

    def similarity(n):  # n x n cosine similarities per stage: forward product + two gradient products
        return depth * 3 * 2 * n * n * e
    assert count_flops(TINY, ['bp', 'cff_1view', 'cff_2view']) == {
        'bp': encoder + 3 * head,
        'cff_1view': encoder + similarity(b),
        'cff_2view': 2 * encoder + similarity(2 * b),
    }


def test_measure_memory_accounting_is_consistent():
    r = measure_memory('cff_1view', TINY)
    assert r['activation_bytes'] == r['total_bytes'] - r['param_bytes'] - r['grad_bytes'] - r['optimizer_bytes']
    assert r['batch_bytes'] == 8 * 3 * 16 * 16 * 4 + 8 * 8  # one view and int64 labels


@pytest.mark.slow
def test_cff_activation_peak_is_far_below_bp_at_depth():
    """Depth 8, 64 tokens: BP keeps 8 blocks of activations, CFF one block (of a 2B batch)."""
    setup = BenchSetup(embed_dim=64, num_heads=2, depth=8, img_size=32, batch_size=64)
    cff = memory_in_subprocess('cff_2view', setup, threads=1)['activation_bytes']
    bp = memory_in_subprocess('bp', setup, threads=1)['activation_bytes']
    assert cff < 0.5 * bp


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f'{name}.py')
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_benchmark_script_quick_mode(tmp_path):
    script = _load_script('run_benchmark')
    threads = torch.get_num_threads()
    script.main(['--quick', '--memory-methods', 'cff_2view', '--out', str(tmp_path / 'quick')])
    torch.set_num_threads(threads)
    result = json.loads((tmp_path / 'quick.json').read_text())
    assert set(result['time']) == {'cff_2view', 'cff_2view_unfused', 'cff_1view', 'ff', 'bp', 'bp_ckpt'}
    assert set(result['memory']['cff_2view']) == {'1', '2'}
    assert 'cff_2view_time_ratio' in result['targets']
    markdown = (tmp_path / 'quick.md').read_text()
    assert '| cff_2view |' in markdown and 'Peak memory' in markdown and 'GFLOP / BP' in markdown
    assert set(result['flops']) == set(result['time'])


def test_loss_benchmark_runs(tmp_path):
    _load_script('bench_loss').main(['--sizes', '32', '--repeats', '1', '--out', str(tmp_path / 'loss')])
    result = json.loads((tmp_path / 'loss.json').read_text())['results']['32']
    assert result['lean']['saved_bytes'] < result['autograd_reference']['saved_bytes']


def test_identical_views_benchmark_runs_and_both_paths_agree(tmp_path):
    _load_script('identical_views').main(['--models', 'mlp', '--batch', '16', '--repeats', '1',
                                          '--out', str(tmp_path / 'views')])
    result = json.loads((tmp_path / 'views.json').read_text())['results']['mlp']
    assert result['first_step_max_difference'] < 1e-5
    assert result['ms']['two_tensors'] > 0 and result['ms']['one_tensor'] > 0
