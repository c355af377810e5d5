"""Paged KV: the block pool, per-sequence block tables, and the per-conversation store."""
