"""Datasets, batches, PNG grids and SVG curves: everything between files and arrays.

    ds = load_dataset("mnist")                        # embedded binarized MNIST
    for index, images in train_batches(ds, 64, seed=0, epoch=0):
        ...                                           # images (64, 28, 28, 1) uint8 in [0, levels)
    save_png("grid.png", image_grid(images, ds.levels))

Images are uint8 arrays ``(N, H, W, C)`` with values in ``[0, levels)``.
Datasets (``DATASETS``), all loaded from local files, nothing downloaded:

- ``mnist``: binarized MNIST from the embedded ``data/mnist.npz``
  (50k / 10k / 10k). Each pixel is 1 with probability ``intensity / 255``.
  Validation and test use one fixed seeded binarization, the same on every
  machine; training draws a fresh one for every batch of every epoch (or one
  fixed one: ``binarize="fixed"``, the paper's protocol).
- ``mnist256``: the same digits as 8-bit levels (a 256-way softmax).
- ``cifar10``: the python version of CIFAR-10 (``cifar-10-batches-py``), from ``data_dir``.
- ``idx``, ``idx-binary``: MNIST-format IDX files (MNIST, Fashion-MNIST, ...)
  from ``data_dir``, 8-bit or binarized.

For the datasets read from ``data_dir`` the validation set is the last sixth
of the official training set (for MNIST's 60,000 images exactly the embedded
50k / 10k split).
"""

import contextlib
import dataclasses
import gzip
import os
import pathlib
import pickle
import struct
import zipfile
import zlib

import numpy as np

EMBEDDED_DIR = pathlib.Path(__file__).parent / "data"

# Every random stream is seeded by (purpose, coordinates...), so no two uses
# share a stream (numpy pads short seeds with zeros: 0, [0] and [0, 0] are one
# seed, hence the tag in front). The fixed binarizations are fixed forever:
# validation and test NLLs of different runs compare only on the same bits.
FIXED_BINARIZATION, SHUFFLE, FRESH_BINARIZATION, OTHER_TEST_BINARIZATION = 1, 2, 3, 4
FIXED_BINARIZATION_SEEDS = {"train": (FIXED_BINARIZATION, 0), "valid": (FIXED_BINARIZATION, 1),
                            "test": (FIXED_BINARIZATION, 2)}


class DataError(Exception):
    """A dataset is missing or malformed: a user-facing, one-line message."""


# ---------------------------------------------------------------------------
# Loaders: data_dir -> {"train", "valid", "test"} uint8 (N, H, W, C), 0..255
# ---------------------------------------------------------------------------


def load_mnist_npz(data_dir=None):
    """MNIST as ``mnist.npz`` in ``data_dir``, by default the embedded copy (``data/mnist.npz``;
    its provenance is in the README, section Data)."""
    path = pathlib.Path(data_dir or EMBEDDED_DIR) / "mnist.npz"
    try:
        with np.load(path, allow_pickle=False) as f:
            splits = {split: f[f"{split}_images"][..., None]
                      for split in ("train", "valid", "test")}
    except FileNotFoundError:
        raise DataError(f"{path} not found") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a valid MNIST .npz file ({e})") from None
    for split, images in splits.items():
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(f"{path}: {split}_images must be uint8 (N, H, W)")
    return splits


def find_file(directory, names):
    """The first of ``names`` that exists in ``directory``, else a ``DataError``."""
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"{names[0]} not found in {directory}")


def hold_out_validation(train_images, test_images):
    """Split the official training set: its last sixth becomes the validation set."""
    n_valid = max(1, len(train_images) // 6)
    return {"train": train_images[:-n_valid], "valid": train_images[-n_valid:],
            "test": test_images}


def read_cifar10_batch(path):
    """One ``cifar-10-batches-py`` file -> uint8 ``(10000, 32, 32, 3)``.

    CIFAR-10's python version is pickled; this is the one place the project
    unpickles anything, and only files the user pointed ``data_dir`` at.
    """
    try:
        with open(path, "rb") as f:
            cifar_batch = pickle.load(f, encoding="bytes")
        rows = np.asarray(cifar_batch[b"data"], dtype=np.uint8)
        # Each row holds the 1024 red, then green, then blue values of a 32x32 image.
        return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, IndexError) as e:
        raise DataError(f"{path} is not a CIFAR-10 python batch file ({e!r})") from None


