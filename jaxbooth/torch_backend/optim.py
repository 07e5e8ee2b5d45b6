"""Optimizer and LR schedule of the torch backend, as diffusers' DreamBooth scripts build them.

AdamW (torch), 8-bit AdamW (bitsandbytes, ``--use_8bit_adam``), DeepSpeed's CPU Adam when a
DeepSpeed config offloads the optimizer (the guide's 8 GB recipe), or Prodigy; the LR
schedules are diffusers' ``get_scheduler``. Imports torch; never jax.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from jaxbooth import spec as spec_lib
from jaxbooth.errors import JaxboothError


def param_groups(spec: spec_lib.RunSpec, unet: Any, text_encoder: Any | None, num_processes: int) -> list[dict]:
    """One group per trained model, each with its LR and weight decay.

    With ``text_encoder_lr`` and ``adam_weight_decay_text_encoder`` unset all groups use the
    UNet's values, which is exactly diffusers ``train_dreambooth.py``'s single group. SDXL's two
    trained encoders (``models.SdxlTextEncoders``) get a group each, both with the text-encoder
    LR and decay, as diffusers' ``train_dreambooth_lora_sdxl.py`` builds them.
    """
    from jaxbooth.torch_backend.models import trained_components

    o = spec.optim
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad],
               "lr": spec_lib.effective_learning_rate(spec, num_processes), "weight_decay": o.adam_weight_decay}]
    if spec.model.train_text_encoder and text_encoder is not None:
        decay = o.adam_weight_decay_text_encoder
        for encoder in trained_components(text_encoder).values():
            groups.append({"params": [p for p in encoder.parameters() if p.requires_grad],
                           "lr": spec_lib.effective_text_encoder_learning_rate(spec, num_processes),
                           "weight_decay": o.adam_weight_decay if decay is None else decay})
    return groups


def optimizer_class(spec: spec_lib.RunSpec, *, deepspeed_cpu_offload: bool) -> tuple[type, str]:
    """(class, name for the log) of the optimizer the spec asks for."""
    o = spec.optim
    if o.optimizer == "prodigy":
        try:
            import prodigyopt
        except ImportError:
            raise JaxboothError("--optimizer=prodigy needs the prodigyopt package: pip install prodigyopt") from None
        return prodigyopt.Prodigy, "Prodigy"
    if o.optimizer != "adamw":
        raise JaxboothError(f"--optimizer={o.optimizer} is not available on the torch backend; use adamw or "
                            "prodigy, or --backend=jax")
    if o.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise JaxboothError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit, "bitsandbytes AdamW8bit"
    if deepspeed_cpu_offload:
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
        except ImportError as error:
            raise JaxboothError(f"the DeepSpeed config offloads the optimizer to the CPU, but DeepSpeedCPUAdam "
                                f"cannot load ({error}); install deepspeed with a C++ compiler present") from None
        return DeepSpeedCPUAdam, "DeepSpeedCPUAdam"
    return torch.optim.AdamW, "torch AdamW"


def make_optimizer(spec: spec_lib.RunSpec, groups: Iterable[dict], *, deepspeed_cpu_offload: bool = False,
                   under_deepspeed: bool = False) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer over ``groups`` with the spec's Adam (or Prodigy) hyper-parameters.

    torch's AdamW runs its fused kernel where every parameter allows it (one kernel for all
    parameters instead of a Python loop over them: a rank-4 SDXL LoRA has ~350 small tensors,
    and the loop cost ~20 ms a step on CPU); same update rule, rounding aside.
    """
    o = spec.optim
    cls, name = optimizer_class(spec, deepspeed_cpu_offload=deepspeed_cpu_offload)
    kwargs: dict[str, Any] = {"betas": (o.adam_beta1, o.adam_beta2), "eps": o.adam_epsilon}
    if o.optimizer == "prodigy":
        kwargs.update(beta3=o.prodigy_beta3, decouple=o.prodigy_decouple,
                      use_bias_correction=o.prodigy_use_bias_correction,
                      safeguard_warmup=o.prodigy_safeguard_warmup)
    if cls.__name__ == "DeepSpeedCPUAdam":
        kwargs["adamw_mode"] = True
    groups = list(groups)
    if cls is torch.optim.AdamW and not under_deepspeed and fused_adam_fits(groups):
        kwargs["fused"] = True
        name += " (fused)"
    return cls(groups, lr=groups[0]["lr"], weight_decay=groups[0]["weight_decay"], **kwargs), name


