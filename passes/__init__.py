"""anefx.passes."""
