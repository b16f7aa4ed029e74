"""Train a PixelRNN model by maximum likelihood.

    python train.py --model pixelcnn --max-steps 50     # a one-minute smoke run
    python train.py --model rowlstm                     # binarized MNIST -> runs/rowlstm-mnist/
    python train.py --out runs/rowlstm-mnist --resume   # continue exactly where it stopped
    python train.py --init-from runs/rowlstm-mnist/best.npz --lr 3e-4 --out runs/more
    python train.py --evaluate weights/rowlstm-mnist.npz --test-seed 1

The run folder holds config.json, checkpoint.npz (the whole state), best.npz
(the best averaged parameters with the run's record: what weights/ ships),
metrics.jsonl, curve.svg and samples.png, each replaced atomically. Ctrl-C or
SIGTERM saves and exits; --resume continues bit for bit. --init-from starts a
new run from a checkpoint's averaged parameters and carries its record on.
Each batch is split over every device; --distributed joins several hosts.
"""

import argparse
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import pathlib
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import data
import pixelrnn
import training
from training import UserError

# ---- defaults: edit them here or override them on the command line ----
SIZES = {"rowlstm": dict(layers=7, hidden=16), "diagbilstm": dict(layers=7, hidden=16),
         "pixelcnn": dict(layers=15, hidden=16)}  # the paper gives MNIST sizes for diagbilstm only
OUT_HIDDEN = 32
RECIPE = dict(dataset="mnist", batch_size=16, optimizer="adam", lr=1e-3, schedule="cosine",
              warmup=200, lr_floor=0.05, clip=1.0, ema=0.9995, seed=0, binarize="fresh",
              train_subset=0, eval_subset=0, skip=True, residual=True)    # RESULTS.md's sweep
EPOCHS = 10
EVAL_BATCH_SIZE = 256
NUM_SAMPLES = 16       # images in samples.png
SAVE_EVERY = 500       # steps between checkpoints inside an epoch
LOSS_WINDOW = 50       # the training loss shown is the mean of this many recent steps
PAPER_MNIST_NLL = {"rowlstm": 80.54, "diagbilstm": 79.20, "pixelcnn": 81.30}   # Table 4, nats
EXIT_DIVERGED = 1

# The settings that define a run, saved with it: on --resume those given must match.
MODEL_SETTINGS = ("model", "layers", "hidden", "out_hidden", "skip", "residual")
SETTINGS = MODEL_SETTINGS + tuple(name for name in RECIPE if name not in MODEL_SETTINGS)


# usage=SUPPRESS: a mistake is one line, "train.py: error: ...", and exit code 2.
parser = argparse.ArgumentParser(prog="train.py", usage=argparse.SUPPRESS,
                                 description="Train a Row LSTM, Diagonal BiLSTM or PixelCNN.")
arg = parser.add_argument
count, positive = training.number(int, 0), training.number(int, 1)
fraction = training.number(float, 0, maximum=1)
arg("--model", choices=pixelrnn.MODELS, help="default rowlstm")
arg("--dataset", choices=data.DATASETS, help=f"default {RECIPE['dataset']}")
arg("--data-dir", help="the dataset's folder (mnist, mnist256: the embedded data/)")
arg("--layers", type=positive, help="hidden layers (default: SIZES in train.py)")
arg("--hidden", type=positive, help="hidden size h (default: SIZES; rounded up for RGB)")
arg("--out-hidden", type=positive, help=f"head width (default {OUT_HIDDEN}; rounded up for RGB)")
arg("--skip", action=argparse.BooleanOptionalAction, help="skip connections (default on)")
arg("--residual", action=argparse.BooleanOptionalAction, help="residual connections (default on)")
arg("--batch-size", type=positive, help=f"global batch (default {RECIPE['batch_size']})")
arg("--optimizer", choices=("adam", "rmsprop"), help=f"default {RECIPE['optimizer']}")
arg("--lr", type=training.number(float, 0, strict=True), help=f"peak rate ({RECIPE['lr']})")
arg("--schedule", choices=("cosine", "exponential", "constant"),
    help="after the warm-up, decay to lr * --lr-floor at the end of --epochs (a new --epochs "
         "on --resume moves the rate onto the new curve at once); default cosine")
