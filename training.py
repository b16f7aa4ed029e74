"""What the scripts share: devices, the update step, the evaluation, checkpoints.

Data parallelism: every device of every process holds one slice of each batch
(a 1-D ``jax.sharding.Mesh`` named ``data``); parameters and optimizer state
are replicated, and one jitted step sums the gradients across devices (XLA
inserts the all-reduce): one code path for the host devices of a CPU, the
GPUs of a node and several hosts. A checkpoint is a plain ``.npz``: each
array named by its path in its tree (``params/layers/0/input_to_state/w``,
``opt_state/...``, ``ema/...``, ``rng``) and ``meta``, the model config and the
run's record as JSON. It loads with ``allow_pickle=False``: nothing is
unpickled, so opening a checkpoint never runs code from it.
"""

import ctypes
import json
import math
import os
import pathlib
import socket
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import data
import layers
import pixelrnn


class UserError(Exception):
    """A mistake the user can fix (a flag, a file, a folder): one line, exit code 2."""


def number(kind, minimum, strict=False, maximum=math.inf):
    """An argparse type: a finite ``kind`` (int or float) from ``minimum`` (excluded if
    ``strict``) to ``maximum``."""
    def parse(text):
        value = kind(text)
        if not math.isfinite(value) or value > maximum or value < minimum or (
                strict and value == minimum):
            raise ValueError(text)
        return value
    parse.__name__ = f"{kind.__name__} {'>' if strict else '>='} {minimum}" + (
        f" and <= {maximum}" if maximum < math.inf else "")
    return parse


# ---------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------

# CPU only: one XLA device per usable core, rounded down to a power of two so that the
# default batch sizes split evenly; more devices than cores only adds waiting.
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
HOST_DEVICES = 1 << (CORES.bit_length() - 1)


def keep_freed_memory():
    """Make glibc's malloc keep freed memory instead of unmapping it: XLA:CPU mallocs
    each step's scratch buffers (hundreds of MB), and glibc would ``mmap`` each and
    page-fault it all in again every step (PERFORMANCE.md). Must run before JAX starts
    its threads; a no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8      # from glibc's malloc.h
    libc.mallopt(m_arena_max, 1)
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, -1)             # -1: never trim


def meet_peers(address, process_id, peers, timeout):
    """Check that the coordinator ``host:port`` is usable before JAX does: JAX aborts the
    process with a C++ stack trace when a peer never comes. Process 0 binds the port
    and waits for each of the ``peers`` other processes to connect once, then frees it
    for JAX; the others retry connecting for ``timeout`` seconds; with no ``process_id``
    only the address is checked. Raises UserError."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"coordinator address {address!r}: expected HOST:PORT")
    deadline = time.monotonic() + timeout
    if process_id == 0:
        with socket.create_server(("", int(port))) as server:
            for joined in range(peers):
                server.settimeout(max(deadline - time.monotonic(), 0.001))
                try:
                    server.accept()[0].close()
                except TimeoutError:
                    raise UserError(f"{joined} of the {peers} other processes joined within "
                                    f"{timeout} s: start each with --coordinator {address}")
    while process_id:
        try:
            return socket.create_connection((host, int(port)), timeout=5).close()
        except OSError:
            if time.monotonic() > deadline:
                raise UserError(f"no coordinator at {address} after {timeout} s: start "
                                f"process 0 first, with the same --coordinator") from None
            time.sleep(0.5)


def set_up_devices(host_devices=HOST_DEVICES, distributed=False, coordinator=None,
                   num_processes=None, process_id=None, timeout=300):
    """Split the CPU into ``host_devices`` devices, or with ``distributed`` join a
    multi-process job through ``jax.distributed.initialize`` (coordinator, process
    count and id given, or read by JAX from the cluster: SLURM, Open MPI). Must run
    before JAX's first computation. Raises UserError."""
    keep_freed_memory()
    if host_devices > 1 and "xla_force_host_platform_device_count" not in os.environ.get(
            "XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", host_devices)   # GPUs are used as they are
    if not distributed:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        meet_peers(coordinator, process_id, (num_processes or 1) - 1, timeout)
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"--distributed: {e} (give --coordinator HOST:PORT, --num-processes "
                        f"and --process-id, or run under SLURM or Open MPI)") from None


def make_mesh(**batch_sizes):
    """A 1-D ``data`` mesh over every device; each batch size (keyword: its flag) must split
    evenly over it."""
    devices = jax.devices()
    for flag, size in batch_sizes.items():
        if size % len(devices):
            raise UserError(f"--{flag.replace('_', '-')} {size} is not divisible by the "
                            f"{len(devices)} devices ({devices[0].platform})")
    return Mesh(np.array(devices), ("data",))


def replicated(mesh):
    """The sharding of arrays that every device holds whole (parameters, losses)."""
    return NamedSharding(mesh, PartitionSpec())


def put_batch(images, mesh):
    """A global batch ``(B, H, W, C)`` (the same on every process) -> a jax.Array split
    along the mesh; each process hands over only the rows its own devices hold."""
    rows = len(images) // jax.process_count()
    local = images[jax.process_index() * rows:(jax.process_index() + 1) * rows]
    return jax.make_array_from_process_local_data(
        NamedSharding(mesh, PartitionSpec("data")), local, images.shape)


# ---------------------------------------------------------------------------
# The update and the evaluation
# ---------------------------------------------------------------------------