def load_cifar10(data_dir):
    """CIFAR-10 from ``data_dir`` or ``data_dir/cifar-10-batches-py``."""
    directory = pathlib.Path(data_dir)
    if not (directory / "data_batch_1").is_file() and (directory / "cifar-10-batches-py").is_dir():
        directory = directory / "cifar-10-batches-py"
    train = [read_cifar10_batch(find_file(directory, [f"data_batch_{i}"])) for i in range(1, 6)]
    test = read_cifar10_batch(find_file(directory, ["test_batch"]))
    return hold_out_validation(np.concatenate(train), test)


def read_idx_images(path):
    """An IDX image file (``.gz`` or raw) -> uint8 ``(N, H, W, 1)``.

    The format (yann.lecun.com/exdb/mnist): bytes 0, 0, a type code (0x08 =
    uint8) and the number of dimensions (3), then each dimension as a
    big-endian uint32, then the values in C order.
    """
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype != 0x08 or ndim != 3:
            raise ValueError("not a uint8 3-D IDX file")
        shape = struct.unpack(">3I", raw[4:16])
        return np.frombuffer(raw, np.uint8, offset=16).reshape(*shape, 1)
    except (OSError, EOFError, ValueError, struct.error, zlib.error) as e:
        raise DataError(f"{path} is not an IDX image file ({e})") from None


def load_idx(data_dir):
    """``train-images-idx3-ubyte`` and ``t10k-images-idx3-ubyte`` (each raw or ``.gz``)."""
    directory = pathlib.Path(data_dir)
    train, test = (read_idx_images(find_file(directory, [f"{name}-images-idx3-ubyte.gz",
                                                         f"{name}-images-idx3-ubyte"]))
                   for name in ("train", "t10k"))
    if train.shape[1:] != test.shape[1:]:
        raise DataError(f"the IDX training images are {train.shape[1:3]}, the test images "
                        f"{test.shape[1:3]}: one model cannot score both")
    return hold_out_validation(train, test)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How to get a dataset: its shape parameters and a loader ``data_dir -> splits``.

    ``levels == 2`` means binarized from 8-bit intensities; 256 means the
    8-bit values themselves.
    """
    channels: int
    levels: int
    load: callable
    files: str = None     # what data_dir must hold, for datasets that are not embedded


IDX_FILES = "train-images-idx3-ubyte and t10k-images-idx3-ubyte (raw or .gz)"
DATASETS = {
    "mnist": DatasetSpec(1, 2, load_mnist_npz),
    "mnist256": DatasetSpec(1, 256, load_mnist_npz),
    "cifar10": DatasetSpec(3, 256, load_cifar10, "CIFAR-10's python version (data_batch_1 to "
                                                 "data_batch_5 and test_batch)"),
    "idx": DatasetSpec(1, 256, load_idx, IDX_FILES),
    "idx-binary": DatasetSpec(1, 2, load_idx, IDX_FILES),
}


# ---------------------------------------------------------------------------
# Binarization and batches
# ---------------------------------------------------------------------------


def binarize(intensities, seed):
    """Bernoulli(intensity / 255) pixels: uint8 ``(...)`` 0..255 -> uint8 0/1.

    ``u`` uniform on ``{0, ..., 254}`` is below ``k`` with probability exactly
    ``k / 255``, so integers suffice: no float rounding, one byte per pixel.
    ``np.random.PCG64`` produces the same stream on every platform.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    return (rng.integers(0, 255, intensities.shape, dtype=np.uint8) < intensities).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A loaded dataset. ``valid`` and ``test`` hold final values in ``[0, levels)``;
    ``train`` holds 8-bit intensities when ``fresh_binarization`` (binarized
    batch by batch in :func:`train_batches`), else final values too."""
    name: str
    channels: int
    levels: int
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    fresh_binarization: bool

    @property
    def shape(self):
        """``(H, W, C)`` of one image."""
        return self.train.shape[1:]


def load_dataset(name, data_dir=None, binarize_train="fresh", test_seed=None):
    """Load dataset ``name`` from ``data_dir`` (the embedded data by default).

    ``binarize_train`` (binary datasets only): ``"fresh"`` draws a new
    binarization of every training batch, ``"fixed"`` binarizes the training
    set once. ``test_seed`` (binary datasets only): binarize the test set with
    this seed instead of the pinned one, to check that a figure holds on any
    binarization. Raises ``DataError`` for unknown names, a missing ``data_dir``
    for a dataset that is not embedded, and unreadable files.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    spec = DATASETS[name]
    if spec.files and data_dir is None:
        raise DataError(f"the {name} dataset is not embedded: give --data-dir, a folder "
                        f"holding {spec.files}")
    splits = spec.load(data_dir)
    if splits["train"].shape[-1] != spec.channels:
        raise DataError(f"{name}: images have {splits['train'].shape[-1]} channels, "
                        f"expected {spec.channels}")
    fresh = spec.levels == 2 and binarize_train == "fresh"
    if test_seed is not None and spec.levels != 2:
        raise DataError(f"{name} is not binarized: a test binarization seed means nothing for it")
    if spec.levels == 2:
        seeds = dict(FIXED_BINARIZATION_SEEDS)
        if test_seed is not None:
            seeds["test"] = (OTHER_TEST_BINARIZATION, test_seed)
        for split in ("valid", "test") if fresh else ("train", "valid", "test"):
            splits[split] = binarize(splits[split], seeds[split])
    return Dataset(name, spec.channels, spec.levels, fresh_binarization=fresh, **splits)


