"""Draw samples, or complete occluded test images, with a trained model: a PNG grid.

    python sample.py                                   # 64 samples from the newest trained run
    python sample.py --num 16 --seed 1 --out grid.png
    python sample.py --model pixelcnn                  # the newest PixelCNN run, else the shipped one
    python sample.py --checkpoint runs/pixelcnn-mnist/checkpoint.npz
    python sample.py --complete                        # the paper's Figure 1

Without ``--checkpoint`` it takes ``best.npz`` (the best validation NLL) of
the run under ``runs/`` whose ``best.npz`` is newest (of ``--model`` if
given). Where there is none, as on a fresh clone, it takes the trained
binarized-MNIST weights shipped in ``weights/``: ``weights/<model>-mnist.npz``,
by default the shipped model with the paper's best NLL. It says which file it
used.

``--complete`` lays out the paper's Figure 1: one test image per row, its
lower half occluded (grey), then several completions sampled given the upper
half, then the original. Sampling uses the fast sampler
(``pixelrnn.sample`` / ``pixelrnn.complete``); the time it takes is printed
with the compile time apart.
"""

import pathlib
import sys
import time

import jax
import numpy as np

import checkpoint
import data
import pixelrnn
from checkpoint import UserError

# ---- defaults: edit them here or override them on the command line ----
RUNS = pathlib.Path("runs")  # where train.py writes its runs
WEIGHTS = pathlib.Path(__file__).resolve().parent / "weights"  # trained models shipped with the code
SHIPPED = ("diagbilstm", "rowlstm", "pixelcnn")  # by the paper's MNIST NLL: 79.20, 80.54, 81.30 nats
NUM = 64                     # samples in the grid (8 x 8)
SEED = 0
IMAGES = 8                   # --complete: test images, one per row
COMPLETIONS = 5              # --complete: completions of each
PROGRAM = "sample.py"


def parse_args(argv=None):
    p = checkpoint.OneLineParser(prog=PROGRAM, description=__doc__.split("\n\n")[0])
    add, number = p.add_argument, checkpoint.number
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--checkpoint", type=pathlib.Path,
        help=f"a checkpoint .npz written by train.py (default: the newest best.npz under {RUNS}/, "
             f"else the shipped weights/<model>-mnist.npz)")
    which.add_argument(
        "--model", choices=pixelrnn.MODELS,
        help="take this model's newest run, else its shipped weights (default: any model's "
             f"newest run, else the first shipped of {', '.join(SHIPPED)})")
    add("--num", type=number(int, 1), default=NUM, help=f"samples (default {NUM})")
    add("--seed", type=number(int, 0), default=SEED, help=f"default {SEED}")
    add("--out", type=pathlib.Path,
        help="PNG to write (default: next to the checkpoint; for shipped weights, "
             "<model>-samples_seed<S>.png here)")
    add("--scale", type=number(int, 1), default=data.GRID_SCALE,
        help=f"screen pixels per image pixel (default {data.GRID_SCALE})")
    add("--complete", action="store_true", help="complete occluded test images instead")
    add("--images", type=number(int, 1), default=IMAGES, help=f"--complete: test images (default {IMAGES})")
    add("--completions", type=number(int, 1), default=COMPLETIONS,
        help=f"--complete: completions per image (default {COMPLETIONS})")
    add("--data-dir", help="--complete: the dataset's folder, as given to train.py")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def newest_checkpoint(model=None, runs=RUNS):
    """The newest ``best.npz`` under ``runs`` (of ``model`` if given): the best
    parameters of the run that validated last, or ``None`` (a run stopped before
    its first validation has none)."""
    trained = sorted(runs.glob("*/best.npz"), key=lambda path: path.stat().st_mtime, reverse=True)
    return next((path for path in trained
                 if model is None or checkpoint.read(path).cfg.model == model), None)


def shipped_checkpoint(model=None, weights=WEIGHTS):
    """``weights/<model>-mnist.npz``, or without ``model`` the first of ``SHIPPED``
    that is there; ``None`` if it is not there."""
    paths = (weights / f"{name}-mnist.npz" for name in ([model] if model else SHIPPED))
    return next((path for path in paths if path.is_file()), None)


