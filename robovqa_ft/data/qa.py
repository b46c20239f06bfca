"""Parse a RoboVQA clip text into clean question/answer pairs.

This is the only place that reads the raw grammar; everything downstream sees
`QA` objects whose prompt never carries the task tag (which leaks the label).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise

# tag -> task family. The trailing True/False of two tags is the answer itself.
TASK_FAMILIES: dict[str, str] = {
    "planning:freeform": "planning",
    "immediate_planning_with_context20:freeform": "planning",
    "remaining5_planning_with_context20:freeform": "planning",
    "success:discrete:True": "success",
    "success:discrete:False": "success",
    "affordance:discriminative:discrete:True": "affordance",
    "affordance:discriminative:discrete:False": "affordance",
    "affordance:generative:positive:freeform": "affordance",
    "future_prediction:freeform": "future_prediction",
    "past_description:freeform": "past_description",
}
FAMILIES: tuple[str, ...] = (
    "planning",
    "success",
    "affordance",
    "future_prediction",
    "past_description",
)

_TASK_START = re.compile(r"<task:")
_BLOCK = re.compile(r"<task:([^>\n]*)>\n?(.*)</PRED>\s*", re.DOTALL)
# Case-sensitive on purpose: instructions contain "a:" and "q:" in lower case.
_ANSWER_START = "<PRED>A:"
_QUESTION_START = "Q:"
# How the data wraps a yes/no answer; `{}` is the answer.
BINARY_ANSWER = (
    "<PRED:ANSWER><PRED:DISCRETE><PRED:BINARY>{}</PRED:BINARY></PRED:DISCRETE></PRED:ANSWER>"
)
_BINARY = re.compile(
    r"\s*(yes|no)\s*".join(map(re.escape, BINARY_ANSWER.split("{}"))), re.IGNORECASE
)
_ANY_TAG = re.compile(r"</?(?:PRED|task)[^>]*>")
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class QA:
    tag: str
    family: str
    context: str
    question: str
    answer: str

    @property
    def prompt(self) -> str:
        """The human turn: context and question, no tag."""
        return f"{self.context} Q: {self.question}" if self.context else f"Q: {self.question}"


@dataclass
class ParsedText:
    qas: list[QA] = field(default_factory=list)
    # reason -> number of blocks (or stray fragments) dropped
    skipped: Counter = field(default_factory=Counter)


def answer_type(tag: str) -> str:
    """`yes_no` for the two discrete tags (whose suffix is the answer), else `freeform`."""
    return "yes_no" if tag.endswith((":True", ":False")) else "freeform"


def _collapse(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def _parse_block(tag: str, body: str) -> QA | str:
    """One block's QA, or the reason it is skipped."""
    family = TASK_FAMILIES.get(tag)
    if family is None:
        return "unknown_task_tag"
    if body.count(_ANSWER_START) != 1:
        return "malformed_qa_block"
    prompt, answer = body.split(_ANSWER_START)
    # The question is a short fixed phrase, so the last "Q:" starts it even if
    # the free-text context happens to contain one.
    head, sep, question = prompt.rpartition(_QUESTION_START)
    if not sep:
        return "malformed_qa_block"
    context, question = _collapse(head), _collapse(question)
    binary = _BINARY.fullmatch(answer.strip())
    answer = binary.group(1).lower() if binary else _collapse(answer)
    if not question or not answer or _ANY_TAG.search(context + question + answer):
        return "malformed_qa_block"
    if answer_type(tag) == "yes_no":
        if not binary:
            return "malformed_qa_block"
        if (answer == "yes") != tag.endswith(":True"):
            return "tag_answer_mismatch"
    elif binary:
        return "malformed_qa_block"
    return QA(tag=tag, family=family, context=context, question=question, answer=answer)


def parse_qa_text(text: str) -> ParsedText:
    """All well-formed QA blocks of one clip text, in order, and why others were dropped."""
    parsed = ParsedText()
    # Cut at every "<task:" so that one broken block cannot swallow the next.
    starts = [m.start() for m in _TASK_START.finditer(text)]
    if text[: starts[0] if starts else len(text)].strip():
        parsed.skipped["malformed_qa_block"] += 1
    for start, end in pairwise([*starts, len(text)]):
        block = _BLOCK.fullmatch(text, start, end)
        if block is None:
            parsed.skipped["malformed_qa_block"] += 1
            continue
        result = _parse_block(block.group(1).strip(), block.group(2))
        if isinstance(result, QA):
            parsed.qas.append(result)
        else:
            parsed.skipped[result] += 1
    return parsed
