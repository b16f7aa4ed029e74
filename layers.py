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
"""

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


def masked_conv(params, x, channels, mask_type, padding="SAME", blocks=1, product=jnp.matmul):
    """2-D convolution, stride 1, whose kernel is multiplied by :func:`conv_mask`:
    ``(B, H, W, F_in) -> (B, H', W', F_out)``.

    The definition is ``lax.conv_general_dilated`` of the masked kernel.
    The mask is a numpy constant built from static shapes, so it costs
    nothing at run time, and masked weights get zero gradient: they stay
    irrelevant whatever the optimiser does. ``"SAME"`` keeps the map size
    (zeros outside the image); ``"VALID"`` is used by the fast sampler to
    evaluate one position from a patch. Where :func:`im2col_is_faster`, the
    same values come from :func:`im2col_conv` instead, with ``product``.
    """
    mask = conv_mask(params["w"].shape, channels, mask_type, blocks)
    if im2col_is_faster():
        return im2col_conv(params, x, padding, mask, product)
    y = lax.conv_general_dilated(x, params["w"] * mask, window_strides=(1, 1), padding=padding,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + params["b"]


def im2col_is_faster():
    """Whether convolutions run as :func:`im2col_conv`: the one place that chooses.

    True on XLA:CPU, where differentiating ``lax.conv_general_dilated`` with
    so few features is slow and im2col trains every model faster (see
    PERFORMANCE.md); elsewhere the definition runs as written.
    """
    return jax.default_backend() == "cpu"


def im2col_conv(params, x, padding="SAME", mask=None, product=jnp.matmul):
    """The fast path of :func:`masked_conv`: the same convolution as one matrix product.

    Output ``(r, c)`` is the sum over kernel taps ``(dy, dx)`` of the
    (padded) input at ``(r + dy, c + dx)`` times the tap's
    ``(F_in, F_out)`` matrix. Only the taps that ``mask`` leaves nonzero are
    computed (a mask-B ``3 x 3`` kernel has 5 of 9): the shifted inputs of
    all ``T`` taps are stacked, ``(B, H', W', T * F_in)``, and multiplied
    once by the stacked kernel ``(T * F_in, F_out)`` ("im2col"). With
    ``mask=None`` it is an unmasked convolution: the state-to-state
    convolutions, which read only earlier pixels, run this way everywhere
    (a matrix product per step inside the scans). ``product(patches,
    kernel)`` multiplies: ``jnp.matmul``, or :func:`patches_times_kernel`.
    A test keeps it equal to ``lax.conv_general_dilated``, values and
    gradients.
    """
    w = params["w"] if mask is None else params["w"] * mask
    kh, kw = w.shape[:2]
    taps = [(dy, dx) for dy in range(kh) for dx in range(kw) if mask is None or mask[dy, dx].any()]
    if padding == "SAME":     # as lax: (k - 1) // 2 zeros before, k // 2 after
        x = jnp.pad(x, [(0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)])
    out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    shifted = [x[:, dy:dy + out_h, dx:dx + out_w] for dy, dx in taps]
    y = product(jnp.concatenate(shifted, -1), jnp.concatenate([w[tap] for tap in taps], 0))
    return y + params["b"]


@jax.custom_vjp
def patches_times_kernel(patches, kernel):
    """``patches @ kernel``, ``(..., K) x (K, F) -> (..., F)``, whose kernel gradient is
    a product that XLA:CPU hands to YNNPACK, its fast matrix-product library. A speed
    path only: a reader learning the model can skip it.

    The kernel gradient sums ``patches^T dy`` over all positions. Left to
    autodiff, that is a product whose left operand is transposed, which
    XLA:CPU's YNNPACK path refuses (it falls back to a slower
    kernel) unless the automatic partitioner happens to lay the patches out
    transposed. Here the backward pass materialises ``patches^T`` itself,
    behind ``lax.optimization_barrier`` so that XLA cannot fold the
    transpose back into the product. The copy costs time: it pays off in the
    Row LSTM, whose train step computes each device's gradient on its own
    (see training.py and PERFORMANCE.md), not in the other models. The
    values and gradients are ``patches @ kernel``'s (a test checks them).
    """
    return patches @ kernel


def _patches_times_kernel_forward(patches, kernel):
    return patches @ kernel, (patches, kernel)


def _patches_times_kernel_backward(saved, dy):
    patches, kernel = saved
    patches_t = lax.optimization_barrier(patches.reshape(-1, patches.shape[-1]).T)   # (K, N)
    return dy @ kernel.T, patches_t @ dy.reshape(-1, dy.shape[-1])


patches_times_kernel.defvjp(_patches_times_kernel_forward, _patches_times_kernel_backward)


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
    from_above = im2col_conv(state_to_state, hidden_above[:, None],
                             product=patches_times_kernel)[:, 0]           # (B, W, 4h)
    gates = gates_from_input + from_above
    hidden, cell = lstm_cell(gates, cell_above)
    return (hidden, cell), hidden


def row_lstm(params, x, channels):
    """Row LSTM layer: ``(B, H, W, 2h) -> (B, H, W, 2h)`` (before the residual add).

    The input-to-state ``1 x k`` convolution with mask B is computed for the
    whole map at once; ``lax.scan`` then runs the recurrence down the rows.
    Each output sees a triangle above it (and the pixels to its left, via the
    mask-A input layer and the mask-B convolutions).
    """
    gates_from_input = masked_conv(params["input_to_state"], x, channels, "B", blocks=4,
                                   product=patches_times_kernel)
    batch, _, width, _ = x.shape
    hidden_size = params["state_to_state"]["w"].shape[2]
    zeros = jnp.zeros((batch, width, hidden_size), x.dtype)

    def step(carry, row_gates):
        return row_lstm_step(params["state_to_state"], carry, row_gates)

    _, hidden_rows = lax.scan(step, (zeros, zeros), jnp.swapaxes(gates_from_input, 0, 1))
    hidden = jnp.swapaxes(hidden_rows, 0, 1)
    return masked_conv(params["output"], hidden, channels, "B", product=patches_times_kernel)


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


@jax.custom_vjp
def diagonal_lstm_scan_fast(kernel, columns):
    """:func:`diagonal_lstm_scan`, with the kernel gradient summed once, after the
    backward scan. A speed path only: a reader learning the model can skip it.

    Left to autodiff, the backward scan adds each column's share of the
    state-to-state kernel gradient as it goes. With the batch split over
    devices, XLA's partitioner then all-reduces that gradient at every
    column: 55 waits for the other device per layer and step. Here the
    backward scan returns each column's gate gradients (which the
    input-to-state part needs anyway), and the kernel gradient is computed
    from them for all columns afterwards, all-reduced once. Values and
    gradients are :func:`diagonal_lstm_scan`'s (a test checks them).
    """
    return diagonal_lstm_scan(kernel, columns)


def _diagonal_lstm_scan_forward(kernel, columns):
    hidden, backward_scan = jax.vjp(lambda c: diagonal_lstm_scan(kernel, c), columns)
    return hidden, (backward_scan, hidden, kernel)


def _diagonal_lstm_scan_backward(saved, d_hidden):
    backward_scan, hidden, kernel = saved
    (d_gates,) = backward_scan(d_hidden)                             # (T, 2, B, H, 4h)
    hidden_prev = jnp.concatenate([jnp.zeros_like(hidden[:1]), hidden[:-1]])
    # One product per column and direction, then the sum over columns. With the columns
    # and directions as the products' leading batch axes, XLA:CPU copies only the read
    # states into the transposed layout its fast products need; one "tdbhk,tdbhg->dkg"
    # product made it copy both operands, and ran slower (PERFORMANCE.md).
    d_kernel = jnp.einsum("tdbhk,tdbhg->tdkg", read_previous_column(hidden_prev), d_gates).sum(0)
    return d_kernel.reshape(kernel.shape), d_gates


diagonal_lstm_scan_fast.defvjp(_diagonal_lstm_scan_forward, _diagonal_lstm_scan_backward)


def diagonal_bilstm(params, x, channels):
    """Diagonal BiLSTM layer: ``(B, H, W, 2h) -> (B, H, W, 2h)`` (before the residual add).

    Direction 0 scans the image's diagonals left to right; direction 1 does
    the same on the horizontally mirrored image. Both run in one
    ``lax.scan`` (:func:`diagonal_lstm_scan`). The input-to-state part is a ``1 x 1`` mask-B convolution,
    computed on the unskewed map (no work wasted on the skew padding) and
    then skewed. Direction 1's output is mirrored back and **shifted down one
    row** before the two are added: unshifted it would see pixels to the
    right in the same row, which come later in raster order.

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
    hidden_columns = diagonal_lstm_scan_fast(params["state_to_state"]["w"], columns)
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
