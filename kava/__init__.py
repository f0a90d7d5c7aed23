"""kava: distil LLM teachers into a small student through their KV caches.

The library knows nothing about Snakemake; stages/ call it, workflow/ calls stages.
"""
