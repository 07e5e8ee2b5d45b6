"""The JAX/Flax backend. Imports the shared core, never torch or the torch backend."""
