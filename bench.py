"""Benchmark training and sampling speed, and put them beside what the machine can do.

    python bench.py                              # all three models, default sizes
    python bench.py --models rowlstm --json      # machine-readable, one JSON object per model
    python bench.py --processes 5 --no-sampling  # training only, medians over 5 fresh processes
    python bench.py --profile --no-sampling      # and where a train step's time goes, per op kind

For each model at its default size (7 layers h=16 for the LSTMs, 15 blocks
h=16 for PixelCNN), 28x28 binary images:

* train step: images/s (median over timed steps after a warm-up), compile time;
* forward FLOPs per image, counted from the layer shapes (the kernel taps
  that the masks leave, which are the ones computed), and the GFLOP/s
  achieved by a train step (taken as 3x the forward FLOPs);
* with ``--profile``: a ``jax.profiler`` trace of a few train steps, the
  time of XLA's operations summed per kind (``fusion.12`` and ``fusion.40``
  are both ``fusion``) over the devices' worker threads;
* sampling 64 images: the fast sampler (compile time apart) and the
  full-recompute reference, timed over its last sub-pixels and extrapolated
  (every reference step is one whole forward pass, so steps cost the same).

The machine's dense fp32 matmul GFLOP/s is measured in the same run, so each
figure also reads as a fraction of the machine. Run it on an otherwise idle
machine: the cores are shared.

On a shared virtual machine the figures move more from one process to the
next than between the timed steps of one process (PERFORMANCE.md has the
spreads measured). ``--processes N`` runs the whole benchmark in N fresh
processes, one after another, and reports each figure's median and the
range of images/s.
"""

import collections
import gzip
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import checkpoint
import layers
import pixelrnn
import training

MODELS = pixelrnn.MODELS
BATCH_SIZE = 64
TIMED_STEPS = 10
# Warm-up: until QUIET_STEPS steps in a row each fault in less than QUIET_FAULT_BYTES of fresh
# memory (see warm_up), at least MIN_WARM_UP_STEPS and at most MAX_WARM_UP_STEPS steps.
MIN_WARM_UP_STEPS = 3
MAX_WARM_UP_STEPS = 100
QUIET_STEPS = 5
QUIET_FAULT_BYTES = 4 << 20
SAMPLES = 64
REFERENCE_STEPS = 16      # reference-sampler steps actually timed, then extrapolated
INK = 0.13                # fraction of binarized MNIST pixels that are 1 (mean intensity 33.4 / 255)
PROFILED_STEPS = 5
PROFILE_ROWS = 12         # op kinds listed per model
# In a trace, XLA's threads are named tf_XLA...; of their events, the operations are
# those named like HLO instructions ("fusion.12", "all-reduce"), not the bookkeeping.
XLA_THREAD = "tf_XLA"
HLO_NAME = re.compile(r"[a-z][\w-]*(\.\d+)?")
PROGRAM = "bench.py"


def median_seconds(run, repeats):
    """Median wall time of ``run()`` (which must block until its result is ready)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def warm_up(run):
    """Call ``run()`` until the process's heap has reached its working size; return the calls.

    XLA:CPU mallocs a step's scratch memory as one block per device and frees
    it after the step. In a fresh process, small buffers that outlive a step
    fragment the freed blocks, so the heap grows block by block during the
    first tens of steps, and a step that faults in a fresh block runs at half
    speed or less (PERFORMANCE.md, "The slow mode"). Timing starts after
    ``QUIET_STEPS`` steps in a row that each fault in less than
    ``QUIET_FAULT_BYTES`` (minor page faults, from ``getrusage``); the warm-up
    lasts from ``MIN_WARM_UP_STEPS`` to ``MAX_WARM_UP_STEPS`` steps.
    """
    page = resource.getpagesize()
    calls = quiet = 0
    while calls < MAX_WARM_UP_STEPS and (calls < MIN_WARM_UP_STEPS or quiet < QUIET_STEPS):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        run()
        faulted = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * page
        quiet = quiet + 1 if faulted < QUIET_FAULT_BYTES else 0
        calls += 1
    return calls


def matmul_gflops(size=2048):
    """Dense fp32 ``size x size`` matmul throughput of this machine."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size))
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()
    return 2 * size ** 3 / median_seconds(lambda: matmul(a, a).block_until_ready(), 10) / 1e9


