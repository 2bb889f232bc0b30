"""Family configs: YAML files read into validated dataclasses.

Every problem in a config is reported as a :class:`ConfigError` that names the file, the key and what
would have been accepted, so the CLI can print it without a traceback.  The rooms:

- ``validation``: the toolkit every YAML schema shares (strict settings, name rules, messages, the YAML reader);
- ``members``, ``data``, ``train``, ``search``: the schema by section; ``schema``: the root ``Config``;
- ``paths``: the values that name files, resolved against the config file's folder in one pass;
- ``overrides``: ``load_config``, a file with dotted ``key=value`` overrides applied.
"""
from __future__ import annotations

from hetero.config.data import PILLOW_PIXEL_LIMIT, DataConfig, EvalDataConfig
from hetero.config.members import (DEFAULT_INPUT_SIZE, EXTERNAL_KINDS, MODEL_FILE_KINDS, PICKLED_KINDS, FamilyConfig,
                                   MemberConfig, untrusted_message)
from hetero.config.overrides import apply_overrides, load_config
from hetero.config.paths import PATH_FIELDS, PROFILE_FIELDS, resolve_paths
from hetero.config.schema import Config, ExportConfig, config_yaml, parse_config
from hetero.config.search import SearchConfig, SearchTarget
from hetero.config.train import AdapterConfig, EarlyExitConfig, LqfConfig, TeacherCacheConfig, TrainConfig
from hetero.config.validation import (MAX_CONFIG_BYTES, MAX_NODES, NAME_PATTERN, NAME_RULE, STRICT, NonNegative,
                                      Positive, check_known, check_name, format_validation_error, parse_yaml, read_yaml,
                                      unknown_message)
from hetero.errors import ConfigError

__all__ = [
    "DEFAULT_INPUT_SIZE", "EXTERNAL_KINDS", "MAX_CONFIG_BYTES", "MAX_NODES", "MODEL_FILE_KINDS", "NAME_PATTERN",
    "NAME_RULE", "PATH_FIELDS", "PICKLED_KINDS", "PILLOW_PIXEL_LIMIT", "PROFILE_FIELDS", "STRICT",
    "AdapterConfig", "Config", "ConfigError", "DataConfig", "EarlyExitConfig", "EvalDataConfig", "ExportConfig",
    "FamilyConfig", "LqfConfig", "MemberConfig", "NonNegative", "Positive", "SearchConfig", "SearchTarget",
    "TeacherCacheConfig", "TrainConfig",
    "apply_overrides", "check_known", "check_name", "config_yaml", "format_validation_error", "load_config",
    "parse_config", "parse_yaml", "read_yaml", "resolve_paths", "unknown_message", "untrusted_message",
]
