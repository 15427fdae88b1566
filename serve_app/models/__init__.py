"""The models: where they come from, the tiny ones built locally, and the CLIP scorer."""
