"""The precomputed teacher of IV-guided training (``IVGuidedConfig(teacher="precomputed")``).

Before the first step, one no-grad pass of the teacher (the model before training with the IVs
added: the live teacher's very computation) over the training set stores what the loss needs at
the KL positions: the whole distribution at each row's last prompt token, the top-k
log-probabilities + token ids + the log of the remaining mass at the other positions, and the IV
heads' outputs at the last prompt token when the head term is on. Every step then reads its rows
back instead of running the teacher, so no reference model is needed at train time.

With ``top_k=0`` (no truncation) it stores instead the teacher's last hidden states (the LM head's
input) at every KL position and the LM head's weights once; each step applies that head to its
rows' hidden states: the teacher's exact logits, for one LM-head matmul a step.

Rows are matched by content: a row's key is a hash of its attended tokens and labels, so
shuffling, padding side, batch composition and multi-process sampling do not matter; a row the
store has not seen is an error, never a silently wrong teacher.

The store lives in ``<output_dir>/_ivtrainer_teacher/<fingerprint>/`` (memory-mapped ``.npy``
files and ``meta.json``; the leading underscore keeps ``Trainer.push_to_hub`` from uploading it).
The fingerprint covers the data (the row keys), the model's weights (sampled), the IVs and the
settings, so a rerun or a resumed run reuses it and any change recomputes it. It is written under
a temporary name and renamed when complete: a killed precompute leaves nothing that is read back.
"""

from ivtrainer.iv_guided.precomputed_teacher.cache import CACHE_FOLDER, check_cache_dir
from ivtrainer.iv_guided.precomputed_teacher.keys import (
    model_fingerprint,
    row_keys,
    stored_masks,
    vectors_fingerprint,
)
from ivtrainer.iv_guided.precomputed_teacher.store import DamagedStoreError, TeacherPass, TeacherStore
from ivtrainer.iv_guided.precomputed_teacher.write import precompute_teacher

__all__ = [
    "CACHE_FOLDER",
    "DamagedStoreError",
    "TeacherPass",
    "TeacherStore",
    "check_cache_dir",
    "model_fingerprint",
    "precompute_teacher",
    "row_keys",
    "stored_masks",
    "vectors_fingerprint",
]
