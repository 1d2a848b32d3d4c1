"""Stage 01 (notebook 01): the benchmark items, their seeded splits and the contamination guard (``prepare``)."""
