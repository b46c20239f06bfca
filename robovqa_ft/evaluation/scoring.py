"""How an answer is scored: yes/no by accuracy after normalization (with the invalid
rate); free form by sacrebleu's sentence BLEU (prediction as hypothesis, the reference as
the one reference, default settings) and exact match after normalization; and the
scores of a run's predictions by question family and answer kind."""

from __future__ import annotations

import re
import string
from collections import defaultdict

import sacrebleu

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def yes_no(text: str) -> str | None:
    """The first `yes` or `no` word of the normalized answer, or None (an invalid answer)."""
    return next((word for word in normalize(text).split() if word in ("yes", "no")), None)


def sentence_bleu(prediction: str, reference: str) -> float:
    return sacrebleu.sentence_bleu(prediction, [reference]).score


def score_group(row: dict) -> str:
    """What a question is scored as: its family, with affordance split by answer type."""
    if row["task"] == "affordance":
        discriminative = row.get("answer_type") == "yes_no"
        return "affordance_discriminative" if discriminative else "affordance_generative"
    return row["task"]


def score_answer(answer_type: str, prediction: str, reference: str) -> dict:
    """One answer's score: the yes/no said and whether it is right, or BLEU and exact match."""
    if answer_type == "yes_no":
        said = yes_no(prediction)
        return {"said": said, "correct": said == reference}
    return {"bleu": sentence_bleu(prediction, reference),
            "exact_match": normalize(prediction) == normalize(reference)}  # fmt: skip


def score_predictions(predictions: list[dict]) -> dict:
    """One format's predictions, per score group and macro-averaged: accuracy (yes/no, with
    both controls beside it) or BLEU and exact match."""
    by_condition: dict[str, dict[str, dict]] = defaultdict(dict)
    for p in predictions:
        by_condition[p["condition"]][p["id"]] = p
    groups: dict[str, list[dict]] = defaultdict(list)
    for p in by_condition["frames"].values():
        groups[p["group"]].append(p)
    scores = {}
    for group, items in sorted(groups.items()):
        if items[0]["answer_type"] == "yes_no":
            control = {c: [by_condition[c][p["id"]]["score"]["correct"] for p in items
                           if p["id"] in by_condition[c]]
                       for c in ("blank_frames", "other_clip")}  # fmt: skip
            yes_share = mean_or_none([p["reference"] == "yes" for p in items])
            scores[group] = {
                "n": len(items),
                # what always giving the commoner answer would score: the floor to beat
                "majority_rate": max(yes_share, 1 - yes_share),
                "accuracy": mean_or_none([p["score"]["correct"] for p in items]),
                "invalid_rate": mean_or_none([p["score"]["said"] is None for p in items]),
                "blank_frames_accuracy": mean_or_none(control["blank_frames"]),
                # another clip's frames of the same family: no evidence of this clip's
                "other_clip_accuracy": mean_or_none(control["other_clip"]),
                "other_clip_n": len(control["other_clip"]),
            }
        else:
            scores[group] = {
                "n": len(items),
                "bleu": mean_or_none([p["score"]["bleu"] for p in items]),
                "exact_match": mean_or_none([p["score"]["exact_match"] for p in items]),
            }
    yes_no_groups = [s for s in scores.values() if "accuracy" in s]
    free_groups = [s for s in scores.values() if "bleu" in s]
    macro = {
        "yes_no_accuracy": _group_mean(yes_no_groups, "accuracy"),
        "blank_frames_yes_no_accuracy": _group_mean(yes_no_groups, "blank_frames_accuracy"),
        "other_clip_yes_no_accuracy": _group_mean(yes_no_groups, "other_clip_accuracy"),
        "yes_no_majority_rate": _group_mean(yes_no_groups, "majority_rate"),
        "bleu": _group_mean(free_groups, "bleu"),
        "exact_match": _group_mean(free_groups, "exact_match"),
    }
    return {"groups": scores, "macro": macro}


def _group_mean(groups: list[dict], key: str) -> float | None:
    """The macro average: each group that has the score counts once."""
    return mean_or_none([g[key] for g in groups if g[key] is not None])


def mean_or_none(values: list) -> float | None:
    return sum(values) / len(values) if values else None
