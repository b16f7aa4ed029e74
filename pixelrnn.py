"""The three models of *Pixel Recurrent Neural Networks* (arXiv:1601.06759) in JAX.

    cfg    = Config(model="rowlstm")                 # or "diagbilstm", "pixelcnn"
    params = init(key, cfg)                          # plain pytree of arrays
    z      = logits(params, cfg, images)             # (B, H, W, C, levels)
    lp     = log_prob(params, cfg, images)           # (B,) nats
    x      = sample(params, cfg, key, num)           # (num, H, W, C) int32
    y      = complete(params, cfg, key, images, known)

The image distribution is factorised in raster order, and inside a pixel
R before G before B (paper equations 1 and 2):

    p(x) = prod_i p(x_i,R | x_<i) p(x_i,G | x_<i, x_i,R) p(x_i,B | x_<i, x_i,R, x_i,G)

Every model is the same sandwich (paper Table 1): a 7x7 mask-A convolution,
``layers`` hidden layers with residual connections (Row LSTM, Diagonal
BiLSTM or PixelCNN blocks, from ``layers.py``), optional skip connections
and a two-layer 1x1 mask-B output head giving each colour a distribution
over ``levels`` values.

The file has two halves: the model (``Config`` to ``log_prob``), then the
samplers that draw from it (the reference sampler, then the fast one).
"""

import dataclasses
import functools
import typing

import jax
import jax.numpy as jnp
from jax import lax

import layers

MODELS = ("rowlstm", "diagbilstm", "pixelcnn")