def epoch_order(num_images, seed, epoch):
    """The shuffled order of the training images in ``epoch``: a permutation
    that depends only on ``(seed, epoch)``, so a resumed run sees the same one."""
    return np.random.Generator(np.random.PCG64((SHUFFLE, seed, epoch))).permutation(num_images)


def steps_per_epoch(dataset, batch_size):
    """Full batches per epoch (the incomplete last batch is dropped)."""
    return len(dataset.train) // batch_size


def train_batches(dataset, batch_size, seed, epoch, start=0):
    """Yield ``(index, images (batch_size, H, W, C) uint8)`` for batches
    ``start, start + 1, ...`` of ``epoch``.

    Deterministic given ``(seed, epoch, index)``, so ``(epoch, start)`` is all
    a checkpoint needs to continue exactly where it stopped.
    """
    order = epoch_order(len(dataset.train), seed, epoch)
    for index in range(start, steps_per_epoch(dataset, batch_size)):
        images = dataset.train[order[index * batch_size:(index + 1) * batch_size]]
        if dataset.fresh_binarization:
            images = binarize(images, (FRESH_BINARIZATION, seed, epoch, index))
        yield index, images


def eval_batches(images, batch_size):
    """Yield ``(batch (batch_size, H, W, C), count)`` covering ``images`` in order.

    The last batch is padded with copies of the first image so that every
    batch has the same shape (one compilation); only its first ``count``
    entries are real.
    """
    for begin in range(0, len(images), batch_size):
        batch = images[begin:begin + batch_size]
        count = len(batch)
        padding = np.repeat(images[:1], batch_size - count, axis=0)
        yield np.concatenate([batch, padding]), count


# ---------------------------------------------------------------------------
# Files: atomic writes and PNG grids
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_write(path):
    """Open ``path`` for binary writing so that it is replaced all at once.

    Writes go to ``.<name>.tmp`` beside it, which is flushed to disk and renamed
    over ``path`` only if the block succeeds: a crash or Ctrl-C leaves either
    the old file or the new one, never half of one (and at most that one
    temporary file, which the next write replaces).
    """
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)            # the message names the file, not the stream
        raise


