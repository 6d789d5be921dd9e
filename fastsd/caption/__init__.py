"""Kosmos-2 captioning with grounded subject boxes."""
