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


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
    """Join a multi-host run. TPU pods and SLURM find their peers themselves; elsewhere pass all three."""
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise JaxboothError("multi-host: set all of --coordinator_address, --num_processes and --process_id "
                            "(or none of them on a TPU pod, where they are discovered)")
    if all(given):
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)


def make_mesh(shape: tuple[int, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp") mesh; ``shape`` comes from ``spec.mesh_shape``. One device works."""
    devices = list(devices if devices is not None else jax.devices())
    grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, BATCH_AXES)


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


def describe_shardings(shardings) -> str:
    """One line per sharded parameter, plus a count of the replicated ones (printed at start-up)."""
    lines, replicated_count = [], 0
    for path, sharding in jax.tree_util.tree_leaves_with_path(shardings):
        if all(axis is None for axis in sharding.spec):
            replicated_count += 1
            continue
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        lines.append(f"  {name}: {sharding.spec}")
    return "\n".join([*lines, f"  ({replicated_count} parameters replicated)"])
