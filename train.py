"""Train a PixelRNN model by maximum likelihood.

    python train.py --model rowlstm                     # binarized MNIST -> runs/rowlstm-mnist/
    python train.py --model pixelcnn --dataset mnist256 --epochs 5
    python train.py --out runs/rowlstm-mnist --resume   # continue exactly where it stopped
    python train.py --dataset cifar10 --data-dir ~/cifar-10-batches-py

The run folder (``--out``, default ``runs/<model>-<dataset>``) holds

    config.json     the model config and the training settings
    checkpoint.npz  the latest state: parameters, optimizer state, step, RNG key,
                    data position and metrics (np.load(..., allow_pickle=False))
    best.npz        the same, from the step with the best validation NLL
    metrics.jsonl   one JSON line per epoch, and a last one with the test NLL
    samples.png     a grid of samples from the best parameters

Every file is replaced atomically. Ctrl-C saves a checkpoint and exits; with
``--resume`` training continues as if it had never stopped. Each batch is
split over all devices (every GPU of a node, or ``--host-devices`` CPU
devices), parameters are replicated; ``--distributed`` joins a multi-host job.
"""

import argparse
import contextlib
import ctypes
import dataclasses
import functools
import json
import math
import os
import pathlib
import signal
import sys
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

import data
import pixelrnn

# ---- defaults: edit them here or override them on the command line ----
MODEL = "rowlstm"
DATASET = "mnist"
LAYERS = {"rowlstm": 7, "diagbilstm": 7, "pixelcnn": 15}  # the paper's MNIST models
HIDDEN = 16            # rounded up to a multiple of 3 for RGB data (colour groups)
OUT_HIDDEN = 32        # likewise
BATCH_SIZE = 64
EPOCHS = 10
OPTIMIZER = "adam"     # or "rmsprop", as in the paper
LR = 1e-3
CLIP = 1.0             # clip the global gradient norm to this; 0 turns clipping off
SEED = 0
BINARIZE = "fresh"     # "fixed": one binarization of the training set (the paper's protocol)
EVAL_BATCH_SIZE = 256
NUM_SAMPLES = 16       # samples in samples.png
SAVE_EVERY = 500       # steps between checkpoints inside an epoch; 0: at epoch ends only
HOST_DEVICES = 2       # CPU only: split each batch over this many XLA devices, one per core

EXIT_DIVERGED, EXIT_USER_ERROR, EXIT_INTERRUPTED = 1, 2, 130

# The settings that define a run. They are saved with it; on --resume the
# ones not given come from the checkpoint and the ones given must match it.
MODEL_SETTINGS = ("model", "layers", "hidden", "out_hidden", "skip", "residual")
TRAIN_SETTINGS = ("dataset", "batch_size", "optimizer", "lr", "clip", "seed", "binarize",
                  "train_subset", "eval_subset")
DEFAULTS = dict(model=MODEL, skip=True, residual=True, dataset=DATASET, batch_size=BATCH_SIZE,
                optimizer=OPTIMIZER, lr=LR, clip=CLIP, seed=SEED, binarize=BINARIZE,
                train_subset=0, eval_subset=0)


class UserError(Exception):
    """A mistake in the command line, the data or the run folder: one line, exit code 2."""


class Diverged(Exception):
    """The training loss became NaN or infinite."""


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a mistake prints one line (no usage block) and exits with code 2."""

    def error(self, message):
        fail(message)


def fail(message, code=EXIT_USER_ERROR, label="error: ", program="train.py"):
    """Print ``message`` as a single line on stderr and exit with ``code``.

    sample.py and bench.py end their user errors here too, under their own name.
    """
    print(f"{program}: {label}{' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(code)


def number(kind, minimum, strict=False):
    """An argparse type: ``kind`` (int or float) that must be >= minimum (> if ``strict``)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if strict else '>='} {minimum}")
        return value
    return parse