def choose_checkpoint(model=None, runs=RUNS, weights=WEIGHTS):
    """The newest trained run's ``best.npz``, else the shipped weights (see the
    module docstring). Neither: a :class:`UserError` that says how to train one."""
    path = newest_checkpoint(model, runs) or shipped_checkpoint(model, weights)
    if path is None:
        which = f"{model} " if model else ""
        raise UserError(f"no trained {which}run under {runs}/ (no best.npz) and no shipped "
                        f"{weights.name}/{model or '<model>'}-mnist.npz: train one first, e.g. "
                        f"`python train.py --model {model or 'rowlstm'}`, or pass --checkpoint PATH")
    return path


def default_out(path, model, kind, seed, weights=WEIGHTS):
    """Next to a run's checkpoint; for shipped weights, in the current folder
    (the repository's ``weights/`` holds only the models)."""
    name = f"{kind}_seed{seed}.png"
    return pathlib.Path(f"{model}-{name}") if path.parent == weights else path.parent / name


# ---------------------------------------------------------------------------
# Sampling, timed
# ---------------------------------------------------------------------------


def timed(function, *args):
    """Compile ``jax.jit(function)`` for ``args``, then run it: ``(result, compile_s, run_s)``."""
    start = time.perf_counter()
    compiled = jax.jit(function).lower(*args).compile()
    compiled_at = time.perf_counter()
    result = np.asarray(compiled(*args))
    return result, compiled_at - start, time.perf_counter() - compiled_at


def draw_samples(params, cfg, key, num):
    """``num`` samples ``(num, H, W, C)`` and the timings."""
    return timed(lambda params, key: pixelrnn.sample(params, cfg, key, num), params, key)


def draw_completions(params, cfg, key, images, completions):
    """``completions`` completions of each of ``images (N, H, W, C)`` given its upper
    half: ``(N, completions, H, W, C)``, and the timings."""
    known = (cfg.height // 2) * cfg.width
    batch = np.repeat(images, completions, axis=0)
    result, compile_s, run_s = timed(
        lambda params, key, batch: pixelrnn.complete(params, cfg, key, batch, known), params, key, batch)
    return result.reshape(len(images), completions, *images.shape[1:]), compile_s, run_s


# ---------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------


def figure_1(images, completions, levels):
    """The paper's Figure 1 as a uint8 grid: per row an occluded image, its completions, the original.

    ``images (N, H, W, C)``, ``completions (N, K, H, W, C)``, values in
    ``[0, levels)``. The occluded half is shown in the grid's padding grey.
    """
    height = images.shape[1]
    as_bytes = lambda x: data.image_grid(x, levels, rows=1, pad=0)  # noqa: E731  one image, 0..255
    tiles = []
    for image, completed in zip(images, completions):
        occluded = as_bytes(image[None]).copy()
        occluded[height // 2:] = data.GRID_PAD_VALUE
        tiles += [occluded] + [as_bytes(c[None]) for c in completed] + [as_bytes(image[None])]
    tiles = np.stack(tiles)
    if tiles.ndim == 3:
        tiles = tiles[..., None]                              # grey: back to (N, H, W, 1)
    return data.image_grid(tiles, 256, rows=len(images))


def load_test_images(settings, data_dir, cfg, count):
    """The first ``count`` test images of the run's dataset."""
    ds = data.load_dataset(settings["dataset"], data_dir)
    if ds.test.shape[1:] != (cfg.height, cfg.width, cfg.channels):
        raise UserError(f"the {settings['dataset']} test images are {ds.test.shape[1:]}, "
                        f"the model's {(cfg.height, cfg.width, cfg.channels)}")
    return ds.test[:count].astype(np.int32)


def main(argv=None):
    args = parse_args(argv)
    path = args.checkpoint or choose_checkpoint(args.model)
    cfg, params, settings = checkpoint.load_params(path)
    key = jax.random.PRNGKey(args.seed)
    kind = "completions" if args.complete else "samples"
    out = args.out or default_out(path, cfg.model, kind, args.seed)
    if args.complete:
        images = load_test_images(settings, args.data_dir, cfg, args.images)
        completed, compile_s, run_s = draw_completions(params, cfg, key, images, args.completions)
        grid = figure_1(images, completed, cfg.levels)
        count = len(images) * args.completions
    else:
        samples, compile_s, run_s = draw_samples(params, cfg, key, args.num)
        grid = data.image_grid(samples, cfg.levels)
        count = len(samples)
    try:
        data.save_png(out, grid, args.scale)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    print(f"wrote {out}: {count} {kind} from {path} in {run_s:.2f} s "
          f"(compiling took {compile_s:.1f} s more)"
          + ("" if args.checkpoint else "; --checkpoint PATH picks another model"))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (UserError, data.DataError) as e:
        checkpoint.fail(e, PROGRAM)
