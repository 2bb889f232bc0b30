"""Joint training of a model family.

Every member sees the same augmented batch.  The loss is, per member, a normalised-softmax classification
loss (through one classifier shared by all members, or one each when `compat: none`) plus, per edge member,
the configured cross-model terms against the cloud member's embeddings of the same images.

State is checkpointed atomically after every epoch (one safetensors file holding weights, optimizer state,
epoch and history; nothing pickled); a resumed run continues from the last finished epoch and ends with the
same weights as an uninterrupted one.  Callbacks run after every epoch (progress reports, snapshots).

Under `torchrun --nproc_per_node N` the same code trains data-parallel (see hetero/distributed.py): every
rank draws the same global batch (same seed, same augmentation, whatever N) and trains on its contiguous
slice; BatchNorm and the cross-model terms see the whole global batch and DDP averages the gradients, so a
step equals one process's step on the global batch up to float rounding.  Rank 0 alone logs and writes.

The rooms, top to bottom: run (train() and a TrainingRun's phases, epochs and steps), updates (starting from
an earlier family), model (the Family module), objective (the loss of a batch and the matching inputs),
plumbing (seeds, LR schedule, batch size, accelerations, the training-state file); beside them exits (early
exit rules), lqf (linearised fine-tuning) and teacher_cache.  A trained family is written by
hetero.family.writer.
"""
from hetero.family.writer import check_finite_weights, write_family
from hetero.training.model import Family, open_cloud, resolve_external_input_size
from hetero.training.objective import (MIXERS, cutmix, deeper_teaches_shallower, dihedral, family_loss,
                                       match_on_mixed_images, matching_inputs, mixup, output_names)
from hetero.training.plumbing import (accelerations, cpu_has_native_bf16, global_batch_size, load_state, lr_factor,
                                      save_state, seed_everything, seeded)
from hetero.training.run import Callback, EpochEnd, TrainingRun, fit_adapters, train
from hetero.training.updates import (hold_out_for_calibration, lqf_update, prototypes_from, read_previous,
                                     start_from_family)

__all__ = [
    "MIXERS", "Callback", "EpochEnd", "Family", "TrainingRun", "accelerations", "check_finite_weights",
    "cpu_has_native_bf16", "cutmix", "deeper_teaches_shallower", "dihedral", "family_loss", "fit_adapters",
    "global_batch_size", "hold_out_for_calibration", "load_state", "lqf_update", "lr_factor", "match_on_mixed_images",
    "matching_inputs", "mixup", "open_cloud", "output_names", "prototypes_from", "read_previous",
    "resolve_external_input_size", "save_state", "seed_everything", "seeded", "start_from_family", "train",
    "write_family",
]
