"""jaxbooth: DreamBooth fine-tuning of Stable-Diffusion-family models, JAX/Flax first."""

__version__ = "0.1.0"