def taps(kh, kw, mask_type="B"):
    """Kernel taps a masked ``kh x kw`` convolution computes (``layers.im2col_conv`` skips the hidden ones)."""
    return int(layers.conv_mask((kh, kw, 1, 1), 1, mask_type).any(axis=(2, 3)).sum())


def forward_flops(cfg):
    """Multiply-adds x 2 of one image's forward pass, from the layer shapes.

    Only the kernel taps a mask leaves are counted: they are the ones
    computed. Elementwise work (gates, ReLUs, softmax) is left out: it is
    small next to the matrix products.
    """
    pixels = cfg.height * cfg.width
    h, f = cfg.hidden, cfg.features
    input_layer = taps(7, 7, "A") * cfg.channels * f * pixels
    head = (f * cfg.out_hidden + cfg.out_hidden * cfg.channels * cfg.logits_per_channel) * pixels
    if cfg.model == "rowlstm":        # 1x3 input-to-state, 1x3 state-to-state, 1x1 output
        layer = (taps(1, 3) * f * 4 * h + 3 * h * 4 * h + h * f) * pixels
    elif cfg.model == "diagbilstm":   # per direction: 1x1 input-to-state, 2x1 state-to-state on the skewed map
        skewed = cfg.height * (cfg.width + cfg.height - 1)
        layer = 2 * (f * 4 * h * pixels + 2 * h * 4 * h * skewed) + h * f * pixels
    else:                             # 1x1 down, 3x3, 1x1 up
        layer = (f * h + taps(3, 3) * h * h + h * f) * pixels
    return 2 * (input_layer + cfg.layers * layer + head)


def bench_training(cfg, batch_size, profile=False):
    """``(compile seconds, warm-up steps, images per second, profile)`` of train.py's own
    update step, with its defaults, timed after :func:`warm_up`; ``profile`` is
    :func:`profile_steps`'s table, or None."""
    mesh = training.make_mesh(batch_size, batch_size)
    optimizer = training.make_optimizer(training.DEFAULTS, planned_steps=10_000)
    state = training.init_state(pixelrnn.init(jax.random.PRNGKey(0), cfg), optimizer)
    rng = np.random.default_rng(0)
    images = (rng.random((batch_size, cfg.height, cfg.width, 1)) < INK).astype(np.int32)
    images = training.put_batch(images, mesh)
    train_step = training.make_train_step(cfg, optimizer, mesh, training.DEFAULTS["ema"])

    start = time.perf_counter()
    step = train_step.lower(state, images, 0).compile()
    compile_seconds = time.perf_counter() - start

    holder = [state]                                  # keeps the state alive for donation

    def one_step():
        holder[0], loss = step(holder[0], images, 1000)
        loss.block_until_ready()

    warm_up_steps = warm_up(one_step)
    images_per_second = batch_size / median_seconds(one_step, TIMED_STEPS)
    return (compile_seconds, warm_up_steps, images_per_second,
            profile_steps(one_step) if profile else None)


def profile_steps(one_step, steps=PROFILED_STEPS):
    """Where ``steps`` calls of ``one_step`` spend their time, from a ``jax.profiler`` trace.

    Returns ``[(op kind, ms per step, share), ...]``, largest first: each
    operation's duration on XLA's threads, summed over the devices
    and grouped by its name without the numeric suffix; the operations of a
    scan's body are counted on their own, marked "(in a scan)". Shares are
    of the summed op time; where devices wait for each other (all-reduce)
    the wait counts as that op's time.
    """
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(steps):
                one_step()
        [trace_file] = Path(folder).rglob("*.trace.json.gz")
        events = json.loads(gzip.decompress(trace_file.read_bytes()))["traceEvents"]
    xla = {(e["pid"], e["tid"]) for e in events
           if e.get("name") == "thread_name" and e["args"]["name"].startswith(XLA_THREAD)}
    ops = sorted((e for e in events if e.get("ph") == "X" and (e["pid"], e["tid"]) in xla
                  and HLO_NAME.fullmatch(e["name"])), key=lambda e: (e["tid"], e["ts"]))
    per_kind, outer, loop = collections.Counter(), None, None

    def inside(e, around):
        return around and e["tid"] == around["tid"] and e["ts"] < around["ts"] + around["dur"]

    for e in ops:
        if e["name"].startswith("while"):      # a scan: count the ops of its body instead
            loop = e
            continue
        if inside(e, outer):        # inside another op (the rendezvous of an all-reduce): part of it
            continue
        outer = e
        kind = re.sub(r"\.\d+$", "", e["name"])
        per_kind[f"{kind} (in a scan)" if inside(e, loop) else kind] += e["dur"] / 1000 / steps
    total = sum(per_kind.values())
    return [(kind, ms, ms / total) for kind, ms in per_kind.most_common()]


