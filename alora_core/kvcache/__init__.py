"""Paged KV (block pool, block tables) and the tiered conversation caches: device -> host -> Redis."""
