"""Device mesh, sharding rules (as data) and multi-host start-up for the JAX backend.

The mesh has axes ("data", "fsdp"). fsdp=1 is pure data parallelism (the seed's pmap);
fsdp>1 shards params and optimizer state along their largest divisible dimension.
Models never name mesh axes; every sharding decision is made here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxbooth import distributed
from jaxbooth import spec as spec_lib
from jaxbooth.errors import JaxboothError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch is split over every device
FSDP_MIN_BYTES = 1 << 20  # smaller params stay replicated: sharding them costs more than it saves

# Ordered (path regex, rule) pairs; the first match wins. "replicate" or "fsdp".
DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|/)(bias|scale)$", "replicate"),
    (r".*", "fsdp"),
)


def initialize_distributed(spec: spec_lib.RunSpec) -> None:
    """Join a multi-host run, before anything asks JAX for devices; once per process.

    Explicit peers (``--coordinator_address/--num_processes/--process_id``, validated together by the
    spec) are passed on; a detected TPU pod slice or SLURM job, or ``--multi_host``, calls
    ``jax.distributed.initialize()`` with no arguments so JAX discovers the peers itself
    (``jaxbooth.distributed`` says why). A single host does nothing.
    """
    mode = distributed.multi_host_mode(spec)
    if mode is None or jax.distributed.is_initialized():
        return
    kind, why = mode
    par = spec.parallelism
    try:
        if kind == "explicit":
            jax.distributed.initialize(coordinator_address=par.coordinator_address, num_processes=par.num_processes,
                                       process_id=par.process_id)
        else:
            jax.distributed.initialize()
    except RuntimeError as error:
        hint = ("check that every host runs the same command and can reach the coordinator"
                if kind == "explicit" else "pass --coordinator_address, --num_processes and --process_id")
        raise JaxboothError(f"joining the multi-host run ({why}) failed: {error}; {hint}") from None


def make_mesh(shape: tuple[int, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp") mesh with Auto axes; ``shape`` comes from ``spec.mesh_shape``. One device works.

    ``jax.make_mesh`` orders the devices by the physical topology (TPU torus, hosts), so the fsdp
    axis's collectives stay on the fastest links; where it cannot lay out a device subset (e.g.
    one host's devices of a pod slice, for class images) the plain order is used, which is only slower.
    """
    devices = list(devices if devices is not None else jax.devices())
    auto = (jax.sharding.AxisType.Auto,) * len(BATCH_AXES)
    try:
        return jax.make_mesh(shape, BATCH_AXES, axis_types=auto, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(shape)
        return Mesh(grid, BATCH_AXES, axis_types=auto)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _fsdp_spec(shape: Sequence[int], itemsize: int, fsdp: int) -> PartitionSpec:
    if fsdp == 1 or math.prod(shape) * itemsize < FSDP_MIN_BYTES:
        return PartitionSpec()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = FSDP_AXIS
            return PartitionSpec(*spec)
    return PartitionSpec()


def param_shardings(abstract_params, mesh: Mesh, rules: Sequence[tuple[str, str]] = DEFAULT_RULES):
    """A NamedSharding per leaf of ``abstract_params`` (from ``jax.eval_shape``), by the first matching rule."""
    fsdp = mesh.shape[FSDP_AXIS]

    def choose(path, leaf) -> NamedSharding:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        for pattern, rule in rules:
            if re.search(pattern, name):
                if rule == "replicate":
                    return NamedSharding(mesh, PartitionSpec())
                if rule == "fsdp":
                    return NamedSharding(mesh, _fsdp_spec(leaf.shape, np.dtype(leaf.dtype).itemsize, fsdp))
                raise ValueError(f"sharding rule {rule!r} for {pattern!r} is not 'replicate' or 'fsdp'")
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(choose, abstract_params)


def bytes_on_device(tree, device: jax.Device | None = None) -> tuple[int, int]:
    """(bytes ``device`` holds, bytes of the whole arrays) over every array leaf of ``tree``.

    Read from the arrays' own shards, so it is what the shardings actually placed, not what the
    rules meant to; ``device`` defaults to this process's first.
    """
    device = device or jax.local_devices()[0]
    held = total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        if not isinstance(leaf, jax.Array):
            continue
        total += leaf.nbytes
        held += sum(shard.data.nbytes for shard in leaf.addressable_shards if shard.device == device)
    return held, total


def sharding_table(tree: dict, depth: int = 2) -> str:
    """Params grouped by their first ``depth`` path keys: leaves, how many are fsdp-sharded, and
    bytes per device against the whole, one line per group (printed at start-up)."""
    groups: dict[str, list[int]] = {}
    device = jax.local_devices()[0]
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not isinstance(leaf, jax.Array):
            continue
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path[:depth])
        row = groups.setdefault(name, [0, 0, 0, 0])
        row[0] += 1
        row[1] += int(any(axis is not None for axis in getattr(leaf.sharding, "spec", ())))
        row[2] += sum(shard.data.nbytes for shard in leaf.addressable_shards if shard.device == device)
        row[3] += leaf.nbytes
    width = max([len(name) for name in groups] + [5])
    lines = [f"  {'group':{width}} {'leaves':>7} {'sharded':>8} {'MB/device':>10} {'MB whole':>10}"]
    for name, (leaves, sharded, held, total) in groups.items():
        lines.append(f"  {name:{width}} {leaves:7d} {sharded:8d} {held / 1e6:10.2f} {total / 1e6:10.2f}")
    return "\n".join(lines)
