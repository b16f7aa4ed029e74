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
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

import layers

MODELS = ("rowlstm", "diagbilstm", "pixelcnn")

# Each model's hidden layer, as an (init, apply) pair from layers.py.
LAYERS = {
    "rowlstm": (layers.init_row_lstm, layers.row_lstm),
    "diagbilstm": (layers.init_diagonal_bilstm, layers.diagonal_bilstm),
    "pixelcnn": (layers.init_pixelcnn_block, layers.pixelcnn_block),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that fixes a model's shapes. Frozen and hashable: a static jit argument.

    ``hidden`` is h of the paper: the recurrent state size (PixelCNN: the
    width inside a block); the residual stream carries ``2h`` features.
    ``skip`` sums every hidden layer's output into the head; ``residual``
    adds each layer's output to its input. An invalid value raises
    ``ValueError`` naming the field, as soon as the config is built.
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
        for field in ("height", "width", "hidden", "layers", "out_hidden"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Config.{field}={value!r}: must be a positive integer")
        if self.channels not in (1, 3):
            raise ValueError(f"Config.channels={self.channels!r}: must be 1 (grey) or 3 (RGB)")
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
    init_layer, _ = LAYERS[cfg.model]
    return {
        "input": layers.init_conv(k_input, 7, 7, cfg.channels, cfg.features),
        "layers": [init_layer(k, cfg.features, cfg.hidden)
                   for k in jax.random.split(k_layers, cfg.layers)],
        "head": layers.init_output_head(
            k_head, cfg.features, cfg.out_hidden, cfg.channels * cfg.logits_per_channel),
    }


def preprocess(cfg, images):
    """Integer images ``(B, H, W, C)`` in ``[0, levels)`` -> floats in ``[-1, 1]``."""
    return images.astype(jnp.float32) * (2.0 / (cfg.levels - 1)) - 1.0


def network(params, cfg, x):
    """The model on real-valued inputs ``x (B, H, W, C)`` -> logits ``(B, H, W, C, levels)``.

    Separate from :func:`logits` so the tests can differentiate the logits
    with respect to the input and prove the model causal.
    """
    _, apply_layer = LAYERS[cfg.model]
    stream = layers.masked_conv(params["input"], x, cfg.channels, "A")
    skip_sum = 0.0
    # A Python loop over layers, not a scan: XLA:CPU differentiates
    # convolutions inside a scan about 25x slower (measured).
    for layer_params in params["layers"]:
        out = apply_layer(layer_params, stream, cfg.channels)
        stream = stream + out if cfg.residual else out
        skip_sum = skip_sum + stream
    head_input = skip_sum if cfg.skip else stream
    return head_to_logits(cfg, layers.output_head(params["head"], head_input, cfg.channels))


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
    """Exact log-likelihood in nats of each image ``(B, H, W, C)`` -> ``(B,)``."""
    log_p = jax.nn.log_softmax(logits(params, cfg, images))
    observed = jnp.take_along_axis(log_p, images[..., None].astype(jnp.int32), axis=-1)
    return observed.sum(axis=(1, 2, 3, 4))


# ---------------------------------------------------------------------------
# Sampling: ancestral, one channel of one pixel at a time (paper section 2)
# ---------------------------------------------------------------------------


def draw(cfg, key, step, step_logits):
    """The value of sub-pixel ``step`` (raster index * C + channel) from ``step_logits (B, levels)``.

    The key is folded with the step index, so every sampler that visits the
    same steps with the same key draws the same randomness.
    """
    return jax.random.categorical(jax.random.fold_in(key, step), step_logits).astype(jnp.int32)


def fill_reference(params, cfg, key, canvas, start):
    """Sample every sub-pixel from ``start`` on, recomputing the whole network each time.

    ``canvas (B, H, W, C)`` int32 holds the given pixels; returns it filled.
    Exact and simple, and ``H * W * C`` forward passes: the readable
    reference that the tests compare against.
    """
    def step(t, canvas):
        position, channel = jnp.divmod(t, cfg.channels)
        row, col = jnp.divmod(position, cfg.width)
        step_logits = logits(params, cfg, canvas)[:, row, col, channel]
        return canvas.at[:, row, col, channel].set(draw(cfg, key, t, step_logits))

    return lax.fori_loop(start, cfg.height * cfg.width * cfg.channels, step, canvas)


def sample_reference(params, cfg, key, num):
    """``num`` images ``(num, H, W, C)`` int32 from the full-recompute sampler."""
    canvas = jnp.zeros((num, cfg.height, cfg.width, cfg.channels), jnp.int32)
    return fill_reference(params, cfg, key, canvas, 0)


def complete_reference(params, cfg, key, images, known):
    """Keep the first ``known`` pixels of ``images`` (raster order), sample the rest."""
    return fill_reference(params, cfg, key, images.astype(jnp.int32), known * cfg.channels)


def sample(params, cfg, key, num):
    """``num`` exact samples from the model: ``(num, H, W, C)`` int32."""
    return sample_reference(params, cfg, key, num)


def complete(params, cfg, key, images, known):
    """Image completion: the first ``known`` pixels of ``images (B, H, W, C)`` in
    raster order (all channels) are kept; the rest are sampled given them."""
    return complete_reference(params, cfg, key, images, known)