arg("--warmup", type=count, help=f"linear warm-up steps (default {RECIPE['warmup']})")
arg("--lr-floor", type=fraction, help=f"final lr / lr (default {RECIPE['lr_floor']})")
arg("--ema", type=fraction, help=f"decay of the parameters' moving average that validation, "
                                 f"test and samples use; 0: none (default {RECIPE['ema']})")
arg("--clip", type=training.number(float, 0), help=f"gradient-norm clip, 0: none "
                                                   f"({RECIPE['clip']})")
arg("--seed", type=training.number(int, 0, maximum=2**32 - 1), help="default 0")
arg("--binarize", choices=("fresh", "fixed"), help="binary data: a new binarization of every "
                                                   "training batch, or one fixed (default fresh)")
arg("--train-subset", type=count, help="train on the first N images only (0: all)")
arg("--eval-subset", type=count, help="validate and test on the first N images only")
arg("--epochs", type=positive, help=f"default {EPOCHS}; on --resume the run's own")
arg("--max-steps", type=count, help="stop after N steps in all (0: no limit); the schedule "
                                    "still plans for --epochs")
arg("--eval-batch-size", type=positive, default=EVAL_BATCH_SIZE)
arg("--num-samples", type=count, default=NUM_SAMPLES, help="images in samples.png")
arg("--save-every", type=positive, default=SAVE_EVERY, help="steps between checkpoints")
arg("--out", help="run folder (default runs/<model>-<dataset>)")
arg("--resume", action="store_true", help="continue the run in --out")
arg("--init-from", type=pathlib.Path, metavar="CKPT",
    help="a new run from CKPT's averaged parameters, model, dataset and (unless given) settings")
arg("--evaluate", type=pathlib.Path, metavar="CKPT",
    help="train nothing: CKPT's validation and test NLL with standard errors")
arg("--test-seed", type=count, help="--evaluate: binarize the test set with this seed")
arg("--host-devices", type=positive, default=training.HOST_DEVICES,
    help=f"CPU only: devices to split each batch over (default {training.HOST_DEVICES})")
arg("--distributed", action="store_true", help="join a multi-process job (several hosts)")
arg("--coordinator", help="--distributed: HOST:PORT of process 0 (else JAX_COORDINATOR_ADDRESS, "
                          "SLURM or Open MPI)")
arg("--num-processes", type=positive, help="--distributed: processes in the job")
arg("--process-id", type=count, help="--distributed: this process's id, 0 to N-1")
arg("--coordinator-timeout", type=positive, default=300, help="seconds (default 300)")


class Diverged(Exception):
    """The training loss became NaN or infinite."""


@dataclasses.dataclass
class Progress:
    """Where a run stands; saved in every checkpoint, so a resumed run continues exactly."""
    step: int = 0              # optimizer steps taken
    epoch: int = 0             # the epoch being trained (0-based)
    index: int = 0             # batches of that epoch already trained on
    recent_losses: list = dataclasses.field(default_factory=list)   # nats/image
    train_seconds: float = 0.0  # time in training steps (not compiling, not validating)
    best_valid: float = None   # best validation NLL (nats/image) and its step
    best_step: int = None
    tested: bool = False       # the run reached its target and was scored on the test set
    metrics: list = dataclasses.field(default_factory=list)         # metrics.jsonl's lines
    images_before: int = 0     # images the starting parameters had seen (--init-from)


@dataclasses.dataclass
class Run:
    """A training run: what it is, and its state, which the loop changes."""
    args: argparse.Namespace
    out: pathlib.Path
    settings: dict
    target: dict               # {"epochs", "max_steps"}: where it stops
    cfg: pixelrnn.Config
    ds: data.Dataset
    data_id: dict              # which images: see fingerprint
    mesh: jax.sharding.Mesh
    progress: Progress
    state: dict                # {"params", "opt_state", "ema"}, replicated over the mesh
    optimizer: object          # an optax.GradientTransformation
    rng: jax.Array = None      # the key samples.png is drawn with
    best: dict = None          # the averaged parameters of the best validation so far
    lock: object = None        # the open run folder's lock file (process 0)

    @property
    def steps_per_epoch(self):
        return data.steps_per_epoch(self.ds, self.settings["batch_size"])

    @property
    def last_step(self):
        planned = self.target["epochs"] * self.steps_per_epoch
        return min(planned, self.target["max_steps"] or math.inf)

    def save(self, name="checkpoint.npz"):
        """``checkpoint.npz`` (the whole state) or ``best.npz`` (the best averaged parameters),
        with the run's record; process 0 writes, from finite parameters only."""
        tree = dict(self.state, rng=self.rng) if name == "checkpoint.npz" else {"params": self.best}
        if not all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(tree["params"])):
            raise Diverged(f"the parameters are not finite at step {self.progress.step}; stopped "
                           f"without saving {self.out / name}")
        if jax.process_index() == 0:
            meta = {"settings": self.settings, "target": self.target,
                    "config": dataclasses.asdict(self.cfg), "data": self.data_id,
                    "progress": dataclasses.asdict(self.progress)}
            training.save(self.out / name, meta, tree)


