"""The pytest suite: proofs that the models are valid autoregressive models,
then the data, training, sampling and benchmark tools built on them.

    python -m pytest -q                  # everything (what CI runs)
    python -m pytest -q -m "not slow"    # the proofs and unit tests, no subprocesses

Contents, in file order:

1. The models: causality (Jacobians), receptive fields, normalisation by
   enumeration, samplers and completion drawing from the model, masks, configs.
2. Data: the embedded MNIST, binarization, batches, loaders, PNG files.
3. Training runs (slow: train.py in subprocesses): outputs, exact resume,
   --init-from, --evaluate, several devices and processes, signals, mistakes.
4. The fast sampler equal to the reference, and sample.py.
5. The shipped weights score their README figures.
6. Speed paths equal to the definitions they replace, and bench.py.
"""

import ast
import functools
import gzip
import hashlib
import itertools
import json
import os
import pathlib
import pickle
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import types
import xml.etree.ElementTree as ET
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bench
import data
import layers
import pixelrnn
import sample
import train
import training

ROOT = pathlib.Path(__file__).parent

# ---- the models: causality, receptive fields, normalisation, sampling ----


def small_config(model, **overrides):
    """A tiny model that still has every part: 2 layers, skip connections."""
    fields = dict(model=model, height=5, width=6, channels=1, levels=2,
                  hidden=6, layers=2, out_hidden=12)
    fields.update(overrides)
    return pixelrnn.Config(**fields)


def normal(seed, shape):
    """Standard-normal test inputs from numpy: ``jax.random`` would compile a program for
    every new shape (about a second each on a slow 2-core machine)."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def one_line(text, *words):
    """Whether ``text`` is one line holding every one of ``words``."""
    return text.strip().count("\n") == 0 and all(word in text for word in words)


def all_images(cfg):
    """Every image of a tiny configuration: ``(levels ** (H*W*C), H, W, C)`` int32."""
    size = cfg.height * cfg.width * cfg.channels
    values = np.array(list(itertools.product(range(cfg.levels), repeat=size)), np.int32)
    return values.reshape(-1, cfg.height, cfg.width, cfg.channels)


def input_jacobian(cfg, seed=0, batch=2):
    """``|d logits / d input|`` summed over a few random inputs and over levels.

    Returns ``(H*W*C, H*W*C)``: row = output sub-pixel, column = input
    sub-pixel, both in raster order with channels innermost (R, G, B).
    """
    params = pixelrnn.init(jax.random.PRNGKey(seed), cfg)
    x = normal(seed + 1, (batch, cfg.height, cfg.width, cfg.channels))
    size = cfg.height * cfg.width * cfg.channels

    def outputs(x):   # every logit of every image, (batch, size, levels)
        return pixelrnn.network(params, cfg, x).reshape(batch, size, cfg.levels)

    jac = jax.jit(jax.jacrev(outputs))(x)            # (batch, size, levels, batch, H, W, C)
    jac = jnp.einsum("bslbhwc->bslhwc", jac)         # each image only depends on itself
    return np.asarray(jnp.abs(jac).sum(axis=(0, 2)).reshape(size, size))


@pytest.mark.parametrize("model", pixelrnn.MODELS)
@pytest.mark.parametrize("channels,levels", [(1, 2), (3, 4)])
@pytest.mark.parametrize("skip", [True, False])
def test_causality_jacobian(model, channels, levels, skip):
    """No logit depends on its own sub-pixel or any later one (strict lower triangle)."""
    cfg = small_config(model, channels=channels, levels=levels, skip=skip)
    jac = input_jacobian(cfg)
    assert np.all(jac[np.triu_indices_from(jac)] == 0.0), "an output sees itself or the future"
    # The test must be able to fail: the past is really being read.
    assert (jac[np.tril_indices_from(jac, k=-1)] > 0).mean() > 0.7


def test_rgb_channels_see_earlier_channels_of_the_same_pixel():
    """G reads R and B reads R and G at the same pixel; R reads neither."""
    cfg = small_config("pixelcnn", channels=3, levels=4)
    jac = input_jacobian(cfg)
    pixel = 2 * cfg.width + 3                       # an interior pixel
    r, g, b = 3 * pixel, 3 * pixel + 1, 3 * pixel + 2
    assert jac[g, r] > 0 and jac[b, r] > 0 and jac[b, g] > 0
    assert jac[r, g] == 0 and jac[r, b] == 0 and jac[g, b] == 0


def receptive_field(model, row, col, height=6, width=16):
    """0/1 map ``(H, W)`` of the inputs the logit at ``(row, col)`` depends on."""
    cfg = small_config(model, height=height, width=width, hidden=4, out_hidden=8)
    params = pixelrnn.init(jax.random.PRNGKey(1), cfg)
    x = normal(2, (3, height, width, 1))
    grad = jax.jit(jax.grad(lambda x: pixelrnn.network(params, cfg, x)[:, row, col].sum()))(x)
    return (np.abs(np.asarray(grad)).sum(axis=(0, 3)) > 0).astype(int)


def raster_past(height, width, row, col):
    """0/1 map of the pixels strictly before ``(row, col)`` in raster order."""
    past = np.zeros((height, width), int)
    past[:row] = 1
    past[row, :col] = 1
    return past


def test_diagonal_bilstm_sees_the_whole_past():
    """The last pixel depends on every earlier pixel, up to the far top-right corner."""
    field = receptive_field("diagbilstm", 5, 15)
    np.testing.assert_array_equal(field, raster_past(6, 16, 5, 15))


def test_diagonal_bilstm_mid_row_pixel_misses_only_the_previous_rows_last_pixel():
    """A documented edge effect: pixel ``(r-1, W-1)`` enters the network only
    through the 7x7 mask-A input layer of positions after it, which lie in
    row ``r`` at columns ``>= W-4``; everything else in the past is seen."""
    field = receptive_field("diagbilstm", 5, 4)
    expected = raster_past(6, 16, 5, 4)
    expected[4, 15] = 0
    np.testing.assert_array_equal(field, expected)


def test_row_lstm_sees_a_triangle():
    """Row LSTM at ``(r, c)``: row ``r - d`` is seen up to column ``c + d + 2``
    (the rows above widen by one per row; the 7x7 input layer adds 2) and
    the current row up to ``c - 1``: a triangle above the pixel."""
    row, col = 5, 4
    rows, cols = np.mgrid[:6, :16]
    triangle = ((rows < row) & (cols <= col + (row - rows) + 2)) | ((rows == row) & (cols < col))
    np.testing.assert_array_equal(receptive_field("rowlstm", row, col), triangle.astype(int))


def test_pixelcnn_has_a_blind_spot():
    """PixelCNN misses past pixels up and to the right that the Diagonal BiLSTM sees."""
    pixelcnn = receptive_field("pixelcnn", 5, 4)
    diagonal = receptive_field("diagbilstm", 5, 4)
    blind = (diagonal == 1) & (pixelcnn == 0)
    assert blind[4, 8] and blind[3, 9] and blind[0, 12]
    assert np.all(pixelcnn <= raster_past(6, 16, 5, 4))


NORMALISATION_CASES = [
    dict(height=2, width=3, channels=1, levels=2),      # 64 binary images
    dict(height=2, width=2, channels=1, levels=4),      # 256 grey images
    dict(height=1, width=2, channels=3, levels=2),      # 64 RGB images
]


@pytest.mark.parametrize("model", pixelrnn.MODELS)
@pytest.mark.parametrize("case", NORMALISATION_CASES, ids=["binary", "grey4", "rgb"])
def test_probabilities_sum_to_one(model, case):
    cfg = small_config(model, **case)
    params = pixelrnn.init(jax.random.PRNGKey(3), cfg)
    log_p = jax.jit(pixelrnn.log_prob, static_argnums=1)(params, cfg, all_images(cfg))
    assert abs(float(jnp.exp(log_p).sum()) - 1.0) < 1e-4
    assert float(jnp.exp(log_p).max()) < 0.5        # not a degenerate model


def image_index(images, levels):
    """Each image's index in :func:`all_images` order: its sub-pixels as base-``levels`` digits."""
    digits = np.asarray(images).reshape(len(images), -1)
    return digits @ (levels ** np.arange(digits.shape[1])[::-1])


def total_variation(counts, probabilities):
    return 0.5 * np.abs(counts / counts.sum() - probabilities).sum()


@pytest.mark.parametrize("model", pixelrnn.MODELS)
def test_sampler_draws_from_the_model(model):
    """20,000 samples of a 2x2 binary model: frequencies match exact probabilities."""
    cfg = small_config(model, height=2, width=2)
    params = pixelrnn.init(jax.random.PRNGKey(4), cfg)
    probabilities = np.exp(np.asarray(pixelrnn.log_prob(params, cfg, all_images(cfg))))
    samples = jax.jit(pixelrnn.sample, static_argnums=(1, 3))(params, cfg, jax.random.PRNGKey(5), 20_000)
    counts = np.bincount(image_index(samples, cfg.levels), minlength=len(probabilities))
    assert total_variation(counts, probabilities) < 0.03
    # ... and the check has power: a different model's distribution is far off.
    other = np.exp(np.asarray(pixelrnn.log_prob(
        pixelrnn.init(jax.random.PRNGKey(6), cfg), cfg, all_images(cfg))))
    assert total_variation(counts, other) > 2 * total_variation(counts, probabilities)


def test_rgb_sampler_draws_from_the_model():
    """RGB with 3 levels, one pixel: 27 outcomes, R then G then B. Random biases keep the
    distribution far from uniform (initial ones make it nearly uniform, which any sampler
    of uniform noise would match)."""
    cfg = small_config("diagbilstm", height=1, width=1, channels=3, levels=3)
    params = with_random_biases(pixelrnn.init(jax.random.PRNGKey(7), cfg), jax.random.PRNGKey(107))
    probabilities = np.exp(np.asarray(pixelrnn.log_prob(params, cfg, all_images(cfg))))
    samples = pixelrnn.sample(params, cfg, jax.random.PRNGKey(8), 20_000)
    counts = np.bincount(image_index(samples, cfg.levels), minlength=len(probabilities))
    assert total_variation(counts, probabilities) < 0.03
    other = with_random_biases(pixelrnn.init(jax.random.PRNGKey(9), cfg), jax.random.PRNGKey(109))
    other = np.exp(np.asarray(pixelrnn.log_prob(other, cfg, all_images(cfg))))
    assert total_variation(counts, other) > 2 * total_variation(counts, probabilities)


@pytest.mark.parametrize("model", pixelrnn.MODELS)
def test_complete_keeps_known_pixels_and_samples_the_conditional(model):
    """Complete a 2x2 binary image from its first 2 pixels: the last two
    pixels follow p(x_2, x_3 | x_0, x_1), computed by enumeration."""
    cfg = small_config(model, height=2, width=2)
    params = pixelrnn.init(jax.random.PRNGKey(9), cfg)
    images = all_images(cfg)
    probabilities = np.exp(np.asarray(pixelrnn.log_prob(params, cfg, images)))
    given = np.array([[[[1], [0]], [[1], [1]]]], np.int32)      # prefix (1, 0); suffix ignored
    batch = np.repeat(given, 20_000, axis=0)
    completed = np.asarray(pixelrnn.complete(params, cfg, jax.random.PRNGKey(10), batch, 2))
    np.testing.assert_array_equal(completed[:, 0], batch[:, 0])    # first row kept bit-for-bit
    matches_prefix = (images[:, 0, 0, 0] == 1) & (images[:, 0, 1, 0] == 0)
    conditional = np.where(matches_prefix, probabilities, 0.0)
    conditional /= conditional.sum()
    counts = np.bincount(image_index(completed, cfg.levels), minlength=len(images))
    assert total_variation(counts, conditional) < 0.03


