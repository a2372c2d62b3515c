"""Models onto the workers: one model reference resolved the same way everywhere (ref.py), and
a model as a set of content-addressed files, of which each rank needs only some (manifest.py).

No MLX and no gRPC here: the laptop (``herd plan``/``submit``), the coordinator's model store, the
worker agent and the rank all use it.
"""
