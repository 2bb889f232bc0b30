"""The config values that name files and folders, declared once, and their one resolution against the
config file's folder: relative paths in a config are relative to the config file, so configs travel with
their data."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hetero.config.schema import Config

# Dotted paths through the schema; `*` stands for each item of a list.  A section that is not set holds none.
PATH_FIELDS = ("data.path", "data.eval.path", "train.previous", "train.init", "train.teacher_cache.dir",
               "family.members.*.model", "family.members.*.weights", "search.cloud")
# Device profiles: a built-in name, or the path of a profile file (hetero.profiles tells them apart by the
# suffix); only the paths are resolved.
PROFILE_FIELDS = ("export.profiles.*", "search.targets.*.profile")
PROFILE_SUFFIXES = (".yaml", ".yml")


def resolve_paths(config: Config, folder: Path) -> Config:
    """`config` with each relative path of PATH_FIELDS and PROFILE_FIELDS resolved against `folder`."""
    for dotted in PATH_FIELDS:
        _update(config, dotted.split("."), lambda value: relative_to(folder, value))
    for dotted in PROFILE_FIELDS:
        _update(config, dotted.split("."), lambda value: relative_to(folder, value)
                if value and value.endswith(PROFILE_SUFFIXES) else value)
    return config


def relative_to(folder: Path, value: str | None) -> str | None:
    """`value` resolved against `folder` when it names something there (or nothing anywhere yet); a path
    that exists only as given (from the working directory) is kept as it is."""
    if not value or Path(value).is_absolute():
        return value
    resolved = (folder / value).resolve()
    return str(resolved) if resolved.exists() or not Path(value).exists() else value


def _update(node, parts: list[str], change: Callable) -> None:
    if node is None:
        return
    head, *rest = parts
    if head == "*":
        for index, item in enumerate(node):
            if rest:
                _update(item, rest, change)
            else:
                node[index] = change(item)
    elif rest:
        _update(getattr(node, head), rest, change)
    else:
        setattr(node, head, change(getattr(node, head)))
