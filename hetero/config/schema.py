"""The whole config: the root `Config` (its sections and the checks across them), the small `export`
section, and a mapping validated into a Config or a Config written back as YAML."""
from __future__ import annotations

import json
from dataclasses import asdict, field

import yaml
from pydantic import TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from hetero.config.data import DataConfig
from hetero.config.members import DEFAULT_INPUT_SIZE, FamilyConfig
from hetero.config.search import SearchConfig
from hetero.config.train import TrainConfig
from hetero.config.validation import STRICT, Positive, format_validation_error
from hetero.errors import ConfigError


@dataclass(config=STRICT)
class ExportConfig:
    profiles: list[str] = field(default_factory=lambda: ["server-onnx-fp32"])
    verify_images: Positive = 256


@dataclass(config=STRICT)
class Config:
    family: FamilyConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    search: SearchConfig | None = None

    @model_validator(mode="after")
    def _across_sections(self):
        cloud = self.family.cloud
        if self.data.source == "unlabeled":
            if not cloud.external:
                raise ValueError(f"family.members: unlabeled data has no classes to train a cloud on; make "
                                 f"{cloud.name!r} an external cloud (model: FILE, or frozen: true with weights)")
            needs_labels = [n for n, w in self.train.losses.items() if w > 0 and n == "contrastive"]
            if needs_labels:
                raise ValueError(f"train.losses: {needs_labels[0]!r} needs labels, which unlabeled data does not "
                                 f"have; set it to 0 (regression and relational learn from the cloud alone)")
            if self.train.compat != "shared":
                raise ValueError(f"train.compat: {self.train.compat!r} trains members on labels; unlabeled data "
                                 f"trains edges from the cloud alone (compat: shared)")
        multi_exit = [m.name for m in self.family.members if m.exits is not None]
        if multi_exit and self.train.compat != "shared":
            raise ValueError(f"train.compat: multi-exit member {multi_exit[0]!r} trains every exit against the "
                             f"cloud; compat {self.train.compat!r} does not (use 'shared')")
        if multi_exit and self.train.mode == "lqf":
            raise ValueError(f"family.members: {multi_exit[0]!r} has exits; mode 'lqf' linearises single-output "
                             f"networks and does not support multi-exit members: remove its `exits` (or leave it "
                             f"out, if the earlier family's {multi_exit[0]!r} has exits), or use mode 'backward'")
        if cloud.external and self.train.mode != "sequential":
            raise ValueError(f"train.mode: {self.train.mode!r} trains the cloud too, but {cloud.name!r} is external "
                             f"(frozen); use 'sequential', whose edge phase is all there is to train")
        if self.search is not None:
            self._searchable()
        elif not self.family.edges:
            raise ValueError("family.members: a family needs a cloud member and at least one edge member (or a "
                             "`search` section, for `hetero search` to find them)")
        return self

    def _searchable(self) -> None:
        search, cloud = self.search, self.family.cloud
        if self.family.edges:
            raise ValueError(f"family.members: `hetero search` finds the edge members (search.targets); list only "
                             f"the cloud (found edge {self.family.edges[0].name!r})")
        clash = [t.name for t in search.targets if t.name == cloud.name]
        if clash:
            raise ValueError(f"search.targets: {clash[0]!r} is the cloud's name; give the student another")
        if self.data.source == "unlabeled":
            raise ValueError("search: candidates are ranked by retrieval on held-out training classes; unlabeled "
                             "data has none")
        if cloud.external or cloud.arch not in ("resnet", "mobilenet") or cloud.exits is not None:
            raise ValueError(f"search: the supernet grows from the cloud member, one of hetero's own architectures "
                             f"(resnet, mobilenet); {cloud.name!r} is "
                             f"{'external' if cloud.external else repr(cloud.arch)}"
                             f"{' with exits' if cloud.exits is not None else ''}")
        if search.design == "shared-cloud":
            from hetero.models import mobilenet_defaults

            largest_width, largest_depth, largest_size = (max(search.widths), max(search.depths),
                                                          max(search.input_sizes))
            if search.arch != cloud.arch:
                raise ValueError(f"search.arch: design 'shared-cloud' makes the cloud the largest sub-network, so the "
                                 f"supernet is the cloud's architecture {cloud.arch!r}, not {search.arch!r}")
            if (largest_width, largest_depth, largest_size) != (cloud.width, cloud.depth, cloud.input_size):
                raise ValueError(f"search: design 'shared-cloud' makes the cloud the largest sub-network, so the "
                                 f"largest width, depth and input size ({largest_width}, {largest_depth}, "
                                 f"{largest_size} px) must be the cloud's ({cloud.width}, {cloud.depth}, "
                                 f"{cloud.input_size} px)")
            if cloud.arch == "mobilenet":
                # the largest sub-network's blocks (search.space.Candidate.blocks, which config cannot import)
                expand, kernel = max(search.expand_ratios), max(search.kernel_sizes)
                ratios, kernels = mobilenet_defaults(cloud.depth)
                own = {"expand_ratios": cloud.expand_ratios or ratios, "kernel_sizes": cloud.kernel_sizes or kernels}
                largest = {"expand_ratios": [r if r == 1 else expand for r in ratios],
                           "kernel_sizes": [kernel] * len(kernels)}
                if own != largest:
                    raise ValueError(f"search: design 'shared-cloud' makes the cloud the largest sub-network, so "
                                     f"its blocks must have the largest expansion ratio and kernel size "
                                     f"({expand:g}, {kernel}) past the first stage; the cloud's are {own}")

    @property
    def load_size(self) -> int:
        searched = max(self.search.input_sizes) if self.search else 0
        return self.data.image_size or max([searched] + [m.input_size or DEFAULT_INPUT_SIZE
                                                          for m in self.family.members])

    def to_dict(self) -> dict:
        return asdict(self)


def parse_config(data: dict, source: str = "<config>") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with a 'family' key, got {type(data).__name__}")
    try:
        # Validated as JSON: strict types (no "3" for 3), yet nested sections may be plain mappings.
        return TypeAdapter(Config).validate_json(json.dumps(data, default=str))
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err, Config)) from None
    except (RecursionError, ValueError) as err:  # nesting too deep for json, or circular YAML aliases
        raise ConfigError(f"{source}: cannot be read as a config ({type(err).__name__})") from None


def config_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
