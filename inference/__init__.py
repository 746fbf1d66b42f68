"""Generation for inference studies: pipelines per model entry, schedulers, fixed latents, the
shard loop (generate, write atomically, score per image, time) and a combination's summary."""
