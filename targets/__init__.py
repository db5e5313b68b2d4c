"""anefx.targets."""