def bench_sampling(cfg, num):
    """Fast sampler ``(compile s, run s)`` and the reference sampler's extrapolated run time."""
    params = pixelrnn.init(jax.random.PRNGKey(0), cfg)
    key = jax.random.PRNGKey(1)

    start = time.perf_counter()
    fast = jax.jit(pixelrnn.sample, static_argnums=(1, 3)).lower(params, cfg, key, num).compile()
    compile_seconds = time.perf_counter() - start
    fast_seconds = median_seconds(lambda: fast(params, key).block_until_ready(), 3)

    total_steps = cfg.height * cfg.width * cfg.channels
    canvas = jnp.zeros((num, cfg.height, cfg.width, cfg.channels), jnp.int32)
    last_steps = jax.jit(lambda p, k, c: pixelrnn.fill_reference(p, cfg, k, c, total_steps - REFERENCE_STEPS))
    last_steps(params, key, canvas).block_until_ready()
    per_step = median_seconds(lambda: last_steps(params, key, canvas).block_until_ready(), 3) / REFERENCE_STEPS
    return compile_seconds, fast_seconds, per_step * total_steps


def bench_model(model, batch_size, machine_gflops, sampling=True, profile=False):
    cfg = pixelrnn.Config(model=model)
    compile_seconds, warm_up_steps, images_per_second, op_times = bench_training(cfg, batch_size,
                                                                                   profile)
    flops = forward_flops(cfg)
    achieved = 3 * flops * images_per_second / 1e9
    row = {
        "model": model, "layers": cfg.layers, "hidden": cfg.hidden, "batch_size": batch_size,
        "devices": jax.device_count(),
        "train_images_per_s": round(images_per_second, 1),
        "train_compile_s": round(compile_seconds, 1),
        "train_warm_up_steps": warm_up_steps,
        "forward_mflops_per_image": round(flops / 1e6, 1),
        "train_gflops": round(achieved, 2),
        "fraction_of_matmul_peak": round(achieved / machine_gflops, 4),
    }
    if op_times:
        row["profile_ms_per_step"] = [[kind, round(ms, 3), round(share, 4)] for kind, ms, share in op_times]
    if sampling:
        sample_compile, sample_fast, sample_reference = bench_sampling(cfg, SAMPLES)
        row.update({
            f"sample_{SAMPLES}_fast_s": round(sample_fast, 2),
            f"sample_{SAMPLES}_fast_compile_s": round(sample_compile, 1),
            f"sample_{SAMPLES}_reference_s": round(sample_reference, 1),
            "sampling_speedup": round(sample_reference / sample_fast, 1),
        })
    return row


def median_rows(runs):
    """Per-model medians of several runs' rows, plus the range of images/s.

    ``runs`` holds one list of rows (as :func:`bench_model` returns) per
    process. Measured figures become their median; ``train_images_per_s_range`` is
    ``[lowest, highest]`` and ``processes`` the number of runs.
    """
    def median(values):    # settings (model, layers, devices, ...) are the same in every run
        return values[0] if len(set(values)) == 1 else round(statistics.median(values), 4)

    medians = []
    for model_rows in zip(*runs):
        row = {key: median([r[key] for r in model_rows]) for key in model_rows[0]}
        speeds = [r["train_images_per_s"] for r in model_rows]
        medians.append(dict(row, train_images_per_s_range=[min(speeds), max(speeds)],
                            processes=len(model_rows)))
    return medians


