"""anefx.models."""