def parse_args(argv=None):
    """The command line -> ``argparse.Namespace``. Run settings left out are None."""
    p = OneLineParser(description="Train a PixelRNN model (Row LSTM, Diagonal BiLSTM, PixelCNN).")
    add = p.add_argument
    add("--model", choices=pixelrnn.MODELS, help=f"default {MODEL}")
    add("--dataset", choices=data.DATASETS, help=f"default {DATASET}")
    add("--data-dir", help="folder with the dataset's files (default: the embedded data/)")
    add("--layers", type=number(int, 1), help="hidden layers (default 7 for the LSTMs, 15 for pixelcnn)")
    add("--hidden", type=number(int, 1), help=f"hidden size h (default {HIDDEN})")
    add("--out-hidden", type=number(int, 1), help=f"output head width (default {OUT_HIDDEN})")
    add("--skip", action=argparse.BooleanOptionalAction, help="skip connections (default on)")
    add("--residual", action=argparse.BooleanOptionalAction, help="residual connections (default on)")
    add("--batch-size", type=number(int, 1), help=f"global batch (default {BATCH_SIZE})")
    add("--optimizer", choices=("adam", "rmsprop"), help=f"default {OPTIMIZER}")
    add("--lr", type=number(float, 0, strict=True), help=f"learning rate (default {LR})")
    add("--clip", type=number(float, 0), help=f"gradient-norm clip, 0 for none (default {CLIP})")
    add("--seed", type=number(int, 0), help=f"default {SEED}")
    add("--binarize", choices=("fresh", "fixed"), help=f"binary data only (default {BINARIZE})")
    add("--train-subset", type=number(int, 0), help="train on the first N images only (0: all)")
    add("--eval-subset", type=number(int, 0), help="validate and test on the first N images only")
    add("--epochs", type=number(int, 1), default=EPOCHS, help=f"default {EPOCHS}")
    add("--max-steps", type=number(int, 0), default=0, help="stop after N steps in all (0: no limit)")
    add("--eval-batch-size", type=number(int, 1), default=EVAL_BATCH_SIZE,
        help=f"default {EVAL_BATCH_SIZE}")
    add("--num-samples", type=number(int, 0), default=NUM_SAMPLES,
        help=f"images in samples.png, 0 for none (default {NUM_SAMPLES})")
    add("--save-every", type=number(int, 0), default=SAVE_EVERY,
        help=f"steps between checkpoints inside an epoch, 0: epoch ends only (default {SAVE_EVERY})")
    add("--out", help="run folder (default runs/<model>-<dataset>)")
    add("--resume", action="store_true", help="continue the run in --out")
    add("--host-devices", type=number(int, 1), default=HOST_DEVICES,
        help=f"CPU only: split the batch over this many XLA devices (default {HOST_DEVICES}; "
             "XLA_FLAGS=--xla_force_host_platform_device_count=N takes precedence)")
    add("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)")
    return p.parse_args(argv)


def keep_freed_memory():
    """Make glibc's malloc keep freed memory for reuse instead of unmapping it.

    XLA:CPU allocates each step's scratch buffers (420 MB for a PixelCNN
    step at batch 64) with malloc from its worker threads, whose glibc
    arenas serve requests that size with a fresh ``mmap`` and unmap them on
    ``free``, so every step page-faulted all of it in again: about 100,000
    faults per PixelCNN step, 400,000 per Diagonal BiLSTM step (measured
    with ``getrusage``). One arena, no ``mmap`` and no trimming make the buffers
    stay mapped and get reused. Must run before JAX starts its threads; a
    no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8      # from glibc's malloc.h
    libc.mallopt(m_arena_max, 1)
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, -1)             # -1: never trim


def set_up_devices(args):
    """Join a multi-host job or split the CPU into host devices; tune malloc for XLA.

    Must run before JAX's first computation: XLA fixes its devices then.
    """
    keep_freed_memory()
    if args.distributed:
        jax.distributed.initialize()  # finds its peers through SLURM, Open MPI, TPU metadata, ...
    user_set = "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    if args.host_devices > 1 and not user_set:
        # Only the CPU backend is split; GPUs and TPUs are used as they are.
        jax.config.update("jax_num_cpu_devices", args.host_devices)


# ---------------------------------------------------------------------------
# Settings, data and model
# ---------------------------------------------------------------------------


def resolve_settings(args, saved):
    """The run's settings: the command line, else ``saved`` (a resumed run's), else the defaults."""
    given = {name: getattr(args, name) for name in MODEL_SETTINGS + TRAIN_SETTINGS
             if getattr(args, name) is not None}
    if saved is None:
        channels = data.DATASETS[given.get("dataset", DATASET)].channels

        def round_up(n):  # RGB features are split into three colour groups
            return -(-n // channels) * channels

        defaults = dict(DEFAULTS, layers=LAYERS[given.get("model", MODEL)],
                        hidden=round_up(HIDDEN), out_hidden=round_up(OUT_HIDDEN))
        return dict(defaults, **given)
    for name, value in given.items():
        if value != saved[name]:
            raise UserError(f"--{name.replace('_', '-')} {value} does not match the checkpoint "
                            f"({name}={saved[name]}); leave it out to continue the run")
    return saved


def load_data(settings, data_dir):
    """The dataset, cut to ``train_subset`` / ``eval_subset`` images when those are set."""
    ds = data.load_dataset(settings["dataset"], data_dir, settings["binarize"])
    n_train, n_eval = settings["train_subset"] or None, settings["eval_subset"] or None  # None: all
    ds = dataclasses.replace(ds, train=ds.train[:n_train], valid=ds.valid[:n_eval],
                             test=ds.test[:n_eval])
    if data.steps_per_epoch(ds, settings["batch_size"]) == 0:
        raise UserError(f"--batch-size {settings['batch_size']} is larger than the "
                        f"{len(ds.train)} training images")
    return ds


def make_config(settings, ds):
    """The model config for ``settings`` on images shaped like ``ds``'s."""
    height, width, channels = ds.shape
    try:
        return pixelrnn.Config(height=height, width=width, channels=channels, levels=ds.levels,
                               **{name: settings[name] for name in MODEL_SETTINGS})
    except ValueError as e:
        raise UserError(str(e)) from None


