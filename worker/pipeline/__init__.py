"""Pipeline parallelism: a model's blocks cut into stages, one per rank, with microbatches flowing
through them in 1F1B order. ``topology`` is pure arithmetic (the agent uses it without MLX); the
other modules run inside the rank process."""
