"""The flags of diffusers' four DreamBooth scripts with their parse_args defaults, as data.

Read once from train_dreambooth.py, train_dreambooth_lora.py, train_dreambooth_lora_sdxl.py
(main, 58eb52c) and v0.39 train_dreambooth_flax.py, so the tests need no diffusers checkout.
"""

from __future__ import annotations

# Every flag of each script with its parse_args default.
SCRIPT_DEFAULTS: dict[str, dict[str, object]] = {
    "train_dreambooth.py": {
        "pretrained_model_name_or_path": None, "revision": None, "variant": None, "tokenizer_name": None,
        "instance_data_dir": None, "class_data_dir": None, "instance_prompt": None, "class_prompt": None,
        "with_prior_preservation": False, "prior_loss_weight": 1.0, "num_class_images": 100,
        "output_dir": "dreambooth-model", "seed": None, "resolution": 512, "center_crop": False,
        "train_text_encoder": False, "train_batch_size": 4, "sample_batch_size": 4, "num_train_epochs": 1,
        "max_train_steps": None, "checkpointing_steps": 500, "checkpoints_total_limit": None,
        "resume_from_checkpoint": None, "gradient_accumulation_steps": 1, "gradient_checkpointing": False,
        "learning_rate": 5e-06, "scale_lr": False, "lr_scheduler": "constant", "lr_warmup_steps": 500,
        "lr_num_cycles": 1, "lr_power": 1.0, "use_8bit_adam": False, "dataloader_num_workers": 0, "adam_beta1": 0.9,
        "adam_beta2": 0.999, "adam_weight_decay": 0.01, "adam_epsilon": 1e-08, "max_grad_norm": 1.0,
        "push_to_hub": False, "hub_token": None, "hub_model_id": None, "logging_dir": "logs", "allow_tf32": False,
        "report_to": "tensorboard", "validation_prompt": None, "num_validation_images": 4, "validation_steps": 100,
        "mixed_precision": None, "prior_generation_precision": None, "local_rank": -1,
        "enable_xformers_memory_efficient_attention": False, "set_grads_to_none": False, "offset_noise": False,
        "snr_gamma": None, "pre_compute_text_embeddings": False, "tokenizer_max_length": None,
        "text_encoder_use_attention_mask": False, "skip_save_text_encoder": False, "validation_images": None,
        "class_labels_conditioning": None, "validation_scheduler": "DPMSolverMultistepScheduler"},
    "train_dreambooth_flax.py": {
        "pretrained_model_name_or_path": None, "pretrained_vae_name_or_path": None, "revision": None,
        "tokenizer_name": None, "instance_data_dir": None, "class_data_dir": None, "instance_prompt": None,
        "class_prompt": None, "with_prior_preservation": False, "prior_loss_weight": 1.0, "num_class_images": 100,
        "output_dir": "text-inversion-model", "save_steps": None, "seed": 0, "resolution": 512, "center_crop": False,
        "train_text_encoder": False, "train_batch_size": 4, "sample_batch_size": 4, "num_train_epochs": 1,
        "max_train_steps": None, "learning_rate": 5e-06, "scale_lr": False, "adam_beta1": 0.9, "adam_beta2": 0.999,
        "adam_weight_decay": 0.01, "adam_epsilon": 1e-08, "max_grad_norm": 1.0, "push_to_hub": False,
        "hub_token": None, "hub_model_id": None, "logging_dir": "logs", "mixed_precision": "no", "local_rank": -1},
    "train_dreambooth_lora.py": {
        "pretrained_model_name_or_path": None, "revision": None, "variant": None, "tokenizer_name": None,
        "instance_data_dir": None, "class_data_dir": None, "instance_prompt": None, "class_prompt": None,
        "validation_prompt": None, "num_validation_images": 4, "validation_epochs": 50,
        "with_prior_preservation": False, "prior_loss_weight": 1.0, "num_class_images": 100,
        "output_dir": "lora-dreambooth-model", "seed": None, "resolution": 512, "center_crop": False,
        "train_text_encoder": False, "train_batch_size": 4, "sample_batch_size": 4, "num_train_epochs": 1,
        "max_train_steps": None, "checkpointing_steps": 500, "checkpoints_total_limit": None,
        "resume_from_checkpoint": None, "gradient_accumulation_steps": 1, "gradient_checkpointing": False,
        "learning_rate": 0.0005, "scale_lr": False, "lr_scheduler": "constant", "lr_warmup_steps": 500,
        "lr_num_cycles": 1, "lr_power": 1.0, "dataloader_num_workers": 0, "use_8bit_adam": False, "adam_beta1": 0.9,
        "adam_beta2": 0.999, "adam_weight_decay": 0.01, "adam_epsilon": 1e-08, "max_grad_norm": 1.0,
        "push_to_hub": False, "hub_token": None, "hub_model_id": None, "logging_dir": "logs", "allow_tf32": False,
        "report_to": "tensorboard", "mixed_precision": None, "prior_generation_precision": None, "local_rank": -1,
        "enable_xformers_memory_efficient_attention": False, "pre_compute_text_embeddings": False,
        "tokenizer_max_length": None, "text_encoder_use_attention_mask": False, "validation_images": None,
        "class_labels_conditioning": None, "rank": 4, "lora_dropout": 0.0, "image_interpolation_mode": "lanczos"},
    "train_dreambooth_lora_sdxl.py": {
        "pretrained_model_name_or_path": None, "pretrained_vae_model_name_or_path": None, "revision": None,
        "variant": None, "dataset_name": None, "dataset_config_name": None, "instance_data_dir": None,
        "cache_dir": None, "image_column": "image", "caption_column": None, "repeats": 1, "class_data_dir": None,
        "instance_prompt": None, "class_prompt": None, "validation_prompt": None, "num_validation_images": 4,
        "validation_epochs": 50, "do_edm_style_training": False, "with_prior_preservation": False,
        "prior_loss_weight": 1.0, "num_class_images": 100, "output_dir": "lora-dreambooth-model",
        "output_kohya_format": False, "seed": None, "resolution": 1024, "center_crop": False, "random_flip": False,
        "train_text_encoder": False, "train_batch_size": 4, "sample_batch_size": 4, "num_train_epochs": 1,
        "max_train_steps": None, "checkpointing_steps": 500, "checkpoints_total_limit": None,
        "resume_from_checkpoint": None, "gradient_accumulation_steps": 1, "gradient_checkpointing": False,
        "learning_rate": 0.0001, "text_encoder_lr": 5e-06, "scale_lr": False, "lr_scheduler": "constant",
        "snr_gamma": None, "lr_warmup_steps": 500, "lr_num_cycles": 1, "lr_power": 1.0, "dataloader_num_workers": 0,
        "optimizer": "AdamW", "use_8bit_adam": False, "adam_beta1": 0.9, "adam_beta2": 0.999, "prodigy_beta3": None,
        "prodigy_decouple": True, "adam_weight_decay": 0.0001, "adam_weight_decay_text_encoder": 0.001,
        "adam_epsilon": 1e-08, "prodigy_use_bias_correction": True, "prodigy_safeguard_warmup": True,
        "max_grad_norm": 1.0, "push_to_hub": False, "hub_token": None, "hub_model_id": None, "logging_dir": "logs",
        "allow_tf32": False, "report_to": "tensorboard", "mixed_precision": None, "prior_generation_precision": None,
        "local_rank": -1, "enable_xformers_memory_efficient_attention": False, "rank": 4, "lora_dropout": 0.0,
        "use_dora": False, "image_interpolation_mode": "lanczos"},
}
