"""The bottom layer: HF model loading, the per-step batch object, and the paged attention backend."""