# ---------------------------------------------------------------------------
# Starting a run: settings, data, model, state
# ---------------------------------------------------------------------------


def resolve_settings(args, saved, source):
    """The command line, else the resumed run's (``saved``), else the ``--init-from``
    checkpoint's (``source``: its model and dataset must stay), else the defaults."""
    given = {name: getattr(args, name) for name in SETTINGS if getattr(args, name) is not None}
    for name, value in given.items():
        flag = f"--{name.replace('_', '-')} {value}"
        if saved and value != saved[name]:
            raise UserError(f"{flag} does not match the checkpoint ({name}={saved[name]}); "
                            f"leave it out to continue the run")
        if source and name in MODEL_SETTINGS + ("dataset",) and value != source[name]:
            raise UserError(f"{flag} does not match {args.init_from} ({name}={source[name]}); "
                            f"--init-from keeps the model and the dataset")
    if saved or source:
        return {**(saved or source), **given}
    model = given.get("model", "rowlstm")
    return {**RECIPE, "model": model, **SIZES[model], "out_hidden": OUT_HIDDEN, **given}


def resolve_target(args, saved):
    """``{"epochs", "max_steps"}``. A resumed run keeps its own unless given new ones:
    ``--epochs`` alone lifts an earlier ``--max-steps``; ``--max-steps`` alone caps."""
    if saved is None or args.epochs is not None:
        return {"epochs": args.epochs or EPOCHS, "max_steps": args.max_steps or 0}
    return dict(saved, max_steps=saved["max_steps"] if args.max_steps is None else args.max_steps)


