"""jaxbooth's own Flax (linen) models, named like the old diffusers/transformers Flax classes."""