def make_optimizer(settings):
    """Adam (or RMSProp) after clipping the global gradient norm."""
    clip = optax.clip_by_global_norm(settings["clip"]) if settings["clip"] > 0 else optax.identity()
    update = {"adam": optax.adam, "rmsprop": optax.rmsprop}[settings["optimizer"]]
    return optax.chain(clip, update(settings["lr"]))


def nll_unit(cfg):
    """``(name, factor)``: NLL in nats per image times ``factor`` is in the reported unit.

    Binary data is reported in nats per image (as the paper's MNIST table),
    anything else in bits per dimension, ``nats / (H * W * C * ln 2)``.
    """
    if cfg.levels == 2:
        return "nats", 1.0
    return "bits/dim", 1.0 / (cfg.height * cfg.width * cfg.channels * math.log(2))


# ---------------------------------------------------------------------------
# Data parallelism: one jitted step over a 1-D mesh of all devices
# ---------------------------------------------------------------------------


def make_mesh(settings, eval_batch_size):
    """A 1-D ``data`` mesh over every device; both batch sizes must split evenly over it."""
    devices = jax.devices()
    for flag, size in (("--batch-size", settings["batch_size"]), ("--eval-batch-size", eval_batch_size)):
        if size % len(devices):
            raise UserError(f"{flag} {size} is not divisible by the {len(devices)} devices "
                            f"({devices[0].platform})")
    return Mesh(np.array(devices), ("data",))


def put_batch(images, mesh):
    """A global batch ``(B, H, W, C)`` (the same on every process) -> a jax.Array split
    along the mesh; each process hands over only the rows its own devices hold."""
    rows = len(images) // jax.process_count()
    local = images[jax.process_index() * rows:(jax.process_index() + 1) * rows]
    return jax.make_array_from_process_local_data(
        NamedSharding(mesh, PartitionSpec("data")), local, images.shape)


def make_train_step(cfg, optimizer, mesh):
    """The jitted update ``state, images -> state, loss``; ``state = {"params", "opt_state"}``.

    The loss is the mean NLL in nats per image. The images arrive split over
    the mesh; the results are replicated, so XLA sums the gradients across
    devices.
    """
    def loss_fn(params, images):
        return -jnp.mean(pixelrnn.log_prob(params, cfg, images))

    def train_step(state, images):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], images)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss

    return jax.jit(train_step, out_shardings=NamedSharding(mesh, PartitionSpec()), donate_argnums=0)


