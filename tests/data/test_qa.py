"""robovqa_ft.data.qa: the RoboVQA text grammar, parsed from literal record texts."""

from collections import Counter

import pytest

from robovqa_ft.data.qa import QA, TASK_FAMILIES, parse_qa_text

# The abridged literal record of ROBOVQA.md, byte for byte.
ABRIDGED_RECORD = (
    "<task:affordance:discriminative:discrete:True>\n"
    "put packet on the table Q: possible right now? <PRED>A: "
    "<PRED:ANSWER><PRED:DISCRETE><PRED:BINARY>yes</PRED:BINARY></PRED:DISCRETE></PRED:ANSWER>\n"
    "</PRED><task:future_prediction:freeform>\n"
    "Q: what is likely to happen next? <PRED>A: put packet on the table\n"
    "</PRED><task:success:discrete:False>\n"
    "put packet on the table Q: satisfied? <PRED>A: "
    "<PRED:ANSWER><PRED:DISCRETE><PRED:BINARY>no</PRED:BINARY></PRED:DISCRETE></PRED:ANSWER>\n"
    "</PRED><task:planning:freeform>\n"
    "current goal is: please place all the chips on the counter and close the top drawer "
    "Q: immediate next step? <PRED>A: put packet on the table\n"
    "</PRED>\n"
)

# One literal block per tag of the ROBOVQA.md table:
# (tag, family, block text, context, question, answer).
TEN_TAG_BLOCKS = [
    (
        "planning:freeform",
        "planning",
        "<task:planning:freeform>\n"
        "current goal is: tidy the desk Q: immediate next step? <PRED>A: pick up the pen\n"
        "</PRED>",
        "current goal is: tidy the desk",
        "immediate next step?",
        "pick up the pen",
    ),
    (
        "immediate_planning_with_context20:freeform",
        "planning",
        "<task:immediate_planning_with_context20:freeform>\n"
        "current goal is: tidy the desk. last 20 steps: 1- pick up the pen "
        "2- put the pen in the cup Q: immediate next step? <PRED>A: close the drawer\n"
        "</PRED>",
        "current goal is: tidy the desk. last 20 steps: 1- pick up the pen "
        "2- put the pen in the cup",
        "immediate next step?",
        "close the drawer",
    ),
    (
        "remaining5_planning_with_context20:freeform",
        "planning",
        "<task:remaining5_planning_with_context20:freeform>\n"
        "current goal is: tidy the desk. last 20 steps: 1- pick up the pen "
        "Q: next 5 steps? <PRED>A: 1- close the drawer 2- push the chair in 3- done\n"
        "</PRED>",
        "current goal is: tidy the desk. last 20 steps: 1- pick up the pen",
        "next 5 steps?",
        "1- close the drawer 2- push the chair in 3- done",
    ),
    (
        "success:discrete:True",
        "success",
        "<task:success:discrete:True>\n"
        "put the pen in the cup Q: satisfied? <PRED>A: "
        "<PRED:ANSWER><PRED:DISCRETE><PRED:BINARY>yes</PRED:BINARY></PRED:DISCRETE></PRED:ANSWER>\n"
        "</PRED>",
        "put the pen in the cup",
        "satisfied?",
        "yes",
    ),
    (
        "success:discrete:False",
        "success",
        "<task:success:discrete:False>\n"
        "close the drawer Q: satisfied? <PRED>A: "
        "<PRED:ANSWER><PRED:DISCRETE><PRED:BINARY>no</PRED:BINARY></PRED:DISCRETE></PRED:ANSWER>\n"
        "</PRED>",
        "close the drawer",
        "satisfied?",
        "no",
    ),
    (
        "affordance:discriminative:discrete:True",
        "affordance",
        "<task:affordance:discriminative:discrete:True>\n"
        "open the drawer Q: possible right now? <PRED>A: "
        "<PRED:ANSWER><PRED:DISCRETE><PRED:BINARY>yes</PRED:BINARY></PRED:DISCRETE></PRED:ANSWER>\n"
        "</PRED>",
        "open the drawer",
        "possible right now?",
        "yes",
    ),
    (
        "affordance:discriminative:discrete:False",
        "affordance",
        "<task:affordance:discriminative:discrete:False>\n"
        "pick up the chair Q: possible right now? <PRED>A: "
        "<PRED:ANSWER><PRED:DISCRETE><PRED:BINARY>no</PRED:BINARY></PRED:DISCRETE></PRED:ANSWER>\n"
        "</PRED>",
        "pick up the chair",
        "possible right now?",
        "no",
    ),
    (
        "affordance:generative:positive:freeform",
        "affordance",
        "<task:affordance:generative:positive:freeform>\n"
        "Q: what action is possible right now? <PRED>A: open the drawer\n"
        "</PRED>",
        "",
        "what action is possible right now?",
        "open the drawer",
    ),
    (
        "future_prediction:freeform",
        "future_prediction",
        "<task:future_prediction:freeform>\n"
        "Q: what is likely to happen next? <PRED>A: put the pen in the cup\n"
        "</PRED>",
        "",
        "what is likely to happen next?",
        "put the pen in the cup",
    ),
    (
        "past_description:freeform",
        "past_description",
        "<task:past_description:freeform>\n"
        "Q: what just happened? <PRED>A: pick up the pen\n</PRED>",
        "",
        "what just happened?",
        "pick up the pen",
    ),
]
ALL_TEN_TAGS_RECORD = "".join(block for _, _, block, *_ in TEN_TAG_BLOCKS)