def load_data_and_config(settings, args):
    """The dataset (cut to the subsets) and the model config for its images; sizes that
    do not split into R, G, B thirds are rounded up, and ``settings`` records them."""
    if settings["schedule"] == "exponential" and settings["lr_floor"] == 0:
        raise UserError("--schedule exponential cannot decay to --lr-floor 0: give a floor > 0")
    if args.binarize and data.DATASETS[settings["dataset"]].levels != 2:
        raise UserError(f"--binarize is for binary datasets (mnist, idx-binary), "
                        f"not {settings['dataset']}")
    ds = data.load_dataset(settings["dataset"], args.data_dir, settings["binarize"])
    train, test = settings["train_subset"] or None, settings["eval_subset"] or None
    ds = dataclasses.replace(ds, train=ds.train[:train], valid=ds.valid[:test], test=ds.test[:test])
    if data.steps_per_epoch(ds, settings["batch_size"]) == 0:
        raise UserError(f"--batch-size {settings['batch_size']} is larger than the "
                        f"{len(ds.train)} training images")
    height, width, channels = ds.shape
    for name in ("hidden", "out_hidden"):          # not given: round up for RGB
        if getattr(args, name) is None and not args.resume and not args.init_from:
            settings[name] = -(-settings[name] // channels) * channels
    try:
        cfg = pixelrnn.Config(height=height, width=width, channels=channels, levels=ds.levels,
                              **{name: settings[name] for name in MODEL_SETTINGS})
    except ValueError as e:
        raise UserError(str(e)) from None
    return ds, cfg


def start_run(args):
    """Check everything the user gave, then set up a new or resumed run (None: nothing to
    do). Nothing is written before every check has passed."""
    if args.resume and args.init_from:
        raise UserError("--init-from starts a new run; leave it out to --resume one")
    source = training.read(args.init_from) if args.init_from else None
    model = args.model or (source[0]["settings"]["model"] if source else "rowlstm")
    dataset = args.dataset or (source[0]["settings"]["dataset"] if source else RECIPE["dataset"])
    if args.out == "":
        raise UserError("--out is empty: name a run folder")
    out = pathlib.Path(args.out or f"runs/{model}-{dataset}")
    path = out / "checkpoint.npz"
    if path.exists() != args.resume:
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose "
                        f"another --out" if path.exists() else f"no checkpoint to resume: "
                        f"{path} does not exist")
    saved = training.read(path) if args.resume else None
    settings = resolve_settings(args, saved and saved[0]["settings"],
                                source and source[0]["settings"])
    target = resolve_target(args, saved and saved[0]["target"])
    ds, cfg = load_data_and_config(settings, args)
    for record, where in ((saved, path), (source, args.init_from)):
        if record and pixelrnn.Config(**record[0]["config"]) != cfg:
            raise UserError(f"{where} was written for another model config: {record[0]['config']}")
    data_id = fingerprint(ds)
    if saved and saved[0].get("data", data_id) != data_id:        # (older checkpoints: no record)
        raise UserError(f"{out} was trained on other data ({saved[0]['data']}), not on these "
                        f"{settings['dataset']} images ({data_id}): check --data-dir")
    mesh = training.make_mesh(batch_size=settings["batch_size"],
                              eval_batch_size=args.eval_batch_size)
    optimizer = training.make_optimizer(settings, target["epochs"] * data.steps_per_epoch(
        ds, settings["batch_size"]))
    run = Run(args, out, settings, target, cfg, ds, data_id, mesh, Progress(), None, optimizer)
    restore_state(run, saved, source)
    if run.progress.tested and run.progress.step >= run.last_step:
        print(f"{out} has already trained to {describe_target(run)} and been tested; nothing "
              f"to do (give a larger --epochs or --max-steps to train on)")
        return None
    write_config(run)
    return run


def restore_state(run, saved, source):
    """The run's state, progress and best parameters: from its checkpoint, from the
    ``--init-from`` checkpoint's averaged parameters (a fresh optimizer, the record
    carried on), or new."""
    key = jax.random.PRNGKey(run.settings["seed"])

    def init(key):
        init_key, rng = jax.random.split(key)
        return dict(training.init_state(pixelrnn.init(init_key, run.cfg), run.optimizer), rng=rng)

    if saved:
        (meta, arrays), path = saved, run.out / "checkpoint.npz"
        tree = training.unflatten(arrays, jax.eval_shape(init, key), path)
        run.progress = Progress(**meta["progress"])
        if run.progress.best_step is not None:
            run.best = training.load_params(run.out / "best.npz")[1]
    else:
        tree = jax.jit(init)(key)
    if source:
        (meta, arrays), p = source, Progress(**source[0]["progress"])
        averaged = training.averaged_params(meta, arrays, run.args.init_from)
        tree = dict(tree, params=averaged, ema=jax.tree.map(np.copy, averaged))
        step = p.step if any(a.startswith("ema/") for a in arrays) else p.best_step
        lines = [line for line in p.metrics if "valid_nll" in line and line["step"] <= step]
        seconds = p.train_seconds if step == p.step else lines[-1]["train_seconds"]
        run.progress = Progress(metrics=lines, train_seconds=seconds, images_before=(
            p.images_before + step * meta["settings"]["batch_size"]))
    replicated = training.replicated(run.mesh)
    run.state = jax.device_put({k: tree[k] for k in ("params", "opt_state", "ema")}, replicated)
    run.rng = tree["rng"]
    if run.best is not None:
        run.best = jax.device_put(run.best, replicated)


def write_config(run):
    """config.json, and metrics.jsonl and curve.svg as of the checkpoint (process 0)."""
    if jax.process_index() != 0:
        return
    try:
        run.out.mkdir(parents=True, exist_ok=True)
        run.lock = open(run.out / ".lock", "w")       # released by the OS when the process ends
        try:
            fcntl.flock(run.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{run.out} is in use by another train.py: wait for it to end or "
                            f"choose another --out") from None
        if not run.args.resume and (run.out / "checkpoint.npz").exists():   # one that just ended
            raise UserError(f"{run.out} already holds a run; pass --resume to continue it")
        for stale in run.out.glob(".*.tmp"):         # left by a write that was killed
            stale.unlink()
        text = json.dumps({"config": dataclasses.asdict(run.cfg), "settings": run.settings,
                           "target": run.target}, indent=2) + "\n"
        with data.atomic_write(run.out / "config.json") as f:
            f.write(text.encode())
        write_record(run)
    except OSError as e:
        raise UserError(f"cannot write to --out {run.out}: {e.strerror or e}") from None


