"""The rank: the training process of one job on one machine (``python -m worker.rank``).

Its package imports nothing heavy, so the agent can read the rank's events (``events``) without
loading MLX; ``cli``, ``trainer`` and the rest load MLX when imported.
"""
