"""The ``herd`` command: the composition root, and the only package that names both planes.

``main`` dispatches to a subcommand's module; the laptop's commands (``laptop``, ``connection``,
``watch``) talk to a coordinator; ``up`` and ``plan`` are developer tools that reach into the
planes; ``tiny`` writes small real models and datasets.
"""
