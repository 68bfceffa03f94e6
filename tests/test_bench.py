"""The benchmark harness against independent references: byte counts against the ViT's parameter formula, timing
against steps of known duration, memory peaks against allocations of known size, FLOPs against the closed form; and
every benchmark script still imports and runs (``--quick`` and tiny sizes)."""
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import harness
import pytest
import torch
from harness import (BenchSetup, count_flops, create_bench_batch, create_step, measure_memory, memory_in_subprocess,
                     state_bytes, time_methods)

TINY = BenchSetup(embed_dim=32, num_heads=2, depth=2, img_size=16, batch_size=8)
BENCHMARKS = Path(__file__).resolve().parent.parent / 'benchmarks'


def _vit_parameters(s: BenchSetup) -> tuple[int, int, int]:
    """Parameters of the bench ViT from its architecture: (stem, one block, fc_norm + head); MLP ratio 2."""
    d, hidden, tokens = s.embed_dim, 2 * s.embed_dim, (s.img_size // s.patch_size) ** 2
    stem = 3 * s.patch_size ** 2 * d + d + tokens * d  # patch projection (weight, bias), position embedding
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * hidden + hidden) + (hidden * d + d)
    head = 2 * d + d * s.num_classes + s.num_classes  # fc_norm, head
    return stem, block, head


STEM_TENSORS, BLOCK_TENSORS, HEAD_TENSORS = 3, 12, 4  # weights and biases counted above, one tensor each


def test_state_bytes_match_the_closed_form_for_adamw():
    """BP trains every parameter: float32 parameters and gradients, and AdamW keeps exp_avg and exp_avg_sq of each
    plus one float32 step counter per parameter tensor."""
    stem, block, head = _vit_parameters(TINY)
    n = stem + TINY.depth * block + head
    tensors = STEM_TENSORS + TINY.depth * BLOCK_TENSORS + HEAD_TENSORS
    model, step, optimizers = create_step('bp', TINY)
    step(create_bench_batch(TINY, views=1))
    assert state_bytes(model, optimizers) == {'param_bytes': 4 * n, 'grad_bytes': 4 * n,
                                              'optimizer_bytes': 2 * 4 * n + 4 * tensors}


def test_cff_state_covers_the_stages_only():
    """CFF trains the stem and the blocks, one AdamW per stage; fc_norm and head get neither gradient nor state."""
    stem, block, head = _vit_parameters(TINY)
    encoder = stem + TINY.depth * block
    tensors = STEM_TENSORS + TINY.depth * BLOCK_TENSORS
    model, step, optimizers = create_step('cff_2view', TINY)
    step(create_bench_batch(TINY))
    assert len(optimizers) == TINY.depth
    assert state_bytes(model, optimizers) == {'param_bytes': 4 * (encoder + head), 'grad_bytes': 4 * encoder,
                                              'optimizer_bytes': 2 * 4 * encoder + 4 * tensors}


def _fake_methods(monkeypatch, steps: dict) -> list[str]:
    """Register ``{name: fn()}`` as bench methods that run ``fn`` per step; returns the log of calls."""
    calls = []

    def builder(name, fn):
        def build(model, setup):
            return (lambda batch: calls.append(name) or fn()), []
        return build
    for name, fn in steps.items():
        monkeypatch.setitem(harness.METHODS, name, (builder(name, fn), 1))
    return calls


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_time_methods_against_steps_of_known_duration(monkeypatch):
    """Sleeping steps of 100 and 200 ms take wall time but no CPU time, a 40 ms busy loop takes both; ratios are to
    the reference, paired per repeat; the order rotates every repeat."""
    calls = _fake_methods(monkeypatch, {'sleep100': lambda: time.sleep(0.1), 'sleep200': lambda: time.sleep(0.2),
                                        'spin40': lambda: _spin(0.04)})
    names = ['sleep100', 'sleep200', 'spin40']
    out = time_methods(TINY, names, warmup=1, repeats=3, steps=2, reference='sleep100')
    assert calls[:3] == names  # warm-up, then each repeat starts one method later, each method twice in a row
    assert calls[3:] == [m for r in range(3) for m in names[r:] + names[:r] for _ in range(2)]
    assert all(len(out[m]['wall_s']) == len(out[m]['cpu_s']) == 3 for m in names)
    assert out['sleep100']['wall']['min'] >= 0.1 and out['sleep200']['wall']['min'] >= 0.2
    assert 1.6 < out['sleep200']['wall_ratio']['median'] < 2.4  # 2, less what wake-up delays add to both
    assert out['sleep200']['cpu']['max'] < 0.01 and out['sleep100']['cpu']['max'] < 0.01
    assert 0.04 <= out['spin40']['cpu']['min'] < 0.06 and out['spin40']['wall']['min'] >= 0.04
    assert out['spin40']['cpu_ratio']['median'] > 4  # 40 ms of CPU against the reference's microseconds


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