def fingerprint(ds):
    """Which images a run trains on: the split sizes and a hash of the arrays (a resumed
    run refuses other data)."""
    digest = hashlib.sha256()
    for split in (ds.train, ds.valid, ds.test):
        digest.update(np.ascontiguousarray(split).data)
    return {"name": ds.name, "sizes": [len(ds.train), len(ds.valid), len(ds.test)],
            "sha256": digest.hexdigest()[:16]}


def write_record(run):
    """metrics.jsonl (strict JSON lines) and curve.svg, from the run's metrics lines."""
    lines = run.progress.metrics
    with data.atomic_write(run.out / "metrics.jsonl") as f:
        f.write("".join(json.dumps(line, allow_nan=False) + "\n" for line in lines).encode())
    shipped_size = run.cfg == pixelrnn.Config(model=run.cfg.model, **SIZES[run.cfg.model])
    paper = PAPER_MNIST_NLL[run.cfg.model] if run.settings["dataset"] == "mnist" and shipped_size \
        else None
    data.save_curve_svg(run.out / "curve.svg", lines, nll_unit(run.cfg)[0], paper)


def describe_target(run):
    """E.g. ``"7810 steps (10 epochs)"`` or ``"50 steps (--max-steps)"``."""
    epochs = run.target["epochs"]
    if run.last_step < epochs * run.steps_per_epoch:
        return f"{run.last_step} steps (--max-steps)"
    return f"{run.last_step} steps ({epochs} epoch{'s' if epochs > 1 else ''})"


def describe_run(run):
    """The lines a run starts with: what trains, at what size, on what; where it resumes or
    what it starts from."""
    cfg, devices, p = run.cfg, jax.devices(), run.progress
    off = "".join(f"no {name} connections, " for name in ("skip", "residual")
                  if not getattr(cfg, name))
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    return (f"training {cfg.model} ({cfg.layers} layer{'s' if cfg.layers > 1 else ''}, "
            f"h={cfg.hidden}, head {cfg.out_hidden}, {off}"
            f"{pixelrnn.parameter_count(run.state['params']):,} parameters) on "
            f"{run.settings['dataset']}, {len(devices)} {devices[0].platform} "
            f"device{'s' if len(devices) > 1 else ''}{processes}, to {describe_target(run)}, "
            f"into {run.out}"
            + (f"\nresuming {run.out} at step {p.step} (epoch {p.epoch + 1}, batch {p.index}) of "
               f"{describe_target(run)}" if run.args.resume else "")
            + (f"\nstarting from the averaged parameters of {run.args.init_from} "
               f"({p.images_before:,} images seen)" if run.args.init_from else ""))


# ---------------------------------------------------------------------------
# The loop: train, validate, checkpoint; then test and sample
# ---------------------------------------------------------------------------


def catch_stop_signals():
    """The first Ctrl-C or SIGTERM asks the loop to save and stop between steps (which
    keeps parameters, optimizer state and data position consistent); a second one
    stops at once. Returns the list the handler appends the signal numbers to."""
    caught = []

    def handle(signum, frame):
        caught.append(signum)
        if len(caught) > 1:            # now, not unwinding through XLA's C++ (that can crash)
            print("train.py: interrupted again: stopped without saving", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handle)
    return caught


def read_loss(run, step, loss):
    """Take step ``step``'s loss, read one step late so that the device runs ahead."""
    p, loss = run.progress, float(loss)
    if not math.isfinite(loss):
        kept = run.out / "checkpoint.npz"
        raise Diverged(f"the training loss is {loss} at step {step}; stopped without saving; "
                       f"the last good checkpoint is {kept if kept.exists() else 'none yet'}")
    p.recent_losses = (p.recent_losses + [loss])[-LOSS_WINDOW:]


