"""Checkpoints, and the one-line errors every script ends with.

    checkpoint.write(path, settings, target, cfg, progress, tree)   # atomically
    saved = checkpoint.read(path)             # .settings, .target, .cfg, .progress, .arrays
    cfg, params, settings = checkpoint.load_params(path)            # the model, for sampling

A checkpoint is a plain ``.npz`` file: every array is named by its path in
the tree it came from (``params/layers/0/input_to_state/w``,
``opt_state/...``, ``ema/...``, ``rng``) and one more entry, ``meta``, holds the model
config, the run's settings and target and its progress as JSON. It loads
with ``np.load(path, allow_pickle=False)``: nothing is ever unpickled, so
opening a checkpoint never runs code from it. The tree's structure is not
stored; it comes from the config (``pixelrnn.init`` and the optimizer),
and every array must match it by name and shape.

A mistake the user can fix (a bad flag, a missing file, a checkpoint of
another model) is a :class:`UserError`; the scripts print it with
:func:`fail` as one line and exit with code 2.
"""

import argparse
import dataclasses
import json
import math
import sys
import typing
import zipfile

import jax
import numpy as np

import data
import pixelrnn

EXIT_USER_ERROR = 2

# ---------------------------------------------------------------------------
# User errors: one line, exit code 2
# ---------------------------------------------------------------------------


class UserError(Exception):
    """A mistake in the command line, the data or the run folder: one line, exit code 2."""


def fail(message, program, code=EXIT_USER_ERROR, label="error: "):
    """Print ``message`` as a single line on stderr, as ``program: error: ...``, and exit with ``code``."""
    print(f"{program}: {label}{' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(code)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a mistake prints one line (no usage block) and exits with code 2."""

    def error(self, message):
        fail(message, self.prog)


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


# ---------------------------------------------------------------------------
# Checkpoints: named arrays + a JSON record, no pickle
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Progress:
    """Where a run stands. Saved in every checkpoint, so a resumed run continues exactly."""
    step: int = 0              # optimizer steps taken
    epoch: int = 0             # the epoch being trained (0-based)
    index: int = 0             # batches of that epoch already trained on
    recent_losses: list = dataclasses.field(default_factory=list)  # nats/image, the last steps'
    train_seconds: float = 0.0  # time spent in training steps (not compiling, not validating)
    best_valid: float = None   # best validation NLL (nats/image) and its step
    best_step: int = None
    tested: bool = False       # the run reached its target and was scored on the test set
    metrics: list = dataclasses.field(default_factory=list)  # the lines of metrics.jsonl
    images_before: int = 0     # images the starting parameters had seen (train.py --init-from)


class Saved(typing.NamedTuple):
    """A checkpoint's contents, as :func:`read` returns them."""
    settings: dict             # the settings that define the run (train.py's RUN_SETTINGS)
    target: dict               # {"epochs": E, "max_steps": S}: where the run stops
    cfg: pixelrnn.Config
    progress: Progress
    arrays: dict               # {name: np.ndarray}


def array_name(path):
    """A key path -> an array name in the checkpoint, e.g. ``params/layers/0/w``."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def flatten(tree):
    """A pytree -> ``{name: np.ndarray}``, named by the leaves' key paths."""
    return {array_name(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(arrays, template, source):
    """The inverse of :func:`flatten`: ``template``'s structure filled from ``arrays``.

    A missing name or another shape means the file was not written for this
    model: a :class:`UserError` naming ``source``.
    """
    def take(path, like):
        name = array_name(path)
        if name not in arrays or arrays[name].shape != like.shape:
            raise UserError(f"{source} does not match the model config (array {name})")
        return arrays[name].astype(like.dtype)
    return jax.tree_util.tree_map_with_path(take, template)


def read(path):
    """The checkpoint at ``path`` as a :class:`Saved`.

    A missing file, a file that is not an ``.npz`` archive, one holding
    Python objects (never unpickled) or one without a complete ``meta``
    record is a :class:`UserError`.
    """
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a checkpoint: not an .npz archive")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
        meta = json.loads(str(arrays.pop("meta")))
        return Saved(meta["settings"], meta["target"], pixelrnn.Config(**meta["config"]),
                     Progress(**meta["progress"]), arrays)
    except ValueError as e:
        if "pickle" in str(e):
            raise UserError(f"{path} is not a checkpoint: it holds Python objects, "
                            f"which are never loaded") from None
        raise UserError(f"{path} is not a readable checkpoint ({e})") from None
    except (OSError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None


def write(path, settings, target, cfg, progress, tree):
    """Save ``tree`` (parameters, optimizer state, RNG key) and the JSON record
    of the run to ``path``, atomically."""
    meta = {"settings": settings, "target": target, "config": dataclasses.asdict(cfg),
            "progress": dataclasses.asdict(progress)}
    with data.atomic_write(path) as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **flatten(tree))


def load_params(path):
    """``path`` -> ``(cfg, params, settings)``: a model ready to use, from any checkpoint.

    The parameters are the moving average (see :func:`averaged_params`).
    """
    saved = read(path)
    return saved.cfg, averaged_params(saved, path), saved.settings


def averaged_params(saved, path):
    """The averaged parameters of ``saved`` (read from ``path``): ``ema/...`` where the file
    has them, as in ``checkpoint.npz``, else ``params/...`` (``best.npz`` holds the
    average under that name). A missing or misshapen array is a :class:`UserError`."""
    name = "ema" if has_average(saved) else "params"
    # Only the shapes are needed: eval_shape does not run init's random ops.
    template = {name: jax.eval_shape(lambda key: pixelrnn.init(key, saved.cfg),
                                     jax.random.PRNGKey(0))}
    return unflatten(saved.arrays, template, path)[name]


def has_average(saved):
    """Whether ``saved`` is a whole training state (``checkpoint.npz``: parameters and their
    average at ``progress.step``) rather than averaged parameters alone (``best.npz``:
    those of ``progress.best_step``)."""
    return any(array.startswith("ema/") for array in saved.arrays)