GOOD_PAST = (
    "<task:past_description:freeform>\nQ: what just happened? <PRED>A: pick up the pen\n</PRED>"
)
GOOD_FUTURE = (
    "<task:future_prediction:freeform>\n"
    "Q: what is likely to happen next? <PRED>A: open the drawer\n"
    "</PRED>"
)


def test_task_families_are_exactly_the_ten_tags_of_the_table():
    assert TASK_FAMILIES == {
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


def test_abridged_record_parses_to_its_four_qas():
    parsed = parse_qa_text(ABRIDGED_RECORD)

    assert parsed.qas == [
        QA(
            tag="affordance:discriminative:discrete:True",
            family="affordance",
            context="put packet on the table",
            question="possible right now?",
            answer="yes",
        ),
        QA(
            tag="future_prediction:freeform",
            family="future_prediction",
            context="",
            question="what is likely to happen next?",
            answer="put packet on the table",
        ),
        QA(
            tag="success:discrete:False",
            family="success",
            context="put packet on the table",
            question="satisfied?",
            answer="no",
        ),
        QA(
            tag="planning:freeform",
            family="planning",
            context="current goal is: please place all the chips on the counter "
            "and close the top drawer",
            question="immediate next step?",
            answer="put packet on the table",
        ),
    ]
    assert not parsed.skipped


@pytest.mark.parametrize(
    ("tag", "family", "block", "context", "question", "answer"),
    TEN_TAG_BLOCKS,
    ids=[row[0] for row in TEN_TAG_BLOCKS],
)
def test_each_tag_parses_to_its_family_and_answer(tag, family, block, context, question, answer):
    parsed = parse_qa_text(block)

    assert parsed.qas == [
        QA(tag=tag, family=family, context=context, question=question, answer=answer)
    ]
    assert not parsed.skipped


def test_record_with_all_ten_tags_keeps_every_block_in_order():
    parsed = parse_qa_text(ALL_TEN_TAGS_RECORD)

    assert [(qa.tag, qa.family, qa.answer) for qa in parsed.qas] == [
        (tag, family, answer) for tag, family, _, _, _, answer in TEN_TAG_BLOCKS
    ]
    assert not parsed.skipped


@pytest.mark.parametrize(
    ("block", "expected"),
    [(row[2], row[5]) for row in TEN_TAG_BLOCKS if ":discrete:" in row[0]],
)
def test_yes_no_answer_is_unwrapped_to_the_bare_word(block, expected):
    (qa,) = parse_qa_text(block).qas

    assert qa.answer == expected
    assert "<" not in qa.answer
    assert "PRED" not in qa.answer


def test_capitalised_or_padded_yes_no_is_read_as_lowercase():
    text = (
        "<task:success:discrete:True>\nput cup Q: satisfied? <PRED>A: <PRED:ANSWER><PRED:DISCRETE>"
        "<PRED:BINARY> Yes </PRED:BINARY></PRED:DISCRETE></PRED:ANSWER>\n</PRED>"
    )

    (qa,) = parse_qa_text(text).qas
    assert qa.answer == "yes"


def test_answers_never_keep_their_a_prefix():
    for qa in parse_qa_text(ALL_TEN_TAGS_RECORD).qas:
        assert not qa.answer.startswith(("A:", "A :")), qa
        assert qa.answer == qa.answer.strip()


def test_colons_lowercase_a_q_and_non_ascii_survive_in_context_and_answer():
    text = (
        "<task:planning:freeform>\n"
        "current goal is: put the Cup on shelf a: top q: then the café Q: immediate next step? "
        "<PRED>A: put the crème on shelf a: top, then カップを棚に置いて\n"
        "</PRED>"
        "<task:success:discrete:True>\n"
        "put the cup on shelf a: top Q: satisfied? <PRED>A: "
        "<PRED:ANSWER><PRED:DISCRETE><PRED:BINARY>yes</PRED:BINARY></PRED:DISCRETE></PRED:ANSWER>\n"
        "</PRED>"
    )

    parsed = parse_qa_text(text)

    planning, success = parsed.qas
    assert planning.context == "current goal is: put the Cup on shelf a: top q: then the café"
    assert planning.question == "immediate next step?"
    assert planning.answer == "put the crème on shelf a: top, then カップを棚に置いて"
    assert success.context == "put the cup on shelf a: top"
    assert success.answer == "yes"
    assert not parsed.skipped


def test_uppercase_a_colon_inside_a_free_form_answer_is_kept():
    text = (
        "<task:future_prediction:freeform>\n"
        "Q: what is likely to happen next? <PRED>A: put the cup on shelf A: top\n"
        "</PRED>"
    )

    (qa,) = parse_qa_text(text).qas

    assert qa.answer == "put the cup on shelf A: top"


def test_same_tag_twice_in_one_clip_gives_two_qas_in_order():
    text = (
        "<task:planning:freeform>\n"
        "current goal is: tidy the desk Q: immediate next step? <PRED>A: pick up the pen\n"
        "</PRED>"
        "<task:planning:freeform>\n"
        "current goal is: tidy the desk Q: immediate next step? <PRED>A: close the drawer\n"
        "</PRED>"
    )

    parsed = parse_qa_text(text)

    assert [(qa.tag, qa.answer) for qa in parsed.qas] == [
        ("planning:freeform", "pick up the pen"),
        ("planning:freeform", "close the drawer"),
    ]
    assert not parsed.skipped


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(
            "<task:success:discrete:True>\nput the pen in the cup Q: satisfied? "
            "<PRED:ANSWER><PRED:DISCRETE><PRED:BINARY>yes</PRED:BINARY>"
            "</PRED:DISCRETE></PRED:ANSWER>\n</PRED>",
            id="missing_pred_a",
        ),
        pytest.param(
            "<task:planning:freeform>\ncurrent goal is: tidy the desk immediate next step? "
            "<PRED>A: close the drawer\n</PRED>",
            id="missing_q",
        ),
        pytest.param(
            "<task:planning:freeform>\ncurrent goal is: tidy the desk Q: immediate next step? "
            "<PRED>A: close the drawer\n",
            id="missing_closing_pred",
        ),
        pytest.param(
            "<task:planning:freeform>\ncurrent goal is: tidy the desk Q: immediate next step? "
            "<PRED>A: close the drawer <PRED>A: push the chair in\n</PRED>",
            id="two_answers",
        ),
        pytest.param(
            "<task:planning:freeform>\ncurrent goal is: tidy the desk Q: immediate next step? "
            "<PRED>A: \n</PRED>",
            id="empty_answer",
        ),
        pytest.param(
            "<task:past_description:freeform>\nQ: <PRED>A: pick up the pen\n</PRED>",
            id="empty_question",
        ),
        pytest.param(
            "<task:success:discrete:True>\nput the pen in the cup Q: satisfied? "
            "<PRED>A: yes\n</PRED>",
            id="unwrapped_answer_on_discrete_tag",
        ),
        pytest.param(
            "<task:future_prediction:freeform>\nQ: what is likely to happen next? <PRED>A: "
            "<PRED:ANSWER><PRED:DISCRETE><PRED:BINARY>yes</PRED:BINARY>"
            "</PRED:DISCRETE></PRED:ANSWER>\n</PRED>",
            id="wrapped_answer_on_freeform_tag",
        ),
    ],
)
def test_malformed_block_is_skipped_and_its_neighbours_are_kept(broken):
    parsed = parse_qa_text(GOOD_FUTURE + broken + GOOD_PAST)

    assert [(qa.tag, qa.answer) for qa in parsed.qas] == [
        ("future_prediction:freeform", "open the drawer"),
        ("past_description:freeform", "pick up the pen"),
    ]
    assert parsed.skipped == Counter({"malformed_qa_block": 1})


