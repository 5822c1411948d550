"""Knowledge-edit records: loaders for CounterFact and ZsRE, the built-in counterfactual set, and
tokenised old/new-knowledge datasets for fine-tuning.

Every loader returns records with one schema (EasyEdit's CounterFact fields, with the old target
named explicitly)::

    {"prompt", "subject", "target_old", "target_new", "rephrase_prompt",
     "locality_prompt", "locality_ground_truth", "relation"}

``target_old`` is the knowledge to forget (F-Learning's old-knowledge set is ``prompt + target_old``),
``target_new`` the knowledge to learn.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from torch import nn
from transformers.utils import logging

from ivtrainer.datasets.prompt_completion import encode_prompt_completion
from ivtrainer.datasets.tasks import read_json_or_jsonl
from ivtrainer.errors import InvalidInputError
from ivtrainer.evaluation.predictions import target_predictions

logger = logging.get_logger(__name__)

__all__ = [
    "EDIT_FIELDS",
    "build_counterfacts",
    "candidate_facts",
    "edit_dataset",
    "load_edits",
    "split_edits",
]

EDIT_FIELDS = (
    "prompt",
    "subject",
    "target_old",
    "target_new",
    "rephrase_prompt",
    "locality_prompt",
    "locality_ground_truth",
    "relation",
)
BUILTIN = "builtin"

# field in the source -> our field; a list value takes its first element (ZsRE "answers")
_COUNTERFACT = {
    "prompt": "prompt",
    "subject": "subject",
    "ground_truth": "target_old",
    "target_new": "target_new",
    "rephrase_prompt": "rephrase_prompt",
    "locality_prompt": "locality_prompt",
    "locality_ground_truth": "locality_ground_truth",
}
_ZSRE = {
    "src": "prompt",
    "subject": "subject",
    "answers": "target_old",
    "alt": "target_new",
    "rephrase": "rephrase_prompt",
    "loc": "locality_prompt",
    "loc_ans": "locality_ground_truth",
}
_OWN = {f: f for f in EDIT_FIELDS}
_REQUIRED = (
    "prompt",
    "target_old",
    "target_new",
    "rephrase_prompt",
    "locality_prompt",
    "locality_ground_truth",
)


def load_edits(
    source: Any,
    *,
    model=None,
    tokenizer=None,
    on_invalid: Literal["auto", "skip", "raise"] = "auto",
    on_skip: Callable[[str], None] | None = None,
) -> list[dict[str, str]]:
    """Edit records from ``"builtin"`` (needs ``model`` and ``tokenizer``), a JSON/JSONL file, a
    list of dicts or a ``datasets.Dataset``, in CounterFact (EasyEdit split), ZsRE (MEND split) or
    our own field names; the format is detected from the first record's fields.

    ``on_invalid``: what to do with a record that lacks a field or has an empty one (the public
    files have a few, e.g. 2 ZsRE records with ``"alt": ""``): ``"skip"`` it (a warning names
    them and the count; ``on_skip`` receives that message instead of the log), ``"raise"``, or
    ``"auto"``: skip in the public formats, raise in ours.
    Records without a relation get one from the prompt (the prompt with the subject replaced by
    ``{}``), so :func:`split_edits` can stratify public files.
    """
    if on_invalid not in ("auto", "skip", "raise"):
        raise InvalidInputError(f"on_invalid must be 'auto', 'skip' or 'raise', not {on_invalid!r}")
    if isinstance(source, str) and source == BUILTIN:
        if model is None or tokenizer is None:
            raise InvalidInputError(
                "the built-in set depends on what the model knows: pass model= and tokenizer="
            )
        return build_counterfacts(model, tokenizer)
    where = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise InvalidInputError(
                f"{os.fspath(source)!r} is not a file; pass a JSON/JSONL file or 'builtin'"
            )
        where, source = str(path), _read_records(path)
    elif hasattr(source, "column_names") and hasattr(source, "to_list"):  # datasets.Dataset
        source = source.to_list()
    if not isinstance(source, Iterable) or isinstance(source, (Mapping, str)):
        raise InvalidInputError(f"edits must be a list of records, not {type(source).__name__}")
    records = list(source)
    loc = f" in {where}" if where else ""
    if not records:
        raise InvalidInputError(f"no edit records{loc}")
    fields = set(next((r for r in records if isinstance(r, Mapping)), {}))
    mapping = _ZSRE if "src" in fields else _COUNTERFACT if "ground_truth" in fields else _OWN
    skip = on_invalid == "skip" or (on_invalid == "auto" and mapping is not _OWN)
    out, problems = [], []
    for i, rec in enumerate(records):
        try:
            out.append(_normalise(rec, mapping, i, where))
        except InvalidInputError as exc:
            if not skip:
                raise
            problems.append(str(exc))
    if problems:
        if not out:
            raise InvalidInputError(f"no valid edit records{loc}: {problems[0]}")
        shown = "; ".join(p.split(" (fields:")[0].replace(loc, "") for p in problems[:3])
        more = "; ..." if len(problems) > 3 else ""
        message = (
            f"skipped {len(problems)} of {len(records)} edit records{loc} that are incomplete: {shown}{more}"
        )
        (on_skip or logger.warning)(message)
    return out


def _normalise(rec: Any, mapping: dict[str, str], i: int, where: str | None) -> dict[str, str]:
    loc = f" in {where}" if where else ""
    if not isinstance(rec, Mapping):
        raise InvalidInputError(f"record {i}{loc} is a {type(rec).__name__}, not a dict")
    out = {}
    for src, dst in mapping.items():
        value = rec.get(src)
        if isinstance(value, list):  # ZsRE answers, CounterFact dumps with list fields
            value = value[0] if value else None
        if isinstance(value, Mapping) and "str" in value:  # raw CounterFact {"str": ...} targets
            value = value["str"]
        if value is not None:
            out[dst] = str(value).strip()
    missing = [f for f in _REQUIRED if not out.get(f)]
    if missing:
        names = {v: k for k, v in mapping.items()}
        name = names.get(missing[0], missing[0])
        problem = f"an empty {name!r}" if name in rec else f"no {name!r}"
        raise InvalidInputError(
            f"record {i}{loc} has {problem} (fields: {sorted(rec)}); edit records need a prompt, the old and "
            "new targets, a rephrased prompt and a locality prompt + answer"
        )
    out.setdefault("subject", "")
    if "{}" in out["prompt"] and out["subject"]:  # raw CounterFact templates
        out["prompt"] = out["prompt"].format(out["subject"])
    relation = str(rec.get("relation") or rec.get("relation_id") or "")
    if not relation and out["subject"] and out["subject"] in out["prompt"]:
        relation = out["prompt"].replace(out["subject"], "{}")  # the prompt's template names the relation
    out["relation"] = relation
    return {f: out[f] for f in EDIT_FIELDS}


def _read_records(path: Path) -> list[Any]:
    data = read_json_or_jsonl(path)
    if isinstance(data, Mapping):
        data = next((data[k] for k in ("records", "data", "edits") if isinstance(data.get(k), list)), [data])
    return data


def _candidate_relations() -> list[dict[str, Any]]:
    return json.loads((resources.files("ivtrainer") / "resources" / "facts.json").read_text())["relations"]


def candidate_facts() -> list[dict[str, str]]:
    """Every fact that ships with the package (capitals, official languages, landmark cities,
    currencies) as a record with ``relation``, ``subject``, ``prompt`` and ``target_old``, in one
    fixed shuffled order (the first ``n`` mix the relations). Not filtered by what a model knows:
    :func:`build_counterfacts` does that."""
    facts = [
        {
            "relation": rel["name"],
            "subject": subject,
            "prompt": rel["prompt"].format(subject),
            "target_old": obj,
        }
        for rel in _candidate_relations()
        for subject, obj in rel["facts"]
    ]
    random.Random(0).shuffle(facts)
    return facts


def build_counterfacts(
    model: nn.Module,
    tokenizer,
    *,
    locality_fraction: float = 0.25,
    seed: int = 0,
    batch_size: int = 32,
) -> list[dict[str, str]]:
    """The built-in counterfactual set for this model, built offline from the candidate facts that
    ship with the package (capitals, official languages, landmark cities, currencies).

    Only facts the model completes correctly (every target token is the teacher-forced argmax
    after the prompt) are kept: F-Learning presumes the model holds the old knowledge. A quarter
    of the known facts per relation (``locality_fraction``) are never edited and serve as the
    locality prompts of the *other* relations' edits (unrelated knowledge, as ZsRE's locality
    questions are); the rest are edits whose new target is another object of the same relation.
    """
    if not 0 < locality_fraction < 1:
        raise InvalidInputError(f"locality_fraction must be in (0, 1), got {locality_fraction}")
    relations = _candidate_relations()
    prompts, targets, index = [], [], []
    for rel in relations:
        for subject, obj in rel["facts"]:
            prompts.append(rel["prompt"].format(subject))
            targets.append(obj)
            index.append((rel, subject, obj))
    preds = target_predictions(model, tokenizer, prompts, targets, batch_size=batch_size, desc="known facts")
    known: dict[str, list[tuple[str, str]]] = {}
    for (rel, subject, obj), (pred, gold) in zip(index, preds, strict=True):
        if pred == gold:
            known.setdefault(rel["name"], []).append((subject, obj))
    rng = random.Random(seed)
    split = {}
    for rel in relations:
        facts = known.get(rel["name"], [])
        if len(facts) < 2 or len({o for _, o in rel["facts"]}) < 2:
            continue
        rng.shuffle(facts)
        n_loc = max(1, round(len(facts) * locality_fraction))
        split[rel["name"]] = (rel, facts[:n_loc], facts[n_loc:])
    records = []
    for name, (rel, _, edits) in split.items():
        # unrelated locality prompts: known facts of the other relations, never edited
        pool = [(r, s, o) for other, (r, loc, _) in split.items() if other != name for s, o in loc]
        pool = pool or [(rel, s, o) for s, o in split[name][1]]
        objects = sorted({o for _, o in rel["facts"]})
        for i, (subject, obj) in enumerate(edits):
            loc_rel, loc_subject, loc_obj = pool[i % len(pool)]
            records.append(
                {
                    "prompt": rel["prompt"].format(subject),
                    "subject": subject,
                    "target_old": obj,
                    "target_new": rng.choice([o for o in objects if o != obj]),
                    "rephrase_prompt": rel["rephrase"].format(subject),
                    "locality_prompt": loc_rel["prompt"].format(loc_subject),
                    "locality_ground_truth": loc_obj,
                    "relation": rel["name"],
                }
            )
    if not records:
        raise InvalidInputError(
            "the model completes too few of the candidate facts to build a counterfactual set; "
            "pass your own edits (CounterFact or ZsRE JSON) instead"
        )
    return records


def split_edits(
    records: Sequence[dict[str, str]], validation_fraction: float = 1 / 3, *, seed: int = 0
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(validation, test): a fixed shuffle, stratified by relation, so settings such as lambda are
    chosen on records that are never reported."""
    if not 0 < validation_fraction < 1:
        raise InvalidInputError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    by_relation: dict[str, list[dict[str, str]]] = {}
    for rec in records:
        by_relation.setdefault(rec.get("relation", ""), []).append(rec)
    rng = random.Random(seed)
    groups = [list(group) for group in by_relation.values()]
    for group in groups:
        rng.shuffle(group)
    if sum(len(g) < 3 for g in groups) > len(groups) / 2:
        # most relations too small to split on their own (public files: one template per few
        # records): one ordering, relation by relation, cut with a running quota
        ordered = [rec for group in groups for rec in group]
        picks = [
            round((k + 1) * validation_fraction) > round(k * validation_fraction) for k in range(len(ordered))
        ]
        return (
            [r for r, v in zip(ordered, picks, strict=True) if v],
            [r for r, v in zip(ordered, picks, strict=True) if not v],
        )
    validation, test = [], []
    for group in groups:
        cut = round(len(group) * validation_fraction)
        validation += group[:cut]
        test += group[cut:]
    return validation, test


def edit_dataset(
    records: Sequence[dict[str, str]],
    tokenizer,
    target: Literal["new", "old"] = "new",
    *,
    prompts: Sequence[str] = ("prompt",),
    add_eos: bool = False,
):
    """A tokenised ``datasets.Dataset`` (input_ids, attention_mask, labels) teaching
    ``prompt + " " + target_<target>``; the prompt tokens are masked out of the loss (-100).

    ``target="old"`` gives F-Learning's old-knowledge set; ``prompts`` may add
    ``"rephrase_prompt"`` to train on paraphrases too (by default they stay held out for Generality).
    The loss covers the target tokens only, as knowledge-editing fine-tuning baselines do, unless
    ``add_eos`` appends the end-of-sequence token.
    """
    from datasets import Dataset

    if target not in ("new", "old"):
        raise InvalidInputError(f"target must be 'new' or 'old', not {target!r}")
    rows = [
        encode_prompt_completion(tokenizer, rec[field], f" {rec[f'target_{target}']}", add_eos=add_eos)
        for rec in records
        for field in prompts
    ]
    return Dataset.from_list(rows)
