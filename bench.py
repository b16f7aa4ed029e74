"""Benchmark training and sampling, beside what the machine can do.

    python bench.py                              # all three models
    python bench.py --models rowlstm --json      # one JSON object per model

Per model, at the sizes every implementation is compared at: train.py's step
(compile time, median time, images/s), its GFLOP/s (3x the forward FLOPs counted
from the layer shapes) as a fraction of this machine's dense fp32 matmul rate,
and the fast sampler's time for 64 images. Run it on an idle machine.
"""

import argparse
import json
import statistics
import time
import timeit

import jax
import jax.numpy as jnp
import numpy as np

import layers
import pixelrnn
import training

# The sizes every implementation is compared at (PERFORMANCE.md), and train.py's optimizer.
SIZES = {"rowlstm": dict(layers=7, hidden=16), "diagbilstm": dict(layers=7, hidden=16),
         "pixelcnn": dict(layers=15, hidden=16)}
RECIPE = dict(optimizer="adam", lr=1e-3, schedule="cosine", warmup=200, lr_floor=0.05, clip=1.0)
EMA = 0.9995
BATCH_SIZE = 64
WARM_UP_STEPS = 10
TIMED_STEPS = 10
SAMPLES = 64
INK = 0.13                # fraction of binarized MNIST pixels that are 1


def median_seconds(run, repeats):
    """Median wall time of ``run()`` (which must block until its result is ready)."""
    return statistics.median(timeit.repeat(run, number=1, repeat=repeats))


def matmul_gflops(size=2048):
    """Dense fp32 ``size x size`` matmul throughput of this machine."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size))
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()
    return 2 * size ** 3 / median_seconds(lambda: matmul(a, a).block_until_ready(), 10) / 1e9


def taps(kh, kw, mask_type="B"):
    """Kernel taps a masked ``kh x kw`` convolution computes (im2col skips the hidden ones)."""
    return int(layers.conv_mask((kh, kw, 1, 1), 1, mask_type).any(axis=(2, 3)).sum())


def forward_flops(cfg):
    """2 x the multiply-adds of one image's forward pass, from the layer shapes (the
    elementwise work, small next to the matrix products, left out)."""
    pixels, h, f = cfg.height * cfg.width, cfg.hidden, cfg.features
    input_layer = taps(7, 7, "A") * cfg.channels * f * pixels
    head = (f * cfg.out_hidden + cfg.out_hidden * cfg.channels * cfg.logits_per_channel) * pixels
    if cfg.model == "rowlstm":        # 1x3 input-to-state, 1x3 state-to-state, 1x1 output
        layer = (taps(1, 3) * f * 4 * h + 3 * h * 4 * h + h * f) * pixels
    elif cfg.model == "diagbilstm":   # per direction 1x1 input-to-state, 2x1 state-to-state
        skewed = cfg.height * (cfg.width + cfg.height - 1)
        layer = 2 * (f * 4 * h * pixels + 2 * h * 4 * h * skewed) + h * f * pixels
    else:                             # 1x1 down, 3x3, 1x1 up
        layer = (f * h + taps(3, 3) * h * h + h * f) * pixels
    return 2 * (input_layer + cfg.layers * layer + head)


def compiled(function, *args):
    """A jitted ``function`` compiled for ``args``, and the seconds compiling took."""
    start = time.perf_counter()
    return function.lower(*args).compile(), time.perf_counter() - start


def bench_training(cfg, batch_size):
    """``(compile seconds, seconds per step)`` of train.py's update with its defaults."""
    mesh = training.make_mesh(batch_size=batch_size)
    optimizer = training.make_optimizer(RECIPE, planned_steps=10_000)
    state = training.init_state(pixelrnn.init(jax.random.PRNGKey(0), cfg), optimizer)
    images = (np.random.default_rng(0).random((batch_size, cfg.height, cfg.width, 1)) < INK)
    images = training.put_batch(images.astype(np.uint8), mesh)
    step, compile_seconds = compiled(training.make_train_step(cfg, optimizer, mesh, EMA),
                                     state, images, 0)
    holder = [state]                                  # the step donates the state

    def one_step():
        holder[0], loss = step(holder[0], images, 1000)
        loss.block_until_ready()

    median_seconds(one_step, WARM_UP_STEPS)
    return compile_seconds, median_seconds(one_step, TIMED_STEPS)


def bench_model(model, batch_size, machine_gflops, sampling=True):
    """One row of figures for ``model`` at its ``SIZES``."""
    cfg = pixelrnn.Config(model=model, **SIZES[model])
    compile_seconds, step_seconds = bench_training(cfg, batch_size)
    flops, images_per_second = forward_flops(cfg), batch_size / step_seconds
    achieved = 3 * flops * images_per_second / 1e9
    row = {"model": model, "layers": cfg.layers, "hidden": cfg.hidden, "batch_size": batch_size,
           "devices": jax.device_count(), "train_compile_s": round(compile_seconds, 1),
           "train_step_ms": round(1000 * step_seconds, 1),
           "train_images_per_s": round(images_per_second, 1),
           "forward_mflops_per_image": round(flops / 1e6, 1), "train_gflops": round(achieved, 2),
           "fraction_of_matmul_peak": round(achieved / machine_gflops, 4)}
    if sampling:                      # the fast sampler
        params, key = pixelrnn.init(jax.random.PRNGKey(0), cfg), jax.random.PRNGKey(1)
        sample, seconds = compiled(jax.jit(pixelrnn.sample, static_argnums=(1, 3)),
                                   params, cfg, key, SAMPLES)
        row.update({f"sample_{SAMPLES}_compile_s": round(seconds, 1), f"sample_{SAMPLES}_s":
                    round(median_seconds(lambda: sample(params, key).block_until_ready(), 3), 2)})
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench.py", usage=argparse.SUPPRESS,
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=pixelrnn.MODELS, default=pixelrnn.MODELS)
    parser.add_argument("--batch-size", type=training.number(int, 1), default=BATCH_SIZE)
    parser.add_argument("--host-devices", type=training.number(int, 1),
                        default=training.HOST_DEVICES, help="as train.py's")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--no-sampling", dest="sampling", action="store_false",
                        help="time the train step only")
    args = parser.parse_args(argv)
    training.set_up_devices(args.host_devices)
    try:
        machine = matmul_gflops()
        rows = [bench_model(model, args.batch_size, machine, args.sampling)
                for model in args.models]
    except training.UserError as e:         # e.g. a batch size the devices cannot split
        parser.error(str(e))
    if args.json:
        print(json.dumps({"matmul_gflops": round(machine, 1)}))
        print("\n".join(json.dumps(row) for row in rows))
        return
    print(f"dense fp32 2048^2 matmul: {machine:.0f} GFLOP/s on {rows[0]['devices']} "
          f"{jax.devices()[0].platform} device(s)")
    for row in rows:
        print(", ".join(f"{key} {value}" for key, value in row.items()))


if __name__ == "__main__":
    main()
