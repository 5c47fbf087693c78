"""Thin wrappers over open_clip / transformers / DALI. No Ray, no Arrow."""
