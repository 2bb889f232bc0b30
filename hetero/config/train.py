"""The `train` section: epochs, optimiser, how members are coupled (compat, mode, losses), and its
subsections: the adapter baseline, the teacher cache, multi-exit training and linearised fine-tuning."""
from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic.dataclasses import dataclass

from hetero.config.validation import STRICT, NonNegative, Positive, check_known


@dataclass(config=STRICT)
class AdapterConfig:
    """compat: adapter, the post-hoc baseline: a map from each independently trained edge's space into the
    cloud's, fitted on training images without labels and exported inside the edge's graph."""

    kind: Literal["procrustes", "affine"] = "procrustes"
    rank: Positive | None = None  # affine: a low-rank map (None: full rank)


@dataclass(config=STRICT)
class TeacherCacheConfig:
    """The cloud's embeddings of `views` augmented views (and matching inputs) per training image, computed
    once and read by the edge phase instead of running the cloud on every batch."""

    views: Positive = 8
    dir: str | None = None  # default: teacher_cache/ in the family directory; share one between runs here


@dataclass(config=STRICT)
class EarlyExitConfig:
    """Training and calibration of multi-exit members (members with `exits`)."""

    # Share of the training data kept out of training for every member, for `hetero calibrate` to pick the
    # exit thresholds on (never test data).
    held_out: Annotated[float, Field(ge=0, lt=1)] = 0.1
    # `classes`: that share of the training classes, every image of them, so the thresholds are fitted on
    # classes the members never saw, as test queries are (an exit is less sure of an unseen class, so
    # thresholds fitted on seen classes escalate far more test queries than asked); `groups`: whole groups
    # of classes (the top folders, e.g. Omniglot's alphabets) until that share of the classes, for data whose
    # test split is by group (data.test_groups), so calibration sees a new group as the test does; data with
    # one group hold out classes.  `images`: the last images of every training class.  Data without classes
    # hold out images.
    held_out_by: Literal["classes", "groups", "images"] = "classes"
    # Weight of deeper-teaches-shallower: each earlier exit regresses onto the last exit's (detached) embedding.
    # On by default: on Omniglot (3 seeds, benchmarks/early_exit.py) it left the earlier exits where they were
    # and held the last exit at a separate student's top-1 on every seed, where without it one seed fell well
    # below.  Members without exits are unaffected.
    self_distillation: NonNegative = 1.0
    # Anchors of the entropy rule.  `prototypes`: the shared classifier's class prototypes (labeled families);
    # `kmeans`: `anchors` k-means centres of the cloud's training embeddings, class-free (always so for
    # unlabeled data).  On Omniglot, 1024 k-means centres carried a calibration fitted on held-out classes to
    # new alphabets better than the prototypes did (benchmarks/early_exit.py's class-free anchors).
    anchors_from: Literal["prototypes", "kmeans"] = "prototypes"
    # How many k-means centres (at most one per training image).
    anchors: Annotated[int, Field(ge=2, le=4096)] = 64


@dataclass(config=STRICT)
class LqfConfig:
    """mode: lqf, linearised fine-tuning (LQF, Achille et al., CVPR 2021) of the family in `previous`.

    Each member is replaced by its first-order Taylor expansion in its weights around the previous
    member's, trained by least squares to `target_scale` x one-hot through the frozen shared classifier
    (plus `compat_weight` x the squared distance to the previous cloud's embedding) with train.weight_decay
    on dw.  The objective is a convex quadratic, minimised by `train.epochs` full-batch conjugate-gradient
    iterations preconditioned by K-FAC (curvlinops): no learning rate, no dependence on the seed.
    """

    # Added to each Kronecker factor before inverting.  It shapes the preconditioner, not the objective: the
    # quadratic's minimiser is the same for any damping, only the path of the `epochs` CG steps to it changes.
    damping: Annotated[float, Field(gt=0)] = 1e-3
    target_scale: Annotated[float, Field(gt=0)] = 1.0
    # `auto`: each member's weight is picked from `compat_grid` by fitting on all but `held_out` of each
    # class's images and scoring on those: the mean of the member's top-1 against the updated cloud's gallery
    # (the cloud: its own) and against the previous cloud's, the gallery already indexed (ties: the smaller
    # weight).  It costs one more update per weight in the grid.
    compat_weight: NonNegative | Literal["auto"] = 0.0
    compat_grid: Annotated[list[NonNegative], Field(min_length=2)] = field(
        default_factory=lambda: [0.0, 1.0, 3.0, 10.0, 30.0, 100.0])
    held_out: Annotated[float, Field(gt=0, lt=1)] = 0.2


