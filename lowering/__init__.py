"""anefx.lowering."""