def learning_rate(settings, planned_steps):
    """The optax schedule: a linear warm-up from 0 over ``warmup`` steps to ``lr``, then
    half a cosine (``"cosine"``) or a geometric decay (``"exponential"``) to ``lr *
    lr_floor`` at step ``planned_steps``; ``"constant"`` stays at ``lr``."""
    lr, warmup, floor = settings["lr"], settings["warmup"], settings["lr_floor"]
    if settings["schedule"] == "constant":      # (optax's warmup_constant_schedule stays at 0
        return optax.join_schedules(             # when warmup is 0, as optax 0.2.8 has it)
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    if settings["schedule"] == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(planned_steps, warmup + 1),
                                                  end_value=lr * floor)
    return optax.warmup_exponential_decay_schedule(0.0, lr, warmup, max(planned_steps - warmup, 1),
                                                   floor, end_value=lr * floor)


def make_optimizer(settings, planned_steps):
    """Adam or RMSProp on the :func:`learning_rate` schedule, after clipping the global
    gradient norm to ``clip`` (0: no clipping)."""
    clip = optax.clip_by_global_norm(settings["clip"]) if settings["clip"] > 0 else optax.identity()
    update = {"adam": optax.adam, "rmsprop": optax.rmsprop}[settings["optimizer"]]
    return optax.chain(clip, update(learning_rate(settings, planned_steps)))


def init_state(params, optimizer):
    """A new run's state: parameters, optimizer state and the parameters' moving average
    (a copy: the train step donates the state's buffers, each can be donated once)."""
    return {"params": params, "opt_state": optimizer.init(params),
            "ema": jax.tree.map(jnp.copy, params)}


def make_train_step(cfg, optimizer, mesh, ema_decay):
    """The jitted update ``state, images, step -> state, loss``.

    ``step`` counts the updates before this one; the loss is the mean NLL in
    nats per image. ``ema`` is the parameters' exponential moving average
    (Polyak averaging, as PixelCNN++ evaluates with), with TensorFlow's
    decay ``min(ema_decay, (1 + step) / (10 + step))`` so that the first
    steps do not pin it to the initial parameters. The images arrive split
    over the mesh and the results are replicated, so XLA sums the gradients
    across devices.
    """
    def loss_fn(params, images):
        return -jnp.mean(pixelrnn.log_prob(params, cfg, images))

    def train_step(state, images, step):
        with layers.fast_gradients():                 # the recurrent layers' speed path
            loss, grads = jax.value_and_grad(loss_fn)(state["params"], images)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
        ema = optax.incremental_update(params, state["ema"], 1.0 - decay)
        return {"params": params, "opt_state": opt_state, "ema": ema}, loss

    return jax.jit(train_step, out_shardings=replicated(mesh), donate_argnums=0)


def make_evaluate(cfg, mesh, batch_size):
    """``evaluate(params, images) -> (mean, standard error)`` of the NLL over ``images``,
    in nats per image; the standard error is over images (sample std / sqrt(N))."""
    nll = jax.jit(lambda params, images: -pixelrnn.log_prob(params, cfg, images),
                  out_shardings=replicated(mesh))

    def evaluate(params, images):
        per_image = np.concatenate([np.asarray(nll(params, put_batch(batch, mesh)))[:count]
                                    for batch, count in data.eval_batches(images, batch_size)])
        se = per_image.std(ddof=1) / np.sqrt(len(per_image)) if len(per_image) > 1 else 0.0
        return float(per_image.mean()), float(se)

    return evaluate


# ---------------------------------------------------------------------------
# Checkpoints: named arrays + a JSON record, no pickle
# ---------------------------------------------------------------------------


def array_name(path):
    """A key path -> an array name in the checkpoint, e.g. ``params/layers/0/w``."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def save(path, meta, tree):
    """Write ``tree``'s arrays, named by their paths, and the JSON ``meta`` to ``path``,
    atomically."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    arrays = {array_name(path): np.asarray(leaf) for path, leaf in leaves}
    with data.atomic_write(path) as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)


def read(path):
    """``(meta, arrays)`` of the checkpoint at ``path``: its JSON record and ``{name:
    array}``. A missing file, a file that is not an ``.npz`` archive or holds Python
    objects (never unpickled) or has no record is a UserError."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a checkpoint: not an .npz archive")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
        meta = json.loads(str(arrays.pop("meta")))
        pixelrnn.Config(**meta["config"])
        return meta, arrays
    except ValueError as e:
        if "pickle" in str(e):
            raise UserError(f"{path} is not a checkpoint: it holds Python objects, "
                            f"which are never loaded") from None
        raise UserError(f"{path} is not a readable checkpoint ({e})") from None
    except (OSError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None


def unflatten(arrays, template, source):
    """``template``'s tree (arrays or shapes) filled from ``arrays`` by name; a missing
    name or another shape is a UserError naming ``source``."""
    def take(path, like):
        name = array_name(path)
        if name not in arrays or arrays[name].shape != like.shape:
            raise UserError(f"{source} does not match the model config (array {name})")
        return arrays[name].astype(like.dtype)
    return jax.tree_util.tree_map_with_path(take, template)


def averaged_params(meta, arrays, source):
    """The moving average of the parameters: ``ema/...`` in a run's ``checkpoint.npz``,
    ``params/...`` in a ``best.npz`` (which holds the average alone)."""
    cfg = pixelrnn.Config(**meta["config"])
    name = "ema" if any(a.startswith("ema/") for a in arrays) else "params"
    shapes = jax.eval_shape(lambda key: pixelrnn.init(key, cfg), jax.random.PRNGKey(0))
    return unflatten(arrays, {name: shapes}, source)[name]


def load_params(path):
    """``path`` -> ``(cfg, params, meta)``: a trained model's config, averaged parameters and
    record (``meta["settings"]`` holds its dataset)."""
    meta, arrays = read(path)
    return pixelrnn.Config(**meta["config"]), averaged_params(meta, arrays, path), meta
