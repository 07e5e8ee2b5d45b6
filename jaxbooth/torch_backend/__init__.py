"""The PyTorch backend. Imports the shared core, never jax or the JAX backend."""