MIB = 2 ** 20


def _hold(*sizes_mib: int) -> None:
    """Allocate (and touch) tensors of these sizes, all alive at once."""
    held = [torch.ones(size * MIB // 4) for size in sizes_mib]
    del held


@pytest.mark.skipif(not Path('/proc/self/clear_refs').exists(), reason='CPU peaks are measured on Linux')
def test_measure_memory_finds_the_peak_of_known_allocations(monkeypatch):
    """A step that holds 2 x 64 MiB at once, one that holds 64 MiB, and one that holds 64 MiB twice in turn: the
    activation peak is the most held at one time (plus the batch, counted as resident), not the sum, and each
    measurement starts from a reset peak."""
    _fake_methods(monkeypatch, {'once': lambda: _hold(64), 'in_turn': lambda: (_hold(64), _hold(64)),
                                'together': lambda: _hold(64, 64)})
    batch_bytes = 8 * 3 * 16 * 16 * 4 + 8 * 8  # one view and int64 labels
    for method, expected in (('together', 128), ('once', 64), ('in_turn', 64)):  # the largest first: peaks reset
        r = measure_memory(method, TINY)
        assert r['batch_bytes'] == batch_bytes and r['grad_bytes'] == r['optimizer_bytes'] == 0
        # the kernel updates a process's resident-set counters in batches of pages: allow 1 MiB below
        assert (expected - 1) * MIB <= r['activation_bytes'] - batch_bytes < (expected + 8) * MIB, (method, r)


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


@pytest.mark.parametrize('name', sorted(p.stem for p in BENCHMARKS.glob('*.py') if p.stem not in ('harness', 'cost')))
def test_every_benchmark_script_imports(name):
    """Each script's module-level imports resolve in this layout (the scripts run only under ``__main__``)."""
    assert callable(_load_script(name).main)


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
    from timm_cff.experiment.rundir import cpu_model  # the CPU named as run folders name it
    assert result['environment']['cpu_model'] == cpu_model()
    assert result['environment']['cpu_capability'] == torch.backends.cpu.get_cpu_capability()


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


def test_redesign_speed_refuses_a_worker_that_imports_another_tree(tmp_path):
    """A root without timm_cff: its worker imports an installed timm_cff (or none), and the run must not use it."""
    script = _load_script('redesign_speed')
    spec = dict(threads=1, batch_size=4, embed_dim=16, num_heads=2, depth=1, img_size=8, patch_size=4, mlp_ratio=2.0,
                steps=1, warmup=0)
    with pytest.raises(RuntimeError, match='another tree|failed'):
        script.run_worker(sys.executable, tmp_path, spec)


@pytest.mark.slow
def test_redesign_speed_runs_both_checkouts(tmp_path):
    """This checkout as both "old" and "new", on a tiny ViT: every step is timed and the workers import this tree."""
    script = _load_script('redesign_speed')
    root = BENCHMARKS.parent
    result = script.main(['--old-root', str(root), '--old-python', sys.executable, '--rounds', '1', '--steps', '2',
                          '--warmup', '0', '--batch-size', '4', '--embed-dim', '16', '--num-heads', '2', '--depth', '1',
                          '--img-size', '8', '--out', str(tmp_path / 'speed')])
    saved = json.loads((tmp_path / 'speed.json').read_text())
    assert saved['rounds'] == result['rounds'] == 1
    for name in ('old', 'new'):
        (run,) = saved['runs'][name]
        assert Path(run['timm_cff']).resolve().is_relative_to(root) and run['threads'] == 1
        assert len(run['cff']['cpu_ms']) == len(run['bp']['wall_ms']) == 2
        assert saved[name]['cpu_ms']['cff']['n'] == 2 and saved[name]['wall_ms']['cff_over_bp']['median'] > 0
    assert '| old |' in (tmp_path / 'speed.md').read_text()


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc malloc settings')
def test_allocator_benchmark_runs_both_settings_on_the_same_arithmetic(tmp_path):
    _load_script('allocator').main(['--methods', 'bp', '--depth', '1', '--batch', '8', '--steps', '1',
                                    '--repeats', '1', '--threads', '1', '--out', str(tmp_path / 'alloc')])
    rows = json.loads((tmp_path / 'alloc.json').read_text())['rows']
    assert [r['setting'] for r in rows] == ['default', 'tuned'] and [r['applied'] for r in rows] == [False, True]
    assert rows[0]['weights_checksum'] == rows[1]['weights_checksum']
    assert '| bp | tuned |' in (tmp_path / 'alloc.md').read_text()
