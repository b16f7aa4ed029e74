"""Draw samples, or complete occluded test images, with a trained model: a PNG grid.

    python sample.py                                   # 64 samples from the shipped Diagonal BiLSTM
    python sample.py --model pixelcnn --num 16 --seed 1 --out grid.png
    python sample.py --checkpoint runs/pixelcnn-mnist/best.npz
    python sample.py --complete                        # the paper's Figure 1

Without ``--checkpoint`` it draws from the binarized-MNIST weights shipped in
``weights/<model>-mnist.npz``, by default the model with the paper's best NLL.
``--complete`` lays out the paper's Figure 1: one test image per row, its
lower half occluded (grey), several completions given the upper half, then
the original. Sampling uses the fast sampler (``pixelrnn.sample`` /
``pixelrnn.complete``); its time is printed with the compile time apart.
"""

import argparse
import pathlib
import sys
import time

import jax
import numpy as np

import data
import pixelrnn
import training
from training import UserError

# ---- defaults: edit them here or override them on the command line ----
WEIGHTS = pathlib.Path(__file__).resolve().parent / "weights"  # the shipped models
SHIPPED = ("diagbilstm", "rowlstm", "pixelcnn")  # by the paper's MNIST NLL: 79.20, 80.54, 81.30
NUM = 64                     # samples in the grid (8 x 8)
IMAGES = 8                   # --complete: test images, one per row
COMPLETIONS = 5              # --complete: completions of each
PNG = b"\x89PNG\r\n\x1a\n"   # the first bytes of every PNG file


# usage=SUPPRESS: a mistake is one line, "sample.py: error: ...", and exit code 2.
parser = argparse.ArgumentParser(prog="sample.py", usage=argparse.SUPPRESS,
                                 description=__doc__.split("\n\n")[0])
which = parser.add_mutually_exclusive_group()
which.add_argument("--checkpoint", type=pathlib.Path, help="a .npz written by train.py")
which.add_argument("--model", choices=pixelrnn.MODELS,
                   help=f"this model's shipped weights (default {SHIPPED[0]})")
parser.add_argument("--num", type=training.number(int, 1), default=NUM,
                    help=f"samples (default {NUM})")
parser.add_argument("--seed", type=int, default=0, help="default 0")
parser.add_argument("--out", type=pathlib.Path, help="PNG to write (default: beside the "
                    "checkpoint; for shipped weights <model>-<kind>_seed<S>.png here)")
parser.add_argument("--scale", type=training.number(int, 1), default=data.GRID_SCALE,
                    help=f"screen pixels per image pixel (default {data.GRID_SCALE})")
parser.add_argument("--complete", action="store_true", help="complete occluded test images")
parser.add_argument("--images", type=training.number(int, 1), default=IMAGES,
                    help=f"--complete: test images (default {IMAGES})")
parser.add_argument("--completions", type=training.number(int, 1), default=COMPLETIONS,
                    help=f"--complete: completions per image (default {COMPLETIONS})")
parser.add_argument("--data-dir", help="--complete: the dataset's folder, as given to train.py")


def shipped_checkpoint(model=None, weights=WEIGHTS):
    """``weights/<model>-mnist.npz``, by default the first of ``SHIPPED`` there."""
    for name in [model] if model else SHIPPED:
        if (weights / f"{name}-mnist.npz").is_file():
            return weights / f"{name}-mnist.npz"
    raise UserError(f"no {weights / (model or '<model>')}-mnist.npz: train one first, e.g. "
                    f"`python train.py --model {model or 'rowlstm'}`, and pass --checkpoint PATH")


def default_out(path, kind, seed):
    """Beside a run's checkpoint; for shipped weights, in the current folder."""
    if path.resolve().parent == WEIGHTS:
        return pathlib.Path(f"{path.name.split('-')[0]}-{kind}_seed{seed}.png")
    return path.parent / f"{kind}_seed{seed}.png"


def check_out(out, checkpoint):
    """Refuse, before any work, to replace the checkpoint or a file that is not a PNG."""
    if out.exists() and (out.resolve() == checkpoint.resolve() or out.read_bytes()[:8] != PNG):
        raise UserError(f"--out {out} would replace a file that is not a PNG image")
    if not out.resolve().parent.is_dir():
        raise UserError(f"cannot write {out}: no folder {out.parent}")


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
        lambda params, key, batch: pixelrnn.complete(params, cfg, key, batch, known),
        params, key, batch)
    return result.reshape(len(images), completions, *images.shape[1:]), compile_s, run_s


# ---------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------


def figure_1(images, completions, levels):
    """The paper's Figure 1 as a uint8 grid: per row an occluded image, its completions and
    the original.

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
    args = parser.parse_args(argv)
    try:
        path = args.checkpoint or shipped_checkpoint(args.model)
        kind = "completions" if args.complete else "samples"
        out = args.out or default_out(path, kind, args.seed)
        check_out(out, path)
        cfg, params, meta = training.load_params(path)
        key = jax.random.PRNGKey(args.seed)
        if args.complete:
            images = load_test_images(meta["settings"], args.data_dir, cfg, args.images)
            completed, compile_s, run_s = draw_completions(params, cfg, key, images,
                                                           args.completions)
            grid, count = figure_1(images, completed, cfg.levels), len(images) * args.completions
        else:
            samples, compile_s, run_s = draw_samples(params, cfg, key, args.num)
            grid, count = data.image_grid(samples, cfg.levels), len(samples)
        data.save_png(out, grid, args.scale)
    except OSError as e:
        parser.error(f"cannot write {out}: {e.strerror or e}")
    except (UserError, data.DataError) as e:
        parser.error(" ".join(str(e).split()))
    print(f"wrote {out}: {count} {kind} from {path} in {run_s:.2f} s "
          f"(compiling took {compile_s:.1f} s more)"
          + ("" if args.checkpoint else "; --checkpoint PATH picks another model"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
