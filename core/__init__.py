"""anefx.core: what every stage shares, at the bottom of the imports: the typed signature of a
graph (inputs, outputs, states, layouts)."""
