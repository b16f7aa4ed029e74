"""The pieces of training that train.py drives and bench.py times.

    training.set_up_devices(host_devices=2)          # before JAX's first computation
    mesh = training.make_mesh(batch_size=16, eval_batch_size=256)
    optimizer = training.make_optimizer(training.DEFAULTS, planned_steps=7810)
    state = training.init_state(pixelrnn.init(key, cfg), optimizer)
    train_step = training.make_train_step(cfg, optimizer, mesh, training.DEFAULTS["ema"])
    state, loss = train_step(state, training.put_batch(images, mesh), step)

Data parallelism: every device of every process holds one slice of each
batch (a 1-D ``jax.sharding.Mesh`` named ``data``); parameters and
optimizer state are replicated, and one jitted step sums the gradients
across devices (XLA inserts the all-reduce). The same code runs on
one CPU split into host devices, on the GPUs of a node, and on several
hosts.
"""

import ctypes
import os
import socket
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import data
import pixelrnn
from checkpoint import UserError

# The settings that define a training run, with their defaults: the recipe measured in
# RESULTS.md. (The model's sizes default in pixelrnn.Config.) A run saves them; a resumed
# run keeps them.
DEFAULTS = dict(dataset="mnist", batch_size=16, optimizer="adam", lr=1e-3, schedule="cosine",
                warmup=200, lr_floor=0.05, clip=1.0, ema=0.9995, seed=0, binarize="fresh",
                train_subset=0, eval_subset=0)
SCHEDULES = ("cosine", "exponential", "constant")


def default_host_devices(cores):
    """How many XLA devices to split a CPU with ``cores`` usable cores into: one per core,
    rounded down to a power of two so that the default batch sizes (16 and 256) split
    evenly. More devices than cores only adds waiting (PERFORMANCE.md)."""
    return 1 << (cores.bit_length() - 1)


def usable_cores():
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


HOST_DEVICES = default_host_devices(usable_cores())     # CPU only: the default --host-devices


# ---------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------


def keep_freed_memory():
    """Make glibc's malloc keep freed memory for reuse instead of unmapping it.

    XLA:CPU mallocs each step's scratch buffers (hundreds of MB) from its
    worker threads, and glibc serves requests that size with a fresh
    ``mmap`` and unmaps them on ``free``, so every step would page-fault
    all of it in again. One arena, no ``mmap`` and no trimming keep the
    buffers mapped for reuse. Must run before JAX starts its threads; a
    no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8      # from glibc's malloc.h
    libc.mallopt(m_arena_max, 1)
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, -1)             # -1: never trim


def wait_for_coordinator(address, process_id, timeout, num_processes=None):
    """Check, before JAX does, that the coordinator ``host:port`` can be used.

    JAX itself aborts the process with a C++ stack trace when a process
    never joins, so this handshake comes first. Process 0 runs the
    coordinator: it binds the port and, when ``num_processes`` is known,
    holds it until each other process has connected once, then frees it
    for JAX. The others retry connecting until ``timeout`` seconds.
    ``process_id`` None (found by JAX from the cluster later): only the
    address is checked. Raises :class:`UserError`.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"coordinator address {address!r}: expected HOST:PORT")
    if process_id is None:
        return
    if process_id == 0:
        serve_until_peers_connect(address, int(port), (num_processes or 1) - 1, timeout)
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise UserError(f"no coordinator at {address} after {timeout} s: start process 0 "
                                f"first, with the same --coordinator") from None
            time.sleep(0.5)


def serve_until_peers_connect(address, port, peers, timeout):
    """Process 0's side of :func:`wait_for_coordinator`: on ``port`` (of ``address``,
    for the message), accept one connection from each of the ``peers`` other
    processes within ``timeout`` seconds. Raises :class:`UserError`."""
    try:
        server = socket.create_server(("", port))
    except OSError as e:
        raise UserError(f"process 0 cannot serve the coordinator on port {port}: "
                        f"{e.strerror or e}") from None
    deadline = time.monotonic() + timeout
    with server:
        for joined in range(peers):
            server.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                server.accept()[0].close()
            except TimeoutError:
                raise UserError(f"{joined} of the {peers} other processes joined within "
                                f"{timeout} s: start each with --coordinator {address}") from None


