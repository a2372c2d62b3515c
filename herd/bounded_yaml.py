"""YAML that cannot exhaust memory: bounded in size, nesting and aliases, before any of it is built.

PyYAML expands aliases when it builds Python objects, so nine nested anchors of nine aliases each
("billion laughs") are a few hundred bytes of text and more objects than memory holds. PyYAML has
no limits of its own, nor does any maintained loader we could use for mlx-lm's configs; this
module composes the node graph (small: an alias is one shared node), measures what building it
would make, and refuses what is too big or too deep with a clear error, before building.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from herd.errors import ConfigError

MAX_BYTES = 1024 * 1024  # a job config is a few KB
MAX_NODES = 100_000  # values once aliases are expanded
MAX_DEPTH = 64


def too_big(size: int, source: str) -> ConfigError:
    return ConfigError(f"{source} is {size} bytes; a job config is at most {MAX_BYTES}",
                       hint="a job config holds settings, not data: ship data in the dataset")


def load(text: str, loader: type[yaml.SafeLoader], source: str) -> Any:
    """``yaml.load(text, loader)``, refusing input over the module's bounds (ConfigError);
    syntax errors still raise yaml.YAMLError."""
    if len(text) > MAX_BYTES:
        raise too_big(len(text), source)
    parser = loader(text)
    try:
        try:
            node = parser.get_single_node()
        except RecursionError:
            raise ConfigError(f"{source} nests deeper than YAML can be read",
                              hint=f"a job config nests at most {MAX_DEPTH} levels") from None
        if node is None:
            return None
        _measure(node, source)
        try:
            return parser.construct_document(node)
        except ValueError as e:  # a value Python will not build (an int of 5,000 digits)
            raise ConfigError(f"{source}: {e}", hint="no number in a job config needs more "
                              "than a few digits") from None
    finally:
        parser.dispose()


def _measure(root: yaml.Node, source: str) -> None:
    """Refuses a graph that would build into more than MAX_NODES values or nest deeper than
    MAX_DEPTH (aliases counted as often as they appear), or that refers to itself."""
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth) once built
    active: set[int] = set()

    def visit(node: yaml.Node, level: int) -> tuple[int, int]:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(f"{source} holds an alias to itself", hint="remove the recursion")
        if level > MAX_DEPTH:
            raise ConfigError(f"{source} nests deeper than {MAX_DEPTH} levels",
                              hint="a job config is a few levels deep")
        active.add(key)
        count, depth = 1, 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            c, d = visit(child, level + 1)
            count, depth = count + c, max(depth, d + 1)
            if count > MAX_NODES:
                raise ConfigError(f"{source} expands to more than {MAX_NODES} values (through "
                                  "YAML aliases)", hint="write the values out, without nested "
                                  "anchors and aliases")
        active.discard(key)
        sizes[key] = (count, depth)
        return count, depth

    visit(root, 1)


def load_file(path: Path, loader: type[yaml.SafeLoader]) -> Any:
    """``load`` of a file, refused by its size before it is read."""
    if (size := path.stat().st_size) > MAX_BYTES:
        raise too_big(size, str(path))
    return load(path.read_text(), loader, str(path))
