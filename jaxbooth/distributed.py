"""Is this process one host of several? Read from the spec and the launch environment, before any framework.

JAX forbids asking for devices before ``jax.distributed.initialize``, and ``backend: auto`` must
ask; so the decision whether (and how) to join a multi-host run is made here first, from what a
pod or scheduler leaves in the environment, without importing jax. Detected: Cloud TPU pod slices
(``TPU_WORKER_HOSTNAMES`` with more than one worker, or a multi-slice ``MEGASCALE_COORDINATOR_ADDRESS``)
and SLURM jobs of several tasks (the variables JAX's SLURM cluster reads). JAX then finds its peers
itself (no-argument ``initialize``); elsewhere ``--coordinator_address/--num_processes/--process_id``
say where they are, or ``--multi_host`` asks JAX's own detection (GKE, Open MPI, a TPU VM without those
variables...).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxbooth.spec import RunSpec

SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def explicit_peers(spec: RunSpec) -> bool:
    """The command line names the coordinator, process count and this process's id (validated together)."""
    return spec.parallelism.coordinator_address is not None


def detected_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """Which multi-host launcher this process runs under, in words; None for a single host."""
    env = os.environ if environ is None else environ
    workers = [name for name in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if name.strip()]
    if len(workers) > 1:
        return f"a Cloud TPU pod slice of {len(workers)} workers (TPU_WORKER_HOSTNAMES)"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "a multi-slice TPU job (MEGASCALE_COORDINATOR_ADDRESS)"
    if all(name in env for name in SLURM_VARIABLES) and _count(env["SLURM_NTASKS"]) > 1:
        return f"a SLURM job of {env['SLURM_NTASKS']} tasks (SLURM_NTASKS)"
    return None


def multi_host_mode(spec: RunSpec, environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """("explicit" | "discover", why) when this process must join a multi-host run first; else None."""
    if explicit_peers(spec):
        return "explicit", f"--coordinator_address={spec.parallelism.coordinator_address}"
    if spec.parallelism.multi_host:
        return "discover", "--multi_host"
    cluster = detected_cluster(environ)
    return None if cluster is None else ("discover", cluster)


def _count(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0
