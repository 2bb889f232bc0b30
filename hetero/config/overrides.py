"""Loading a config file, with dotted overrides (`train.epochs=3`, the CLI's `--set`) applied to it.

An override replaces one value of the validated config by a YAML value (`3`, `'on'`, `[mixup, cutmix]`,
`{views: 2}`), then the whole config is validated again, so a value the schema refuses is refused as it
would be in the file, at its key.  The file is validated first on its own: its own mistakes are its own.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from hetero.config.paths import resolve_paths
from hetero.config.schema import Config, parse_config
from hetero.config.validation import parse_yaml, read_yaml, unknown_message
from hetero.errors import ConfigError


def load_config(path: str | Path, overrides: Iterable[str] | None = ()) -> Config:
    """The config in a YAML file, with `overrides` (`dotted.key=YAML value`, applied in order), its relative
    paths resolved against the file's folder."""
    path = Path(path)
    config = parse_config(read_yaml(path), str(path))
    overrides = list(overrides or ())
    if overrides:
        data = apply_overrides(config.to_dict(), overrides, str(path))
        config = parse_config(data, f"{path} with {' '.join(overrides)}")
    return resolve_paths(config, path.parent)


def apply_overrides(data: dict, overrides: Iterable[str], source: str = "<config>") -> dict:
    """`data` (a config as a mapping, every section present) with each `dotted.key=YAML value` set in turn.

    A key through an unknown or unset section, or a value that is not YAML, is a ConfigError naming the key;
    an unknown last key is left for validation, which names it with the keys allowed there.
    """
    for override in overrides:
        key, equals, text = override.partition("=")
        parts = key.strip().split(".")
        if not equals or not all(parts):
            raise ConfigError(f"{source}: override {override!r}: give dotted.key=value (a YAML value), "
                              f"e.g. train.epochs=3")
        where = f"{source}: override {key.strip()}"
        value = parse_yaml(text, where, "config value")
        node = data
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, ".".join(parts[:depth]), where)
            if node is None:
                raise ConfigError(f"{where}: {'.'.join(parts[:depth + 1])} is not set in the config; give the "
                                  f"whole section ({'.'.join(parts[:depth + 1])}={{key: value}})")
        _set(node, parts[-1], value, ".".join(parts[:-1]), where)
    return data


def _child(node, part: str, parent: str, where: str):
    """node[part] for a section (a mapping) or a list (an index); `parent` is node's dotted key, for messages."""
    if isinstance(node, dict):
        if part not in node:
            raise ConfigError(f"{where}: {unknown_message(part, list(node), 'key')}")
        return node[part]
    return node[_index(node, part, parent, where)]


def _set(node, part: str, value, parent: str, where: str) -> None:
    if isinstance(node, dict):
        node[part] = value  # an unknown key: validation names it and the keys allowed in its section
    else:
        node[_index(node, part, parent, where)] = value


def _index(node, part: str, parent: str, where: str) -> int:
    if not isinstance(node, list):
        raise ConfigError(f"{where}: {parent} is a value ({node!r}), not a section")
    if not part.isdigit() or int(part) >= len(node):
        allowed = f"an index 0-{len(node) - 1}" if node else "nothing (it is empty)"
        raise ConfigError(f"{where}: {parent} is a list; {part!r} is not an index of it, which takes {allowed}")
    return int(part)