def make_evaluate(cfg, mesh, batch_size):
    """``evaluate(params, images) -> mean NLL`` in nats per image over all ``images``."""
    @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, PartitionSpec()))
    def nll_sum(params, images, count):
        nll = -pixelrnn.log_prob(params, cfg, images)
        return jnp.sum(jnp.where(jnp.arange(len(nll)) < count, nll, 0.0))  # drop the padding

    def evaluate(params, images):
        total = sum(float(nll_sum(params, put_batch(batch, mesh), count))
                    for batch, count in data.eval_batches(images, batch_size))
        return total / len(images)

    return evaluate


# ---------------------------------------------------------------------------
# Checkpoints: named arrays + a JSON record, no pickle
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Progress:
    """Where a run stands. Saved in every checkpoint, so a resumed run continues exactly."""
    step: int = 0            # optimizer steps taken
    epoch: int = 0           # the epoch being trained (0-based)
    index: int = 0           # batches of that epoch already trained on
    loss_sum: float = 0.0    # training losses (nats/image) summed since the last validation
    loss_count: int = 0
    best_valid: float = None  # best validation NLL (nats/image) and its step
    best_step: int = None
    metrics: list = dataclasses.field(default_factory=list)  # the lines of metrics.jsonl


def array_name(path):
    """A key path -> an array name in the checkpoint, e.g. ``params/layers/0/w``."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def flatten(tree):
    """A pytree -> ``{name: np.ndarray}``, named by the leaves' key paths."""
    return {array_name(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(arrays, template, source):
    """The inverse of :func:`flatten`: ``template``'s structure filled from ``arrays``.

    The template comes from the config (``init`` and the optimizer), so no
    tree structure needs storing. A missing name or another shape means the
    file was not written for this model: a ``UserError`` naming ``source``.
    """
    def take(path, like):
        name = array_name(path)
        if name not in arrays or arrays[name].shape != like.shape:
            raise UserError(f"{source} does not match the model config (array {name})")
        return arrays[name].astype(like.dtype)
    return jax.tree_util.tree_map_with_path(take, template)


def read_checkpoint(path):
    """``path`` -> ``(settings, config, progress, named arrays)``.

    Anything unreadable or incomplete is a ``UserError``.
    """
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
        meta = json.loads(str(arrays.pop("meta")))
        settings = {name: meta["settings"][name] for name in MODEL_SETTINGS + TRAIN_SETTINGS}
        return settings, pixelrnn.Config(**meta["config"]), Progress(**meta["progress"]), arrays
    except FileNotFoundError:
        raise UserError(f"no checkpoint to resume: {path} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None


def write_checkpoint(path, settings, cfg, progress, tree):
    """Save ``tree`` (parameters, optimizer state, RNG key) and the JSON record
    of the run to ``path``, atomically."""
    meta = {"settings": settings, "config": dataclasses.asdict(cfg),
            "progress": dataclasses.asdict(progress)}
    with data.atomic_write(path) as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **flatten(tree))


def write_text(path, text):
    """Replace ``path`` with ``text``, atomically."""
    with data.atomic_write(path) as f:
        f.write(text.encode())


def write_metrics(out, lines):
    """Rewrite ``metrics.jsonl`` (atomically, so a crash never leaves half a line)."""
    write_text(out / "metrics.jsonl", "".join(json.dumps(line) + "\n" for line in lines))


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def stop_on_sigint():
    """Turn the first Ctrl-C into a request, checked between steps, to save and stop.

    Stopping between steps keeps parameters, optimizer state and data position
    consistent. A second Ctrl-C interrupts at once, without saving.
    """
    stop = argparse.Namespace(requested=False)

    def handle(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclasses.dataclass
class Run:
    """Everything a training run holds, fixed once it has started (``progress`` and ``state`` change)."""
    args: argparse.Namespace
    out: pathlib.Path
    settings: dict
    cfg: pixelrnn.Config
    ds: data.Dataset
    mesh: Mesh
    optimizer: optax.GradientTransformation
    progress: Progress
    state: dict           # {"params", "opt_state"}, replicated over the mesh
    rng: jax.Array        # the key samples.png is drawn with
    is_main: bool         # process 0 writes the files

    def tree(self):
        """All the arrays a checkpoint holds."""
        return dict(self.state, rng=self.rng)

    def save(self, name="checkpoint.npz"):
        """Write the run's state to ``out/name`` (process 0 only)."""
        if self.is_main:
            write_checkpoint(self.out / name, self.settings, self.cfg, self.progress, self.tree())


def make_init(cfg, optimizer):
    """``init(key) -> {"params", "opt_state", "rng"}``: a new run's arrays.

    Jit it to run it (op by op, every initializer would compile on its own);
    ``jax.eval_shape`` it for the shapes a checkpoint must have.
    """
    def init(key):
        init_key, rng = jax.random.split(key)
        params = pixelrnn.init(init_key, cfg)
        return {"params": params, "opt_state": optimizer.init(params), "rng": rng}
    return init


def start_run(args):
    """Check everything the user gave, then set up a new or resumed run. Writes config.json."""
    out = pathlib.Path(args.out or f"runs/{args.model or MODEL}-{args.dataset or DATASET}")
    checkpoint = out / "checkpoint.npz"
    if not args.resume and checkpoint.exists():
        raise UserError(f"{out} already holds a run; pass --resume to continue it "
                        f"or choose another --out")
    saved, saved_cfg, progress, arrays = (read_checkpoint(checkpoint) if args.resume
                                          else (None, None, Progress(), None))
    settings = resolve_settings(args, saved)
    ds = load_data(settings, args.data_dir)
    cfg = make_config(settings, ds)
    if args.resume and saved_cfg != cfg:
        raise UserError(f"{checkpoint} was written for another model config: {saved_cfg}")
    mesh = make_mesh(settings, args.eval_batch_size)
    optimizer = make_optimizer(settings)
    init, key = make_init(cfg, optimizer), jax.random.PRNGKey(settings["seed"])
    if args.resume:
        tree = unflatten(arrays, jax.eval_shape(init, key), checkpoint)
    is_main = jax.process_index() == 0
    if is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            write_text(out / "config.json", json.dumps(
                {"config": dataclasses.asdict(cfg), "settings": settings}, indent=2) + "\n")
            write_metrics(out, progress.metrics)  # drop lines written after the checkpoint
        except OSError as e:
            raise UserError(f"cannot write to --out {out}: {e.strerror or e}") from None
    if not args.resume:
        tree = jax.jit(init)(key)
    state = jax.device_put({"params": tree["params"], "opt_state": tree["opt_state"]},
                           NamedSharding(mesh, PartitionSpec()))
    return Run(args, out, settings, cfg, ds, mesh, optimizer, progress, state, tree["rng"], is_main)


def train_epoch(run, train_step, stop, max_steps, clock):
    """Train from the current data position to the end of the epoch, ``max_steps`` or a stop request.

    ``clock`` accumulates the images and seconds of the steps for images/s,
    leaving out the process's first step (it includes compilation).
    """
    p, batch_size = run.progress, run.settings["batch_size"]
    total = data.steps_per_epoch(run.ds, batch_size)
    unit, factor = nll_unit(run.cfg)
    bar = tqdm(total=total * batch_size, initial=p.index * batch_size, unit="img",
               desc=f"epoch {p.epoch + 1}/{run.args.epochs}", disable=not run.is_main)
    batches = data.train_batches(run.ds, batch_size, run.settings["seed"], p.epoch, p.index)
    last = time.perf_counter() if clock.warm else None
    with bar:
        for index, images in batches:
            run.state, loss = train_step(run.state, put_batch(images, run.mesh))
            loss = float(loss)
            if not math.isfinite(loss):
                kept = run.out / "checkpoint.npz"
                raise Diverged(f"the training loss is {loss} at step {p.step + 1}; stopped without "
                               f"saving; the last good checkpoint is "
                               f"{kept if kept.exists() else 'none (none was saved yet)'}")
            now = time.perf_counter()
            if last is not None:
                clock.images, clock.seconds = clock.images + batch_size, clock.seconds + now - last
            last, clock.warm = now, True
            p.step, p.index = p.step + 1, index + 1
            p.loss_sum, p.loss_count = p.loss_sum + loss, p.loss_count + 1
            bar.update(batch_size)
            bar.set_postfix_str(f"loss {loss * factor:.4g} {unit}")
            if stop.requested or p.step >= max_steps:
                break
            if run.args.save_every and p.step % run.args.save_every == 0:
                run.save()


def validate(run, evaluate, clock):
    """Validation NLL after an epoch (or the last step): a metrics line, best.npz, checkpoint.npz."""
    p = run.progress
    unit, factor = nll_unit(run.cfg)
    valid = evaluate(run.state["params"], run.ds.valid)
    line = {"epoch": round(p.step / data.steps_per_epoch(run.ds, run.settings["batch_size"]), 4),
            "step": p.step, "unit": unit, "valid_nll": valid * factor,
            "train_loss": p.loss_sum / p.loss_count * factor if p.loss_count else None,
            "images_per_s": clock.images / clock.seconds if clock.seconds else None}
    p.metrics.append(line)
    p.loss_sum, p.loss_count = 0.0, 0
    clock.images, clock.seconds = 0, 0.0
    tqdm.write(f"step {p.step}: valid {line['valid_nll']:.4f} {unit}"
               + (f", train {line['train_loss']:.4f}" if line["train_loss"] is not None else "")
               + (f", {line['images_per_s']:.1f} images/s" if line["images_per_s"] else ""))
    if run.is_main:
        write_metrics(run.out, p.metrics)
    if p.best_valid is None or valid < p.best_valid:
        p.best_valid, p.best_step = valid, p.step
        run.save("best.npz")  # before checkpoint.npz: a checkpoint never names a best step not on disk
    run.save()


def finish(run, evaluate):
    """Test NLL and samples.png, both from the best parameters."""
    unit, factor = nll_unit(run.cfg)
    arrays = read_checkpoint(run.out / "best.npz")[-1]
    params = jax.device_put(unflatten(arrays, run.tree(), run.out / "best.npz")["params"],
                            NamedSharding(run.mesh, PartitionSpec()))
    test = evaluate(params, run.ds.test) * factor
    print(f"test NLL {test:.4f} {unit} (best validation at step {run.progress.best_step})")
    if run.is_main:
        write_metrics(run.out, run.progress.metrics + [
            {"step": run.progress.step, "best_step": run.progress.best_step, "unit": unit,
             "test_nll": test}])
    if run.args.num_samples:  # every process samples (the parameters live on all of them)
        start = time.perf_counter()
        sample = jax.jit(pixelrnn.sample, static_argnums=(1, 3))
        images = np.asarray(sample(params, run.cfg, run.rng, run.args.num_samples))
        if run.is_main:
            data.save_png(run.out / "samples.png", data.image_grid(images, run.cfg.levels))
            print(f"wrote {run.out / 'samples.png'} ({time.perf_counter() - start:.1f} s)")


def train(args):
    """Train until ``--epochs`` or ``--max-steps``; returns the exit code."""
    set_up_devices(args)
    with stop_on_sigint() as stop:
        run = start_run(args)
        devices = jax.devices()
        print(f"training {run.cfg.model} on {run.settings['dataset']}, {len(devices)} "
              f"{devices[0].platform} device{'s' if len(devices) > 1 else ''}, into {run.out}")
        train_step = make_train_step(run.cfg, run.optimizer, run.mesh)
        evaluate = make_evaluate(run.cfg, run.mesh, args.eval_batch_size)
        max_steps = args.max_steps or math.inf
        steps = data.steps_per_epoch(run.ds, run.settings["batch_size"])
        clock = argparse.Namespace(images=0, seconds=0.0, warm=False)
        p = run.progress
        while p.epoch < args.epochs and p.step < max_steps and not stop.requested:
            train_epoch(run, train_step, stop, max_steps, clock)
            if stop.requested:
                break
            if p.index == steps:
                p.epoch, p.index = p.epoch + 1, 0
            validate(run, evaluate, clock)
        if stop.requested:
            run.save()
            fail(f"interrupted at step {p.step}; saved {run.out / 'checkpoint.npz'}; "
                 f"continue with --resume", EXIT_INTERRUPTED, label="")
        finish(run, evaluate)
    return 0


def main(argv=None):
    """The command line entry point: user mistakes become one line on stderr and exit code 2;
    a diverged run exits with 1, an interrupted one with 130."""
    args = parse_args(argv)
    try:
        return train(args)
    except (UserError, data.DataError) as e:
        fail(e)
    except Diverged as e:
        fail(e, EXIT_DIVERGED)
    except KeyboardInterrupt:
        fail("interrupted again: stopped without saving", EXIT_INTERRUPTED, label="")


if __name__ == "__main__":
    sys.exit(main())