@dataclass(config=STRICT)
class TrainConfig:
    epochs: Positive = 10
    # Epochs of the edge phase in sequential mode (the cloud phase has `epochs`); default: `epochs`.
    # Students matching a fixed teacher keep improving long after the teacher would overfit.
    edge_epochs: Positive | None = None
    batch_size: Positive = 128
    samples_per_class: Positive = 4
    lr: Annotated[float, Field(gt=0)] = 5e-3
    weight_decay: NonNegative = 5e-4
    warmup_epochs: NonNegative = 1.0
    seed: Annotated[int, Field(ge=0)] = 0
    # How members are coupled.  none: independent members, each with its own classifier (the baseline).
    # shared: one shared normalised-softmax classifier plus the cross-model terms in `losses`.
    # adapter: independent members as with none, then a fitted map into the cloud's space (see AdapterConfig).
    compat: Literal["none", "shared", "adapter"] = "shared"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    teacher_cache: TeacherCacheConfig | None = None
    # sequential (default): the cloud and the shared head first, then frozen while the edge members learn
    # against them (BCT's influence loss plus the cross-model terms); joint: every member learns together.
    # Measured on Omniglot and procedural data, sequential aligned the edges better at a lower cost per epoch
    # (benchmarks/compat_quality.py).  backward: a new family, cloud included, learns against the frozen
    # cloud of the earlier family in `previous`, whose gallery is never re-indexed; it keeps that space id.
    # lqf: linearised fine-tuning of the family in `previous` on this config's data (see LqfConfig); it
    # keeps that family's members, space id and gallery.
    mode: Literal["joint", "sequential", "backward", "lqf"] = "sequential"
    # backward and lqf modes: directory of the earlier, trained family (relative paths: to the config).
    previous: str | None = None
    lqf: LqfConfig = field(default_factory=LqfConfig)
    # Start every member from the same-named member of the family in this directory (ordinary fine-tuning;
    # with mode backward and the same `previous`, fine-tuning with the backward terms).
    init: str | None = None
    classifier: Literal["cosface", "arcface"] = "cosface"
    margin: NonNegative = 0.2
    scale: Annotated[float, Field(gt=0)] = 16.0
    # Cross-model terms between each edge member (query) and the cloud member (reference), with weights.
    losses: dict[str, float] = field(
        default_factory=lambda: {"contrastive": 5.0, "relational": 5.0, "regression": 20.0})
    # Weight of the shared classifier's loss on each edge member; 0 trains edges by the cross-model terms
    # alone.  compat: none ignores it (independent members learn from their own classifier only).
    edge_classification: NonNegative = 1.0
    # Weight of the label-free cross-model terms (regression, relational) again on images made from the
    # batch: function matching off the training images, which carried over to unseen classes on Omniglot
    # (benchmarks/compat_quality.py); 0 turns it off.
    mixed_matching: NonNegative = 1.0
    # How those images are made: mixup blends two images, cutmix pastes a box of one into another (with
    # both, each image gets one of the two), dihedral then rotates/reflects each.  The matching is label-free,
    # so rotated inputs need no rotation-invariant classes; they only show the students more of the
    # teacher's function.  mixup alone is the default; examples/omniglot.yaml says what the others gained.
    matching_inputs: list[Literal["mixup", "cutmix", "dihedral"]] = field(default_factory=lambda: ["mixup"])
    detach_cloud: bool = True
    workers: Annotated[int, Field(ge=0)] = 0
    # bfloat16 autocast and channels-last tensors: `auto` turns each on where the device gains from it:
    # bf16 on a GPU or CPU that computes it in hardware (AVX512-BF16/AMX; elsewhere torch emulates it),
    # channels-last on a CUDA GPU.  Losses are always computed in fp32.
    amp: Literal["auto", "off", "bf16"] = "auto"
    channels_last: Literal["auto", "off", "on"] = "auto"
    # torch.compile (inductor) for every trained member's forward and backward; the first steps of each
    # phase pay the compilation (benchmarks/time_to_quality.py measures what it returns).
    compile: bool = False
    # Multi-exit members: held-out calibration images, self-distillation, anchors (defaults when omitted).
    early_exit: EarlyExitConfig = field(default_factory=EarlyExitConfig)

    @field_validator("amp", "channels_last", mode="before")
    @classmethod
    def _yaml_switch(cls, value):
        # YAML 1.1 reads a bare `off` / `on` as false / true: take them as the words the user wrote
        return ("on" if value else "off") if isinstance(value, bool) else value

    @field_validator("losses")
    @classmethod
    def _losses_registered(cls, value: dict[str, float]) -> dict[str, float]:
        from hetero.losses import CROSS_MODEL_LOSSES

        for name, weight in value.items():
            check_known(name, CROSS_MODEL_LOSSES, "loss")
            if weight < 0:
                raise ValueError(f"weight of loss {name!r} must be >= 0, got {weight}")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.mode in ("backward", "lqf") and not self.previous:
            raise ValueError(f"previous: mode {self.mode!r} needs the directory of the earlier family it stays "
                             "compatible with")
        if self.mode in ("backward", "lqf") and self.compat in ("none", "adapter"):
            raise ValueError(f"compat: mode {self.mode!r} trains against the earlier cloud, so compat "
                             f"{self.compat!r} cannot apply")
        if self.mode == "lqf" and self.init:
            raise ValueError("init: mode 'lqf' always starts from (and linearises around) the family in `previous`")
        if self.teacher_cache is not None and (self.mode != "sequential" or self.compat != "shared"):
            raise ValueError("teacher_cache: the cloud's embeddings are cached for an edge phase against a frozen "
                             "cloud: mode 'sequential' with compat 'shared'")
        if self.edge_epochs is not None and self.mode != "sequential":
            raise ValueError(f"edge_epochs: only used in mode 'sequential' (mode is {self.mode!r})")
        if self.compat == "shared" and self.edge_classification == 0 and not any(self.losses.values()):
            raise ValueError("edge_classification: 0 with no cross-model term in `losses` leaves the edge members "
                             "nothing to learn from; give a loss a weight > 0 or edge_classification > 0")
        if self.previous and self.mode not in ("backward", "lqf"):
            raise ValueError(f"previous: only used in modes 'backward' and 'lqf' (mode is {self.mode!r})")
        if self.batch_size % self.samples_per_class:
            raise ValueError(f"batch_size: {self.batch_size} must be a multiple of samples_per_class "
                             f"({self.samples_per_class})")
        return self