def test_block_missing_its_closing_pred_does_not_swallow_the_next_block():
    text = (
        "<task:future_prediction:freeform>\n"
        "Q: what is likely to happen next? <PRED>A: open the drawer\n"
        "<task:past_description:freeform>\nQ: what just happened? <PRED>A: pick up the pen\n"
        "</PRED>"
    )

    parsed = parse_qa_text(text)

    assert parsed.qas == [
        QA(
            tag="past_description:freeform",
            family="past_description",
            context="",
            question="what just happened?",
            answer="pick up the pen",
        )
    ]
    assert parsed.skipped == Counter({"malformed_qa_block": 1})


def test_text_before_the_first_block_is_counted_as_malformed():
    parsed = parse_qa_text("stray words " + GOOD_PAST)

    assert [qa.answer for qa in parsed.qas] == ["pick up the pen"]
    assert parsed.skipped == Counter({"malformed_qa_block": 1})


def test_unknown_tag_is_counted_and_the_rest_kept():
    text = (
        "<task:counting:freeform>\nQ: how many cups? <PRED>A: two\n</PRED>"
        + GOOD_PAST
        + GOOD_FUTURE
    )

    parsed = parse_qa_text(text)

    assert [qa.tag for qa in parsed.qas] == [
        "past_description:freeform",
        "future_prediction:freeform",
    ]
    assert parsed.skipped == Counter({"unknown_task_tag": 1})


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(
            "<task:success:discrete:True>\nput the pen in the cup Q: satisfied? <PRED>A: "
            "<PRED:ANSWER><PRED:DISCRETE><PRED:BINARY>no</PRED:BINARY>"
            "</PRED:DISCRETE></PRED:ANSWER>\n</PRED>",
            id="success_true_answered_no",
        ),
        pytest.param(
            "<task:affordance:discriminative:discrete:False>\nopen the drawer "
            "Q: possible right now? <PRED>A: "
            "<PRED:ANSWER><PRED:DISCRETE><PRED:BINARY>yes</PRED:BINARY>"
            "</PRED:DISCRETE></PRED:ANSWER>\n</PRED>",
            id="affordance_false_answered_yes",
        ),
    ],
)
def test_tag_contradicting_its_binary_answer_is_counted_as_mismatch(block):
    parsed = parse_qa_text(block + GOOD_PAST)

    assert [qa.tag for qa in parsed.qas] == ["past_description:freeform"]
    assert parsed.skipped == Counter({"tag_answer_mismatch": 1})