def test_skew_round_trip_and_layout():
    x = jnp.arange(1, 10).reshape(3, 3, 1)
    skewed = layers.skew(x)[..., 0]
    np.testing.assert_array_equal(skewed, [[1, 2, 3, 0, 0],
                                           [0, 4, 5, 6, 0],
                                           [0, 0, 7, 8, 9]])
    y = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 7, 3))
    assert layers.skew(y).shape == (2, 4, 10, 3)
    np.testing.assert_array_equal(layers.unskew(layers.skew(y)), y)


def test_mask_values_grey():
    # Rows: kernel row; columns: kernel column. 1 = visible.
    mask_a = layers.conv_mask((3, 3, 1, 1), 1, "A")[..., 0, 0]
    mask_b = layers.conv_mask((3, 3, 1, 1), 1, "B")[..., 0, 0]
    np.testing.assert_array_equal(mask_a, [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(mask_b, [[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(layers.conv_mask((1, 3, 1, 1), 1, "B")[..., 0, 0], [[1, 1, 0]])


def test_mask_values_rgb_groups():
    # 3 input features (R, G, B) -> 6 output features (R, R, G, G, B, B).
    # Centre tap, [input, output]: mask A lets group g read groups < g.
    centre_a = layers.conv_mask((3, 3, 3, 6), 3, "A")[1, 1]
    np.testing.assert_array_equal(centre_a, [[0, 0, 1, 1, 1, 1],
                                             [0, 0, 0, 0, 1, 1],
                                             [0, 0, 0, 0, 0, 0]])
    centre_b = layers.conv_mask((3, 3, 3, 6), 3, "B")[1, 1]
    np.testing.assert_array_equal(centre_b, [[1, 1, 1, 1, 1, 1],
                                             [0, 0, 1, 1, 1, 1],
                                             [0, 0, 0, 0, 1, 1]])
    mask = layers.conv_mask((3, 3, 3, 6), 3, "A")
    assert np.all(mask[0] == 1) and np.all(mask[1, 0] == 1)       # the past: every group
    assert np.all(mask[1, 2] == 0) and np.all(mask[2] == 0)       # the future: nothing


def test_gate_blocks_each_get_the_colour_groups():
    # 3 inputs (R, G, B) -> LSTM gates [o | f | i | g] of 3 units (R, G, B) each.
    centre = layers.conv_mask((1, 3, 3, 12), 3, "B", blocks=4)[0, 1]
    block = [[1, 1, 1], [0, 1, 1], [0, 0, 1]]
    np.testing.assert_array_equal(centre, np.tile(block, 4))


@pytest.mark.parametrize("field,overrides", [
    ("model", dict(model="transformer")),
    ("channels", dict(channels=2)),
    ("levels", dict(levels=1)),
    ("hidden", dict(channels=3, hidden=16)),
    ("out_hidden", dict(channels=3, hidden=6, out_hidden=32)),
    ("layers", dict(layers=0)),
    ("height", dict(height=0)),
])
def test_invalid_config_names_the_field(field, overrides):
    with pytest.raises(ValueError, match=rf"Config\.{field}="):
        small_config(**{"model": "rowlstm", **overrides})


@pytest.mark.parametrize("skip", [True, False])
def test_the_head_reads_the_sum_of_the_residual_stream_after_every_layer(monkeypatch, skip):
    """skip=True: the head's input is the sum over layers of the stream after that
    layer's residual add; skip=False: the last layer's stream."""
    cfg = small_config("pixelcnn", layers=3, skip=skip)
    params = with_random_biases(pixelrnn.init(jax.random.PRNGKey(0), cfg), jax.random.PRNGKey(1))
    x = jax.random.normal(jax.random.PRNGKey(2), (2, cfg.height, cfg.width, 1))
    stream = layers.masked_conv(params["input"], x, 1, "A")
    streams = []
    for layer_params in params["layers"]:
        stream = stream + layers.pixelcnn_block(layer_params, stream, 1)
        streams.append(stream)
    received = []
    head = layers.output_head
    monkeypatch.setattr(layers, "output_head", lambda p, h, c: received.append(h) or head(p, h, c))
    pixelrnn.network(params, cfg, x)
    np.testing.assert_allclose(received[0], sum(streams) if skip else streams[-1], rtol=1e-5, atol=1e-5)


def test_an_impossible_value_has_log_probability_minus_infinity():
    """Values outside [0, levels) are neither wrapped into range nor NaN: probability 0."""
    cfg = small_config("rowlstm", levels=4)
    params = pixelrnn.init(jax.random.PRNGKey(0), cfg)
    images = np.ones((4, cfg.height, cfg.width, 1), np.int32)
    images[1, 2, 3, 0], images[2, 0, 0, 0], images[3, 4, 5, 0] = -1, 4, 1000
    log_p = np.asarray(pixelrnn.log_prob(params, cfg, images))
    assert np.isfinite(log_p[0]) and log_p[0] < 0
    assert (log_p[1:] == -np.inf).all()


def test_config_defaults_are_the_papers_diagonal_bilstm_and_train_py_holds_each_models_size():
    cfg = pixelrnn.Config()
    assert (cfg.layers, cfg.hidden, cfg.out_hidden, cfg.skip, cfg.residual) == (7, 16, 32, True, True)
    assert [train.SIZES[m]["layers"] for m in pixelrnn.MODELS] == [7, 7, 15]
    with pytest.raises(ValueError, match="Config.hidden=16: must be divisible by channels=3"):
        pixelrnn.Config(channels=3, levels=256)


def mnist_like_batch():
    """8 real MNIST digits, thresholded and 2x2 max-pooled to 14x14 binary images."""
    with np.load(ROOT / "data" / "mnist.npz", allow_pickle=False) as data:
        digits = data["train_images"][:8] > 127
    return digits.reshape(8, 14, 2, 14, 2).max(axis=(2, 4))[..., None].astype(np.int32)


@pytest.mark.slow
@pytest.mark.parametrize("model", pixelrnn.MODELS)
def test_it_learns_a_fixed_batch(model):
    """A few hundred Adam steps on 8 images more than halve their NLL."""
    images = mnist_like_batch()
    cfg = pixelrnn.Config(model=model, height=14, width=14, hidden=8, layers=2, out_hidden=16)
    params = pixelrnn.init(jax.random.PRNGKey(0), cfg)
    optimiser = optax.adam(3e-3)

    @jax.jit
    def loss(params):
        return -pixelrnn.log_prob(params, cfg, images).mean()

    @jax.jit
    def update(params, opt_state):
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimiser.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state = optimiser.init(params)
    first = float(loss(params))
    for _ in range(300):
        params, opt_state, _ = update(params, opt_state)
    assert float(loss(params)) < 0.5 * first


def test_no_neural_network_library_is_imported():
    forbidden = {"flax", "haiku", "equinox", "torch", "keras", "tensorflow"}
    for path in ROOT.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not {n.split(".")[0] for n in names} & forbidden, f"{path.name} imports {names}"


@pytest.mark.parametrize("model", pixelrnn.MODELS)
def test_params_are_plain_containers_of_arrays(model):
    params = pixelrnn.init(jax.random.PRNGKey(0), small_config(model))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)

    def containers(tree):
        if isinstance(tree, dict):
            return [dict] + [c for v in tree.values() for c in containers(v)]
        if isinstance(tree, list):
            return [list] + [c for v in tree for c in containers(v)]
        return []

    assert set(containers(params)) <= {dict, list}


@pytest.mark.parametrize("model", pixelrnn.MODELS)
def test_forward_pass_has_no_python_loop_over_pixels(model):
    """The traced forward pass has the same size for a 4-row and a 12-row
    image: rows, columns and diagonals are scanned, not unrolled. It also
    jits with the config as a static argument."""
    def equations(height):
        cfg = small_config(model, height=height, width=height + 1)
        params = pixelrnn.init(jax.random.PRNGKey(0), cfg)
        images = jnp.zeros((2, cfg.height, cfg.width, 1), jnp.int32)
        jax.jit(pixelrnn.log_prob, static_argnums=1)(params, cfg, images).block_until_ready()
        return len(jax.make_jaxpr(pixelrnn.log_prob, static_argnums=1)(params, cfg, images).eqns)

    assert equations(4) == equations(12)


# ---- data, training runs and the command line ----


def test_embedded_mnist_loads_with_the_documented_shapes_and_pinned_binarizations():
    """data/mnist.npz holds the 50k / 10k / 10k split; validation and test are
    one fixed binarization, pinned here bit for bit (sha256 of the packed
    bits), so every machine and every run scores the same images."""
    ds = data.load_dataset("mnist")
    assert (ds.channels, ds.levels, ds.fresh_binarization) == (1, 2, True)
    assert ds.train.shape == (50000, 28, 28, 1) and ds.train.dtype == np.uint8
    assert ds.valid.shape == ds.test.shape == (10000, 28, 28, 1)
    assert abs(ds.train.mean() - 33.395) < 1e-3  # 8-bit intensities, binarized batch by batch
    pinned = {"valid": "7d5c4b19b740755ff6f24951bf39c6891c6227cfc4ac46dda77df8a9649f6aaf",
              "test": "6ad6c45ff1622e3b15b0ccafc9806d333ac809bda3cb1b1af0a92197ed955af9"}
    for split, digest in pinned.items():
        bits = getattr(ds, split)
        assert set(np.unique(bits)) == {0, 1}
        assert hashlib.sha256(np.packbits(bits).tobytes()).hexdigest() == digest
    fixed = data.load_dataset("mnist", binarize_train="fixed")
    assert not fixed.fresh_binarization and set(np.unique(fixed.train)) == {0, 1}
    eight_bit = data.load_dataset("mnist256")
    assert eight_bit.levels == 256 and eight_bit.valid.max() == 255


def test_binarize_draws_bernoulli_intensity_over_255():
    """A pixel of intensity k is 1 with probability k / 255, reproducibly."""
    intensities = np.repeat(np.array([[0, 51, 255]], np.uint8), 20000, axis=0)
    bits = data.binarize(intensities, seed=7)
    np.testing.assert_allclose(bits.mean(axis=0), [0.0, 0.2, 1.0], atol=0.01)
    np.testing.assert_array_equal(bits, data.binarize(intensities, seed=7))


def tiny_dataset():
    """Ten 2x2 images; image i is filled with the value i."""
    images = np.broadcast_to(np.arange(10, dtype=np.uint8)[:, None, None, None], (10, 2, 2, 1))
    return data.Dataset("tiny", 1, 10, train=images, valid=images, test=images,
                        fresh_binarization=False)


def epoch_batches(ds, batch_size, seed, epoch, start=0):
    """The batches of ``epoch`` from batch ``start`` on, as one array."""
    return np.stack([batch for _, batch in data.train_batches(ds, batch_size, seed, epoch, start)])


def test_train_batches_are_deterministic_resumable_and_cover_each_epoch_once():
    ds = tiny_dataset()
    first = epoch_batches(ds, 3, seed=0, epoch=0)
    assert len(first) == data.steps_per_epoch(ds, 3) == 3  # the incomplete last batch is dropped
    assert len(np.unique(first[..., 0, 0, 0])) == 9
    np.testing.assert_array_equal(first, epoch_batches(ds, 3, seed=0, epoch=0))
    np.testing.assert_array_equal(first[1:], epoch_batches(ds, 3, seed=0, epoch=0, start=1))
    assert not np.array_equal(first, epoch_batches(ds, 3, seed=0, epoch=1))  # a new order every epoch
    assert not np.array_equal(first, epoch_batches(ds, 3, seed=1, epoch=0))


def test_fresh_binarization_changes_every_epoch_and_is_reproducible():
    grey = np.full((1, 2, 2, 1), 128, np.uint8)
    ds = data.Dataset("grey", 1, 2, train=grey, valid=grey, test=grey, fresh_binarization=True)
    draws = [epoch_batches(ds, 1, seed=0, epoch=e) for e in range(20)]
    assert all(set(np.unique(bits)) <= {0, 1} for bits in draws)
    assert len({bits.tobytes() for bits in draws}) > 1
    np.testing.assert_array_equal(draws[3], epoch_batches(ds, 1, seed=0, epoch=3))


def test_eval_batches_cover_every_image_once_with_a_padded_last_batch():
    images = tiny_dataset().valid
    batches = list(data.eval_batches(images, 4))
    assert [count for _, count in batches] == [4, 4, 2]
    assert all(batch.shape == (4, 2, 2, 1) for batch, _ in batches)
    np.testing.assert_array_equal(np.concatenate([b[:n] for b, n in batches]), images)


def write_cifar10(directory, images_per_file=3):
    """Fake ``cifar-10-batches-py`` files in CIFAR's own pickled format; returns the
    training images and test images ``(N, 32, 32, 3)`` they encode."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows = rng.integers(0, 256, (images_per_file, 3072), dtype=np.uint8)
        with open(directory / name, "wb") as f:
            pickle.dump({b"data": rows, b"labels": [0] * images_per_file}, f, protocol=2)
        # row layout: the 1024 red values (32 rows of 32), then green, then blue
        written[name] = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    train = np.concatenate([written[f"data_batch_{i}"] for i in range(1, 6)])
    return train, written["test_batch"]


def test_cifar10_loader_reads_the_python_batch_files(tmp_path):
    train, test = write_cifar10(tmp_path / "cifar-10-batches-py")
    ds = data.load_dataset("cifar10", tmp_path)  # the parent folder works too
    assert (ds.channels, ds.levels) == (3, 256)
    np.testing.assert_array_equal(np.concatenate([ds.train, ds.valid]), train)
    assert len(ds.valid) == len(train) // 6
    np.testing.assert_array_equal(ds.test, test)
    assert ds.train[0, 0, 1, 2] == train[0, 0, 1, 2]


def write_idx(path, images):
    """``images (N, H, W)`` uint8 as an IDX file (gzipped if ``path`` ends in .gz)."""
    raw = struct.pack(">HBB3I", 0, 0x08, 3, *images.shape) + images.tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def test_idx_loader_reads_raw_and_gzipped_files(tmp_path):
    rng = np.random.default_rng(0)
    train, test = (rng.integers(0, 256, (n, 4, 5), dtype=np.uint8) for n in (12, 3))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test)
    ds = data.load_dataset("idx", tmp_path)
    assert (ds.channels, ds.levels, ds.valid.shape) == (1, 256, (2, 4, 5, 1))
    np.testing.assert_array_equal(np.concatenate([ds.train, ds.valid])[..., 0], train)
    np.testing.assert_array_equal(ds.test[..., 0], test)
    binary = data.load_dataset("idx-binary", tmp_path)
    assert binary.levels == 2 and set(np.unique(binary.test)) <= {0, 1}
    write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (3, 5, 5), dtype=np.uint8))
    with pytest.raises(data.DataError, match=r"training images are \(4, 5\), the test images \(5, 5\)"):
        data.load_dataset("idx", tmp_path)


def test_missing_and_corrupt_data_files_raise_a_data_error(tmp_path):
    with pytest.raises(data.DataError, match="data_batch_1 not found"):
        data.load_dataset("cifar10", tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03" + bytes(12))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(data.DataError, match="not an IDX image file"):
        data.load_dataset("idx", tmp_path)
    (tmp_path / "mnist.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(data.DataError, match="not a valid MNIST"):
        data.load_dataset("mnist", tmp_path)
    with pytest.raises(data.DataError, match="unknown dataset"):
        data.load_dataset("imagenet")


def read_png(path):
    """Decode an 8-bit, unfiltered grey or RGB PNG, checking signature and CRCs."""
    raw = pathlib.Path(path).read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = {}, 8
    while at < len(raw):
        length, kind = struct.unpack(">I4s", raw[at:at + 8])
        payload = raw[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", raw[at + 8 + length:at + 12 + length])
        assert crc == zlib.crc32(kind + payload)
        chunks[kind] = chunks.get(kind, b"") + payload
        at += 12 + length
    width, height, depth, color_type = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8 and b"IEND" in chunks
    channels = {0: 1, 2: 3}[color_type]
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, -1)
    assert rows.shape[1] == 1 + width * channels and not rows[:, 0].any()  # filter type 0
    image = rows[:, 1:].reshape(height, width, channels)
    return image[..., 0] if channels == 1 else image


def test_png_writer_round_trips_grey_and_rgb(tmp_path):
    rng = np.random.default_rng(0)
    for shape in [(5, 7), (6, 4, 3)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        data.save_png(tmp_path / "x.png", image)
        np.testing.assert_array_equal(read_png(tmp_path / "x.png"), image)
    with pytest.raises(ValueError):
        data.save_png(tmp_path / "bad.png", np.zeros((4, 4, 2), np.uint8))


def test_image_grid_tiles_and_scales_images():
    images = np.arange(5 * 2 * 3).reshape(5, 2, 3, 1) % 4  # levels = 4
    grid = data.image_grid(images, levels=4)  # 5 images -> 2 rows of 3
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[1:3, 5:8], images[1, ..., 0] * 85)
    assert (grid[0] == data.GRID_PAD_VALUE).all()
    assert (grid[4:6, 9:12] == data.GRID_PAD_VALUE).all()  # the sixth cell is empty
    rgb = data.image_grid(np.ones((4, 2, 2, 3), int), levels=2, rows=1, pad=0)
    assert rgb.shape == (2, 8, 3) and (rgb == 255).all()


# The training runs below use a tiny PixelCNN on 64 MNIST images: 4 steps an
# epoch, each run takes seconds (mostly JAX import and compilation).
TINY = ["--model", "pixelcnn", "--layers", "1", "--hidden", "4", "--out-hidden", "8",
        "--batch-size", "16", "--train-subset", "64", "--eval-subset", "32",
        "--eval-batch-size", "16", "--lr", "1e-2", "--warmup", "2", "--epochs", "3",
        "--num-samples", "0"]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A JAX compilation cache shared by the tests' subprocesses (train.py, bench.py and
    the scripts below): the same program compiles once, not once per process."""
    return tmp_path_factory.mktemp("jax_cache")


def sharing_compile_cache(cache, **env):
    """The environment of a subprocess that reads and fills ``cache``, JAX's compilation
    cache, with ``env`` added."""
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **env)


def start_train(args, cache, devices=1):
    """Start train.py in a subprocess with ``devices`` CPU devices."""
    env = sharing_compile_cache(cache, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait(process):
    """``(exit code, stdout, stderr)`` once ``process`` has finished."""
    stdout, stderr = process.communicate(timeout=600)
    return process.returncode, stdout, stderr


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_arrays(path):
    with np.load(path, allow_pickle=False) as f:
        return {name: f[name] for name in f.files if name != "meta"}


def checkpoint_meta(path):
    with np.load(path, allow_pickle=False) as f:
        return json.loads(str(f["meta"]))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed(process_id, port):
    return ["--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
            "--process-id", str(process_id), "--host-devices", "1"]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, compile_cache):
    """Runs of the tiny config: ``full`` (12 steps, with samples), ``half``
    (stopped at step 6 by --max-steps, then resumed to the end),
    ``two_devices`` (one process), and ``process_0`` and ``process_1``: two
    ``--distributed`` processes of one device each (process 1 is given
    another --out, where it must write nothing). Returns their folders and
    ``(exit code, stdout, stderr)``."""
    root = tmp_path_factory.mktemp("runs")
    names = ("full", "half", "two_devices", "process_0", "process_1")
    dirs = {name: root / name for name in names}
    results = {"full": wait(start_train(TINY + ["--out", str(dirs["full"]), "--num-samples", "4"],
                                        compile_cache))}
    port = free_port()
    started = [start_train(TINY + ["--out", str(dirs["half"]), "--max-steps", "6"], compile_cache),
               start_train(TINY + ["--out", str(dirs["two_devices"])], compile_cache, devices=2),
               *[start_train(TINY + ["--out", str(dirs[f"process_{i}"])] + distributed(i, port),
                             compile_cache) for i in (0, 1)]]
    results.update(zip(names[1:], map(wait, started)))
    assert results["half"][0] == 0, results["half"][2][-2000:]
    results["half_stopped"] = metrics(dirs["half"])
    results["resumed"] = wait(start_train(["--out", str(dirs["half"]), "--resume", "--epochs", "3",
                                           "--num-samples", "0"], compile_cache))
    for name, (code, _, stderr) in results.items():
        assert name == "half_stopped" or code == 0, f"{name}: {stderr[-2000:]}"
    return dirs, results


@pytest.mark.slow
def test_training_writes_every_output_and_the_loss_falls(tiny_runs):
    dirs, results = tiny_runs
    run = dirs["full"]
    for name in ("config.json", "checkpoint.npz", "best.npz", "metrics.jsonl", "curve.svg",
                 "samples.png"):
        assert (run / name).is_file(), name
    assert json.loads((run / "config.json").read_text())["config"]["model"] == "pixelcnn"
    *epochs, test = metrics(run)
    assert [line["epoch"] for line in epochs] == [1, 2, 3]
    train_loss, valid = [line["train_loss"] for line in epochs], [line["valid_nll"] for line in epochs]
    assert train_loss == sorted(train_loss, reverse=True) and valid == sorted(valid, reverse=True)
    assert test["unit"] == "nats" and 0 < test["test_nll"] < 28 * 28 * np.log(2)
    meta, _ = training.read(run / "best.npz")   # the shareable file: best parameters, whole record
    assert meta["progress"]["tested"] and meta["progress"]["metrics"] == epochs + [test]
    grid = (2 * 29 + 1) * data.GRID_SCALE                     # 4 samples, 2 x 2, enlarged
    assert read_png(run / "samples.png").shape == (grid, grid)


@pytest.mark.slow
def test_the_first_line_gives_the_sizes_actually_used(tiny_runs):
    stdout = tiny_runs[1]["full"][1]
    assert stdout.splitlines()[0] == (
        f"training pixelcnn (1 layer, h=4, head 8, {parameter_count(TINY)} parameters) on mnist, "
        f"1 cpu device, to 12 steps (3 epochs), into {tiny_runs[0]['full']}")


def test_the_first_line_names_the_connections_switched_off():
    cfg = pixelrnn.Config(model="pixelcnn", layers=1, hidden=4, out_hidden=8, skip=False,
                          residual=False)
    run = types.SimpleNamespace(cfg=cfg, state={"params": pixelrnn.init(jax.random.PRNGKey(0), cfg)},
                                settings={"dataset": "mnist"}, target={"epochs": 1, "max_steps": 0},
                                steps_per_epoch=4, last_step=4, out="runs/x", progress=None,
                                args=types.SimpleNamespace(resume=False, init_from=None))
    assert "h=4, head 8, no skip connections, no residual connections, " in train.describe_run(run)


def parameter_count(argv):
    args = train.parser.parse_args(argv)
    cfg = pixelrnn.Config(model=args.model, layers=args.layers, hidden=args.hidden,
                          out_hidden=args.out_hidden)
    return f"{pixelrnn.parameter_count(pixelrnn.init(jax.random.PRNGKey(0), cfg)):,}"


@pytest.mark.slow
def test_the_bar_and_the_validation_line_show_the_same_loss_and_speed(tiny_runs):
    """One loss (mean of the recent steps, in nats) and one images/s (compilation
    excluded) in the progress bar, the line after it and metrics.jsonl."""
    _, results = tiny_runs
    _, stdout, stderr = results["full"]
    bar_end = re.findall(r"epoch 3/3: 100%.*?\[.*?, (loss [\d.]+ nats, [\d.]+ img/s)\]", stderr)[-1]
    line = next(line for line in stdout.splitlines() if line.startswith("step 12: valid"))
    assert line.endswith(bar_end), (line, bar_end)
    last = metrics(tiny_runs[0]["full"])[-2]
    assert bar_end == f"loss {last['train_loss']:.4g} nats, {last['images_per_s']:.1f} img/s"
    assert "it/s" not in stderr and "img/s]" in stderr
    assert "96/96 [" in results["half"][2]       # the bar's total is the run's own: 6 steps of 16


@pytest.mark.slow
def test_resume_continues_exactly(tiny_runs):
    """12 steps in one run == 6 steps, stop, resume, 6 more: the same parameters,
    averaged parameters, optimizer state, learning rates and validation NLL."""
    dirs, results = tiny_runs
    assert [line["step"] for line in results["half_stopped"]] == [4, 6, 6]  # stopped: validated, tested
    full, resumed = (checkpoint_arrays(dirs[name] / "checkpoint.npz") for name in ("full", "half"))
    assert full.keys() == resumed.keys()
    assert {name.split("/")[0] for name in full} == {"params", "opt_state", "ema", "rng"}
    for name in full:
        np.testing.assert_array_equal(full[name], resumed[name], err_msg=name)
    assert not np.array_equal(full["params/head/hidden/w"], full["ema/head/hidden/w"])
    # The schedule planned for the run's 3 epochs, even while --max-steps stopped it at 6.
    settings = json.loads((dirs["full"] / "config.json").read_text())["settings"]
    schedule = training.learning_rate(settings, planned_steps=12)
    for name in ("full", "half"):
        for line in metrics(dirs[name]):
            if "lr" in line:
                assert line["lr"] == pytest.approx(float(schedule(line["step"])), rel=1e-6)
    last_valid = [metrics(dirs[name])[-2]["valid_nll"] for name in ("half", "full")]
    np.testing.assert_allclose(*last_valid, rtol=1e-6)  # XLA:CPU may sum in another order
    assert results["resumed"][1].splitlines()[1] == (
        f"resuming {dirs['half']} at step 6 (epoch 2, batch 2) of 12 steps (3 epochs)")


@pytest.mark.slow
def test_init_from_starts_a_new_run_from_the_averaged_parameters_and_carries_the_record(
        tiny_runs, tmp_path, compile_cache):
    """--init-from with another batch size: model, dataset and the settings not given come
    from the checkpoint; the parameters start as its averaged ones (a learning rate of 1e-9
    keeps them there), the optimizer state and the schedule afresh; metrics.jsonl goes on
    from the checkpoint's validation lines and counts its images."""
    source, run = tiny_runs[0]["full"] / "checkpoint.npz", tmp_path / "run"
    code, stdout, stderr = wait(start_train(["--init-from", str(source), "--batch-size", "32",
                                             "--lr", "1e-9", "--epochs", "1", "--out", str(run)],
                                            compile_cache))
    assert code == 0, stderr
    assert stdout.splitlines()[1] == (f"starting from the averaged parameters of {source} "
                                      f"(192 images seen)")                  # 12 steps of 16
    settings = json.loads((run / "config.json").read_text())["settings"]
    assert settings == dict(checkpoint_meta(source)["settings"], batch_size=32, lr=1e-9)
    *carried, new, test = metrics(run)
    assert carried == metrics(tiny_runs[0]["full"])[:-1]
    assert (new["step"], new["images"]) == (2, 192 + 2 * 32)
    assert new["train_seconds"] >= carried[-1]["train_seconds"]     # not from 0: 11 steps vs 1
    assert new["valid_nll"] == pytest.approx(carried[-1]["valid_nll"], rel=1e-5)
    assert test["test_nll"] == pytest.approx(metrics(tiny_runs[0]["full"])[-1]["test_nll"], rel=1e-5)
    started, ended = checkpoint_arrays(source), checkpoint_arrays(run / "checkpoint.npz")
    assert ended["opt_state/1/0/count"] == 2
    for name in started:
        if name.startswith("ema/"):
            np.testing.assert_allclose(ended[name], started[name], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(ended["params/" + name[4:]], started[name], rtol=1e-5,
                                       atol=1e-7)


@pytest.mark.slow
def test_curve_svg_plots_one_point_per_validation(tiny_runs):
    run = tiny_runs[0]["full"]
    validations = [line for line in metrics(run) if "valid_nll" in line]
    svg = ET.fromstring((run / "curve.svg").read_text())
    circles = [c for c in svg.iter("{http://www.w3.org/2000/svg}circle")
               if c.get("class") == "validation"]
    assert len(circles) == len(validations) == 3
    heights = [float(c.get("cy")) for c in circles]
    assert heights == sorted(heights)              # the NLL falls: lower on screen is larger y
    texts = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert "training images seen" in texts and "NLL (nats)" in texts
    ticks = [float(t.text) for t in svg.iter("{http://www.w3.org/2000/svg}text")
             if t.get("text-anchor") == "end"]
    assert len(ticks) == 3 and min(ticks) >= 0


def test_curve_svg_draws_the_papers_figure_dashed():
    lines = [{"images": 64 * s, "valid_nll": v, "train_loss": v + 1} for s, v in [(1, 90), (2, 85)]]
    svg = ET.fromstring(data.curve_svg(lines, "nats", paper=81.3))
    [paper] = [e for e in svg.iter("{http://www.w3.org/2000/svg}line") if e.get("class") == "paper"]
    assert paper.get("stroke-dasharray") and paper.get("y1") == paper.get("y2")
    assert "paper: 81.3" in [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]


@pytest.mark.slow
def test_evaluate_scores_a_checkpoint_with_its_standard_error(tiny_runs, compile_cache):
    """train.py --evaluate prints the mean -log_prob of the averaged parameters over the
    validation and test images, ± the standard error over images."""
    best = tiny_runs[0]["full"] / "best.npz"
    code, stdout, stderr = wait(start_train(["--evaluate", str(best), "--eval-subset", "32"],
                                            compile_cache))
    assert code == 0, stderr
    cfg, params, _ = training.load_params(best)
    ds = data.load_dataset("mnist")
    for line, images in zip(stdout.splitlines(), (ds.valid[:32], ds.test[:32])):
        nll = -np.asarray(pixelrnn.log_prob(params, cfg, images), np.float64)
        name, mean, _, se, unit, *_ = line.split()
        assert name in ("valid", "test") and unit == "nats"
        assert float(mean) == pytest.approx(nll.mean(), abs=2e-4)
        assert float(se) == pytest.approx(nll.std(ddof=1) / np.sqrt(32), abs=5e-3)
    one = wait(start_train(["--evaluate", str(best), "--eval-subset", "1", "--eval-batch-size", "1"],
                           compile_cache))[1]
    assert one.count(" ± 0.00 nats (1 images)") == 2 and "nan" not in one
    other = wait(start_train(["--evaluate", str(best), "--eval-subset", "32", "--test-seed", "1"],
                             compile_cache))[1].splitlines()
    assert other[0] == stdout.splitlines()[0] and other[1] != stdout.splitlines()[1]
    assert other[1].endswith("(32 images, binarization seed 1)")
    code, _, stderr = wait(start_train(["--evaluate", "nowhere.npz"], compile_cache))
    assert code == 2 and one_line(stderr, "train.py: error:", "no checkpoint", "nowhere.npz")


TWO_DEVICE_SCAN_CHECK = """
import sys, jax, numpy as np, layers, training, pixelrnn
cfg = pixelrnn.Config(model=sys.argv[1], layers=2, hidden=4, out_hidden=8)
mesh = training.make_mesh(batch_size=8)
optimizer = training.make_optimizer(dict(optimizer="adam", lr=1e-3, schedule="cosine", warmup=2,
                                          lr_floor=0.05, clip=1.0), planned_steps=10)
images = (np.random.default_rng(0).random((8, 28, 28, 1)) < 0.3).astype(np.int32)

def two_steps():
    state = training.init_state(pixelrnn.init(jax.random.PRNGKey(0), cfg), optimizer)
    step = training.make_train_step(cfg, optimizer, mesh, 0.9995)
    batch = training.put_batch(images, mesh)
    compiled = step.lower(state, batch, 0).compile()    # compiled once, for its HLO and the steps
    losses = []
    for i in range(2):
        state, loss = compiled(state, batch, i)
        losses.append(float(loss))
    return losses, state, compiled.as_text().count(" all-reduce(")

fast = two_steps()
layers.SPEED_PATHS = layers.DEFINITIONS          # the plain scans inside the train step too
plain = two_steps()
np.testing.assert_allclose(fast[0], plain[0], rtol=1e-5)
for a, b in zip(jax.tree.leaves(fast[1]), jax.tree.leaves(plain[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
print(jax.device_count(), fast[2], plain[2])
"""


@pytest.mark.slow
@pytest.mark.parametrize("model", ["rowlstm", "diagbilstm"])
def test_the_recurrent_models_all_reduce_once_per_step_on_two_devices(model, compile_cache):
    """On 2 host devices the recurrent layers' scans, which compute their state-to-state
    gradient after the backward scan (layers.kernel_gradient_after_scan), give the same
    losses and state as the plain scans, which XLA all-reduces inside the loop (one
    all-reduce per layer in the loop body, and the rest); the step has one all-reduce."""
    env = sharing_compile_cache(compile_cache, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run([sys.executable, "-c", TWO_DEVICE_SCAN_CHECK, model], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    devices, fast, plain = map(int, out.stdout.split())
    assert devices == 2 and fast == 1 and plain > 2


@pytest.mark.slow
def test_two_host_devices_follow_the_same_loss_trajectory(tiny_runs):
    dirs, results = tiny_runs
    assert "2 cpu devices" in results["two_devices"][1]
    one, two = metrics(dirs["full"]), metrics(dirs["two_devices"])
    for key in ("train_loss", "valid_nll"):
        np.testing.assert_allclose([m[key] for m in two[:-1]], [m[key] for m in one[:-1]], rtol=1e-4)


@pytest.mark.slow
def test_two_distributed_processes_train_as_one_process_with_two_devices(tiny_runs):
    """Two train.py --distributed processes on 127.0.0.1, one CPU device each: the
    loss trajectory of one process with two devices; only process 0 writes files."""
    dirs, results = tiny_runs
    assert "2 cpu devices in 2 processes" in results["process_0"][1]
    assert not dirs["process_1"].exists()
    assert "valid" not in results["process_1"][1]
    two_devices, two_processes = metrics(dirs["two_devices"]), metrics(dirs["process_0"])
    assert len(two_processes) == len(two_devices) == 4
    for key in ("train_loss", "valid_nll"):
        np.testing.assert_allclose([m[key] for m in two_processes[:-1]],
                                   [m[key] for m in two_devices[:-1]], rtol=1e-5)
    np.testing.assert_allclose(two_processes[-1]["test_nll"], two_devices[-1]["test_nll"], rtol=1e-5)


@pytest.mark.slow
def test_a_missing_or_unreachable_coordinator_or_absent_peer_is_one_line(tmp_path, compile_cache):
    """Each is a user mistake: one line and exit code 2, not JAX's C++ abort."""
    missing = wait(start_train(TINY + ["--out", str(tmp_path), "--distributed"], compile_cache))
    unreachable, alone = (wait(start_train(TINY + ["--out", str(tmp_path), "--coordinator-timeout",
                                                   "1"] + distributed(process_id, free_port()),
                                           compile_cache)) for process_id in (1, 0))
    for (code, _, stderr), expected in ((missing, "--distributed: coordinator_address"),
                                        (unreachable, "no coordinator at 127.0.0.1:"),
                                        (alone, "0 of the 1 other processes joined within 1 s")):
        assert code == 2 and stderr.count("\n") == 1, stderr
        assert stderr.startswith(f"train.py: error: {expected}"), stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.slow
def test_a_finished_run_resumed_with_nothing_to_do_says_so_and_changes_no_file(tiny_runs, tmp_path,
                                                                               compile_cache):
    for name, target in (("full", "12 steps (3 epochs)"), ("half", "12 steps (3 epochs)")):
        run = tmp_path / name
        shutil.copytree(tiny_runs[0][name], run)
        files = {path: path.read_bytes() for path in run.iterdir()}
        code, stdout, stderr = wait(start_train(["--out", str(run), "--resume"], compile_cache))
        assert code == 0, stderr
        assert one_line(stdout, str(run), target, "nothing to do", "--epochs")
        assert files == {path: path.read_bytes() for path in run.iterdir()}


@pytest.mark.parametrize("schedule", ["cosine", "exponential", "constant"])
@pytest.mark.parametrize("warmup", [0, 10])
def test_the_schedule_warms_up_to_its_peak_then_reaches_its_floor_at_the_planned_end(schedule,
                                                                                      warmup):
    rate = training.learning_rate(dict(lr=1e-3, warmup=warmup, lr_floor=0.05, schedule=schedule),
                                  planned_steps=100)
    floor = 1e-3 if schedule == "constant" else 5e-5
    assert float(rate(0)) == (0.0 if warmup else pytest.approx(1e-3))
    assert float(rate(warmup)) == pytest.approx(1e-3)
    assert float(rate(100)) == pytest.approx(floor) and float(rate(10_000)) == pytest.approx(floor)


@pytest.mark.parametrize("given,saved,expected", [
    ({}, {"epochs": 1, "max_steps": 0}, {"epochs": 1, "max_steps": 0}),
    ({}, {"epochs": 3, "max_steps": 6}, {"epochs": 3, "max_steps": 6}),
    ({"epochs": 5}, {"epochs": 3, "max_steps": 6}, {"epochs": 5, "max_steps": 0}),
    ({"max_steps": 9}, {"epochs": 3, "max_steps": 6}, {"epochs": 3, "max_steps": 9}),
    ({"epochs": 4, "max_steps": 9}, {"epochs": 3, "max_steps": 0}, {"epochs": 4, "max_steps": 9}),
    ({}, None, {"epochs": train.EPOCHS, "max_steps": 0}),
    ({"max_steps": 1}, None, {"epochs": train.EPOCHS, "max_steps": 1}),
])
def test_a_resumed_run_keeps_its_target_unless_a_new_one_is_given(given, saved, expected):
    argv = [f"--{name.replace('_', '-')}={value}" for name, value in given.items()]
    assert train.resolve_target(train.parser.parse_args(argv), saved) == expected


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_a_bare_resume_keeps_the_target(tmp_path, compile_cache):
    """Interrupted after its first epoch, a run saves where it stands and says so;
    resumed with a bare --resume it heads for its own --epochs, not the default."""
    process = start_train(TINY + ["--out", str(tmp_path), "--epochs", "1000"], compile_cache)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (
            (tmp_path / "metrics.jsonl").exists() and (tmp_path / "metrics.jsonl").read_text()):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    code, _, stderr = wait(process)
    assert code == 128 + signal.SIGINT, stderr
    assert "Traceback" not in stderr
    meta = checkpoint_meta(tmp_path / "checkpoint.npz")
    step, epoch, index = (meta["progress"][name] for name in ("step", "epoch", "index"))
    assert step >= 4 and one_line(stderr.splitlines()[-1], f"interrupted at step {step}",
                                  str(tmp_path / "checkpoint.npz"), "--resume")
    assert meta["target"] == {"epochs": 1000, "max_steps": 0}

    resumed = start_train(["--out", str(tmp_path), "--resume"], compile_cache)
    resumed.stdout.readline()                                  # the sizes
    assert resumed.stdout.readline() == (f"resuming {tmp_path} at step {step} (epoch {epoch + 1}, "
                                         f"batch {index}) of 4000 steps (1000 epochs)\n")
    resumed.send_signal(signal.SIGINT)
    assert wait(resumed)[0] == 128 + signal.SIGINT


def user_error(capsys, argv):
    """Run ``train.main(argv)`` in this process (on 1 device unless told); assert that it
    exits with code 2 after exactly one line on stderr, and return that line."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--host-devices", "1", *argv])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2, stderr
    assert stderr.startswith("train.py: error: ") and stderr.count("\n") == 1, stderr
    return stderr


# A mistake -> the words its one line must hold. In the command lines, RUN is a copy of a
# finished run, NEW a folder that must not appear, TMP the test's folder.
MISTAKES = {
    "--model": ["--model", "transformer"],
    "--dataset": ["--dataset", "imagenet"],
    "--hidden": ["--hidden", "0"],
    "--batch-size": ["--batch-size", "-1"],
    "larger than": TINY + ["--batch-size", "128", "--out", "NEW"],
    "divisible by channels=3": ["--dataset", "cifar10", "--data-dir", "TMP/cifar", "--batch-size",
                                "4", "--hidden", "16", "--out", "NEW"],
    "data_batch_1 not found": ["--dataset", "cifar10", "--data-dir", "TMP", "--out", "NEW"],
    "the cifar10 dataset is not embedded: give --data-dir, a folder holding CIFAR-10's":
        ["--dataset", "cifar10", "--out", "NEW"],
    "the idx dataset is not embedded: give --data-dir, a folder holding train-images-idx3":
        ["--dataset", "idx", "--out", "NEW"],
    "--binarize is for binary datasets (mnist, idx-binary), not mnist256":
        ["--dataset", "mnist256", "--binarize", "fixed", "--out", "NEW"],
    "already holds a run": TINY + ["--out", "RUN"],
    "does not match the checkpoint": ["--out", "RUN", "--resume", "--model", "rowlstm"],
    "no checkpoint to resume": ["--out", "TMP/none", "--resume"],
    "--init-from starts a new run; leave it out to --resume one":
        ["--out", "RUN", "--resume", "--init-from", "RUN/best.npz"],
    "--init-from keeps the model and the dataset":
        ["--init-from", "RUN/best.npz", "--model", "rowlstm", "--out", "NEW"],
    "no checkpoint at TMP/none.npz": ["--init-from", "TMP/none.npz", "--out", "NEW"],
    "cannot write to --out": TINY + ["--out", "TMP/file/run"],
    "coordinator address 'nowhere': expected HOST:PORT":
        TINY + ["--distributed", "--coordinator", "nowhere", "--out", "NEW"],
    "--seed: invalid int >= 0 and <= 4294967295": ["--seed", "4294967296"],
    "--ema: invalid float >= 0 and <= 1": ["--ema", "1.5"],
    "--out is empty": ["--out", ""],
    "--schedule exponential cannot decay to --lr-floor 0":
        TINY + ["--schedule", "exponential", "--lr-floor", "0", "--out", "NEW"],
    "--evaluate scores the checkpoint's own model on its own dataset: leave out --model":
        ["--evaluate", "RUN/best.npz", "--model", "rowlstm"],
}


@pytest.fixture
def finished_run(tiny_runs, tmp_path):
    """A copy of a finished run in ``tmp_path / "run"``, a file ``tmp_path / "file"`` and
    CIFAR-10 files in ``tmp_path / "cifar"``."""
    run = tmp_path / "run"
    shutil.copytree(tiny_runs[0]["full"], run)
    (tmp_path / "file").write_text("")
    write_cifar10(tmp_path / "cifar")
    return run


@pytest.mark.slow
@pytest.mark.parametrize("expected", MISTAKES)
def test_a_user_mistake_is_one_line_and_changes_nothing(expected, finished_run, tmp_path, capsys):
    def place(text):
        return (text.replace("RUN", str(finished_run)).replace("NEW", str(tmp_path / "new"))
                .replace("TMP", str(tmp_path)))
    files = {path: path.read_bytes() for path in finished_run.iterdir()}
    assert place(expected) in user_error(capsys, [place(a) for a in MISTAKES[expected]])
    assert files == {path: path.read_bytes() for path in finished_run.iterdir()}
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_a_damaged_or_pickled_checkpoint_is_one_line(finished_run, tmp_path, capsys):
    run = finished_run
    checkpoint_path = run / "checkpoint.npz"
    arrays = dict(np.load(checkpoint_path, allow_pickle=False))
    for tree in ("params/", "ema/"):                                       # any one will do
        del arrays[min(name for name in arrays if name.startswith(tree))]
    np.savez(checkpoint_path, **arrays)
    assert "does not match the model config" in user_error(capsys, ["--out", str(run), "--resume"])
    line = user_error(capsys, ["--init-from", str(checkpoint_path), "--out", str(tmp_path / "new")])
    assert "does not match the model config" in line and not (tmp_path / "new").exists()
    checkpoint_path.write_text("step 12, loss 80.3\n")
    line = user_error(capsys, ["--out", str(run), "--resume"])
    assert "checkpoint.npz is not a checkpoint: not an .npz archive" in line
    np.savez(checkpoint_path, meta=np.array([{"code": "print('hi')"}], dtype=object))
    line = user_error(capsys, ["--out", str(run), "--resume"])
    assert "is not a checkpoint: it holds Python objects, which are never loaded" in line
    assert "unsafe" not in line.lower() and "allow_pickle" not in line


@pytest.mark.slow
def test_rgb_data_without_hidden_sizes_says_the_sizes_used(tmp_path, compile_cache):
    """h = 16 and a head of 32 do not split into R, G, B thirds: the run uses 18 and 33, and says so."""
    write_cifar10(tmp_path / "cifar")
    code, stdout, stderr = wait(start_train(
        ["--dataset", "cifar10", "--data-dir", str(tmp_path / "cifar"), "--model", "pixelcnn",
         "--layers", "1", "--batch-size", "4", "--max-steps", "1", "--num-samples", "0",
         "--out", str(tmp_path / "run")], compile_cache))
    assert code == 0, stderr
    assert stdout.startswith("training pixelcnn (1 layer, h=18, head 33, ")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["settings"]["hidden"] == 18


@pytest.mark.slow
def test_the_cpu_is_split_into_one_device_per_usable_core_by_default():
    """A process allowed on one core (as under taskset -c 0) trains on one device."""
    one_core = subprocess.run(
        [sys.executable, "-c", "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
                               "import training; print(training.HOST_DEVICES)"],
        cwd=ROOT, capture_output=True, text=True, check=True)
    assert one_core.stdout.strip() == "1"
    assert training.HOST_DEVICES <= len(os.sched_getaffinity(0)) < 2 * training.HOST_DEVICES


@pytest.mark.slow
def test_batch_not_divisible_by_the_devices_is_one_line_in_a_real_process(tmp_path, compile_cache):
    code, _, stderr = wait(start_train(TINY + ["--batch-size", "15", "--out", str(tmp_path)],
                                       compile_cache, devices=2))
    assert code == 2 and "Traceback" not in stderr
    assert stderr.strip() == "train.py: error: --batch-size 15 is not divisible by the 2 devices (cpu)"
    assert not (tmp_path / "checkpoint.npz").exists()
    code, _, stderr = wait(start_train(["--evaluate", str(ROOT / "weights" / "pixelcnn-mnist.npz"),
                                        "--eval-batch-size", "3"], compile_cache, devices=2))
    assert code == 2 and stderr == (
        "train.py: error: --eval-batch-size 3 is not divisible by the 2 devices (cpu)\n")


@pytest.mark.slow
def test_a_nan_loss_stops_training_and_keeps_the_checkpoint(tiny_runs, tmp_path, compile_cache):
    """Parameters poisoned with a NaN make the first resumed step's loss NaN."""
    run = tmp_path / "run"
    shutil.copytree(tiny_runs[0]["full"], run)
    arrays = dict(np.load(run / "checkpoint.npz", allow_pickle=False))
    first = min(name for name in arrays if name.startswith("params/"))
    arrays[first] = np.full_like(arrays[first], np.nan)
    np.savez(run / "checkpoint.npz", **arrays)
    poisoned = (run / "checkpoint.npz").read_bytes()
    code, _, stderr = wait(start_train(["--out", str(run), "--resume", "--epochs", "4"], compile_cache))
    assert code == train.EXIT_DIVERGED and "Traceback" not in stderr
    assert one_line(stderr.splitlines()[-1], "train.py: error:", "loss is nan at step 13",
                    "without saving", str(run / "checkpoint.npz"))
    assert (run / "checkpoint.npz").read_bytes() == poisoned


@pytest.mark.slow
def test_a_run_whose_best_validation_is_not_its_last_ends_with_the_test_nll_of_the_best(tmp_path,
                                                                                      compile_cache):
    code, _, stderr = wait(start_train(
        ["--model", "pixelcnn", "--layers", "1", "--hidden", "4", "--out-hidden", "8",
         "--batch-size", "8", "--train-subset", "24", "--eval-subset", "32", "--epochs", "6",
         "--lr", "0.3", "--clip", "0", "--warmup", "0", "--ema", "0", "--schedule", "constant",
         "--num-samples", "0", "--out", str(tmp_path)], compile_cache))
    assert code == 0, stderr
    lines = [json.loads(line, parse_constant=pytest.fail)      # strict JSON: no NaN
             for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    *validations, test = lines
    best = min(validations, key=lambda line: line["valid_nll"])
    assert test["best_step"] == best["step"] < validations[-1]["step"]


@pytest.mark.slow
def test_parameters_that_are_not_finite_are_never_saved(tmp_path, compile_cache):
    """One step at a rate that overflows float32: its loss is finite, the parameters after it
    are not."""
    code, _, stderr = wait(start_train(TINY + ["--max-steps", "1", "--lr", "1e39", "--clip", "0",
                                               "--warmup", "0", "--out", str(tmp_path)],
                                       compile_cache))
    assert code == train.EXIT_DIVERGED and "Traceback" not in stderr, stderr
    assert "stopped without saving" in stderr.splitlines()[-1]
    assert not (tmp_path / "checkpoint.npz").exists() and not (tmp_path / "best.npz").exists()


@pytest.mark.slow
def test_sigterm_saves_and_resume_continues_as_if_it_never_stopped(tmp_path, compile_cache):
    """SIGTERM mid-run (after the first validation): exit 143 and a checkpoint; --resume then
    ends with the parameters, average and optimizer state of a run never stopped."""
    longer = TINY + ["--epochs", "200"]
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    assert wait(start_train(longer + ["--out", str(reference)], compile_cache))[0] == 0
    process = start_train(longer + ["--out", str(stopped)], compile_cache)
    while not ((stopped / "metrics.jsonl").exists() and (stopped / "metrics.jsonl").read_text()):
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    code, _, stderr = wait(process)
    assert code == 128 + signal.SIGTERM and "interrupted at step" in stderr, stderr
    step = checkpoint_meta(stopped / "checkpoint.npz")["progress"]["step"]
    assert 4 <= step < 800
    assert wait(start_train(["--out", str(stopped), "--resume"], compile_cache))[0] == 0
    want, got = (checkpoint_arrays(run / "checkpoint.npz") for run in (reference, stopped))
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.slow
def test_a_second_ctrl_c_while_compiling_quits_at_once_in_one_line(tmp_path, compile_cache):
    process = start_train(TINY + ["--out", str(tmp_path)], compile_cache)
    assert process.stdout.readline().startswith("training pixelcnn")   # the handler is set
    for _ in range(2):
        process.send_signal(signal.SIGINT)
        time.sleep(0.05)
    code, _, stderr = wait(process)
    assert code == 128 + signal.SIGINT, stderr
    assert stderr.strip().splitlines()[-1] == "train.py: interrupted again: stopped without saving"


@pytest.mark.slow
def test_two_runs_started_on_one_folder_one_is_refused_and_the_other_finishes(tmp_path,
                                                                           compile_cache):
    runs = [start_train(TINY + ["--out", str(tmp_path)], compile_cache) for _ in range(2)]
    (code_a, _, err_a), (code_b, _, err_b) = map(wait, runs)
    assert sorted([code_a, code_b]) == [0, 2], (err_a, err_b)
    refused = err_a if code_a else err_b
    assert "in use by another train.py" in refused or "already holds a run" in refused
    assert metrics(tmp_path)[-1]["test_nll"] > 0


@pytest.mark.slow
def test_a_disk_that_cannot_take_the_checkpoint_is_one_line_and_leaves_no_half_file(tmp_path):
    """Files over 8 KB cannot be written (EFBIG, as a full disk gives ENOSPC; SIGXFSZ,
    which would kill the process, ignored)."""
    out = tmp_path / "run"
    command = shlex.join([sys.executable, str(ROOT / "train.py"), *TINY, "--out", str(out),
                          "--host-devices", "1"])
    result = subprocess.run(["bash", "-c", f"trap '' XFSZ; ulimit -f 8; exec {command}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert one_line(result.stderr.splitlines()[-1], "train.py: error: cannot write", "File too large")
    assert not list(out.glob(".*.tmp")) and not (out / "checkpoint.npz").exists()


@pytest.mark.slow
def test_a_new_run_removes_the_temporary_files_a_killed_write_left(tmp_path, compile_cache):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / ".checkpoint.npz.k3j9x2.tmp").write_bytes(b"half a checkpoint")    # as mkstemp named them
    assert wait(start_train(TINY + ["--out", str(tmp_path)], compile_cache))[0] == 0
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_resume_on_other_data_is_refused(tiny_runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs[0]["full"], run)
    with np.load(data.EMBEDDED_DIR / "mnist.npz") as f:
        arrays = dict(f)
    arrays["train_images"] = arrays["train_images"][::-1]          # the same sizes, other images
    np.savez(tmp_path / "mnist.npz", **arrays)
    line = user_error(capsys, ["--out", str(run), "--resume", "--epochs", "4",
                               "--data-dir", str(tmp_path)])
    assert "was trained on other data" in line


# ---- the fast sampler and sample.py ----



def with_random_biases(params, key):
    """``params`` with every bias drawn at random: init's zero biases could hide a bias bug
    (at the image border, say, or on the Diagonal BiLSTM's skew padding)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [
        0.5 * jax.random.normal(k, leaf.shape) if getattr(path[-1], "key", None) == "b" else leaf
        for k, (path, leaf) in zip(keys, leaves)])


def fast_case(model, channels, levels, **overrides):
    """A non-square 4x5 image, 2 layers, and its parameters (random biases included)."""
    cfg = small_config(model, height=4, width=5, channels=channels, levels=levels, **overrides)
    return cfg, with_random_biases(pixelrnn.init(jax.random.PRNGKey(11), cfg), jax.random.PRNGKey(14))


FAST_CASES = pytest.mark.parametrize("channels,levels", [(1, 2), (3, 4)], ids=["binary", "rgb"])


@pytest.mark.parametrize("model", pixelrnn.MODELS)
@FAST_CASES
def test_fast_sampler_draws_the_reference_samplers_images(model, channels, levels):
    """Same key, same images: the same logits at every step and the same draws."""
    cfg, params = fast_case(model, channels, levels)
    key = jax.random.PRNGKey(12)
    fast = np.asarray(pixelrnn.sample(params, cfg, key, 6))
    np.testing.assert_array_equal(fast, pixelrnn.sample_reference(params, cfg, key, 6))
    assert len(np.unique(fast)) == levels                      # not a degenerate draw


@pytest.mark.parametrize("model,channels,levels,overrides", [
    *[(model, 1, 2, {}) for model in pixelrnn.MODELS],
    *[(model, 3, 4, {}) for model in pixelrnn.MODELS],
    ("pixelcnn", 1, 2, dict(skip=False, residual=False))],   # the connections are model-independent
    ids=[f"{kind}-{model}" for kind in ("binary", "rgb") for model in pixelrnn.MODELS]
    + ["no-skip-no-residual-pixelcnn"])
def test_fast_sampler_logits_are_the_networks_teacher_forced(model, channels, levels, overrides):
    """Fed a given image, the fast sampler's logits at every sub-pixel are :func:`logits`'s."""
    cfg, params = fast_case(model, channels, levels, **overrides)
    images = jax.random.randint(jax.random.PRNGKey(13), (6, cfg.height, cfg.width, channels), 0, levels)
    full = jax.jit(pixelrnn.logits, static_argnums=1)(params, cfg, images)
    np.testing.assert_allclose(pixelrnn.fast_logits(params, cfg, images), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model", pixelrnn.MODELS)
def test_complete_keeps_the_known_pixels_and_matches_the_reference(model):
    """RGB, 7 known pixels (mid-row): kept bit for bit, the rest as the reference draws them."""
    cfg, params = fast_case(model, 3, 4)
    images = jax.random.randint(jax.random.PRNGKey(14), (6, cfg.height, cfg.width, 3), 0, 4)
    key, known = jax.random.PRNGKey(15), 7
    completed = np.asarray(pixelrnn.complete(params, cfg, key, images, known))
    pixels = lambda x: np.asarray(x).reshape(len(x), -1, 3)    # noqa: E731  raster order
    np.testing.assert_array_equal(pixels(completed)[:, :known], pixels(images)[:, :known])
    assert (pixels(completed)[:, known:] != pixels(images)[:, known:]).any()
    np.testing.assert_array_equal(completed, pixelrnn.complete_reference(params, cfg, key, images, known))


def count_equations(jaxpr):
    """Equations of ``jaxpr``, counting those inside loops and nested jits."""
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += count_equations(inner)
    return total


@pytest.mark.parametrize("model", pixelrnn.MODELS)
def test_fast_sampler_is_scanned_not_unrolled_over_pixels(model):
    """The traced sampler has the same size for 4x5 and 12x13 images."""
    def equations(height):
        cfg = small_config(model, height=height, width=height + 1)
        params = jax.eval_shape(lambda key: pixelrnn.init(key, cfg), jax.random.PRNGKey(0))
        jaxpr = jax.make_jaxpr(pixelrnn.sample, static_argnums=(1, 3))(params, cfg, jax.random.PRNGKey(0), 2)
        return count_equations(jaxpr.jaxpr)

    assert equations(4) == equations(12)


@pytest.mark.parametrize("channels", [1, 3])
def test_figure_1_rows_are_occluded_completions_original(channels):
    """8-bit grey and RGB: per row the upper half with the lower half grey, the completions, the original."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 4, 6, channels))
    completions = rng.integers(0, 256, (2, 3, 4, 6, channels))
    grid = sample.figure_1(images, completions, 256)
    assert grid.shape == (2 * 5 + 1, 5 * 7 + 1) + ((3,) if channels == 3 else ())
    grid = grid.reshape(grid.shape[0], grid.shape[1], channels)

    def tile(row, col):
        return grid[1 + 5 * row:5 + 5 * row, 1 + 7 * col:7 + 7 * col]

    for row in range(2):
        np.testing.assert_array_equal(tile(row, 0)[:2], images[row, :2])
        assert (tile(row, 0)[2:] == data.GRID_PAD_VALUE).all()
        for k in range(3):
            np.testing.assert_array_equal(tile(row, 1 + k), completions[row, k])
        np.testing.assert_array_equal(tile(row, 4), images[row])


@pytest.fixture(scope="module")
def sampling_dir(tmp_path_factory, compile_cache):
    """A folder holding ``runs/tiny/``: the tiny config of the training tests, one step."""
    root = tmp_path_factory.mktemp("sampling")
    code, _, stderr = wait(start_train(TINY + ["--max-steps", "1", "--out", str(root / "runs" / "tiny")],
                                       compile_cache))
    assert code == 0, stderr[-2000:]
    return root


def run_sample(args, cwd, script=ROOT / "sample.py"):
    """Run ``script`` (the repository's sample.py) in ``cwd``: ``(exit code, stdout, stderr)``."""
    result = subprocess.run([sys.executable, str(script), *args], cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    return result.returncode, result.stdout, result.stderr


@pytest.mark.slow
def test_sample_py_writes_an_enlarged_grid_from_a_trained_run(sampling_dir):
    """The 8 x 8 grid of MNIST digits is drawn large enough to see (>= 700 px wide)."""
    code, stdout, stderr = run_sample(["--checkpoint", "runs/tiny/best.npz", "--out", "grid.png"],
                                      sampling_dir)
    assert code == 0, stderr
    grid = read_png(sampling_dir / "grid.png")
    assert grid.shape == ((8 * 29 + 1) * 4,) * 2 and grid.shape[1] >= 700
    assert set(np.unique(grid)) == {0, data.GRID_PAD_VALUE, 255}
    np.testing.assert_array_equal(grid[::4, ::4], grid[3::4, 3::4])        # 4 x 4 blocks
    assert f"from {pathlib.Path('runs', 'tiny', 'best.npz')} " in stdout and "compiling took" in stdout
    assert "compiling took" in stdout


@pytest.mark.slow
def test_sample_py_complete_draws_figure_1_from_test_images(sampling_dir):
    code, _, stderr = run_sample(["--checkpoint", "runs/tiny/checkpoint.npz", "--complete",
                                  "--images", "2", "--completions", "3", "--out", "fig1.png",
                                  "--scale", "1"], sampling_dir)
    assert code == 0, stderr
    grid = read_png(sampling_dir / "fig1.png")
    assert grid.shape == (2 * 29 + 1, 5 * 29 + 1)
    originals = data.load_dataset("mnist").test[:2, ..., 0] * 255
    for row, original in enumerate(originals):
        tiles = [grid[1 + 29 * row:29 + 29 * row, 1 + 29 * col:29 + 29 * col] for col in range(5)]
        for completed in tiles[1:4]:                           # the upper half is given
            np.testing.assert_array_equal(completed[:14], original[:14])
        np.testing.assert_array_equal(tiles[4], original)
    code, _, stderr = run_sample(["--checkpoint", "runs/tiny/checkpoint.npz", "--complete",
                                  "--images", "2", "--completions", "3", "--out", "big.png"],
                                 sampling_dir)
    assert code == 0, stderr
    assert read_png(sampling_dir / "big.png").shape == (4 * (2 * 29 + 1), 4 * (5 * 29 + 1))


def test_sample_py_takes_a_models_shipped_weights_by_default_the_papers_best(tmp_path):
    for model in ("pixelcnn", "rowlstm"):
        (tmp_path / f"{model}-mnist.npz").write_bytes(b"")
    assert sample.shipped_checkpoint(None, tmp_path) == tmp_path / "rowlstm-mnist.npz"
    assert sample.shipped_checkpoint("pixelcnn", tmp_path) == tmp_path / "pixelcnn-mnist.npz"
    with pytest.raises(training.UserError, match="diagbilstm-mnist.npz: train one first"):
        sample.shipped_checkpoint("diagbilstm", tmp_path)
    shipped, run = sample.WEIGHTS / "rowlstm-mnist.npz", tmp_path / "runs" / "x" / "best.npz"
    assert sample.default_out(shipped, "samples", 3) == pathlib.Path("rowlstm-samples_seed3.png")
    assert sample.default_out(run, "samples", 3) == run.parent / "samples_seed3.png"


def sample_py_error(args, cwd):
    """The one line sample.py prints on stderr when it exits with code 2."""
    code, _, stderr = run_sample(args, cwd)
    assert code == 2 and "Traceback" not in stderr, stderr
    [line] = stderr.strip().splitlines()
    return line


@pytest.mark.slow
def test_sample_py_without_shipped_weights_says_how_to_train_one(tmp_path):
    for script in ROOT.glob("*.py"):                   # the code alone: no weights/
        shutil.copy(script, tmp_path)
    code, _, stderr = run_sample(["--model", "diagbilstm"], tmp_path, tmp_path / "sample.py")
    assert code == 2 and one_line(stderr, "sample.py: error:", "weights/diagbilstm-mnist.npz",
                                  "python train.py --model diagbilstm", "--checkpoint")


@pytest.mark.slow
def test_sample_py_never_replaces_its_checkpoint_or_a_file_that_is_not_a_png(tmp_path):
    shutil.copy(sample.WEIGHTS / "pixelcnn-mnist.npz", tmp_path / "w.npz")
    (tmp_path / "notes.txt").write_text("keep me")
    for out in ("w.npz", "notes.txt"):
        line = sample_py_error(["--checkpoint", "w.npz", "--out", out], tmp_path)
        assert one_line(line, "sample.py: error:", f"--out {out}", "not a PNG")
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert training.load_params(tmp_path / "w.npz")[0].model == "pixelcnn"
    assert "no folder" in sample_py_error(["--out", "nowhere/grid.png"], tmp_path)


@pytest.mark.slow
def test_sample_py_takes_a_model_or_a_checkpoint_not_both(tmp_path):
    assert sample_py_error(["--model", "pixelcnn", "--checkpoint", "x.npz"], tmp_path).endswith(
        "argument --checkpoint: not allowed with argument --model")
    assert sample_py_error(["--checkpoint", "x.npz", "--model", "pixelcnn"], tmp_path).endswith(
        "argument --model: not allowed with argument --checkpoint")


@pytest.mark.slow
def test_sample_py_rejects_a_corrupt_checkpoint_in_one_line(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    assert "bad.npz is not a checkpoint: not an .npz archive" in sample_py_error(
        ["--checkpoint", "bad.npz"], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--num", "--images", "--completions", "--scale"])
def test_sample_py_flag_mistakes_are_one_line(tmp_path, flag):
    assert sample_py_error([flag, "0"], tmp_path) == (
        f"sample.py: error: argument {flag}: invalid int >= 1 value: '0'")


def test_sample_py_imports_no_other_script():
    """sample.py and bench.py read checkpoints and run the train step through modules, never
    through another script (which would pull in its flags, signal handling, ...)."""
    scripts = {"train", "sample", "bench"}
    for name in scripts:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not imported & scripts, f"{name}.py imports {imported & scripts}"


# ---- the trained weights shipped in weights/ ----

SHIPPED = sorted((ROOT / "weights").glob("*-mnist.npz"))


def readme_test_nll(path):
    """The test NLL (nats) that the README's Results table gives for the shipped ``path``:
    the first ``N ± SE`` on the row that names ``weights/<file>``."""
    rows = [line for line in (ROOT / "README.md").read_text().splitlines()
            if line.startswith("|") and f"weights/{path.name}" in line]
    assert len(rows) == 1, f"the README's Results table has no single row for {path.name}"
    return float(re.search(r"(\d+\.\d+) ± \d+\.\d+", rows[0])[1])


def test_weights_are_shipped_and_each_has_its_readme_row():
    assert SHIPPED, "no trained weights under weights/"
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"weights/([a-z]+-mnist\.npz)", readme))
    assert listed == {path.name for path in SHIPPED}


# Every 4th test image: 2,500 images score in a quarter of the time of all 10,000 (minutes
# for the Diagonal BiLSTM on 2 cores), and their mean lies within 1 nat of the whole set's
# at about 2.5 standard errors (per-image NLLs spread about 20 nats). The first 2,500 would
# not do: the test set's first images are 1-1.3 nats easier than the rest.
SHIPPED_CHECK_STRIDE = 4


@pytest.mark.slow
@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.stem)
def test_shipped_weights_are_small_safe_and_score_the_readme_figure(path):
    """A shipped file holds the averaged parameters, the config and the training record
    (no optimizer state), loads without pickle, records the README's test NLL, and
    scores every 4th image of the pinned test binarization within 1 nat of it. (The
    whole set, to within float rounding: ``python train.py --evaluate <file>``.)"""
    assert path.stat().st_size < 1_000_000
    with np.load(path, allow_pickle=False) as f:
        assert all(name == "meta" or name.startswith("params/") for name in f.files)
    cfg, params, meta = training.load_params(path)
    assert meta["progress"]["tested"]
    recorded = meta["progress"]["metrics"][-1]["test_nll"]
    assert abs(recorded - readme_test_nll(path)) < 0.01, (recorded, readme_test_nll(path))
    test = data.load_dataset(meta["settings"]["dataset"], None, meta["settings"]["binarize"]).test
    batch = train.EVAL_BATCH_SIZE
    nll, se = training.make_evaluate(cfg, training.make_mesh(eval_batch_size=batch), batch)(
        params, test[::SHIPPED_CHECK_STRIDE])
    assert abs(nll - recorded) < 1.0, (nll, se, recorded)


@pytest.mark.slow
def test_sample_py_on_a_fresh_clone_draws_digits_from_the_shipped_weights(tmp_path):
    """No runs/ here, as on a fresh clone: sample.py takes the shipped model with the
    paper's best NLL, says so, and draws digits (MNIST's ink is 10-20 % of pixels,
    an untrained model's noise about half)."""
    code, stdout, stderr = run_sample(["--num", "16"], tmp_path)
    assert code == 0, stderr
    shipped = sample.shipped_checkpoint()
    assert f"from {shipped}" in stdout
    model = training.load_params(shipped)[0].model
    grid = read_png(tmp_path / f"{model}-samples_seed0.png")
    ink = (grid[::data.GRID_SCALE, ::data.GRID_SCALE] == 255).sum() / (16 * 28 * 28)
    assert 0.05 < ink < 0.3, ink


@pytest.mark.slow
@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.stem)
def test_sample_py_completes_test_images_with_each_shipped_model(tmp_path, path):
    """``--model M --complete`` on a fresh clone uses weights/M-mnist.npz, says so, and
    keeps the given upper half of each test image."""
    model = path.name.removesuffix("-mnist.npz")
    code, stdout, stderr = run_sample(["--model", model, "--complete", "--images", "2",
                                       "--completions", "2", "--scale", "1"], tmp_path)
    assert code == 0, stderr
    assert f"from {sample.shipped_checkpoint(model)}" in stdout
    grid = read_png(tmp_path / f"{model}-completions_seed0.png")
    originals = data.load_dataset("mnist").test[:2, ..., 0] * 255
    for row, original in enumerate(originals):
        completed = grid[1 + 29 * row:15 + 29 * row, 1 + 29:29 + 29]     # first completion, upper half
        np.testing.assert_array_equal(completed, original[:14])


def test_the_readmes_links_and_pictures_exist():
    for name in ("README.md", "RESULTS.md", "PERFORMANCE.md"):
        targets = re.findall(r"\]\(([^)#\s]+)\)", (ROOT / name).read_text())
        local = [target for target in targets if "://" not in target]
        assert len(local) > 5 or name != "README.md"
        assert not [target for target in local if not (ROOT / target).exists()], name


@pytest.mark.slow
def test_the_readmes_python_snippet_runs_as_written(tmp_path):
    [snippet] = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (tmp_path / "weights").symlink_to(ROOT / "weights")
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr
    nats, bits = map(float, re.fullmatch(r"([\d.]+) nats, ([\d.]+) bits/dim\n", result.stdout).groups())
    assert 70 < nats < 95 and bits == pytest.approx(nats / (28 * 28 * np.log(2)), abs=1e-4)
    assert read_png(tmp_path / "samples.png").shape == ((4 * 29 + 1) * 4, (4 * 29 + 1) * 4)


# ---- speed: memory, convolutions, bench.py ----

PAGE_FAULTS_PER_STEP = """
import resource, sys
import training
if sys.argv[1] == "keep":
    training.keep_freed_memory()
import jax, jax.numpy as jnp, pixelrnn
cfg = pixelrnn.Config(model="pixelcnn", layers=2)
params = pixelrnn.init(jax.random.PRNGKey(0), cfg)
images = jnp.zeros((64, 28, 28, 1), jnp.int32)
step = jax.jit(jax.grad(lambda p: pixelrnn.log_prob(p, cfg, images).sum()))
for _ in range(3):
    jax.block_until_ready(step(params))
per_step = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(step(params))
    per_step.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(per_step)[2])    # the median step: a heap still growing faults in one step, not all
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_stops_xla_scratch_buffers_page_faulting_every_step(compile_cache):
    def faults(mode):
        result = subprocess.run([sys.executable, "-c", PAGE_FAULTS_PER_STEP, mode], cwd=ROOT,
                                capture_output=True, text=True, check=True,
                                env=sharing_compile_cache(compile_cache))
        return float(result.stdout.split()[-1])

    plain, kept = faults("plain"), faults("keep")
    assert plain > 10_000          # the 80 MB scratch buffer is faulted in again every step
    assert kept < plain / 4


CONV_CASES = [  # (kh, kw, F_in, F_out, channels, mask type, padding, gate blocks)
    (7, 7, 1, 32, 1, "A", "SAME", 1), (7, 7, 3, 12, 3, "A", "SAME", 1),
    (3, 3, 16, 16, 1, "B", "SAME", 1), (3, 3, 6, 6, 3, "B", "SAME", 1),
    (3, 3, 6, 6, 3, "A", "VALID", 1), (3, 3, 4, 8, 1, "B", "VALID", 1), (7, 7, 1, 8, 1, "A", "VALID", 1),
    (1, 3, 32, 64, 1, "B", "SAME", 4), (1, 3, 6, 24, 3, "B", "SAME", 4),
    (1, 1, 32, 16, 1, "B", "SAME", 1), (1, 1, 12, 6, 3, "B", "VALID", 1),
]


lax_conv = jax.lax.conv_general_dilated    # before any test patches it


def conv_values_and_gradients(conv, params, x):
    """``conv(params, x)`` and its gradients for a fixed random cotangent, as one jitted
    program (compiled for each call: a fresh function, traced with the current patches)."""
    cotangent = normal(3, jax.eval_shape(conv, params, x).shape)

    def values_and_gradients(params, x):
        y, vjp = jax.vjp(conv, params, x)
        return y, vjp(cotangent)
    return jax.jit(values_and_gradients)(params, x)


@pytest.mark.parametrize("kh, kw, f_in, f_out, channels, mask_type, padding, blocks",
                         CONV_CASES + [(1, 3, 4, 16, 1, None, "VALID", 1), (2, 1, 4, 16, 1, None, "VALID", 1)])
def test_im2col_equals_the_lax_convolution(monkeypatch, kh, kw, f_in, f_out, channels, mask_type,
                                           padding, blocks):
    """layers.conv as defined (lax.conv_general_dilated of the masked kernel, or unmasked as
    the state-to-state convolutions are) and as im2col: the same values and gradients."""
    params = layers.init_conv(jax.random.PRNGKey(0), kh, kw, f_in, f_out)
    params["b"] = normal(1, (f_out,))
    x = normal(2, (2, 8, 9, f_in))
    mask = mask_type and layers.conv_mask((kh, kw, f_in, f_out), channels, mask_type, blocks)
    calls = []
    monkeypatch.setattr(jax.lax, "conv_general_dilated",
                        lambda *a, **k: calls.append(1) or lax_conv(*a, **k))
    results = []
    for conv, runs_lax in ((layers.im2col_conv, False), (layers.DEFINITIONS["conv"], True)):
        results.append(conv_values_and_gradients(lambda p, x: conv(p, x, padding, mask), params, x))
        assert bool(calls) == runs_lax, "only the definition runs lax.conv_general_dilated"
    for got, want in zip(*map(jax.tree.leaves, results)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


SCANS = {   # layer: (state-to-state parameters, gates (T, ..., 4h))
    "row_lstm_scan": (layers.init_conv(jax.random.PRNGKey(0), 1, 3, 4, 16), (6, 3, 5, 16)),
    "diagonal_lstm_scan": (normal(0, (2, 2, 1, 4, 16)), (9, 2, 3, 5, 16)),
}


@pytest.mark.parametrize("name", SCANS)
def test_the_fast_scans_have_the_plain_scans_values_and_gradients(name):
    """The recurrences with their state-to-state gradient computed after the backward
    scan equal the plain ``lax.scan`` left to autodiff: values and both gradients."""
    params, gates_shape = SCANS[name]
    gates = normal(1, gates_shape)
    weights = normal(2, gates_shape[:-1] + (4,))

    def values_and_gradients(scan):
        def loss(params, gates):
            return jnp.sum(jnp.sin(scan(params, gates)) * weights)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, gates)

    for got, want in zip(jax.tree.leaves(values_and_gradients(layers.SPEED_PATHS[name])),
                         jax.tree.leaves(values_and_gradients(layers.DEFINITIONS[name]))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", pixelrnn.MODELS)
def test_every_model_with_the_speed_paths_equals_its_definition(monkeypatch, model):
    """The whole model, logits and parameter gradients, with the speed paths swapped in
    at the end of layers.py and with the definitions as written."""
    cfg = small_config(model)
    params = with_random_biases(pixelrnn.init(jax.random.PRNGKey(0), cfg), jax.random.PRNGKey(1))
    images = (normal(2, (2, cfg.height, cfg.width, 1)) > 0).astype(np.int32)

    def logits_and_gradients(params):
        with layers.fast_gradients():          # a no-op once the definitions are patched in
            grads = jax.grad(lambda p: pixelrnn.log_prob(p, cfg, images).sum())(params)
        return pixelrnn.logits(params, cfg, images), grads

    fast = jax.jit(logits_and_gradients)(params)
    monkeypatch.setattr(layers, "conv", layers.DEFINITIONS["conv"])
    monkeypatch.setattr(layers, "SPEED_PATHS", layers.DEFINITIONS)
    for got, want in zip(jax.tree.leaves(fast), jax.tree.leaves(jax.jit(logits_and_gradients)(params))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model", pixelrnn.MODELS)
def test_forward_mode_autodiff_gives_the_reverse_modes_jacobian(model):
    cfg = small_config(model, height=3, width=4, layers=1)
    params = with_random_biases(pixelrnn.init(jax.random.PRNGKey(0), cfg), jax.random.PRNGKey(1))
    x = normal(2, (1, cfg.height, cfg.width, 1))

    def network(x):
        return pixelrnn.network(params, cfg, x)
    np.testing.assert_allclose(jax.jit(jax.jacfwd(network))(x), jax.jit(jax.jacrev(network))(x),
                               rtol=1e-4, atol=1e-5)


def test_bench_counts_the_kernel_taps_the_masks_leave():
    assert [bench.taps(7, 7, "A"), bench.taps(3, 3, "B"), bench.taps(1, 3, "B"),
            bench.taps(1, 1)] == [24, 5, 2, 1]


def test_bench_flop_count_agrees_with_xla_for_pixelcnn():
    # XLA counts the PixelCNN's matrix products as we do, plus the elementwise
    # work (ReLUs, biases, the softmax) that bench.py leaves out. (Its count
    # of a scan holds the loop body once, so the LSTMs cannot be checked so.)
    cfg = pixelrnn.Config(model="pixelcnn")
    params = pixelrnn.init(jax.random.PRNGKey(0), cfg)
    x = jnp.zeros((1, cfg.height, cfg.width, cfg.channels))
    cost = jax.jit(lambda p, x: pixelrnn.network(p, cfg, x)).lower(params, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert bench.forward_flops(cfg) <= cost["flops"] <= 1.2 * bench.forward_flops(cfg)


@pytest.mark.slow
def test_bench_py_times_each_model_and_rejects_bad_flags(compile_cache):
    bench_py = [sys.executable, str(pathlib.Path(bench.__file__))]
    out = subprocess.run(bench_py + ["--models", "pixelcnn", "--batch-size", "2", "--host-devices",
                                     "1", "--json"], capture_output=True, text=True, check=True,
                         env=sharing_compile_cache(compile_cache)).stdout
    machine, row = [json.loads(line) for line in out.splitlines()]
    assert machine["matmul_gflops"] > 0 and row["model"] == "pixelcnn" and row["devices"] == 1
    assert row["train_images_per_s"] == pytest.approx(2000 / row["train_step_ms"], rel=0.01)
    assert 0 < row["fraction_of_matmul_peak"] < 1
    assert 0 < row["sample_64_s"] < 60
    unknown = subprocess.run(bench_py + ["--models", "foo"], capture_output=True, text=True)
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1, unknown.stderr
    assert "argument --models: invalid choice: 'foo'" in unknown.stderr
    odd = subprocess.run(bench_py + ["--batch-size", "3", "--host-devices", "2"],
                         capture_output=True, text=True)
    assert odd.returncode == 2 and odd.stderr == (
        "bench.py: error: --batch-size 3 is not divisible by the 2 devices (cpu)\n")