def fused_adam_fits(groups: list[dict]) -> bool:
    """torch's fused AdamW takes floating-point parameters on the CPU or a CUDA device, all on one kind."""
    params = [p for group in groups for p in group["params"]]
    kinds = {p.device.type for p in params}
    return bool(params) and len(kinds) == 1 and kinds <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)


def make_lr_scheduler(spec: spec_lib.RunSpec, optimizer: torch.optim.Optimizer, max_train_steps: int,
                      num_processes: int) -> Any:
    """diffusers ``get_scheduler`` with warmup and length multiplied by the process count.

    accelerate steps a prepared scheduler once per process for every optimizer step, which
    diffusers compensates the same way (huggingface/diffusers#8312).
    """
    from diffusers.optimization import get_scheduler

    o = spec.optim
    if o.lr_scheduler == "piecewise_constant":
        raise JaxboothError("--lr_scheduler=piecewise_constant needs --lr_step_rules, which jaxbooth does not "
                            "take; use constant_with_warmup, linear, cosine, cosine_with_restarts or polynomial")
    return get_scheduler(o.lr_scheduler, optimizer=optimizer, num_warmup_steps=o.lr_warmup_steps * num_processes,
                         num_training_steps=max_train_steps * num_processes, num_cycles=o.lr_num_cycles,
                         power=o.lr_power)


class EmaWeights:
    """The EMA of the trained parameters (``--use_ema``): diffusers' ``EMAModel`` behaviour from the shared
    ``jaxbooth.ema`` formulas, over a list of parameters (the UNet's and trained encoders', or a LoRA run's
    adapters). ``state_dict`` / ``load_state_dict`` let ``accelerator.register_for_checkpointing`` save it
    in each checkpoint's ``state/``, so a resume continues it exactly.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float):
        self.parameters = list(parameters)
        self.decay = float(decay)
        self.optimizer_steps = 0
        self.averages = [p.detach().float().clone() for p in self.parameters]

    @torch.no_grad()
    def step(self) -> None:
        """After an optimizer step: move each average toward its parameter by the step's warmup decay."""
        from jaxbooth import ema

        self.optimizer_steps += 1
        decay = ema.ema_decay(self.optimizer_steps, self.decay)
        for average, param in zip(self.averages, self.parameters, strict=True):
            average.copy_(ema.ema_update(average, param.detach().float(), decay))

    @torch.no_grad()
    def copy_to_parameters(self) -> list[torch.Tensor]:
        """Write the averages into the parameters; returns the raw weights they held (for `restore`)."""
        raw = [p.detach().clone() for p in self.parameters]
        for average, param in zip(self.averages, self.parameters, strict=True):
            param.copy_(average.to(param.dtype))
        return raw

    @torch.no_grad()
    def restore(self, raw: list[torch.Tensor]) -> None:
        for saved, param in zip(raw, self.parameters, strict=True):
            param.copy_(saved)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "optimizer_steps": self.optimizer_steps,
                "averages": [average.cpu() for average in self.averages]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        averages = state["averages"]
        if len(averages) != len(self.averages) or any(a.shape != b.shape for a, b in zip(averages, self.averages,
                                                                                        strict=True)):
            raise JaxboothError("the checkpoint's EMA weights do not fit this run's trained parameters; resume with "
                                "the same model and options, or start a new output_dir")
        self.optimizer_steps = int(state["optimizer_steps"])
        for average, saved in zip(self.averages, averages, strict=True):
            average.copy_(saved)