def png_bytes(image):
    """An 8-bit PNG of ``image``: uint8 ``(H, W)`` grey or ``(H, W, 3)`` RGB."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"PNG image must be uint8 (H, W) or (H, W, 3), "
                         f"got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    color_type = 0 if image.ndim == 2 else 2  # 0 = greyscale, 2 = RGB

    def chunk(kind, payload):
        # length, type, payload, CRC-32 of type + payload (PNG spec section 5.3)
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload)))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    # Every scanline starts with its filter type; 0 means unfiltered.
    scanlines = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, -1)], axis=1)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 9)) + chunk(b"IEND", b""))


def save_png(path, image, scale=1):
    """Write ``image`` (uint8 ``(H, W)`` or ``(H, W, 3)``) to ``path`` as a PNG, atomically.

    ``scale`` enlarges it by nearest neighbour: every pixel becomes a
    ``scale x scale`` block, so that a 28x28 digit is not a speck on screen.
    """
    image = np.repeat(np.repeat(np.asarray(image), scale, axis=0), scale, axis=1)
    data = png_bytes(image)
    with atomic_write(path) as f:
        f.write(data)


GRID_PAD_VALUE = 128  # mid grey: visible between white-on-black digits and photos alike
GRID_SCALE = 4        # screen pixels per image pixel: an 8x8 grid of MNIST digits is 932 px wide


def image_grid(images, levels, rows=None, pad=1):
    """Tile ``images (N, H, W, C)`` in ``[0, levels)`` into one uint8 picture.

    Values are scaled to 0..255. ``rows`` defaults to a near-square layout.
    Returns ``(rows*(H+pad)+pad, cols*(W+pad)+pad)`` for grey images, with a
    trailing axis of 3 for RGB.
    """
    images = np.asarray(images)
    num, height, width, channels = images.shape
    cols = int(np.ceil(np.sqrt(num))) if rows is None else -(-num // rows)
    rows = -(-num // cols)
    grid = np.full((rows * (height + pad) + pad, cols * (width + pad) + pad, channels),
                   GRID_PAD_VALUE, np.uint8)
    scaled = (images.astype(np.int64) * 255 // (levels - 1)).astype(np.uint8)
    for i, image in enumerate(scaled):
        top, left = pad + (i // cols) * (height + pad), pad + (i % cols) * (width + pad)
        grid[top:top + height, left:left + width] = image
    return grid[..., 0] if channels == 1 else grid


def curve_svg(lines, unit, paper=None):
    """An SVG chart (plain text, no plotting library) of the validation NLL and the training
    loss in ``unit`` against images seen; the paper's figure as a dashed line."""
    width, height, left, right, top, bottom = 640, 400, 70, 150, 20, 50
    series = {"validation NLL": ("#1f77b4", [(m["images"], m["valid_nll"]) for m in lines
                                             if "valid_nll" in m]),
              "training loss": ("#ff7f0e", [(m["images"], m["train_loss"]) for m in lines
                                            if m.get("train_loss") is not None])}
    xs = [x for _, points in series.values() for x, _ in points] + [1]
    ys = [y for _, points in series.values() for _, y in points] + ([paper] if paper else [])
    low, high = (min(ys), max(ys)) if ys else (0.0, 1.0)
    pad = 0.05 * (high - low) or 1.0             # keep the extremes off the axes
    low, high, x_max = max(low - pad, 0.0), high + pad, max(xs)    # an NLL is >= 0

    def px(x):
        return left + (width - left - right) * x / x_max

    def py(y):
        return top + (height - top - bottom) * (high - y) / (high - low)

    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<polyline points="{px(0)},{py(high)} {px(0)},{py(low)} {px(x_max)},{py(low)}" '
           f'fill="none" stroke="black"/>',
           f'<text x="{(left + width - right) / 2}" y="{height - 10}" text-anchor="middle">'
           f'training images seen</text>',
           f'<text x="{left}" y="{top - 6}" text-anchor="middle">NLL ({unit})</text>']
    for fraction in (0, 0.5, 1):                 # ticks at both ends and the middle
        x, y = x_max * fraction, low + (high - low) * fraction
        svg += [f'<text x="{px(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">'
                f'{x:,.0f}</text>',
                f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>']
    legend = [(f"paper: {paper}", "gray")] if paper else []
    if paper:
        svg.append(f'<line class="paper" x1="{px(0)}" y1="{py(paper):.1f}" x2="{px(x_max)}" '
                   f'y2="{py(paper):.1f}" stroke="gray" stroke-dasharray="6,4"/>')
    for name, (colour, points) in series.items():
        kind, path = name.split()[0], " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        svg.append(f'<polyline class="{kind}" points="{path}" fill="none" stroke="{colour}"/>')
        svg += [f'<circle class="{kind}" cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" '
                f'fill="{colour}"/>' for x, y in points]
        legend.append((name, colour))
    svg += [f'<text x="{width - right + 8}" y="{top + 10 + 18 * i}" fill="{colour}">{text}</text>'
            for i, (text, colour) in enumerate(legend)]
    return "\n".join(svg + ["</svg>"]) + "\n"


def save_curve_svg(path, lines, unit, paper=None):
    """Write :func:`curve_svg` of a run's metrics ``lines`` to ``path``, atomically."""
    with atomic_write(path) as f:
        f.write(curve_svg(lines, unit, paper).encode())
