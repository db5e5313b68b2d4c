"""anefx.passes: one graph rewrite per module, each ``GraphModule -> PassResult``."""
