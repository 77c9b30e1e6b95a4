"""Graph passes: plain functions `gs.Graph -> gs.Graph`, and the file-level helpers around them."""