def train_epoch(run, train_step, bar, stop):
    """Train to the end of the epoch, the target or a stop signal; returns images/s."""
    p, batch_size, (unit, factor) = run.progress, run.settings["batch_size"], nll_unit(run.cfg)
    start, first_step, pending, speed = time.perf_counter(), p.step, None, None
    for index, images in data.train_batches(run.ds, batch_size, run.settings["seed"], p.epoch,
                                            p.index):
        run.state, loss = train_step(run.state, training.put_batch(images, run.mesh), p.step)
        if pending is not None:
            read_loss(run, *pending)
        p.step, p.index, pending = p.step + 1, index + 1, (p.step + 1, loss)
        at_end = bool(stop) or p.step >= run.last_step or p.index == run.steps_per_epoch
        if at_end or p.step % run.args.save_every == 0:
            read_loss(run, *pending)               # never save past an unread loss
            pending = None
        speed = (p.step - first_step) * batch_size / (time.perf_counter() - start)
        bar.set_postfix_str(f"loss {mean_loss(p) * factor:.4g} {unit}, {speed:.1f} img/s"
                            if p.recent_losses else "", refresh=False)
        bar.update(batch_size)
        if at_end:
            break
        if pending is None:
            run.save()
    p.train_seconds += time.perf_counter() - start
    return speed                                   # as the bar shows it


def mean_loss(progress):
    """The training loss (nats/image): the mean of the recent steps', or None."""
    losses = progress.recent_losses
    return sum(losses) / len(losses) if losses else None


def nll_unit(cfg):
    """``(name, factor)``: nats per image for binary data (as the paper's MNIST table),
    else bits per dimension, ``nats / (H * W * C * ln 2)``."""
    if cfg.levels == 2:
        return "nats", 1.0
    return "bits/dim", 1.0 / (cfg.height * cfg.width * cfg.channels * math.log(2))


def validate(run, evaluate, speed):
    """Validation NLL of the averaged parameters: a metrics line, best.npz if it is the
    best so far, checkpoint.npz."""
    p, (unit, factor) = run.progress, nll_unit(run.cfg)
    valid, se = evaluate(run.state["ema"], run.ds.valid)
    if not math.isfinite(valid):
        raise Diverged(f"the validation NLL is {valid} at step {p.step}; stopped without saving")
    loss = mean_loss(p)
    line = {"epoch": round(p.step / run.steps_per_epoch, 4), "step": p.step,
            "images": p.images_before + p.step * run.settings["batch_size"], "unit": unit,
            "valid_nll": valid * factor, "valid_se": se * factor,
            "train_loss": loss * factor if loss is not None else None,
            "lr": float(training.learning_rate(run.settings, run.target["epochs"] *
                                               run.steps_per_epoch)(p.step)),
            "images_per_s": speed, "train_seconds": round(p.train_seconds, 1)}
    p.metrics.append(line)
    report(run, f"step {p.step}: valid {line['valid_nll']:.4f} ± {line['valid_se']:.2f} {unit}"
           + (f", loss {line['train_loss']:.4g} {unit}" if loss is not None else "")
           + (f", {speed:.1f} img/s" if speed else ""))
    if p.best_valid is None or valid < p.best_valid:
        p.best_valid, p.best_step = valid, p.step
        run.best = jax.tree.map(jnp.copy, run.state["ema"])   # the step donates run.state
        run.save("best.npz")            # before checkpoint.npz, which names its step
    run.save()


def report(run, text):
    """Print a line (process 0) and rewrite metrics.jsonl and curve.svg."""
    if jax.process_index() == 0:
        tqdm.write(text)
        write_record(run)


def finish(run, evaluate):
    """Test NLL of the best averaged parameters; best.npz with the whole record (the file
    to share or ship) and the checkpoint; then samples.png from the same parameters."""
    p, (unit, factor) = run.progress, nll_unit(run.cfg)
    test, se = evaluate(run.best, run.ds.test)
    p.metrics.append({"step": p.step, "best_step": p.best_step, "unit": unit,
                      "test_nll": test * factor, "test_se": se * factor})
    p.tested = True
    report(run, f"test NLL {test * factor:.4f} ± {se * factor:.2f} {unit} "
                f"(best validation at step {p.best_step})")
    run.save("best.npz")
    run.save()
    if run.args.num_samples:  # every process samples: the parameters live on all of them
        start = time.perf_counter()
        sample = jax.jit(pixelrnn.sample, static_argnums=(1, 3))
        images = np.asarray(sample(run.best, run.cfg, run.rng, run.args.num_samples))
        if jax.process_index() == 0:
            data.save_png(run.out / "samples.png", data.image_grid(images, run.cfg.levels),
                          data.GRID_SCALE)
            print(f"wrote {run.out / 'samples.png'} ({time.perf_counter() - start:.1f} s)")