# Each model's hidden layer, as an (init, apply) pair from layers.py.
HIDDEN_LAYERS = {
    "rowlstm": (layers.init_row_lstm, layers.row_lstm),
    "diagbilstm": (layers.init_diagonal_bilstm, layers.diagonal_bilstm),
    "pixelcnn": (layers.init_pixelcnn_block, layers.pixelcnn_block),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that fixes a model's shapes. Frozen and hashable: a static jit argument.

    ``hidden`` is h of the paper: the recurrent state size (PixelCNN: the
    width inside a block); the residual stream carries ``2h`` features. The
    defaults are the paper's Diagonal BiLSTM for MNIST (7 layers, h = 16, a
    head of 32 features, section 5); ``train.py`` holds each model's own sizes.
    With ``channels=3`` every feature count must split into R, G, B thirds.

    ``residual`` adds each layer's output to its input (paper section 3.4).
    ``skip`` feeds the head the sum of the residual stream after every
    layer, so that each layer reaches the output directly; without it the
    head reads the last layer's stream. (The paper's skip connections,
    section 3.4, are learnable, one per layer; here the head's first 1x1
    convolution is the one learnable map applied to their sum.)

    An invalid value raises ``ValueError`` naming the field, as soon as the
    config is built.
    """

    model: str = "rowlstm"
    height: int = 28
    width: int = 28
    channels: int = 1
    levels: int = 2
    hidden: int = 16
    layers: int = 7
    skip: bool = True
    residual: bool = True
    out_hidden: int = 32

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"Config.model={self.model!r}: must be one of {', '.join(MODELS)}")
        if self.channels not in (1, 3):
            raise ValueError(f"Config.channels={self.channels!r}: must be 1 (grey) or 3 (RGB)")
        for field in ("height", "width", "hidden", "layers", "out_hidden"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Config.{field}={value!r}: must be a positive integer")
        if not isinstance(self.levels, int) or self.levels < 2:
            raise ValueError(f"Config.levels={self.levels!r}: must be an integer >= 2")
        for field in ("hidden", "out_hidden"):
            if getattr(self, field) % self.channels:
                raise ValueError(
                    f"Config.{field}={getattr(self, field)}: must be divisible by "
                    f"channels={self.channels} to split the features into R, G, B groups")

    @property
    def features(self):
        """Width of the residual stream: 2h."""
        return 2 * self.hidden

    @property
    def logits_per_channel(self):
        """1 for binary data (a sigmoid), else ``levels`` (a softmax)."""
        return 1 if self.levels == 2 else self.levels


def init(key, cfg):
    """Random parameters: ``{"input": ..., "layers": ..., "head": ...}``.

    ``"layers"`` is a list with one parameter dict per hidden layer.
    """
    k_input, k_layers, k_head = jax.random.split(key, 3)
    init_layer, _ = HIDDEN_LAYERS[cfg.model]
    return {
        "input": layers.init_conv(k_input, 7, 7, cfg.channels, cfg.features),
        "layers": [init_layer(k, cfg.features, cfg.hidden)
                   for k in jax.random.split(k_layers, cfg.layers)],
        "head": layers.init_output_head(
            k_head, cfg.features, cfg.out_hidden, cfg.channels * cfg.logits_per_channel),
    }


def parameter_count(params):
    """The number of scalars in a parameter tree."""
    return sum(leaf.size for leaf in jax.tree.leaves(params))


def preprocess(cfg, images):
    """Integer images ``(B, H, W, C)`` in ``[0, levels)`` -> floats in ``[-1, 1]``."""
    return images.astype(jnp.float32) * (2.0 / (cfg.levels - 1)) - 1.0


def network(params, cfg, x):
    """The model on real-valued inputs ``x (B, H, W, C)`` -> logits ``(B, H, W, C, levels)``.

    The hidden layers run in a Python loop, unrolled when traced, rather than
    a ``lax.scan`` over stacked parameters: each layer keeps its own named
    parameters (a checkpoint's ``params/layers/<i>/...``), and compiling 15
    unrolled layers takes seconds. Separate from :func:`logits` so the tests
    can differentiate the logits with respect to the input and prove the
    model causal.
    """
    _, hidden_layer = HIDDEN_LAYERS[cfg.model]
    stream = layers.masked_conv(params["input"], x, cfg.channels, "A")
    skip_sum = 0.0
    for layer_params in params["layers"]:
        out = hidden_layer(layer_params, stream, cfg.channels)
        stream = stream + out if cfg.residual else out                 # residual connection
        skip_sum = skip_sum + stream                                   # skip connection
    head_output = layers.output_head(params["head"], skip_sum if cfg.skip else stream,
                                     cfg.channels)
    return head_to_logits(cfg, head_output)


def head_to_logits(cfg, head_output):
    """``(..., C * logits_per_channel)`` -> ``(..., C, levels)``.

    For binary data the head gives one logit ``z`` per channel; it becomes
    the pair ``(0, z)``, whose softmax is ``(1 - sigmoid(z), sigmoid(z))``.
    So every ``levels`` is handled by one softmax downstream.
    """
    z = head_output.reshape(*head_output.shape[:-1], cfg.channels, cfg.logits_per_channel)
    if cfg.levels == 2:
        z = jnp.concatenate([jnp.zeros_like(z), z], axis=-1)
    return z


def logits(params, cfg, images):
    """Per-pixel, per-channel logits ``(B, H, W, C, levels)`` of integer ``images``.

    ``logits[b, i, j, c]`` is the unnormalised log-distribution of
    ``images[b, i, j, c]`` given every earlier pixel and earlier channel.
    """
    return network(params, cfg, preprocess(cfg, images))


def log_prob(params, cfg, images):
    """Exact log-likelihood in nats of each image ``(B, H, W, C)`` -> ``(B,)``.

    A value outside ``[0, levels)`` is impossible under the model: an image
    holding one has probability 0, log-likelihood ``-inf`` (never a value
    wrapped into range).
    """
    log_p = jax.nn.log_softmax(logits(params, cfg, images))
    index = jnp.asarray(images)[..., None].astype(jnp.int32)
    observed = jnp.take_along_axis(log_p, jnp.clip(index, 0, cfg.levels - 1), axis=-1)
    possible = (index >= 0) & (index < cfg.levels)
    return jnp.where(possible, observed, -jnp.inf).sum(axis=(1, 2, 3, 4))


# ===========================================================================
# Sampling (paper section 2): ancestral, one channel of one pixel at a time.
# Everything above defines the model; everything below draws from it.
# ===========================================================================


def draw(key, step, step_logits):
    """Sub-pixel ``step``'s value (raster index * C + channel) from ``step_logits (B, levels)``.

    The key is folded with the step index, so every sampler that visits the
    same steps with the same key draws the same randomness.
    """
    return jax.random.categorical(jax.random.fold_in(key, step), step_logits).astype(jnp.int32)


def fill_reference(params, cfg, key, canvas, start):
    """Sample every sub-pixel from ``start`` on, recomputing the whole network each time.

    ``canvas (B, H, W, C)`` int32 holds the given pixels; returns it filled.
    Exact and simple, and ``H * W * C`` forward passes: the readable
    reference that the tests compare the fast sampler against.
    """
    def step(t, canvas):
        position, channel = jnp.divmod(t, cfg.channels)
        row, col = jnp.divmod(position, cfg.width)
        step_logits = logits(params, cfg, canvas)[:, row, col, channel]
        return canvas.at[:, row, col, channel].set(draw(key, t, step_logits))

    return lax.fori_loop(start, cfg.height * cfg.width * cfg.channels, step, canvas)


def sample_reference(params, cfg, key, num):
    """``num`` images ``(num, H, W, C)`` int32 from the full-recompute sampler."""
    canvas = jnp.zeros((num, cfg.height, cfg.width, cfg.channels), jnp.int32)
    return fill_reference(params, cfg, key, canvas, 0)


def complete_reference(params, cfg, key, images, known):
    """Keep the first ``known`` pixels of ``images`` (raster order), sample the rest."""
    return fill_reference(params, cfg, key, images.astype(jnp.int32), known * cfg.channels)


# ---------------------------------------------------------------------------
# The fast sampler: one position at a time, reading cached activations
# ---------------------------------------------------------------------------
#
# The reference sampler recomputes every layer at every position for every
# sub-pixel. But a value drawn at pixel p only changes activations at p and
# after it, so each sub-pixel needs, for every layer, only the activations at
# p: they read a few cached activations of earlier positions (the pixels
# above, the pixel to the left), exactly what the masks and recurrences of
# layers.py read. The image costs about one forward pass (C passes for RGB:
# each colour of a pixel recomputes the pixel).
#
# Activations at one pixel are 1 x 1 maps ``(B, 1, 1, F)``, so the
# convolutions of layers.py apply unchanged: a ``k x k`` kernel with
# ``padding="VALID"`` on the ``k x k`` patch around a pixel gives its value
# there, and the masks hide the patch's future as they always do.
#
# Each hidden layer caches its activations at every pixel (its "values", a
# dict such as ``{"hidden": ..., "cell": ...}``) three times:
#
#   above  row r-1, complete: ``(B, 1, W + 2, F)``, pixel c at column c + 1,
#          a zero column on each side (zero padding, zero state outside);
#   row    row r as it is computed: same layout; it becomes ``above`` at the
#          end of the row (zeros above the first row);
#   left   pixel (r, c-1): ``(B, 1, 1, F)``, zeros at the start of a row.
#
# A pixel reads only ``above`` and ``left`` and its values are stored into
# ``row`` and ``left`` after its last colour, so no cache is read and written
# in the same step and XLA updates them in place (a map read and written in
# one step would be copied at every step).
#
# RGB: colour g of pixel p recomputes every feature at p from the colours
# < g drawn so far. Features of groups > g are garbage until their colour is
# drawn; the masks keep them from every output that matters at that step,
# and the values stored after the last colour are the full forward pass's.


def _conv_at(params, cfg, patch, mask_type="B", blocks=1):
    """A masked ``k x k'`` convolution at the centre of ``patch (B, k, k', F)``:
    ``(B, 1, 1, F')``."""
    return layers.masked_conv(params, patch, cfg.channels, mask_type, "VALID", blocks)


def _centred(row_map, col, span):
    """Pixels ``col - span // 2 .. col + span // 2`` of a row cache ``(B, 1, W + 2, F)``."""
    start = col + 1 - span // 2
    batch, _, _, features = row_map.shape
    return lax.dynamic_slice(row_map, (0, 0, start, 0), (batch, 1, span, features))


def _own_row(left, centre):
    """A pixel's ``1 x 3`` neighbourhood in its own row, ``(B, 1, 3, F)``: its left
    neighbour, itself, and zeros for its right neighbour (the future, which
    every mask hides)."""
    return jnp.concatenate([left, centre, jnp.zeros_like(centre)], axis=2)


def _layer_cache(cfg, batch, **features):
    """Zero ``above``, ``row`` and ``left`` caches for values of the given feature sizes."""
    row = {name: jnp.zeros((batch, 1, cfg.width + 2, f)) for name, f in features.items()}
    left = {name: jnp.zeros((batch, 1, 1, f)) for name, f in features.items()}
    return {"above": row, "row": row, "left": left}


def _store(cache, values, col):
    """Pixel ``col``'s values, after its last colour: into ``row`` and the next pixel's
    ``left``."""
    row = {name: lax.dynamic_update_slice(cache["row"][name], value, (0, 0, col + 1, 0))
           for name, value in values.items()}
    return dict(cache, row=row, left=values)


def _next_row(cache):
    """A finished row becomes the row above; the new row starts with zeros on its left."""
    return dict(cache, above=cache["row"], left=jax.tree.map(jnp.zeros_like, cache["left"]))


# PixelCNN block at one pixel; the full form is layers.pixelcnn_block. The 3x3
# convolution reads the block's reduced (2h -> h) features at the 3 pixels
# above and the one to the left.

def _pixelcnn_cache(cfg, batch):
    return _layer_cache(cfg, batch, reduced=cfg.hidden)


def _pixelcnn_at(params, cfg, cache, x, col):
    """:func:`layers.pixelcnn_block` at pixel ``col`` of the current row, from its input
    ``x (B, 1, 1, 2h)``."""
    reduced = _conv_at(params["reduce"], cfg, jax.nn.relu(x))
    below = jnp.zeros((x.shape[0], 1, 3, reduced.shape[3]))               # the future
    patch = jnp.concatenate([_centred(cache["above"]["reduced"], col, 3),
                             _own_row(cache["left"]["reduced"], reduced), below], axis=1)
    y = _conv_at(params["masked"], cfg, jax.nn.relu(patch))
    return _conv_at(params["expand"], cfg, jax.nn.relu(y)), {"reduced": reduced}


# Row LSTM at one pixel; the full form is layers.row_lstm. The 1x3
# input-to-state convolution reads the layer input at the pixel and to its
# left; the 1x3 state-to-state convolution the hidden state of the 3 pixels
# above; the cell update the cell state above.

def _lstm_cache(cfg, batch):
    return _layer_cache(cfg, batch, input=cfg.features, hidden=cfg.hidden, cell=cfg.hidden)


def _row_lstm_at(params, cfg, cache, x, col):
    """:func:`layers.row_lstm` at pixel ``col`` of the current row, from its input
    ``x (B, 1, 1, 2h)``."""
    above, left = cache["above"], cache["left"]
    gates = (_conv_at(params["input_to_state"], cfg, _own_row(left["input"], x), blocks=4)
             + layers.conv(params["state_to_state"], _centred(above["hidden"], col, 3), "VALID"))
    hidden, cell = layers.lstm_cell(gates, _centred(above["cell"], col, 1))
    return _conv_at(params["output"], cfg, hidden), {"input": x, "hidden": hidden, "cell": cell}


# Diagonal BiLSTM at one pixel; the full form is layers.diagonal_bilstm.
# Unskewed, the forward direction at (r, c) reads the state above it and to
# its left. The mirrored direction reads the state above and to the right,
# so pixel (r, c) uses it shifted down one row, at (r-1, c): it is computed
# for a whole row, right to left, as soon as the row is complete
# (:func:`_diagonal_finish_row`), and cached as ``mirrored`` for the next row.

def _diagonal_cache(cfg, batch):
    mirrored = jnp.zeros((batch, 1, cfg.width + 2, cfg.hidden))    # zeros above the first row
    return dict(_lstm_cache(cfg, batch), mirrored=mirrored)


def _direction(params, d):
    """Direction ``d``'s input-to-state and state-to-state parameters (0 forward, 1 mirrored)."""
    return {name: jax.tree.map(lambda a: a[d], params[name])
            for name in ("input_to_state", "state_to_state")}


def _diagonal_gates(direction, cfg, x, state_above, state_beside):
    """Gate pre-activations of one direction at one pixel, all ``(B, 1, 1, .)``.

    The state-to-state kernel is ``2 x 1``: row 0 reads the state above,
    row 1 the state beside (left for the forward direction, right for the
    mirrored one).
    """
    states = jnp.concatenate([state_above, state_beside], axis=1)   # (B, 2, 1, h)
    return (_conv_at(direction["input_to_state"], cfg, x, blocks=4)
            + layers.conv(direction["state_to_state"], states, "VALID"))


def _diagonal_at(params, cfg, cache, x, col):
    """:func:`layers.diagonal_bilstm` at pixel ``col`` of the current row, from its input
    ``x (B, 1, 1, 2h)``."""
    above, left = cache["above"], cache["left"]
    gates = _diagonal_gates(_direction(params, 0), cfg, x, _centred(above["hidden"], col, 1),
                            left["hidden"])
    hidden, cell = layers.lstm_cell(gates, left["cell"])
    mirrored = _centred(cache["mirrored"], col, 1)                # (r-1, c): shifted down
    return (_conv_at(params["output"], cfg, hidden + mirrored),
            {"input": x, "hidden": hidden, "cell": cell})


def _diagonal_finish_row(params, cfg, cache):
    """The mirrored direction along the completed row r, right to left, from the
    row's layer inputs (``row``) and row r-1's mirrored state (``mirrored``),
    which it replaces: row r+1 reads it."""
    def columns(row_map):      # (B, 1, W + 2, F) -> (W, B, 1, 1, F), one pixel at a time
        return jnp.moveaxis(row_map[:, :, 1:-1], 2, 0)[:, :, :, None]

    mirrored = _direction(params, 1)

    def step(right, column):   # right: (hidden, cell) of the pixel to the right
        x, hidden_above = column
        gates = _diagonal_gates(mirrored, cfg, x, hidden_above, right[0])
        hidden, cell = layers.lstm_cell(gates, right[1])
        return (hidden, cell), hidden

    above = columns(cache["mirrored"])
    zeros = jnp.zeros_like(above[0])                              # no state right of the image
    _, hidden = lax.scan(step, (zeros, zeros), (columns(cache["row"]["input"]), above),
                         reverse=True)
    hidden = jnp.moveaxis(hidden[:, :, :, 0], 0, 2)               # (B, 1, W, h)
    return dict(cache, mirrored=jnp.pad(hidden, [(0, 0), (0, 0), (1, 1), (0, 0)]))


# Each model's hidden layer at one pixel: (cache, at, finish_row or None).
FAST_LAYERS = {
    "rowlstm": (_lstm_cache, _row_lstm_at, None),
    "diagbilstm": (_diagonal_cache, _diagonal_at, _diagonal_finish_row),
    "pixelcnn": (_pixelcnn_cache, _pixelcnn_at, None),
}


def network_at(params, cfg, patch, caches, col):
    """:func:`network` at pixel ``col`` of the current row only.

    ``patch (B, 7, 7, C)`` is the preprocessed input around the pixel (for
    the 7x7 input layer), ``caches`` one cache per hidden layer. Returns the
    logits ``(B, C, levels)`` and each layer's values at the pixel.
    """
    _, layer_at, _ = FAST_LAYERS[cfg.model]
    stream = _conv_at(params["input"], cfg, patch, "A")
    skip_sum, values = 0.0, []
    for layer_params, cache in zip(params["layers"], caches):     # as in network
        out, layer_values = layer_at(layer_params, cfg, cache, stream, col)
        stream = stream + out if cfg.residual else out
        skip_sum = skip_sum + stream
        values.append(layer_values)
    head_output = layers.output_head(params["head"], skip_sum if cfg.skip else stream,
                                     cfg.channels)
    return head_to_logits(cfg, head_output)[:, 0, 0], values


class Sampling(typing.NamedTuple):
    """What every step of :func:`fill` reads: the model, the key, and the
    first sub-pixel to draw (those before it are given)."""
    params: dict
    cfg: Config
    key: jax.Array
    start: jax.Array


def sample_colour(s, row, col, caches, canvas, inputs):
    """Colour ``c`` of pixel ``(row, col)``: the network at the pixel, then the value.

    ``canvas (B, H + 6, W + 6, C)`` float: the preprocessed image so far,
    pixel ``(r, c)`` at ``(r + 3, c + 3)`` (zero padding for the 7x7 input
    layer). ``inputs = (c, given (B,))``. The value is ``given`` for a
    sub-pixel before ``s.start``, else drawn. Returns the canvas with the
    value written and ``(value (B,), logits (B, levels), values)``, where
    ``values`` are the layers' values at the pixel (to cache after the last
    colour).
    """
    colour, given = inputs
    cfg = s.cfg
    t = (row * cfg.width + col) * cfg.channels + colour
    patch = lax.dynamic_slice(canvas, (0, row, col, 0), (canvas.shape[0], 7, 7, cfg.channels))
    pixel_logits, values = network_at(s.params, cfg, patch, caches, col)
    step_logits = pixel_logits[:, colour]
    value = jnp.where(t < s.start, given, draw(s.key, t, step_logits))
    canvas = canvas.at[:, row + 3, col + 3, colour].set(preprocess(cfg, value))
    return canvas, (value, step_logits, values)


def sample_pixel(s, row, carry, inputs):
    """Pixel ``(row, col)``: scan its colours, then cache the layers' values there.

    ``carry = (canvas, caches)`` (see :func:`sample_colour`; one cache per
    hidden layer), ``inputs = (col, given (B, C))``. Returns the new carry
    and ``(values (C, B), logits (C, B, levels))``.
    """
    canvas, caches = carry
    col, given = inputs
    canvas, (values, step_logits, layer_values) = lax.scan(
        functools.partial(sample_colour, s, row, col, caches), canvas,
        (jnp.arange(s.cfg.channels), jnp.moveaxis(given, 1, 0)))
    last_colour = jax.tree.map(lambda v: v[-1], layer_values)
    caches = [_store(cache, v, col) for cache, v in zip(caches, last_colour)]
    return (canvas, caches), (values, step_logits)


def sample_row(s, carry, inputs):
    """Image row ``row``: scan its pixels, then move every cache on to the next row.

    ``carry = (canvas, caches)``, ``inputs = (row, given (B, W, C))``.
    Returns the new carry and ``(values (W, C, B), logits (W, C, B, levels))``.
    """
    row, given = inputs
    (canvas, caches), outputs = lax.scan(functools.partial(sample_pixel, s, row), carry,
                                         (jnp.arange(s.cfg.width), jnp.moveaxis(given, 1, 0)))
    _, _, finish_row = FAST_LAYERS[s.cfg.model]
    if finish_row is not None:
        caches = [finish_row(p, s.cfg, cache) for p, cache in zip(s.params["layers"], caches)]
    return (canvas, [_next_row(cache) for cache in caches]), outputs


@functools.partial(jax.jit, static_argnums=1)
def fill(params, cfg, key, images, start):
    """Sample every sub-pixel from ``start`` on, one pixel at a time: the fast sampler.

    ``images (B, H, W, C)`` int: sub-pixels before ``start`` (raster index
    * C + colour) are kept, the rest are drawn with :func:`draw`, as by
    :func:`fill_reference`. Returns ``(images, step_logits)``: the filled
    images and the logits ``(B, H, W, C, levels)`` each sub-pixel was drawn
    from (before ``start``: would have been). With ``start = H * W * C`` they
    are :func:`logits` of ``images``, computed pixel by pixel (teacher forcing).

    Three scans, one inside the other: :func:`sample_row` over the rows,
    :func:`sample_pixel` over a row's pixels, :func:`sample_colour` over a
    pixel's colours.
    """
    batch = images.shape[0]
    make_cache, _, _ = FAST_LAYERS[cfg.model]
    canvas = jnp.zeros((batch, cfg.height + 6, cfg.width + 6, cfg.channels))
    caches = [make_cache(cfg, batch) for _ in range(cfg.layers)]
    given = jnp.moveaxis(images.astype(jnp.int32), 1, 0)                   # (H, B, W, C)
    _, (values, step_logits) = lax.scan(
        functools.partial(sample_row, Sampling(params, cfg, key, start)), (canvas, caches),
        (jnp.arange(cfg.height), given))
    # Stacked (H, W, C, B, ...): move the batch axis first.
    return jnp.moveaxis(values, 3, 0), jnp.moveaxis(step_logits, 3, 0)


def fast_logits(params, cfg, images):
    """:func:`logits` of ``images``, pixel by pixel by the fast sampler (teacher forced)."""
    everything = cfg.height * cfg.width * cfg.channels
    return fill(params, cfg, jax.random.PRNGKey(0), images, everything)[1]


def sample(params, cfg, key, num):
    """``num`` exact samples from the model: ``(num, H, W, C)`` int32 (the fast sampler)."""
    blank = jnp.zeros((num, cfg.height, cfg.width, cfg.channels), jnp.int32)
    return fill(params, cfg, key, blank, 0)[0]


def complete(params, cfg, key, images, known):
    """Image completion: the first ``known`` pixels of ``images (B, H, W, C)`` in
    raster order (all channels) are kept; the rest are sampled given them."""
    return fill(params, cfg, key, images, known * cfg.channels)[0]