def set_up_devices(host_devices=HOST_DEVICES, distributed=False, coordinator=None,
                   num_processes=None, process_id=None, timeout=300):
    """Join a multi-process job or split the CPU into host devices; tune malloc for XLA.

    ``distributed``: call ``jax.distributed.initialize`` with the given
    coordinator ``host:port``, process count and this process's id; left
    out, JAX reads them from ``JAX_COORDINATOR_ADDRESS`` or from the
    cluster (SLURM, Open MPI). Cross-process collectives on CPU go through
    gloo. Must run before JAX's first computation: XLA fixes its devices
    then. Raises :class:`UserError`.
    """
    keep_freed_memory()
    user_set = "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    if host_devices > 1 and not user_set:
        # Only the CPU backend is split; GPUs and TPUs are used as they are.
        jax.config.update("jax_num_cpu_devices", host_devices)
    if not distributed:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        wait_for_coordinator(address, process_id, timeout, num_processes)
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"--distributed: {e} (give --coordinator HOST:PORT, --num-processes "
                        f"and --process-id, or run under SLURM or Open MPI)") from None


def make_mesh(batch_size, eval_batch_size):
    """A 1-D ``data`` mesh over every device; both batch sizes must split evenly over it."""
    devices = jax.devices()
    for flag, size in (("--batch-size", batch_size), ("--eval-batch-size", eval_batch_size)):
        if size % len(devices):
            raise UserError(f"{flag} {size} is not divisible by the {len(devices)} devices "
                            f"({devices[0].platform})")
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
    """The learning rate as a function of the step: an optax schedule.

    A linear warm-up from 0 over ``warmup`` steps to ``lr``, then a decay to
    ``lr * lr_floor`` at step ``planned_steps``, the run's planned length:
    half a cosine (``"cosine"``) or a geometric one (``"exponential"``);
    ``"constant"`` is ``lr`` throughout.
    """
    lr, warmup = settings["lr"], settings["warmup"]
    decay_steps = max(planned_steps - warmup, 1)
    if settings["schedule"] == "constant":
        decay = optax.constant_schedule(lr)
    elif settings["schedule"] == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=settings["lr_floor"])
    else:
        decay = optax.exponential_decay(lr, decay_steps, settings["lr_floor"],
                                        end_value=lr * settings["lr_floor"])
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(settings, planned_steps):
    """Adam (or RMSProp) with the :func:`learning_rate` schedule, after clipping the
    global gradient norm to ``settings["clip"]`` (0: no clipping)."""
    clip = optax.clip_by_global_norm(settings["clip"]) if settings["clip"] > 0 else optax.identity()
    update = {"adam": optax.adam, "rmsprop": optax.rmsprop}[settings["optimizer"]]
    return optax.chain(clip, update(learning_rate(settings, planned_steps)))


def init_state(params, optimizer):
    """A new run's training state: parameters, optimizer state, their running average.

    The average starts as a copy: the train step donates the state's buffers,
    and one buffer cannot be donated twice.
    """
    return {"params": params, "opt_state": optimizer.init(params),
            "ema": jax.tree.map(jnp.copy, params)}


def make_train_step(cfg, optimizer, mesh, ema_decay):
    """The jitted update ``state, images, step -> state, loss``.

    ``state = {"params", "opt_state", "ema"}``; ``step`` counts the updates
    before this one. The loss is the mean NLL in nats per image. ``ema`` is
    the exponential moving average of the parameters (Polyak averaging, as
    PixelCNN++ evaluates and samples with), with the decay
    ``min(ema_decay, (1 + step) / (10 + step))`` of TensorFlow's
    ``ExponentialMovingAverage``, so that the first steps do not hold the
    average near the initial parameters. The images arrive split over the
    mesh; the results are replicated, so XLA sums the gradients across
    devices.
    """
    def loss_fn(params, images):
        return -jnp.mean(pixelrnn.log_prob(params, cfg, images))

    def train_step(state, images, step):
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
        return per_image.mean(), per_image.std(ddof=1) / np.sqrt(len(per_image))

    return evaluate