def train(args):
    """Train until the run's target, then test; returns the exit code."""
    training.set_up_devices(args.host_devices, args.distributed, args.coordinator,
                            args.num_processes, args.process_id, args.coordinator_timeout)
    stop = catch_stop_signals()
    run = start_run(args)
    if run is None:
        return 0
    p = run.progress
    if jax.process_index() == 0:
        print(describe_run(run))
    batch = training.put_batch(np.zeros((run.settings["batch_size"], *run.ds.shape), np.uint8),
                               run.mesh)
    step = training.make_train_step(run.cfg, run.optimizer, run.mesh, run.settings["ema"])
    train_step = step.lower(run.state, batch, p.step).compile()    # before the bar starts
    evaluate = training.make_evaluate(run.cfg, run.mesh, args.eval_batch_size)
    images = run.settings["batch_size"]
    with tqdm(total=run.last_step * images, initial=p.step * images, unit="img",
              disable=jax.process_index() != 0,
              bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"
              ) as bar:
        while p.step < run.last_step and not stop:
            bar.set_description(f"epoch {p.epoch + 1}/{run.target['epochs']}")
            speed = train_epoch(run, train_step, bar, stop)
            if stop:
                break
            if p.index == run.steps_per_epoch:
                p.epoch, p.index = p.epoch + 1, 0
            validate(run, evaluate, speed)
    if stop:
        run.save()
        print(f"train.py: interrupted at step {p.step}; saved {run.out / 'checkpoint.npz'}; "
              f"continue with --resume", file=sys.stderr)
        return 128 + stop[0]
    if run.best is None:        # the target was reached before any validation
        validate(run, evaluate, None)
    finish(run, evaluate)
    return 0


def evaluate_checkpoint(args):
    """``--evaluate``: a checkpoint's validation and test NLL, ± standard errors over images."""
    ignored = [flag for flag in ("model", "dataset", "resume", "init_from") if getattr(args, flag)]
    if ignored:
        raise UserError(f"--evaluate scores the checkpoint's own model on its own dataset: leave "
                        f"out --{ignored[0].replace('_', '-')}")
    training.set_up_devices(args.host_devices)
    cfg, params, meta = training.load_params(args.evaluate)
    settings = meta["settings"]
    ds = data.load_dataset(settings["dataset"], args.data_dir, settings["binarize"], args.test_seed)
    mesh = training.make_mesh(eval_batch_size=args.eval_batch_size)
    evaluate = training.make_evaluate(cfg, mesh, args.eval_batch_size)
    params = jax.device_put(params, training.replicated(mesh))
    (unit, factor), n = nll_unit(cfg), args.eval_subset or None
    seed = "" if args.test_seed is None else f", binarization seed {args.test_seed}"
    for name, images, note in (("valid", ds.valid[:n], ""), ("test", ds.test[:n], seed)):
        nll, se = evaluate(params, images)
        print(f"{name} {nll * factor:.4f} ± {se * factor:.2f} {unit} ({len(images)} images{note})")
    return 0


def main(argv=None):
    """User mistakes: one line on stderr, exit code 2. A diverged run exits with 1; one
    stopped by a signal with 128 + its number (130 for Ctrl-C), after saving."""
    args = parser.parse_args(argv)
    try:
        return evaluate_checkpoint(args) if args.evaluate else train(args)
    except (UserError, data.DataError) as e:
        parser.error(" ".join(str(e).split()))
    except Diverged as e:
        parser.exit(EXIT_DIVERGED, f"train.py: error: {e}\n")
    except OSError as e:               # a full disk, a folder removed under the run
        parser.error(f"cannot write {e.filename}: {e.strerror or e}")
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        parser.error("out of memory: give a smaller --batch-size or --eval-batch-size")


if __name__ == "__main__":
    sys.exit(main())
