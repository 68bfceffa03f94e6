"""The cost model's predictions for K GPUs: layer pipeline, data-parallel replicas and their 2-D mix.

    python benchmarks/pipeline_predict.py --gpus 2 4 8 --tflops 30 --bandwidth 100 20 --overhead-ms 0 1

Per-stage step times come from FLOP counts (``vit_stage_flops``) at an assumed sustained throughput per GPU, plus a
fixed overhead per stage-step (kernel launches and the optimizer step, which do not shrink with the batch).
Activations and gradients move over links of the given bandwidths (GB/s; e.g. NVLink and PCIe). Data-parallel
replicas split each global batch and sum each stage's gradients with a ring all-reduce. Every number here is a
prediction from these assumptions, not a measurement; see docs/scaling.md.
"""
import argparse

from cost import group_costs, ring_allreduce_time, simulate_pipeline, vit_stage_flops, vit_stage_params
from timm_cff.pipeline import balance_stages

#: name -> (embed_dim, depth, mlp_ratio, patch_size, tokens, images per epoch, global batch)
MODELS = {
    'ViT[240 6 7], CIFAR 32 px': (240, 7, 2, 4, 64, 45_000, 512),
    'ViT-S/16, ImageNet 224 px': (384, 12, 4, 16, 196, 1_281_167, 512),
}
VIEWS = 2
BYTES = 4  # float32, as the official recipe


def epoch_time(model: tuple, groups: int, replicas: int, flops_per_s: float, bandwidth: float,
               overhead: float) -> float:
    dim, depth, ratio, patch, tokens, images, batch = model
    num_batches = -(-images // batch)
    per_replica = VIEWS * batch / replicas  # images through each stage per step
    stage_costs = [f * per_replica / flops_per_s + overhead
                   for f in vit_stage_flops(dim, depth, tokens, ratio, patch)]
    counts = balance_stages(stage_costs, groups)
    transfer = per_replica * tokens * dim * BYTES / bandwidth
    grad_bytes = group_costs([p * BYTES for p in vit_stage_params(dim, depth, ratio, patch, tokens)], counts)
    reduces = [ring_allreduce_time(b, replicas, bandwidth) for b in grad_bytes]
    return simulate_pipeline(group_costs(stage_costs, counts), num_batches, [transfer] * (groups - 1), reduces)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--gpus', type=int, nargs='+', default=[2, 4, 8])
    p.add_argument('--tflops', type=float, default=30.0, help='sustained float32 TFLOP/s per GPU')
    p.add_argument('--bandwidth', type=float, nargs='+', default=[100.0, 20.0], help='GB/s per link')
    p.add_argument('--overhead-ms', type=float, nargs='+', default=[0.0, 1.0], help='fixed ms per stage-step')
    args = p.parse_args()
    flops_per_s = args.tflops * 1e12
    for name, model in MODELS.items():
        depth = model[1]
        print(f'\n{name}, batch {model[6]} x {VIEWS} views, {args.tflops:g} TFLOP/s per GPU')
        print('| GPUs | link GB/s | overhead ms | 1 GPU epoch (s) | pipeline K=GPUs | replicas R=GPUs | '
              'best K x R <= GPUs |')
        print('|---|---|---|---|---|---|---|')
        for overhead in args.overhead_ms:
            one_gpu = epoch_time(model, 1, 1, flops_per_s, 1.0, overhead / 1e3)
            for gpus in args.gpus:
                for bandwidth in args.bandwidth:
                    options = {(k, gpus // k): epoch_time(model, k, gpus // k, flops_per_s, bandwidth * 1e9,
                                                          overhead / 1e3)
                               for k in range(1, min(gpus, depth) + 1)}  # K x R <= GPUs; some may idle
                    k_max = min(gpus, depth)
                    pipeline = epoch_time(model, k_max, 1, flops_per_s, bandwidth * 1e9, overhead / 1e3)
                    (k, r), best = min(options.items(), key=lambda kv: kv[1])
                    print(f'| {gpus} | {bandwidth:g} | {overhead:g} | {one_gpu:.1f} | {one_gpu / pipeline:.2f}x '
                          f'(K={k_max}) | {one_gpu / options[(1, gpus)]:.2f}x | {k} x {r}: {one_gpu / best:.2f}x |')


if __name__ == '__main__':
    main()
