"""Data parallelism with `jax.sharding`: one mesh axis over devices, the batch split along it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ..data import Batch

# The name of the mesh axis; batches are split along it.
_BATCH_AXIS = "batch"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class DataParallel(eqx.Module):
    """Data-parallel training and evaluation over several devices, through `jax.sharding`.

    A one-axis mesh (axis `"batch"`) over the devices: parameters and optimiser state are
    replicated on every device, each batch is split along its leading axis, and XLA
    all-reduces the gradients (and the loss, the metrics and, in a continuous solve, the
    adaptive error norm) where the sharding requires it. Nothing else changes: the same
    jitted `train_step` runs, and since a batch is still one ODE, a sharded adaptive solve
    takes the same steps as on one device. Pass it to `train(..., parallel=...)` and
    `evaluate(..., parallel=...)`, or use `replicate` and `shard` in a loop of your own.

    With several processes (`jax.distributed.initialize()` first, one process per host),
    `jax.devices()` lists every host's devices and the mesh spans them all; each process
    then places only the rows of a batch that its own devices hold. See the how-to
    "Run on GPU and on several devices".

    **Arguments:**

    - `devices`: `None` (default) for every device, `jax.devices()` (all hosts' devices
      after `jax.distributed.initialize()`); an `int` `n` for the first `n` of them; or a
      sequence of `jax.Device`s.

    **Raises:**

    `ValueError` for a device count outside `[1, len(jax.devices())]`, an empty sequence or a
    repeated device.
    """

    devices: tuple[Any, ...] = eqx.field(static=True)
    mesh: Mesh = eqx.field(static=True)

    def __init__(self, devices: int | Sequence[Any] | None = None):
        available = jax.devices()
        if devices is None:
            chosen = tuple(available)
        elif isinstance(devices, int) and not isinstance(devices, bool):
            if not 1 <= devices <= len(available):
                raise ValueError(
                    f"devices must lie in [1, {len(available)}] (the devices JAX sees: "
                    f"{len(available)}); got devices={devices}. Pass devices=None for all of "
                    "them (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N "
                    "virtual devices)."
                )
            chosen = tuple(available[:devices])
        else:
            chosen = tuple(devices)
            if not chosen:
                raise ValueError(
                    "devices must not be empty; pass devices=None for all of jax.devices()."
                )
            if len(set(chosen)) != len(chosen):
                raise ValueError(f"devices must be distinct; got {list(chosen)}.")
        self.devices = chosen
        self.mesh = jax.make_mesh(
            (len(chosen),), (_BATCH_AXIS,), axis_types=(AxisType.Auto,), devices=chosen
        )

    @property
    def num_devices(self) -> int:
        """The number of devices of the mesh (the batch is split into this many parts)."""
        return len(self.devices)

    @property
    def batch_sharding(self) -> NamedSharding:
        """Leading axis split over the mesh, other axes whole."""
        return NamedSharding(self.mesh, PartitionSpec(_BATCH_AXIS))

    @property
    def replicated(self) -> NamedSharding:
        """A full copy on every device of the mesh."""
        return NamedSharding(self.mesh, PartitionSpec())

    def check_batch_size(self, batch_size: int, name: str = "batch_size") -> None:
        """Raise if `batch_size` cannot be split evenly over the devices.

        **Arguments:**

        - `batch_size`: the global batch size (all devices, all hosts together).
        - `name`: how the caller calls it, for the message.

        **Raises:**

        `ValueError` if `batch_size` is not a multiple of `num_devices`; the message names
        the nearest multiples and the device counts that would divide it.
        """
        n = self.num_devices
        if batch_size % n:
            lower, upper = (batch_size // n) * n, (batch_size // n + 1) * n
            multiples = f"{lower} or {upper}" if lower else f"{upper}"
            counts = [d for d in _divisors(batch_size) if d <= len(jax.devices())]
            raise ValueError(
                f"{name} must be divisible by the number of devices of DataParallel "
                f"({n}); got {name}={batch_size}. Pass a multiple of {n} (e.g. {multiples}), "
                f"or DataParallel(devices=k) with k dividing {batch_size} (one of {counts})."
            )

    def shard(self, batch: Batch, *, process_local: bool = False) -> Batch:
        """Place a batch on the mesh, split along its leading axis.

        **Arguments:**

        - `batch`: a `pdeformer.data.Batch` of numpy (or JAX) arrays.
        - `process_local`: `False` (default): `batch` is the whole global batch, the same on
          every process (as `iterate_batches` with one seed yields it everywhere); each
          process copies only the rows its devices hold. `True`: `batch` is this process's
          slice of the global batch (its rows, in process order), assembled with
          `jax.make_array_from_process_local_data`; the global batch is the processes'
          slices concatenated. With one process both are the same.

        **Returns:**

        A `Batch` of global `jax.Array`s sharded over the mesh (`None` fields stay `None`).

        **Raises:**

        `ValueError` if the (global or local) batch size is not divisible by the number of
        (all or local) devices.
        """
        sharding = self.batch_sharding
        if process_local:
            local = sum(d.process_index == jax.process_index() for d in self.devices)
            n = int(np.shape(batch.tokens)[0])
            if local == 0 or n % local:
                raise ValueError(
                    f"a process-local batch must be divisible by this process's devices in the "
                    f"mesh ({local}); got {n} rows. Pass a multiple of {local} rows per process."
                )

            def place(a):
                return jax.make_array_from_process_local_data(sharding, np.asarray(a))

        else:
            self.check_batch_size(int(np.shape(batch.tokens)[0]), "the batch size")

            def place(a):
                if isinstance(a, jax.Array) and a.sharding == sharding:
                    return a
                host = np.asarray(a)
                return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

        return Batch(*(None if a is None else place(a) for a in batch))

    def replicate(self, tree: Any) -> Any:
        """Copy every array leaf of a pytree (a model, an optimiser state) to every device.

        **Arguments:**

        - `tree`: any pytree; leaves that are not arrays are returned unchanged. On several
          processes the values must be equal on every process (the same initialisation key,
          or the same checkpoint).

        **Returns:**

        The pytree with its array leaves replicated over the mesh (already replicated leaves
        are returned as they are).
        """
        sharding = self.replicated

        def place(x):
            if not eqx.is_array(x):
                return x
            if isinstance(x, jax.Array) and x.sharding == sharding:
                return x
            if sharding.is_fully_addressable or (
                isinstance(x, jax.Array) and not x.is_fully_addressable
            ):
                return jax.device_put(x, sharding)
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

        return jax.tree.map(place, tree)


def to_host(tree: Any) -> Any:
    """Every `jax.Array` leaf of a pytree as a numpy array holding its whole (global) value.

    Fully addressable arrays are copied; arrays that span other processes' devices are read
    from a local copy when replicated and all-gathered (`process_allgather`) when sharded,
    which every process must then call together.

    **Arguments:**

    - `tree`: any pytree (e.g. a model and its optimiser state, metrics, logits).

    **Returns:**

    The pytree with numpy leaves in place of its `jax.Array`s.
    """

    def get(x):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)
