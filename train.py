"""Train a PixelRNN model by maximum likelihood.

    python train.py --model pixelcnn --max-steps 50     # a one-minute smoke run
    python train.py --model rowlstm                     # binarized MNIST -> runs/rowlstm-mnist/
    python train.py --model pixelcnn --dataset mnist256 --epochs 5
    python train.py --out runs/rowlstm-mnist --resume   # continue exactly where it stopped
    python train.py --init-from runs/rowlstm-mnist/best.npz --batch-size 64 --out runs/b64
                                                        # a new run from those parameters
    python train.py --dataset cifar10 --data-dir ~/cifar-10-batches-py

The run folder (``--out``, default ``runs/<model>-<dataset>``) holds

    config.json     the model config, the training settings and the target
    checkpoint.npz  the latest state: parameters, their moving average, optimizer
                    state, step, RNG key, data position, target and metrics
                    (see checkpoint.py)
    best.npz        the averaged parameters of the best validation NLL; once the
                    run is tested, with its whole record (what weights/ ships)
    metrics.jsonl   one JSON line per validation, and one with the test NLL (after
                    --init-from, the validation lines of the run started from come first)
    curve.svg       validation NLL and training loss against images seen
    samples.png     a grid of samples from the best averaged parameters

Every file is replaced atomically. Ctrl-C saves a checkpoint and exits; with
``--resume`` training continues as if it had never stopped, to the run's own
``--epochs`` / ``--max-steps`` unless new ones are given; ``--init-from``
instead starts a new run (another batch size, learning rate or schedule)
from a checkpoint's averaged parameters, and carries its record on. Each
batch is split over all devices (every GPU of a node, or ``--host-devices``
CPU devices), parameters are replicated; ``--distributed`` joins a
multi-process job.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import pathlib
import signal
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

import checkpoint
import data
import pixelrnn
import training
from checkpoint import Progress, UserError

# ---- defaults of this script: edit them here or override them on the command line ----
# (The model's sizes default in pixelrnn.Config, the run's settings in training.DEFAULTS.)
EPOCHS = 10
EVAL_BATCH_SIZE = 256
NUM_SAMPLES = 16       # samples in samples.png
SAVE_EVERY = 500       # steps between checkpoints inside an epoch; 0: at epoch ends only
LOSS_WINDOW = 50       # the training loss shown is the mean over this many recent steps

EXIT_DIVERGED, EXIT_INTERRUPTED = 1, 130
# Test NLL in nats of the paper's MNIST models (Table 4), drawn in curve.svg.
PAPER_MNIST_NLL = {"rowlstm": 80.54, "diagbilstm": 79.20, "pixelcnn": 81.30}
PROGRAM = "train.py"

# The settings that define a run. They are saved with it; on --resume the
# ones not given come from the checkpoint and the ones given must match it.
MODEL_SETTINGS = ("model", "layers", "hidden", "out_hidden", "skip", "residual")
RUN_SETTINGS = MODEL_SETTINGS + tuple(training.DEFAULTS)


class Diverged(Exception):
    """The training loss became NaN or infinite."""


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_args(argv=None):
    """The command line -> ``argparse.Namespace``. Run settings left out are None."""
    p = checkpoint.OneLineParser(
        prog=PROGRAM, description="Train a PixelRNN model (Row LSTM, Diagonal BiLSTM, PixelCNN).")
    add, number, d = p.add_argument, checkpoint.number, training.DEFAULTS
    add("--model", choices=pixelrnn.MODELS, help=f"default {pixelrnn.Config.model}")
    add("--dataset", choices=data.DATASETS, help=f"default {d['dataset']}")
    add("--data-dir", help="folder with the dataset's files (mnist, mnist256: default the "
                           "embedded data/; cifar10, idx, idx-binary: required)")
    add("--layers", type=number(int, 1), help="hidden layers (default: the paper's, 7 for the "
                                              "LSTMs, 15 for pixelcnn)")
    add("--hidden", type=number(int, 1), help=f"hidden size h (default {pixelrnn.HIDDEN}, "
                                              f"rounded up to a multiple of 3 for RGB)")
    add("--out-hidden", type=number(int, 1), help=f"output head width (default {pixelrnn.OUT_HIDDEN})")
    add("--skip", action=argparse.BooleanOptionalAction, help="skip connections (default on)")
    add("--residual", action=argparse.BooleanOptionalAction, help="residual connections (default on)")
    add("--batch-size", type=number(int, 1), help=f"global batch (default {d['batch_size']})")
    add("--optimizer", choices=("adam", "rmsprop"), help=f"default {d['optimizer']}")
    add("--lr", type=number(float, 0, strict=True), help=f"peak learning rate (default {d['lr']})")
    add("--schedule", choices=training.SCHEDULES,
        help=f"after the warm-up, decay the learning rate to lr * --lr-floor by the end of "
             f"--epochs (a new --epochs on --resume stretches or shrinks the whole curve, so the "
             f"rate jumps to the new curve's value at the current step); default {d['schedule']}")
    add("--warmup", type=number(int, 0), help=f"steps of linear warm-up (default {d['warmup']})")
    add("--lr-floor", type=number(float, 0),
        help=f"the final learning rate as a fraction of --lr (default {d['lr_floor']})")
    add("--ema", type=number(float, 0),
        help=f"decay of the parameters' moving average that validation, test, best.npz and "
             f"samples use; 0: no averaging (default {d['ema']})")
    add("--clip", type=number(float, 0), help=f"gradient-norm clip, 0 for none (default {d['clip']})")
    add("--seed", type=number(int, 0), help=f"default {d['seed']}")
    add("--binarize", choices=("fresh", "fixed"),
        help=f"binary datasets only: a new binarization of every training batch, or one fixed "
             f"one (default {d['binarize']})")
    add("--train-subset", type=number(int, 0), help="train on the first N images only (0: all)")
    add("--eval-subset", type=number(int, 0), help="validate and test on the first N images only")
    add("--epochs", type=number(int, 1),
        help=f"train until this many epochs (default {EPOCHS}; on --resume: the run's own)")
    add("--max-steps", type=number(int, 0),
        help="stop after N steps in all, 0: no limit; the schedule still plans for --epochs "
             "(default 0; on --resume: the run's own)")
    add("--eval-batch-size", type=number(int, 1), default=EVAL_BATCH_SIZE,
        help=f"default {EVAL_BATCH_SIZE}")
    add("--num-samples", type=number(int, 0), default=NUM_SAMPLES,
        help=f"images in samples.png, 0 for none (default {NUM_SAMPLES})")
    add("--save-every", type=number(int, 0), default=SAVE_EVERY,
        help=f"steps between checkpoints inside an epoch, 0: epoch ends only (default {SAVE_EVERY})")
    add("--out", help="run folder (default runs/<model>-<dataset>)")
    add("--resume", action="store_true", help="continue the run in --out")
    add("--init-from", type=pathlib.Path, metavar="CHECKPOINT",
        help="start a new run from CHECKPOINT's averaged parameters (e.g. to go on with another "
             "--batch-size or --lr): its model and dataset, and its training settings unless "
             "given; the optimizer state and the schedule start afresh, the record carries on")
    add("--evaluate", type=pathlib.Path, metavar="CHECKPOINT",
        help="train nothing: score CHECKPOINT's averaged parameters on the validation and test "
             "sets of its run's dataset, with standard errors")
    add("--test-seed", type=number(int, 0),
        help="--evaluate: score a test set binarized with this seed instead of the pinned one")
    add("--host-devices", type=number(int, 1), default=training.HOST_DEVICES,
        help=f"CPU only: split the batch over this many XLA devices (default "
             f"{training.HOST_DEVICES}; XLA_FLAGS=--xla_force_host_platform_device_count=N "
             f"takes precedence)")
    add("--distributed", action="store_true",
        help="join a multi-process job (several hosts): see --coordinator")
    add("--coordinator", help="--distributed: HOST:PORT of process 0 (default: "
                              "JAX_COORDINATOR_ADDRESS, or found under SLURM / Open MPI)")
    add("--num-processes", type=number(int, 1), help="--distributed: processes in the job")
    add("--process-id", type=number(int, 0), help="--distributed: this process's id, 0 to N-1")
    add("--coordinator-timeout", type=number(int, 1), default=300,
        help="--distributed: seconds to wait for the other processes (default 300)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# Settings, target, data and model
# ---------------------------------------------------------------------------


def resolve_settings(args, saved, source=None):
    """The run's settings: the command line, else ``saved`` (a resumed run's), else the defaults.

    A run started ``--init-from`` a checkpoint takes its settings from ``source`` (that
    checkpoint's) where the command line gives none; its model and dataset must stay.
    The model's sizes left out stay None here: :func:`make_config` fills them.
    """
    given = {name: getattr(args, name) for name in RUN_SETTINGS if getattr(args, name) is not None}
    if saved is None and source is None:
        model_defaults = {name: getattr(pixelrnn.Config, name) for name in MODEL_SETTINGS}
        return {**training.DEFAULTS, **model_defaults, **given}
    if saved is None:
        for name in MODEL_SETTINGS + ("dataset",):
            if name in given and given[name] != source[name]:
                raise UserError(f"--{name.replace('_', '-')} {given[name]} does not match "
                                f"{args.init_from} ({name}={source[name]}); --init-from keeps "
                                f"the model and the dataset of the checkpoint it starts from")
        return {**source, **given}
    for name, value in given.items():
        if value != saved[name]:
            raise UserError(f"--{name.replace('_', '-')} {value} does not match the checkpoint "
                            f"({name}={saved[name]}); leave it out to continue the run")
    return saved


def resolve_target(args, saved):
    """``{"epochs", "max_steps"}``: where the run stops.

    A new run takes the command line's, else the defaults. A resumed run
    keeps its own unless new ones are given: ``--epochs E`` alone trains to
    E epochs (lifting an earlier ``--max-steps`` cap); ``--max-steps S``
    alone keeps the run's epochs and caps them at S steps.
    """
    if saved is None:
        return {"epochs": args.epochs or EPOCHS, "max_steps": args.max_steps or 0}
    if args.epochs is not None:
        return {"epochs": args.epochs, "max_steps": args.max_steps or 0}
    return dict(saved, max_steps=saved["max_steps"] if args.max_steps is None else args.max_steps)


def target_steps(target, steps_per_epoch):
    """The step at which a run with ``target`` stops."""
    return min(target["epochs"] * steps_per_epoch, target["max_steps"] or math.inf)


def planned_steps(target, steps_per_epoch):
    """The length the learning-rate schedule plans for: ``--epochs``, whatever ``--max-steps``
    cuts off, so that a run stopped early and resumed follows the same schedule."""
    return target["epochs"] * steps_per_epoch


def describe_target(target, steps_per_epoch):
    """E.g. ``"7810 steps (10 epochs)"`` or ``"50 steps (--max-steps)"``."""
    steps = target_steps(target, steps_per_epoch)
    if steps < target["epochs"] * steps_per_epoch:
        return f"{steps} steps (--max-steps)"
    return f"{steps} steps ({target['epochs']} epoch{'s' if target['epochs'] > 1 else ''})"


def load_data(settings, data_dir, binarize_given):
    """The dataset, cut to ``train_subset`` / ``eval_subset`` images when those are set."""
    if binarize_given and data.DATASETS[settings["dataset"]].levels != 2:
        raise UserError(f"--binarize is for binary datasets (mnist, idx-binary), "
                        f"not {settings['dataset']}")
    ds = data.load_dataset(settings["dataset"], data_dir, settings["binarize"])
    n_train, n_eval = settings["train_subset"] or None, settings["eval_subset"] or None  # None: all
    ds = dataclasses.replace(ds, train=ds.train[:n_train], valid=ds.valid[:n_eval],
                             test=ds.test[:n_eval])
    if data.steps_per_epoch(ds, settings["batch_size"]) == 0:
        raise UserError(f"--batch-size {settings['batch_size']} is larger than the "
                        f"{len(ds.train)} training images")
    return ds


def make_config(settings, ds):
    """The model config for ``settings`` on images shaped like ``ds``'s; fills the
    sizes left out into ``settings``, so that the run saves what it used."""
    height, width, channels = ds.shape
    try:
        cfg = pixelrnn.Config(height=height, width=width, channels=channels, levels=ds.levels,
                              **{name: settings[name] for name in MODEL_SETTINGS})
    except ValueError as e:
        raise UserError(str(e)) from None
    settings.update({name: getattr(cfg, name) for name in MODEL_SETTINGS})
    return cfg


def nll_unit(cfg):
    """``(name, factor)``: NLL in nats per image times ``factor`` is in the reported unit.

    Binary data is reported in nats per image (as the paper's MNIST table),
    anything else in bits per dimension, ``nats / (H * W * C * ln 2)``.
    """
    if cfg.levels == 2:
        return "nats", 1.0
    return "bits/dim", 1.0 / (cfg.height * cfg.width * cfg.channels * math.log(2))


# ---------------------------------------------------------------------------
# Files of the run folder
# ---------------------------------------------------------------------------


def write_text(path, text):
    """Replace ``path`` with ``text``, atomically."""
    with data.atomic_write(path) as f:
        f.write(text.encode())


def write_record(out, lines, cfg, dataset):
    """Rewrite ``metrics.jsonl`` from the run's metrics ``lines`` and ``curve.svg`` beside it
    (each atomically, so a crash never leaves half a line)."""
    write_text(out / "metrics.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    default_sizes = cfg == pixelrnn.Config(model=cfg.model)
    paper = PAPER_MNIST_NLL[cfg.model] if dataset == "mnist" and default_sizes else None
    write_text(out / "curve.svg", curve_svg(lines, nll_unit(cfg)[0], paper))


def curve_svg(lines, unit, paper=None):
    """An SVG chart of a run's validation NLL and training loss (in ``unit``) against
    images seen: one point per validation line, the paper's figure as a dashed line.

    Plain SVG text, no plotting library: it opens in any browser and on GitHub.
    """
    width, height, left, right, top, bottom = 640, 400, 70, 150, 20, 50
    series = {"validation NLL": [(m["images"], m["valid_nll"]) for m in lines if "valid_nll" in m],
              "training loss": [(m["images"], m["train_loss"]) for m in lines
                                if m.get("train_loss") is not None]}
    colours = {"validation NLL": "#1f77b4", "training loss": "#ff7f0e"}
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points] + ([paper] if paper else [])
    x_max = max(xs + [1])
    y_low, y_high = (min(ys), max(ys)) if ys else (0.0, 1.0)
    pad = 0.05 * (y_high - y_low) or 1.0        # keep the extremes (and the paper's line) off the axes
    y_low, y_high = y_low - pad, y_high + pad

    def px(x):
        return left + (width - left - right) * x / x_max

    def py(y):
        return top + (height - top - bottom) * (y_high - y) / (y_high - y_low)

    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<polyline points="{px(0)},{py(y_high)} {px(0)},{py(y_low)} {px(x_max)},{py(y_low)}" '
           f'fill="none" stroke="black"/>',
           f'<text x="{(left + width - right) / 2}" y="{height - 10}" text-anchor="middle">'
           f'training images seen</text>',
           f'<text transform="translate(16,{(top + height - bottom) / 2}) rotate(-90)" '
           f'text-anchor="middle">NLL ({unit})</text>']
    for fraction in (0, 0.5, 1):                 # ticks at both ends and the middle
        x, y = x_max * fraction, y_low + (y_high - y_low) * fraction
        svg += [f'<text x="{px(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">{x:,.0f}</text>',
                f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>']
    legend = [(f"paper: {paper}", "gray")] if paper else []
    if paper:
        svg.append(f'<line class="paper" x1="{px(0)}" y1="{py(paper):.1f}" x2="{px(x_max)}" '
                   f'y2="{py(paper):.1f}" stroke="gray" stroke-dasharray="6,4"/>')
    for name, points in series.items():
        kind, colour = name.split()[0], colours[name]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        svg.append(f'<polyline class="{kind}" points="{path}" fill="none" stroke="{colour}"/>')
        svg += [f'<circle class="{kind}" cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}"/>'
                for x, y in points]
        legend.append((name, colour))
    svg += [f'<text x="{width - right + 8}" y="{top + 10 + 18 * i}" fill="{colour}">{text}</text>'
            for i, (text, colour) in enumerate(legend)]
    return "\n".join(svg + ["</svg>"]) + "\n"


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


class StopRequest:
    """Set by the first Ctrl-C; the training loop checks it between steps."""
    requested = False


@contextlib.contextmanager
def stop_on_sigint():
    """Turn the first Ctrl-C into a request, checked between steps, to save and stop.

    Stopping between steps keeps parameters, optimizer state and data position
    consistent. A second Ctrl-C interrupts at once, without saving.
    """
    stop = StopRequest()

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
class Throughput:
    """Images and seconds of the training steps since the last validation, for images/s.

    The process's first step is left out: it includes compilation.
    """
    images: int = 0
    seconds: float = 0.0
    last: float = None         # when the previous step ended; None before the first

    def step_done(self, images):
        """Count a step of ``images`` that ended now; returns its seconds (0 for the first)."""
        now, last = time.perf_counter(), self.last
        self.last = now
        if last is None:
            return 0.0
        self.images, self.seconds = self.images + images, self.seconds + now - last
        return now - last

    def per_second(self):
        return self.images / self.seconds if self.seconds else None

    def restart(self):
        """Start a new count; the next step's time runs from now (validation excluded)."""
        self.images, self.seconds = 0, 0.0
        if self.last is not None:
            self.last = time.perf_counter()


@dataclasses.dataclass
class Run:
    """Everything a training run holds; ``progress``, ``state`` and ``best_params`` change."""
    args: argparse.Namespace
    out: pathlib.Path
    settings: dict
    target: dict
    cfg: pixelrnn.Config
    ds: data.Dataset
    mesh: jax.sharding.Mesh
    optimizer: object     # an optax.GradientTransformation
    progress: Progress
    state: dict           # {"params", "opt_state", "ema"}, replicated over the mesh
    rng: jax.Array        # the key samples.png is drawn with
    best_params: dict     # the averaged parameters of the best validation so far (or None)
    is_main: bool         # process 0 writes the files

    @property
    def steps_per_epoch(self):
        return data.steps_per_epoch(self.ds, self.settings["batch_size"])

    def checkpoint_arrays(self):
        """All the arrays a checkpoint holds."""
        return dict(self.state, rng=self.rng)

    def save(self, name="checkpoint.npz", tree=None):
        """Write ``tree`` (default: the whole state) and the run's record to ``out/name``
        (process 0 only)."""
        if self.is_main:
            checkpoint.write(self.out / name, self.settings, self.target, self.cfg,
                             self.progress, tree or self.checkpoint_arrays())


def make_init(cfg, optimizer):
    """``init(key) -> {"params", "opt_state", "ema", "rng"}``: a new run's arrays.

    Jit it to run it (op by op, every initializer would compile on its own);
    ``jax.eval_shape`` it for the shapes a checkpoint must have.
    """
    def init(key):
        init_key, rng = jax.random.split(key)
        return dict(training.init_state(pixelrnn.init(init_key, cfg), optimizer), rng=rng)
    return init


def read_run(args, out):
    """A resumed run's checkpoint, its best parameters' arrays, or ``(None, None)`` for a new run."""
    path = out / "checkpoint.npz"
    if not args.resume:
        if path.exists():
            raise UserError(f"{out} already holds a run; pass --resume to continue it "
                            f"or choose another --out")
        return None, None
    if not path.exists():
        raise UserError(f"no checkpoint to resume: {path} does not exist")
    saved = checkpoint.read(path)
    best = checkpoint.read(out / "best.npz").arrays if saved.progress.best_step is not None else None
    return saved, best


def read_source(args):
    """The checkpoint a new run starts ``--init-from``, or None."""
    if args.init_from is None:
        return None
    if args.resume:
        raise UserError("--init-from starts a new run; leave it out to --resume one")
    return checkpoint.read(args.init_from)


def carried_progress(source):
    """A new run's :class:`Progress`. Started ``--init-from`` ``source``, it carries on the record
    of the averaged parameters taken: their validation lines, images seen and training time."""
    if source is None:
        return Progress()
    p = source.progress
    step = p.step if checkpoint.has_average(source) else p.best_step
    lines = [line for line in p.metrics if "valid_nll" in line and line["step"] <= step]
    return Progress(train_seconds=p.train_seconds if step == p.step else lines[-1]["train_seconds"],
                    metrics=lines, images_before=p.images_before + step * source.settings["batch_size"])


def start_run(args):
    """Check everything the user gave, then set up a new or resumed run.

    Returns None, having written nothing, when a resumed run has nothing
    left to do. Writes config.json.
    """
    source = read_source(args)
    defaults = source.settings if source else {**training.DEFAULTS, "model": pixelrnn.Config.model}
    model, dataset = args.model or defaults["model"], args.dataset or defaults["dataset"]
    out = pathlib.Path(args.out or f"runs/{model}-{dataset}")
    saved, best_arrays = read_run(args, out)
    settings = resolve_settings(args, saved and saved.settings, source and source.settings)
    target = resolve_target(args, saved and saved.target)
    ds = load_data(settings, args.data_dir, args.binarize is not None)
    cfg = make_config(settings, ds)
    progress = saved.progress if saved else carried_progress(source)
    for record, path in ((saved, out / "checkpoint.npz"), (source, args.init_from)):
        if record and record.cfg != cfg:
            raise UserError(f"{path} was written for another model config: {record.cfg}")
    averaged = checkpoint.averaged_params(source, args.init_from) if source else None
    steps = data.steps_per_epoch(ds, settings["batch_size"])
    optimizer = training.make_optimizer(settings, planned_steps(target, steps))
    init, key = make_init(cfg, optimizer), jax.random.PRNGKey(settings["seed"])
    template = jax.eval_shape(init, key)
    tree = checkpoint.unflatten(saved.arrays, template, out / "checkpoint.npz") if saved else None
    best = (checkpoint.unflatten(best_arrays, {"params": template["params"]},
                                 out / "best.npz")["params"] if best_arrays is not None else None)
    if saved and progress.tested and progress.step >= target_steps(target, steps):
        print(f"{out} has already trained to {describe_target(target, steps)} and been tested; "
              f"nothing to do (give a larger --epochs or --max-steps to train on)")
        return None
    mesh = training.make_mesh(settings["batch_size"], args.eval_batch_size)
    is_main = jax.process_index() == 0
    if is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            write_text(out / "config.json", json.dumps(
                {"config": dataclasses.asdict(cfg), "settings": settings, "target": target},
                indent=2) + "\n")
            write_record(out, progress.metrics, cfg, settings["dataset"])  # drop lines after the checkpoint
        except OSError as e:
            raise UserError(f"cannot write to --out {out}: {e.strerror or e}") from None
    if not saved:
        tree = jax.jit(init)(key)
    if averaged is not None:              # --init-from: both start as its averaged parameters
        tree = dict(tree, params=averaged, ema=jax.tree.map(np.copy, averaged))
    state = jax.device_put({name: tree[name] for name in ("params", "opt_state", "ema")},
                           training.replicated(mesh))
    best = jax.device_put(best, training.replicated(mesh)) if best is not None else None
    return Run(args, out, settings, target, cfg, ds, mesh, optimizer, progress, state,
               tree["rng"], best, is_main)


def describe_run(run):
    """The first line of every run: what trains, at what size, on what."""
    devices = jax.devices()
    cfg = run.cfg
    switched_off = "".join(f"no {wiring} connections, " for wiring in ("skip", "residual")
                           if not getattr(cfg, wiring))
    return (f"training {cfg.model} ({cfg.layers} layer{'s' if cfg.layers > 1 else ''}, "
            f"h={cfg.hidden}, head {cfg.out_hidden}, {switched_off}"
            f"{pixelrnn.parameter_count(run.state['params']):,} parameters) on "
            f"{run.settings['dataset']}, {len(devices)} {devices[0].platform} "
            f"device{'s' if len(devices) > 1 else ''}"
            f"{f' in {jax.process_count()} processes' if jax.process_count() > 1 else ''}, "
            f"to {describe_target(run.target, run.steps_per_epoch)}, into {run.out}")


def recent_loss(progress):
    """The mean training loss (nats/image) of the last ``LOSS_WINDOW`` steps, or None."""
    losses = progress.recent_losses
    return sum(losses) / len(losses) if losses else None


def train_epoch(run, train_step, stop, clock):
    """Train from the current data position to the end of the epoch, the target or a stop request."""
    p, batch_size = run.progress, run.settings["batch_size"]
    unit, factor = nll_unit(run.cfg)
    last_step = target_steps(run.target, run.steps_per_epoch)
    bar = tqdm(total=run.steps_per_epoch * batch_size, initial=p.index * batch_size, unit="img",
               desc=f"epoch {p.epoch + 1}/{run.target['epochs']}", disable=not run.is_main,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                          "[{elapsed}<{remaining}{postfix}]")   # no rate: tqdm's counts compiling
    batches = data.train_batches(run.ds, batch_size, run.settings["seed"], p.epoch, p.index)
    with bar:
        for index, images in batches:
            run.state, loss = train_step(run.state, training.put_batch(images, run.mesh), p.step)
            loss = float(loss)
            if not math.isfinite(loss):
                kept = run.out / "checkpoint.npz"
                raise Diverged(f"the training loss is {loss} at step {p.step + 1}; stopped without "
                               f"saving; the last good checkpoint is "
                               f"{kept if kept.exists() else 'none (none was saved yet)'}")
            p.train_seconds += clock.step_done(batch_size)
            p.step, p.index = p.step + 1, index + 1
            p.recent_losses = (p.recent_losses + [loss])[-LOSS_WINDOW:]
            bar.update(batch_size)
            speed = clock.per_second()
            bar.set_postfix_str(f"loss {recent_loss(p) * factor:.4g} {unit}"
                                + (f", {speed:.1f} img/s" if speed else ""))
            if stop.requested or p.step >= last_step:
                break
            if run.args.save_every and p.step % run.args.save_every == 0:
                run.save()


def validate_and_save(run, evaluate, learning_rate, clock):
    """Validation NLL of the averaged parameters after an epoch (or the last step):
    a metrics line, curve.svg, best.npz, checkpoint.npz."""
    p = run.progress
    unit, factor = nll_unit(run.cfg)
    valid, valid_se = evaluate(run.state["ema"], run.ds.valid)
    train_loss, speed = recent_loss(p), clock.per_second()
    line = {"epoch": round(p.step / run.steps_per_epoch, 4), "step": p.step,
            "images": p.images_before + p.step * run.settings["batch_size"], "unit": unit,
            "valid_nll": float(valid * factor), "valid_se": float(valid_se * factor),
            "train_loss": train_loss * factor if train_loss is not None else None,
            "lr": float(learning_rate(p.step)), "images_per_s": speed,
            "train_seconds": round(p.train_seconds, 1)}
    p.metrics.append(line)
    if run.is_main:
        tqdm.write(f"step {p.step}: valid {line['valid_nll']:.4f} ± {line['valid_se']:.2f} {unit}"
                   + (f", loss {line['train_loss']:.4g} {unit}" if train_loss is not None else "")
                   + (f", {speed:.1f} img/s" if speed else ""))
        write_run_record(run)
    if p.best_valid is None or valid < p.best_valid:
        p.best_valid, p.best_step = float(valid), p.step
        run.best_params = run.state["ema"]
        # Before checkpoint.npz: a checkpoint never names a best step not on disk.
        run.save("best.npz", {"params": run.best_params})
    run.save()
    clock.restart()


def write_run_record(run):
    """metrics.jsonl and curve.svg, from the run's metrics lines."""
    write_record(run.out, run.progress.metrics, run.cfg, run.settings["dataset"])


def finish(run, evaluate):
    """Test NLL of the best averaged parameters; the final best.npz (those parameters
    with the run's whole record) and checkpoint; then samples.png from the same parameters."""
    unit, factor = nll_unit(run.cfg)
    p = run.progress
    test, test_se = evaluate(run.best_params, run.ds.test)
    p.metrics.append({"step": p.step, "best_step": p.best_step, "unit": unit,
                      "test_nll": float(test * factor), "test_se": float(test_se * factor)})
    p.tested = True
    if run.is_main:
        print(f"test NLL {test * factor:.4f} ± {test_se * factor:.2f} {unit} "
              f"(best validation at step {p.best_step})")
        write_run_record(run)
    # best.npz with the whole record, test included: the file to share or ship.
    run.save("best.npz", {"params": run.best_params})
    run.save()
    if run.args.num_samples:  # every process samples (the parameters live on all of them)
        start = time.perf_counter()
        sample = jax.jit(pixelrnn.sample, static_argnums=(1, 3))
        images = np.asarray(sample(run.best_params, run.cfg, run.rng, run.args.num_samples))
        if run.is_main:
            data.save_png(run.out / "samples.png", data.image_grid(images, run.cfg.levels),
                          data.GRID_SCALE)
            print(f"wrote {run.out / 'samples.png'} ({time.perf_counter() - start:.1f} s)")


def train(args):
    """Train until the run's target; returns the exit code."""
    training.set_up_devices(args.host_devices, args.distributed, args.coordinator,
                            args.num_processes, args.process_id, args.coordinator_timeout)
    with stop_on_sigint() as stop:
        run = start_run(args)
        if run is None:
            return 0
        p = run.progress
        if run.is_main:
            print(describe_run(run))
            if args.resume:
                print(f"resuming {run.out} at step {p.step} (epoch {p.epoch + 1}, batch {p.index}) "
                      f"of {describe_target(run.target, run.steps_per_epoch)}")
            if args.init_from:
                print(f"starting from the averaged parameters of {args.init_from} "
                      f"({p.images_before:,} images seen)")
        train_step = training.make_train_step(run.cfg, run.optimizer, run.mesh,
                                              run.settings["ema"])
        evaluate = training.make_evaluate(run.cfg, run.mesh, args.eval_batch_size)
        schedule = training.learning_rate(run.settings, planned_steps(run.target, run.steps_per_epoch))
        clock = Throughput()
        last_step = target_steps(run.target, run.steps_per_epoch)
        while p.step < last_step and not stop.requested:
            train_epoch(run, train_step, stop, clock)
            if stop.requested:
                break
            if p.index == run.steps_per_epoch:
                p.epoch, p.index = p.epoch + 1, 0
            validate_and_save(run, evaluate, schedule, clock)
        if stop.requested:
            run.save()
            checkpoint.fail(f"interrupted at step {p.step}; saved {run.out / 'checkpoint.npz'}; "
                            f"continue with --resume", PROGRAM, EXIT_INTERRUPTED, label="")
        if run.best_params is None:        # a target already reached before any validation
            validate_and_save(run, evaluate, schedule, clock)
        finish(run, evaluate)
    return 0


def evaluate_checkpoint(args):
    """``--evaluate``: the NLL of a checkpoint's averaged parameters on the validation and
    test sets of its run's dataset, with standard errors over images. Trains nothing."""
    training.set_up_devices(args.host_devices)
    cfg, params, settings = checkpoint.load_params(args.evaluate)
    ds = data.load_dataset(settings["dataset"], args.data_dir, settings["binarize"], args.test_seed)
    mesh = training.make_mesh(args.eval_batch_size, args.eval_batch_size)
    evaluate = training.make_evaluate(cfg, mesh, args.eval_batch_size)
    params = jax.device_put(params, training.replicated(mesh))
    unit, factor = nll_unit(cfg)
    n = args.eval_subset or None
    other_seed = "" if args.test_seed is None else f", binarization seed {args.test_seed}"
    for name, images, seed in (("valid", ds.valid[:n], ""), ("test", ds.test[:n], other_seed)):
        nll, se = evaluate(params, images)
        print(f"{name} {nll * factor:.4f} ± {se * factor:.4f} {unit} ({len(images)} images{seed})")
    return 0


def main(argv=None):
    """The command line entry point: user mistakes become one line on stderr and exit code 2;
    a diverged run exits with 1, an interrupted one with 130."""
    args = parse_args(argv)
    try:
        return evaluate_checkpoint(args) if args.evaluate else train(args)
    except (UserError, data.DataError) as e:
        checkpoint.fail(e, PROGRAM)
    except Diverged as e:
        checkpoint.fail(e, PROGRAM, EXIT_DIVERGED)
    except KeyboardInterrupt:
        checkpoint.fail("interrupted again: stopped without saving", PROGRAM, EXIT_INTERRUPTED,
                        label="")


if __name__ == "__main__":
    sys.exit(main())
