"""Pure building blocks of PixelRNN (van den Oord et al., ICML 2016, arXiv:1601.06759).

Every block is a pair of plain functions:

    params = init_<block>(key, ...)         # a dict of jnp arrays
    y      = <block>(params, x, channels)   # a pure function of arrays

Feature maps are NHWC: ``(B, H, W, F)``. ``channels`` is the number of image
channels (1 for grey, 3 for RGB): with 3 channels every masked layer splits its
features into three contiguous groups tied to R, G and B (paper section 3.4).

Read top to bottom: masks, masked convolution, the LSTM cell, the Row LSTM
(section 3.1), skewing and the Diagonal BiLSTM (section 3.2), the PixelCNN
residual block (section 3.5 / Figure 5) and the output head (section 3.4).
Those are the definitions, and what the model's path reads. The last section
holds faster equivalents (im2col convolutions on the CPU, the recurrent
layers' state-to-state gradient after the scan) and swaps them in at one
place, the end of the file: a reader learning the model can stop before it.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# ---------------------------------------------------------------------------
# Masks (paper section 3.4, Figure 4)
# ---------------------------------------------------------------------------


def colour_groups(features, channels):
    """Colour group (0 = R, 1 = G, 2 = B) of each of ``features`` features.

    Groups are contiguous blocks: with 6 features and 3 channels the groups are
    ``[0, 0, 1, 1, 2, 2]``. Returns an int array of shape ``(features,)``.
    """
    if features % channels:
        raise ValueError(f"{features} features cannot be split into {channels} colour groups")
    return np.arange(features) * channels // features


def conv_mask(kernel_shape, channels, mask_type, blocks=1):
    """The 0/1 mask of a masked convolution kernel ``(kh, kw, F_in, F_out)``.

    Positions above the centre row and left of the centre in the centre row
    are earlier in raster order: fully visible. Positions after the centre are
    the future: hidden. At the centre itself, output group ``g`` may read
    input groups ``< g`` (mask ``"A"``, first layer: a pixel must not see its
    own value) or ``<= g`` (mask ``"B"``, later layers: features of group
    ``g`` at the centre were already computed without seeing colour ``g``).
    With one colour, mask A hides the centre and mask B shows it.

    ``blocks > 1`` splits the outputs into that many equal blocks, each with
    its own colour groups: the LSTM gates ``[o | f | i | g]`` (``blocks=4``),
    so that unit ``j``'s four gates all get unit ``j``'s colour.
    """
    kh, kw, features_in, features_out = kernel_shape
    centre_row, centre_col = kh // 2, kw // 2
    groups_in = colour_groups(features_in, channels)[:, None]
    groups_out = np.tile(colour_groups(features_out // blocks, channels), blocks)[None, :]
    centre = groups_in < groups_out if mask_type == "A" else groups_in <= groups_out
    mask = np.zeros(kernel_shape, np.float32)
    mask[:centre_row] = 1.0
    mask[centre_row, :centre_col] = 1.0
    mask[centre_row, centre_col] = centre
    return mask


# ---------------------------------------------------------------------------
# Convolutions
# ---------------------------------------------------------------------------


def init_conv(key, kh, kw, features_in, features_out):
    """Kernel ``(kh, kw, F_in, F_out)`` with LeCun-normal scale, zero bias ``(F_out,)``."""
    fan_in = kh * kw * features_in
    w = jax.random.normal(key, (kh, kw, features_in, features_out)) / np.sqrt(fan_in)
    return {"w": w, "b": jnp.zeros((features_out,))}


def conv(params, x, padding="SAME", mask=None):
    """2-D convolution, stride 1: ``(B, H, W, F_in) -> (B, H', W', F_out)``, of the
    kernel ``params["w"] (kh, kw, F_in, F_out)`` times ``mask`` (None: unmasked), plus
    the bias: ``lax.conv_general_dilated``. ``"SAME"`` keeps the map size (zeros
    outside the image); ``"VALID"`` is used by the fast sampler to evaluate one
    position from a patch.
    """
    w = params["w"] if mask is None else params["w"] * mask
    y = lax.conv_general_dilated(x, w, window_strides=(1, 1), padding=padding,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + params["b"]


def masked_conv(params, x, channels, mask_type, padding="SAME", blocks=1):
    """:func:`conv` with the kernel multiplied by :func:`conv_mask` (paper section 3.4).

    The mask is a numpy constant built from static shapes, so it costs
    nothing at run time, and masked weights get zero gradient: they stay
    irrelevant whatever the optimiser does.
    """
    return conv(params, x, padding, conv_mask(params["w"].shape, channels, mask_type, blocks))


# ---------------------------------------------------------------------------
# The LSTM cell shared by both recurrent layers (paper equation 3)
# ---------------------------------------------------------------------------


def lstm_cell(gates, cell_prev):
    """One LSTM update from pre-activations ``gates (..., 4h)`` and ``cell_prev (..., h)``.

    The gates come as four contiguous blocks ``[o | f | i | g]`` of ``h``
    features each: contiguous slices, where gates interleaved per unit would
    make XLA gather every 4th value inside the scans. The input-to-state
    convolutions give each block its own colour groups, see
    :func:`conv_mask`. Returns ``(hidden, cell)``, each ``(..., h)``.
    """
    o, f, i, g = jnp.split(gates, 4, axis=-1)
    cell = jax.nn.sigmoid(f) * cell_prev + jax.nn.sigmoid(i) * jnp.tanh(g)
    hidden = jax.nn.sigmoid(o) * jnp.tanh(cell)
    return hidden, cell


# ---------------------------------------------------------------------------
# Row LSTM (paper section 3.1, Figure 2 left)
# ---------------------------------------------------------------------------


def init_row_lstm(key, features, hidden, kernel=3):
    """Parameters of a Row LSTM layer reading and writing ``features`` = 2h maps."""
    k_input, k_state, k_output = jax.random.split(key, 3)
    return {
        "input_to_state": init_conv(k_input, 1, kernel, features, 4 * hidden),
        "state_to_state": init_conv(k_state, 1, kernel, hidden, 4 * hidden),
        "output": init_conv(k_output, 1, 1, hidden, features),
    }


def row_lstm_step(state_to_state, carry, gates_from_input):
    """Advance the Row LSTM by one image row.

    ``carry = (hidden, cell)`` of the row above, each ``(B, W, h)``;
    ``gates_from_input (B, W, 4h)`` is this row's input-to-state part. The
    state-to-state part is an unmasked ``1 x k`` convolution of the row above:
    every position it reads is in an earlier row, so nothing needs hiding.
    """
    hidden_above, cell_above = carry
    from_above = conv(state_to_state, hidden_above[:, None])[:, 0]         # (B, W, 4h)
    gates = gates_from_input + from_above
    hidden, cell = lstm_cell(gates, cell_above)
    return (hidden, cell), hidden


def row_lstm_scan(state_to_state, gates_from_input):
    """The recurrence down the rows, from a zero state: input-to-state gates
    ``(H, B, W, 4h)``, rows first -> the hidden state of every row ``(H, B, W, h)``."""
    zeros = jnp.zeros(gates_from_input.shape[1:-1] + (state_to_state["w"].shape[2],),
                      gates_from_input.dtype)

    def step(carry, row_gates):
        return row_lstm_step(state_to_state, carry, row_gates)

    return lax.scan(step, (zeros, zeros), gates_from_input)[1]


def row_lstm(params, x, channels):
    """Row LSTM layer: ``(B, H, W, 2h) -> (B, H, W, 2h)`` (before the residual add).

    The input-to-state ``1 x k`` convolution with mask B is computed for the
    whole map at once; ``lax.scan`` then runs the recurrence down the rows
    (:func:`row_lstm_scan`). Each output sees a triangle above it (and the
    pixels to its left, via the mask-A input layer and the mask-B
    convolutions).
    """
    gates_from_input = masked_conv(params["input_to_state"], x, channels, "B", blocks=4)
    hidden_rows = row_lstm_scan(params["state_to_state"], jnp.swapaxes(gates_from_input, 0, 1))
    hidden = jnp.swapaxes(hidden_rows, 0, 1)
    return masked_conv(params["output"], hidden, channels, "B")


# ---------------------------------------------------------------------------
# Skewing and the Diagonal BiLSTM (paper section 3.2, Figure 3)
# ---------------------------------------------------------------------------


def skew(x):
    """Shift row ``r`` right by ``r``: ``(..., H, W, F) -> (..., H, W + H - 1, F)``.

    Each column of the result is then one diagonal of the image, so a scan
    over columns processes a whole diagonal per step. Done without a loop:
    pad every row to ``W + H`` with zeros, flatten, drop the last ``H``
    entries and read the same memory back with rows of ``W + H - 1``; each
    row starts one entry earlier than before, i.e. shifted right by one more.
    """
    *lead, height, width, features = x.shape
    padded = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (0, height), (0, 0)])
    flat = padded.reshape(*lead, height * (width + height), features)
    return flat[..., : height * (width + height - 1), :].reshape(
        *lead, height, width + height - 1, features)


def unskew(x):
    """Inverse of :func:`skew`: ``(..., H, W + H - 1, F) -> (..., H, W, F)``."""
    *lead, height, skewed_width, features = x.shape
    width = skewed_width - height + 1
    flat = x.reshape(*lead, height * skewed_width, features)
    padded = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, height), (0, 0)])
    return padded.reshape(*lead, height, width + height, features)[..., :width, :]


def shift_down(x):
    """Move a map ``(..., H, W, F)`` down one row, filling the top with zeros."""
    pad = [(0, 0)] * (x.ndim - 3) + [(1, 0), (0, 0), (0, 0)]
    return jnp.pad(x, pad)[..., :-1, :, :]


def init_diagonal_bilstm(key, features, hidden):
    """Parameters of a Diagonal BiLSTM layer; the leading axis 2 is the direction.

    ``state_to_state["w"]`` has shape ``(2, 2, 1, h, 4h)``: per direction a
    ``2 x 1`` kernel whose first row reads the state above (previous column,
    one row up in the skewed map) and whose second row reads the state to
    the left (previous column, same row).
    """
    k_input, k_state, k_output = jax.random.split(key, 3)
    both = jax.random.split(k_input, 2)
    return {
        "input_to_state": jax.vmap(lambda k: init_conv(k, 1, 1, features, 4 * hidden))(both),
        "state_to_state": jax.vmap(lambda k: init_conv(k, 2, 1, hidden, 4 * hidden))(
            jax.random.split(k_state, 2)),
        "output": init_conv(k_output, 1, 1, hidden, features),
    }


def read_previous_column(hidden_prev):
    """What each position of a column reads from the previous column's state.

    ``hidden_prev (..., H, h)`` -> ``(..., H, 2h)``: position ``r`` gets the
    state at row ``r - 1`` (the pixel above; zeros for the top row) and the
    state at row ``r`` (the pixel to the left), in the order of the
    state-to-state kernel's two rows.
    """
    pad = [(0, 0)] * (hidden_prev.ndim - 2) + [(1, 0), (0, 0)]
    hidden_above = jnp.pad(hidden_prev, pad)[..., :-1, :]
    return jnp.concatenate([hidden_above, hidden_prev], axis=-1)


def diagonal_lstm_step(kernel, carry, gates_from_input):
    """Advance both directions' LSTMs by one column of the skewed map.

    ``kernel (2, 2, 1, h, 4h)`` is the state-to-state kernel of both
    directions; ``carry = (hidden, cell)``, each ``(2, B, H, h)``: the
    previous column; ``gates_from_input (2, B, H, 4h)``: this column's
    input-to-state part, which already holds the state-to-state bias.
    """
    hidden_prev, cell_prev = carry
    kernel = kernel.reshape(2, -1, kernel.shape[-1])                     # (2, 2h, 4h)
    gates = gates_from_input + jnp.einsum("dbhk,dkg->dbhg", read_previous_column(hidden_prev),
                                          kernel)
    hidden, cell = lstm_cell(gates, cell_prev)
    return (hidden, cell), hidden


def diagonal_lstm_scan(kernel, columns):
    """The recurrence over the columns of the skewed map, from a zero state.

    ``kernel (2, 2, 1, h, 4h)``; ``columns (T, 2, B, H, 4h)``: the
    input-to-state gates of the ``T = W + H - 1`` columns, both directions.
    Returns the hidden state of every column, ``(T, 2, B, H, h)``.
    """
    zeros = jnp.zeros(columns.shape[1:-1] + (kernel.shape[-2],), columns.dtype)

    def step(carry, column):
        return diagonal_lstm_step(kernel, carry, column)

    return lax.scan(step, (zeros, zeros), columns)[1]


def diagonal_bilstm(params, x, channels):
    """Diagonal BiLSTM layer: ``(B, H, W, 2h) -> (B, H, W, 2h)`` (before the residual add).

    Direction 0 scans the image's diagonals left to right; direction 1 does
    the same on the horizontally mirrored image. Both run in one ``lax.scan``
    (:func:`diagonal_lstm_scan`). The input-to-state part is a ``1 x 1``
    mask-B convolution, computed on the unskewed map (no work wasted on the
    skew padding) and then skewed. Direction 1's output is mirrored back and
    **shifted down one row** before the two are added: unshifted it would
    see pixels to the right in the same row, which come later in raster
    order.

    The skew padding needs no masking. Both biases are added before skewing,
    so the padding's gates are exactly 0, and an LSTM with zero gates and
    zero state keeps a zero state (``c' = c / 2 = 0``, ``h = tanh(c') / 2 = 0``): left of
    each row the state stays 0, as outside the image in the Row LSTM. Right
    of each row it does not, but no image position reads it (they read the
    previous column at the same row and the row above).
    """
    gates = jax.vmap(lambda p: masked_conv(p, x, channels, "B", blocks=4))(params["input_to_state"])
    gates = gates + params["state_to_state"]["b"][:, None, None, None, :]
    gates = jnp.stack([gates[0], gates[1][:, :, ::-1]])               # (2, B, H, W, 4h)
    columns = jnp.moveaxis(skew(gates), 3, 0)                         # (W+H-1, 2, B, H, 4h)
    hidden_columns = diagonal_lstm_scan(params["state_to_state"]["w"], columns)
    hidden = unskew(jnp.moveaxis(hidden_columns, 0, 3))               # (2, B, H, W, h)
    combined = hidden[0] + shift_down(hidden[1][:, :, ::-1])
    return masked_conv(params["output"], combined, channels, "B")


# ---------------------------------------------------------------------------
# PixelCNN residual block (paper section 3.5, Figure 5 right)
# ---------------------------------------------------------------------------


def init_pixelcnn_block(key, features, hidden):
    """Parameters of a residual block ``2h -> h -> h -> 2h``."""
    k_reduce, k_masked, k_expand = jax.random.split(key, 3)
    return {
        "reduce": init_conv(k_reduce, 1, 1, features, hidden),
        "masked": init_conv(k_masked, 3, 3, hidden, hidden),
        "expand": init_conv(k_expand, 1, 1, hidden, features),
    }


def pixelcnn_block(params, x, channels):
    """ReLU, 1x1, ReLU, 3x3 mask B, ReLU, 1x1: ``(B, H, W, 2h) -> (B, H, W, 2h)``.

    Stacked ``3 x 3`` masks grow a receptive field that misses a wedge of
    pixels up and to the right (the "blind spot"); the PixelRNN layers do
    not have it. That is the model as published, and a test checks it.
    """
    y = masked_conv(params["reduce"], jax.nn.relu(x), channels, "B")
    y = masked_conv(params["masked"], jax.nn.relu(y), channels, "B")
    return masked_conv(params["expand"], jax.nn.relu(y), channels, "B")


# ---------------------------------------------------------------------------
# Output head (paper section 3.4 and Table 1)
# ---------------------------------------------------------------------------


def init_output_head(key, features, out_hidden, out_features):
    """Two ``1 x 1`` convolutions: ``features -> out_hidden -> out_features``."""
    k_hidden, k_logits = jax.random.split(key)
    return {
        "hidden": init_conv(k_hidden, 1, 1, features, out_hidden),
        "logits": init_conv(k_logits, 1, 1, out_hidden, out_features),
    }


def output_head(params, x, channels):
    """ReLU, 1x1 mask B, ReLU, 1x1 mask B: ``(B, H, W, F) -> (B, H, W, out_features)``.

    The output features are ordered colour-major (all of R's logits, then
    G's, then B's), so mask B lets colour ``c``'s logits read only features
    of groups ``<= c``.
    """
    y = masked_conv(params["hidden"], jax.nn.relu(x), channels, "B")
    return masked_conv(params["logits"], jax.nn.relu(y), channels, "B")


# ===========================================================================
# Speed paths (PERFORMANCE.md). Everything above is the definition, and all a
# reader of the model needs. The functions below compute the same values and
# gradients faster; the last lines of this file swap them in, and the tests
# keep each equal to the definition it replaces.
# ===========================================================================


def im2col(x, kh, kw, padding="SAME", mask=None):
    """The inputs that a ``kh x kw`` convolution multiplies, side by side ("im2col").

    ``x (B, H, W, F)`` -> ``patches (B, H', W', T * F)`` and the list of the
    ``T`` taps ``(dy, dx)`` they hold: at output ``(r, c)``, the (padded)
    input at ``(r + dy, c + dx)`` for each tap that ``mask`` leaves nonzero
    (all taps when ``mask`` is None). Padding as ``lax``: ``"SAME"`` puts
    ``(k - 1) // 2`` zeros before and ``k // 2`` after; ``"VALID"`` none.
    """
    taps = [(dy, dx) for dy in range(kh) for dx in range(kw) if mask is None or mask[dy, dx].any()]
    if padding == "SAME":
        x = jnp.pad(x, [(0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)])
    out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    return jnp.concatenate([x[:, dy:dy + out_h, dx:dx + out_w] for dy, dx in taps], -1), taps


def im2col_conv(params, x, padding="SAME", mask=None):
    """:func:`conv` as one matrix product: the :func:`im2col` patches ``(B, H', W',
    T * F_in)`` of the taps that ``mask`` leaves (a mask-B ``3 x 3`` kernel has 5 of
    9) times the stacked kernel ``(T * F_in, F_out)`` of those taps."""
    w = params["w"] if mask is None else params["w"] * mask
    patches, taps = im2col(x, *w.shape[:2], padding, mask)
    return patches @ jnp.concatenate([w[tap] for tap in taps], 0) + params["b"]


def fast_conv(params, x, padding="SAME", mask=None):
    """:func:`conv`, run the faster way: :func:`im2col_conv` on XLA:CPU, where
    differentiating ``lax.conv_general_dilated`` with so few features is slow, and for
    the unmasked state-to-state convolutions (a small product per step inside the
    scans) everywhere; otherwise the definition."""
    if mask is None or jax.default_backend() == "cpu":
        return im2col_conv(params, x, padding, mask)
    return DEFINITIONS["conv"](params, x, padding, mask)


def kernel_gradient_after_scan(scan, kernel_gradient):
    """``scan(params, gates) -> hidden``, with the gradient of ``params`` computed
    once, after the backward scan.

    ``scan`` runs an LSTM recurrence over the input-to-state ``gates (T, ...,
    4h)`` (rows, or columns of the skewed map, as the leading axis) with
    state-to-state parameters ``params``, and returns every step's hidden
    state ``(T, ..., h)``. Left to autodiff, the backward scan adds each
    step's share of the parameters' gradient as it goes; with the batch
    split over devices, XLA's partitioner then all-reduces that share at
    every step, one wait for every device per image row or diagonal. Here
    the backward scan returns only the gates' gradients ``d_gates`` (which
    the input-to-state convolution needs anyway), and
    ``kernel_gradient(params, hidden, d_gates)`` computes the parameters'
    gradient from them and from the saved states, after the scan: one
    all-reduce per step of training (PERFORMANCE.md). Values and gradients
    are ``scan``'s (a test checks both layers).
    """
    @jax.custom_vjp
    def scan_fast(params, gates):
        return scan(params, gates)

    def forward(params, gates):
        hidden, backward_scan = jax.vjp(lambda g: scan(params, g), gates)
        return hidden, (backward_scan, params, hidden)

    def backward(saved, d_hidden):
        backward_scan, params, hidden = saved
        (d_gates,) = backward_scan(d_hidden)
        return kernel_gradient(params, hidden, d_gates), d_gates

    scan_fast.defvjp(forward, backward)
    return scan_fast


def previous_steps(hidden):
    """The state each scan step started from: ``hidden (T, ...)`` moved one step on,
    zeros first."""
    return jnp.concatenate([jnp.zeros_like(hidden[:1]), hidden[:-1]])


def row_lstm_kernel_gradient(state_to_state, hidden, d_gates):
    """The state-to-state parameters' gradient, from every row's state ``hidden
    (H, B, W, h)`` and gate gradients ``d_gates (H, B, W, 4h)``: each row's
    :func:`im2col` patches of the row above, times its gate gradients, summed."""
    rows, batch, width, features = hidden.shape
    patches, _ = im2col(previous_steps(hidden).reshape(rows * batch, 1, width, features),
                        *state_to_state["w"].shape[:2])
    patches = patches.reshape(rows, batch, width, -1)                    # (H, B, W, k * h)
    # One product per row, then the sum over rows, rather than one product over all rows:
    # in the Diagonal BiLSTM the single product made XLA:CPU copy both of its operands
    # into a transposed layout and ran slower (PERFORMANCE.md).
    d_kernel = jnp.einsum("rbwk,rbwg->rkg", patches, d_gates).sum(0)
    return {"w": d_kernel.reshape(state_to_state["w"].shape), "b": d_gates.sum((0, 1, 2))}


def diagonal_lstm_kernel_gradient(kernel, hidden, d_gates):
    """The state-to-state kernel's gradient ``(2, 2, 1, h, 4h)``, from every column's
    state ``hidden (T, 2, B, H, h)`` and gate gradients ``d_gates (T, 2, B, H, 4h)``:
    what each column read of the previous one, times its gate gradients, summed."""
    read = read_previous_column(previous_steps(hidden))                 # (T, 2, B, H, 2h)
    # One product per column and direction, then the sum: see row_lstm_kernel_gradient.
    d_kernel = jnp.einsum("tdbhk,tdbhg->tdkg", read, d_gates).sum(0)
    return d_kernel.reshape(kernel.shape)


# ---------------------------------------------------------------------------
# The swap: the one place where the speed paths replace the definitions. The
# layers above look these names up when they run. The convolution is swapped
# for good. The scans are swapped only while a gradient is traced inside
# fast_gradients() (the train step is), because forward-mode autodiff
# (jax.jvp, jax.jacfwd) cannot pass a custom VJP. Delete the swaps to run the
# definitions everywhere.
# ---------------------------------------------------------------------------

DEFINITIONS = {"conv": conv, "row_lstm_scan": row_lstm_scan,
               "diagonal_lstm_scan": diagonal_lstm_scan}
SPEED_PATHS = {
    "conv": fast_conv,
    "row_lstm_scan": kernel_gradient_after_scan(row_lstm_scan, row_lstm_kernel_gradient),
    "diagonal_lstm_scan": kernel_gradient_after_scan(diagonal_lstm_scan,
                                                     diagonal_lstm_kernel_gradient),
}
conv = SPEED_PATHS["conv"]


@contextlib.contextmanager
def fast_gradients():
    """Within it, the recurrent layers run the scans whose kernel gradient comes after the
    backward scan: trace a reverse-mode gradient inside it."""
    global row_lstm_scan, diagonal_lstm_scan
    row_lstm_scan, diagonal_lstm_scan = (SPEED_PATHS["row_lstm_scan"],
                                         SPEED_PATHS["diagonal_lstm_scan"])
    try:
        yield
    finally:
        row_lstm_scan, diagonal_lstm_scan = (DEFINITIONS["row_lstm_scan"],
                                             DEFINITIONS["diagonal_lstm_scan"])
