"""The toolkit every YAML schema of hetero shares (family configs here, device profiles in hetero.profiles).

Strict validation settings, the rules for names a user types, error messages that name the file, the key
and what would have been accepted (so the CLI can print them without a traceback), and a YAML reader that
refuses what PyYAML would silently accept: repeated keys (the last one would win), text that is not UTF-8,
and documents that expand to more than :data:`MAX_NODES` values through aliases.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import ConfigDict, Field, ValidationError

from hetero.errors import ConfigError

# Strict types (no "3" for 3) and finite numbers only: `lr: .nan` is a typo, not a learning rate.
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
MAX_CONFIG_BYTES = 1 << 20
MAX_NODES = 100_000
# Member names become file names (checkpoints/<name>.safetensors, exports/<profile>/<name>.onnx): plain
# identifiers only, so no name can point anywhere else.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
NAME_RULE = "1-64 letters, digits, '-' or '_', starting with a letter or digit"

Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[float, Field(ge=0)]


def check_known(name: str, allowed, what: str) -> str:
    """`name` if it is one of `allowed`, else a ValueError (a validator's) saying what would be."""
    if name in allowed:
        return name
    raise ValueError(unknown_message(name, allowed, what))


def unknown_message(name: str, allowed, what: str) -> str:
    """"unknown <what> 'x' (did you mean 'y'?); allowed: ..." for names a user typed."""
    hint = difflib.get_close_matches(str(name), [str(a) for a in allowed], n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown {what} {name!r}{suggestion}; allowed: {', '.join(sorted(map(str, allowed)))}"


def check_name(value: str, what: str = "name") -> str:
    if not NAME_PATTERN.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not allowed: use {NAME_RULE}")
    return value


# -------------------------------------------------------------------------------------------- messages


def _section(loc: tuple, root):
    """The dataclass that `loc` (ending with the offending key) points into, or None."""
    kind = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        hint = typing.get_type_hints(kind).get(part) if dataclasses.is_dataclass(kind) else None
        while typing.get_origin(hint) in (list, typing.Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            hint = args[0] if args else None
        kind = hint
    return kind if dataclasses.is_dataclass(kind) else None


def _section_keys(loc: tuple, root) -> list[str]:
    kind = _section(loc, root)
    return [f.name for f in dataclasses.fields(kind)] if kind is not None else []


def format_validation_error(source: str, err: ValidationError, root, what: str = "config") -> str:
    """One line per problem: where (dotted keys), what is wrong, and what would have been accepted.

    `root` is the schema's top dataclass (Config, DeviceProfile): unknown keys are answered with its keys.
    """
    lines = [f"{source}: invalid {what}"]
    for problem in err.errors():
        loc = tuple(problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        # A check on a whole section names its key first ("epochs: must be ..."): report it at that key.
        named = re.match(r"(\w+): ", message)
        if problem["type"] == "value_error" and named and named.group(1) in _section_keys(loc + ("",), root):
            loc, message = loc + (named.group(1),), message[named.end():]
        where = ".".join(str(p) for p in loc) or "(top level)"
        if problem["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            keys = _section_keys(loc, root)
            hint = difflib.get_close_matches(str(loc[-1]), keys, n=1)
            message = (f"unknown key{f' (did you mean {hint[0]!r}?)' if hint else ''}; allowed here: "
                       f"{', '.join(keys)}")
        elif problem["type"] in ("missing", "missing_argument"):
            message = "required key is missing"
        elif problem["type"] == "literal_error":
            message = f"{problem['input']!r} is not allowed; {message[0].lower()}{message[1:]}"
        elif not isinstance(problem.get("input"), (dict, list)) and "got" not in message and "input" in problem:
            message = f"{message}, got {problem['input']!r}"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a plain value",
                                                        key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    f"key {key!r} first given on line {seen[key] + 1}", node.start_mark,
                    f"is given again on line {key_node.start_mark.line + 1} (the second would silently win)",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _count_nodes(data, budget: int) -> int:
    """Values in `data`, counting each alias expansion again (json.dumps would expand them all)."""
    stack, count = [data], 0
    while stack:
        value = stack.pop()
        count += 1
        if count > budget:
            break
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return count


def read_yaml(path: str | Path, what: str = "config"):
    """The document in a YAML file, or a ConfigError naming the file and what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: {what} file not found")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file (a {what} is a YAML file)")
    try:
        raw = path.read_bytes()[: MAX_CONFIG_BYTES + 1]
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the {what} ({err.strerror})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB; a {what} is a short YAML file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start} is {raw[err.start:err.start + 1]!r}); save "
                          f"the {what} as UTF-8") from None
    return parse_yaml(text, str(path), what)


def parse_yaml(text: str, source: str, what: str = "config"):
    """The document in YAML text (a file's, or a value given on a command line), or a ConfigError naming
    `source`: repeated keys and alias bombs are refused as in :func:`read_yaml`."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a {what}") from None
    if _count_nodes(data, MAX_NODES) > MAX_NODES:
        raise ConfigError(f"{source}: expands to more than {MAX_NODES:,} values (through YAML aliases?); "
                          f"a {what} is far smaller")
    return data