def test_no_prompt_of_a_ten_tag_record_leaks_its_tag_or_label():
    qas = parse_qa_text(ALL_TEN_TAGS_RECORD).qas
    assert len(qas) == 10

    for qa in qas:
        prompt = qa.prompt
        assert "<" not in prompt, prompt
        assert "task:" not in prompt, prompt
        assert "PRED" not in prompt, prompt
        assert "True" not in prompt, prompt
        assert "False" not in prompt, prompt
        assert qa.tag not in prompt, prompt


def test_success_tag_label_never_reaches_prompt():
    qas = parse_qa_text(ABRIDGED_RECORD).qas

    for qa in qas:
        assert qa.tag.rsplit(":", 1)[-1] not in qa.prompt


def test_prompt_is_context_then_q_then_question():
    with_context = QA(
        tag="success:discrete:True",
        family="success",
        context="put cup",
        question="satisfied?",
        answer="yes",
    )
    without_context = QA(
        tag="past_description:freeform",
        family="past_description",
        context="",
        question="what just happened?",
        answer="pick up the pen",
    )

    assert with_context.prompt == "put cup Q: satisfied?"
    assert without_context.prompt == "Q: what just happened?"


def test_prompts_of_parsed_record_follow_the_format():
    for qa in parse_qa_text(ALL_TEN_TAGS_RECORD).qas:
        expected = f"{qa.context} Q: {qa.question}" if qa.context else f"Q: {qa.question}"
        assert qa.prompt == expected


def test_whitespace_in_context_and_question_is_collapsed():
    text = (
        "<task:success:discrete:True>\n"
        "  put  the\ncup \t  away\n Q:   satisfied?  \n<PRED>A: "
        "<PRED:ANSWER><PRED:DISCRETE><PRED:BINARY>yes</PRED:BINARY></PRED:DISCRETE></PRED:ANSWER>\n"
        "</PRED>"
    )

    (qa,) = parse_qa_text(text).qas

    assert qa.context == "put the cup away"
    assert qa.question == "satisfied?"
    assert qa.prompt == "put the cup away Q: satisfied?"


def test_whitespace_in_free_form_answer_is_collapsed():
    text = (
        "<task:past_description:freeform>\n"
        "Q: what just happened? <PRED>A:   pick  up\nthe   pen  \n</PRED>"
    )

    (qa,) = parse_qa_text(text).qas

    assert qa.answer == "pick up the pen"


def test_turns_written_on_lines_of_their_own_keep_no_line_break():
    # A chat turn opening with a line break would merge with the template's "\n" after
    # "assistant" into one BPE token, and the sample builder would find no answer there.
    text = (
        "<task:past_description:freeform>\n\n\nput the cup\naway\nQ:\n\n what just happened?\n"
        "<PRED>A:\n\n pick up\n\nthe pen\n\n</PRED>"
    )

    (qa,) = parse_qa_text(text).qas

    assert qa.answer == "pick up the pen"
    assert qa.prompt == "put the cup away Q: what just happened?"
    for parsed in parse_qa_text(ALL_TEN_TAGS_RECORD).qas:
        for value in (parsed.prompt, parsed.answer):
            assert "\n" not in value and value == value.strip(), parsed


@pytest.mark.parametrize("text", ["", "\n", "   \n\t"])
def test_empty_text_gives_no_qas_and_no_skips(text):
    parsed = parse_qa_text(text)

    assert parsed.qas == []
    assert not parsed.skipped
