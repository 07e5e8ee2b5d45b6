"""Training metrics of a JAX run: the progress line, metrics.jsonl, TensorBoard and wandb.

The only place the loop syncs with the device for metrics (at log steps), and the place the
NaN/Inf check names the step range the loss went bad in.
"""

from __future__ import annotations

from pathlib import Path

import jax

from jaxbooth import output
from jaxbooth import spec as spec_lib
from jaxbooth.progress import TrainingProgress


class Progress:
    """Progress line with loss, lr and steps/s; metrics to JSON lines and the trackers.

    The record is the shared one (``output.metric_record``): ``lr`` is the UNet group's,
    ``grad_norm`` the norm of the accumulated gradient the clip saw.
    """

    def __init__(self, spec: spec_lib.RunSpec, output_dir: Path, total: int, start_step: int = 0):
        self.total = total
        self.metrics_log = output.MetricsLog(output_dir, enabled=jax.process_index() == 0)
        self.window = output.MetricWindow(start_step)
        self.tensorboard = tensorboard_writer(spec, output_dir)
        self.wandb = wandb_run(spec, output_dir)
        self.display = TrainingProgress(total, start_step, enabled=jax.process_index() == 0)

    def report(self, step: int, metrics: dict) -> None:
        record = self.window.record(step, {key: float(value) for key, value in jax.device_get(metrics).items()})
        self.metrics_log.write(step, record)
        if self.tensorboard is not None:
            for key, value in record.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=step)
        self.display.show(step, record["train/loss"], record["train/lr"], record["perf/steps_per_sec"])


def tensorboard_writer(spec: spec_lib.RunSpec, output_dir: Path):
    """jaxbooth's torch-free event writer (tensorboardX would import torch), on process 0 only."""
    if spec.logging.report_to not in ("tensorboard", "all") or jax.process_index() != 0:
        return None
    from jaxbooth.tensorboard import EventWriter

    return EventWriter(output_dir / spec.logging.logging_dir)


def wandb_run(spec: spec_lib.RunSpec, output_dir: Path):
    if spec.logging.report_to not in ("wandb", "all") or jax.process_index() != 0:
        return None
    import wandb  # preflight.check_packages has made sure it is installed

    return wandb.init(project="jaxbooth", dir=str(output_dir), config=spec_lib.shareable_spec_dict(spec))
