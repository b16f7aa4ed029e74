"""The pytest suite: proofs that the models are valid autoregressive models,
then the data, training, sampling and benchmark tools built on them.

Run it with ``python -m pytest -q``.
"""

import ast
import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layers
import pixelrnn

ROOT = pathlib.Path(__file__).parent

# ---- models (issue 2) ----


def small_config(model, **overrides):
    """A tiny model that still has every part: 2 layers, skip connections."""
    fields = dict(model=model, height=5, width=6, channels=1, levels=2,
                  hidden=6, layers=2, out_hidden=12)
    fields.update(overrides)
    return pixelrnn.Config(**fields)


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
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, cfg.height, cfg.width, cfg.channels))
    size = cfg.height * cfg.width * cfg.channels

    def outputs(x):   # every logit of every image, (batch, size, levels)
        return pixelrnn.network(params, cfg, x).reshape(batch, size, cfg.levels)

    jac = jax.jacrev(outputs)(x)                     # (batch, size, levels, batch, H, W, C)
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
    x = jax.random.normal(jax.random.PRNGKey(2), (3, height, width, 1))
    grad = jax.grad(lambda x: pixelrnn.network(params, cfg, x)[:, row, col].sum())(x)
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
    """RGB with 3 levels, one pixel: 27 outcomes, R then G then B."""
    cfg = small_config("diagbilstm", height=1, width=1, channels=3, levels=3)
    params = pixelrnn.init(jax.random.PRNGKey(7), cfg)
    probabilities = np.exp(np.asarray(pixelrnn.log_prob(params, cfg, all_images(cfg))))
    samples = pixelrnn.sample(params, cfg, jax.random.PRNGKey(8), 20_000)
    counts = np.bincount(image_index(samples, cfg.levels), minlength=len(probabilities))
    assert total_variation(counts, probabilities) < 0.03


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


def mnist_like_batch():
    """8 real MNIST digits, thresholded and 2x2 max-pooled to 14x14 binary images."""
    with np.load(ROOT / "data" / "mnist.npz", allow_pickle=False) as data:
        digits = data["train_images"][:8] > 127
    return digits.reshape(8, 14, 2, 14, 2).max(axis=(2, 4))[..., None].astype(np.int32)


@pytest.mark.parametrize("model", pixelrnn.MODELS)
def test_it_learns_a_fixed_batch(model):
    """A few hundred Adam steps on 8 images more than halve their NLL."""
    images = mnist_like_batch()
    cfg = pixelrnn.Config(model=model, height=14, width=14, hidden=8, layers=2, out_hidden=16)
    params = pixelrnn.init(jax.random.PRNGKey(0), cfg)
    optimiser = optax.adam(3e-3)

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
