"""Conversion between diffusers folders and single-file checkpoints."""