def bench_in_processes(args):
    """``(matmul GFLOP/s, rows)``: medians of ``args.processes`` fresh ``bench.py --json`` runs."""
    command = [sys.executable, __file__, "--json", "--models", *args.models,
               "--batch-size", str(args.batch_size), "--host-devices", str(args.host_devices)]
    if not args.sampling:
        command.append("--no-sampling")
    machine, runs = [], []
    for _ in range(args.processes):
        # stderr goes straight through, so a failing child's own error is what the user reads.
        child = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        if child.returncode:
            sys.exit(child.returncode)
        objects = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
        machine.append(objects[0]["matmul_gflops"])
        runs.append(objects[1:])
    return statistics.median(machine), median_rows(runs)


def print_table(machine_gflops, rows):
    print(f"dense fp32 2048^2 matmul: {machine_gflops:.0f} GFLOP/s on {rows[0]['devices']} "
          f"{jax.devices()[0].platform} device(s)")
    print(f"{'model':<11}{'img/s':>8}{'compile':>9}{'warm-up':>8}{'MFLOP/img':>11}{'GFLOP/s':>9}"
          f"{'%peak':>7}{'sample64':>10}{'(compile)':>10}{'reference':>11}{'speedup':>9}")
    for r in rows:
        sampling = (f"{r['sample_64_fast_s']:>9.2f}s{r['sample_64_fast_compile_s']:>9.1f}s"
                    f"{r['sample_64_reference_s']:>10.1f}s{r['sampling_speedup']:>8.0f}x"
                    if "sampling_speedup" in r else f"{'-':>10}{'-':>10}{'-':>11}{'-':>9}")
        print(f"{r['model']:<11}{r['train_images_per_s']:>8.1f}{r['train_compile_s']:>8.1f}s"
              f"{r['train_warm_up_steps']:>8.0f}{r['forward_mflops_per_image']:>11.1f}"
              f"{r['train_gflops']:>9.1f}{100 * r['fraction_of_matmul_peak']:>6.1f}%{sampling}")
    for r in rows:
        if "profile_ms_per_step" in r:
            print_profile(r["model"], r["devices"], r["profile_ms_per_step"])
    if "processes" in rows[0]:
        print(f"medians of {rows[0]['processes']} processes; img/s ranged over "
              + ", ".join(f"{r['model']} {r['train_images_per_s_range'][0]:.1f}-"
                          f"{r['train_images_per_s_range'][1]:.1f}" for r in rows))


def print_profile(model, devices, op_times, rows=PROFILE_ROWS):
    print(f"{model}: time per train step by op kind, summed over {devices} device(s)")
    for kind, ms, share in op_times[:rows]:
        print(f"  {kind:<52}{ms:>9.2f} ms{100 * share:>6.1f}%")
    rest = op_times[rows:]
    if rest:
        print(f"  {f'{len(rest)} other kinds':<52}{sum(ms for _, ms, _ in rest):>9.2f} ms"
              f"{100 * sum(share for *_, share in rest):>6.1f}%")


def main(argv=None):
    parser = checkpoint.OneLineParser(prog=PROGRAM, description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--batch-size", type=checkpoint.number(int, 1), default=BATCH_SIZE)
    parser.add_argument("--host-devices", type=checkpoint.number(int, 1),
                        default=training.HOST_DEVICES,
                        help="CPU devices to split the batch over, as train.py does")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")
    parser.add_argument("--no-sampling", dest="sampling", action="store_false",
                        help="time the train step only")
    parser.add_argument("--processes", type=checkpoint.number(int, 1), default=1,
                        help="run in this many fresh processes, one after another; report medians")
    parser.add_argument("--profile", action="store_true",
                        help=f"also trace {PROFILED_STEPS} train steps and list their time per op kind")
    args = parser.parse_args(argv)
    if args.profile and args.processes > 1:
        parser.error("--profile traces one process: leave out --processes")

    if args.processes > 1:
        machine_gflops, rows = bench_in_processes(args)
    else:
        training.set_up_devices(args.host_devices)
        machine_gflops = matmul_gflops()
        rows = [bench_model(model, args.batch_size, machine_gflops, args.sampling, args.profile)
                for model in args.models]
    if args.json:
        print(json.dumps({"matmul_gflops": round(machine_gflops, 1)}))
        for row in rows:
            print(json.dumps(row))
    else:
        print_table(machine_gflops, rows)


if __name__ == "__main__":
    try:
        main()
    except checkpoint.UserError as e:         # e.g. a batch size the devices cannot split
        checkpoint.fail(e, PROGRAM)
