from pathlib import Path

import pytest

from robovqa_ft.tools import readme_figures
from robovqa_ft.tools.readme_figures import (
    BEGIN,
    END,
    ROBUST,
    Machine,
    check,
    main,
    parse_machine,
    quoted_lines,
    recorded_machine,
    stale_lines,
    table_rows,
)

HEADER = (
    "| metric | format | trained on | curriculum | stage-2-only | "
    "Δ (stage-2-only − curriculum) [95%] | McNemar p | rests on | noise? |\n"
    "|---|---|---|---|---|---|---|---|---|\n"
)
CONTROLS = (
    "| run | format | frames | blank frames | Δ frames − blank [95%] | other clip | "
    "Δ frames − other clip [95%] | majority floor |\n"
    "|---|---|---|---|---|---|---|---|\n"
)
NOISE = "not distinguishable from noise"
STAGE2_ONLY = (
    f"| stage2_only | stage2 | 54.0% | 54.0% | +0.0 pts [+0.0, +0.0] ({NOISE}) | 54.0% | "
    f"+0.0 pts [+0.0, +0.0] ({NOISE}) | 54.0% |\n"
    f"| stage2_only | stage1 | 54.0% | 54.0% | +0.0 pts [+0.0, +0.0] ({NOISE}) | 54.0% | "
    f"+0.0 pts [+0.0, +0.0] ({NOISE}) | 54.0% |\n"
)
# The demo's block as make demo wrote it on an AMD EPYC with AVX-512 kernels (the README's
# record of 2026-12-06) ...
FIGURES_A = (
    HEADER
    + "| val loss (stage2_val) | stage2 | both | 4.973 | 5.192 | +0.219 nats [+0.206, +0.230] "
    "(+4% loss) | – | 915 tokens, 50 clips |  |\n"
    "| yes/no accuracy (macro) | stage2 | both | 66.0% | 54.0% | -12.0 pts [-24.0, +0.0] | 0.111 "
    f"| 100 questions, 50 clips | {NOISE} |\n"
    "| val loss (stage1_val) | stage1 | curriculum only | 4.953 | 5.193 | +0.240 nats "
    "[+0.226, +0.250] (+5% loss) | – | 915 tokens, 50 clips |  |\n"
    "| yes/no accuracy (macro) | stage1 | curriculum only | 89.0% | 54.0% | -35.0 pts "
    "[-46.0, -24.0] | 2.84e-09 | 100 questions, 50 clips |  |\n\n"
    + CONTROLS
    + "| curriculum | stage2 | 66.0% | 48.0% | +18.0 pts [+8.0, +28.0] | 48.0% | +18.0 pts "
    "[+9.0, +27.0] | 54.0% |\n"
    "| curriculum | stage1 | 89.0% | 46.0% | +43.0 pts [+31.0, +55.0] | 46.0% | +43.0 pts "
    "[+32.0, +54.0] | 54.0% |\n" + STAGE2_ONLY + "\n"
    "Achieved 95% half-width of the macro yes/no accuracy Δ, stage2 format: ±12.0 pts on 100 "
    "questions of 50 clips; 48% of them discordant, at which ±5 pts would take about 738 "
    "questions.\n"
)
# ... and on the same EPYC with ATEN_CPU_CAPABILITY=avx2 (an AVX2 machine's kernels), the
# same day: every figure moved, the stage-1 Δ by 11 pts, the robust conclusions held.
FIGURES_B = (
    HEADER + "| val loss (stage2_val) | stage2 | both | 4.959 | 5.192 | +0.234 nats [+0.219, "
    "+0.246] (+5% loss) | – | 915 tokens, 50 clips |  |\n"
    "| yes/no accuracy (macro) | stage2 | both | 65.0% | 54.0% | -11.0 pts [-26.0, +4.0] "
    f"| 0.215 | 100 questions, 50 clips | {NOISE} |\n"
    "| val loss (stage1_val) | stage1 | curriculum only | 4.931 | 5.193 | +0.261 nats "
    "[+0.251, +0.270] (+5% loss) | – | 915 tokens, 50 clips |  |\n"
    "| yes/no accuracy (macro) | stage1 | curriculum only | 100.0% | 54.0% | -46.0 pts "
    "[-56.0, -36.0] | 2.84e-14 | 100 questions, 50 clips |  |\n"
    "\n"
    + CONTROLS
    + "| curriculum | stage2 | 65.0% | 40.0% | +25.0 pts [+15.0, +35.0] | 42.0% | +23.0 pts "
    "[+14.0, +32.0] | 54.0% |\n"
    "| curriculum | stage1 | 100.0% | 46.0% | +54.0 pts [+44.0, +64.0] | 44.0% | +56.0 "
    "pts [+46.0, +66.0] | 54.0% |\n" + STAGE2_ONLY + "\n"
    "Achieved 95% half-width of the macro yes/no accuracy Δ, stage2 format: ±15.0 pts on "
    "100 questions of 50 clips; 65% of them discordant, at which ±5 pts would take about "
    "999 questions.\n"
)
SAME_DAY = dict(torch="2.14.1+cu130", date="2026-12-06")
EPYC = "AMD EPYC (x86_64, family 25 model 17, simd flags 3f45a4f5)"
MACHINE_A = Machine(EPYC, "AVX512", 2, **SAME_DAY)
MACHINE_B = Machine(EPYC, "AVX2", 2, **SAME_DAY)


def readme(machine: Machine, figures: str) -> str:
    return f"intro\n{BEGIN}\n\n{machine.line()}\n\n{figures}\n{END}\noutro | 1 |\n"


def report(figures: str) -> str:
    """A report holding the figures among other sections, as make demo writes it."""
    per_group = "| group | x |\n|---|---|\n| a | 1 |\n"
    return f"# Ablation\n\n## Headline\n\n{figures}\nPer group:\n\n{per_group}"


def test_a_figure_moved_on_the_machine_of_record_fails_and_is_named():
    recorded = readme(MACHINE_A, FIGURES_A)
    same_machine_later = Machine(**{**MACHINE_A.__dict__, "date": "2027-01-05"})
    ok, text = check(recorded, report(FIGURES_A), same_machine_later)
    assert ok and "(the machine of record)" in text
    moved = FIGURES_A.replace("| curriculum | stage1 | 89.0% |", "| curriculum | stage1 | 90.0% |")
    ok, text = check(recorded, report(moved), same_machine_later)
    assert not ok
    assert "| curriculum | stage1 | 89.0% | 46.0% | +43.0 pts" in text
    assert "val loss" not in text  # only the moved line is named


def test_a_moved_figure_that_keeps_every_conclusion_still_fails_on_the_machine_of_record():
    # A 1-pt move keeps every robust conclusion: the exact check must still catch it.
    moved = FIGURES_A.replace("4.973", "4.974")
    assert check(readme(MACHINE_A, FIGURES_A), report(moved), MACHINE_A)[0] is False


def test_another_machines_figures_with_the_same_conclusions_pass_side_by_side():
    ok, text = check(readme(MACHINE_A, FIGURES_A), report(FIGURES_B), MACHINE_B)
    assert ok, text
    assert MACHINE_A.line() in text and MACHINE_B.line() in text
    assert "DIFFERS" not in text
    assert text.count("same ") == len(ROBUST)
    # each differing figure README | here | here − README, in the cell's unit
    assert "yes/no accuracy (macro), stage2 · curriculum: 66.0% | 65.0% | -1.0 pts" in text
    assert (
        "curriculum, stage1 · Δ frames − blank [95%]: +43.0 pts [+31.0, +55.0] | +54.0 "
        "pts [+44.0, +64.0] | +11.0 pts" in text
    )
    assert "val loss (stage1_val), stage1 · curriculum: 4.953 | 4.931 | -0.022" in text
    assert "2.84e-09 | 2.84e-14\n" in text  # p values side by side, no difference
    assert (
        "here: Achieved 95% half-width of the macro yes/no accuracy Δ, stage2 format: ±15.0" in text
    )


@pytest.mark.parametrize(
    ("row", "changed"),
    [
        # the curriculum no better than blank frames: the model ignores the pixels
        ("| curriculum | stage2 | 66.0% | 48.0% | +18.0 pts [+8.0, +28.0] |",
         f"| curriculum | stage2 | 66.0% | 60.0% | +6.0 pts [-4.0, +16.0] ({NOISE}) |"),
        # the curriculum's loss no lower than stage-2-only's
        ("+0.240 nats [+0.226, +0.250] (+5% loss) | – | 915 tokens, 50 clips |  |",
         f"+0.004 nats [-0.010, +0.018] (+0% loss) | – | 915 tokens, 50 clips | {NOISE} |"),
        # stage-2-only learned to look at the frames
        ("| stage2_only | stage1 | 54.0% | 54.0% | +0.0 pts [+0.0, +0.0] (not distinguishable "
         "from noise) |", "| stage2_only | stage1 | 70.0% | 54.0% | +16.0 pts [+6.0, +26.0] |"),
    ],
)  # fmt: skip
def test_another_machine_where_a_robust_conclusion_differs_fails(row, changed):
    assert row in FIGURES_A
    ok, text = check(readme(MACHINE_B, FIGURES_A), report(FIGURES_A.replace(row, changed)),
                     MACHINE_A)  # fmt: skip
    assert not ok
    assert text.count("DIFFERS") == 1


def test_a_robust_row_missing_from_another_machines_report_fails():
    without = FIGURES_A.replace(STAGE2_ONLY, "")
    ok, text = check(readme(MACHINE_B, FIGURES_A), report(without), MACHINE_A)
    assert not ok and "(no such row)" in text


def test_the_borderline_stage2_yes_no_conclusion_may_flip_on_another_machine():
    # the AVX-512 machine of the issue (20): 72%, -18.0 pts [-31.0, -5.0], p 0.0198
    row = f"| 66.0% | 54.0% | -12.0 pts [-24.0, +0.0] | 0.111 | 100 questions, 50 clips | {NOISE} |"
    flipped = FIGURES_A.replace(row, "| 72.0% | 54.0% | -18.0 pts [-31.0, -5.0] | 0.0198 | "
                                     "100 questions, 50 clips |  |")  # fmt: skip
    assert flipped != FIGURES_A
    ok, text = check(readme(MACHINE_A, FIGURES_A), report(flipped), MACHINE_B)
    assert ok, text
    assert "-12.0 pts [-24.0, +0.0] | -18.0 pts [-31.0, -5.0] | -6.0 pts" in text
    assert "0.111 | 0.0198" in text


def test_the_machine_record_reads_back_and_its_date_does_not_make_another_machine():
    assert parse_machine(MACHINE_A.line()) == MACHINE_A
    assert recorded_machine(readme(MACHINE_A, FIGURES_A)) == MACHINE_A
    assert MACHINE_A.same_setup(Machine(**{**MACHINE_A.__dict__, "date": "2030-01-01"}))
    for field, value in [("processor", "AMD EPYC"), ("kernels", "AVX2"), ("threads", 1),
                         ("torch", "2.15.0")]:  # fmt: skip
        assert not MACHINE_A.same_setup(Machine(**{**MACHINE_A.__dict__, field: value}))


def test_the_record_line_is_not_a_quoted_figure():
    lines = quoted_lines(readme(MACHINE_A, FIGURES_A))
    assert not any(line.startswith("Machine of record") for line in lines)
    assert stale_lines(readme(MACHINE_A, FIGURES_A), report(FIGURES_A)) == []


def test_tables_are_read_by_their_header_and_first_two_cells():
    rows = table_rows(report(FIGURES_A).splitlines())
    key = (CONTROLS.splitlines()[0].strip("| "), "curriculum", "stage2")
    assert rows[key]["Δ frames − blank [95%]"] == "+18.0 pts [+8.0, +28.0]"
    assert len(rows) == 9  # 4 headline rows, 4 control rows, the per-group one


def test_a_readme_without_the_block_or_the_record_is_an_error():
    with pytest.raises(ValueError, match="no demo-figure block"):
        stale_lines("just text", report(FIGURES_A))
    with pytest.raises(ValueError, match="no 'Machine of record:' line"):
        recorded_machine(f"{BEGIN}\n{FIGURES_A}\n{END}")


def test_make_demos_command_exits_non_zero_only_when_the_check_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(readme_figures, "this_machine", lambda threads: MACHINE_B)
    (tmp_path / "README.md").write_text(readme(MACHINE_A, FIGURES_A))
    (tmp_path / "report.md").write_text(report(FIGURES_B))
    args = [str(tmp_path / "README.md"), str(tmp_path / "report.md"), "--threads", "2"]
    assert main(args) == 0
    assert MACHINE_B.line() in capsys.readouterr().out  # ready to paste when re-recording
    (tmp_path / "README.md").write_text(readme(MACHINE_B, FIGURES_A))  # recorded here
    assert main(args) == 1


def test_the_readme_records_its_machine_and_quotes_every_robust_row():
    text = (Path(__file__).parents[2] / "README.md").read_text()
    recorded_machine(text)  # raises if the record is missing or malformed
    rows = table_rows(quoted_lines(text))
    quoted = {(key[1:], column) for key, row in rows.items() for column in row}
    assert set(ROBUST) <= quoted


def test_each_demos_block_is_checked_against_its_own_folders_report(tmp_path, monkeypatch):
    """`make demo-qwen3-vl`'s block (`--demo demo_qwen3_vl`) sits beside make demo's."""
    monkeypatch.setattr(readme_figures, "this_machine", lambda threads: MACHINE_A)
    qwen = readme(MACHINE_A, FIGURES_B).replace(
        BEGIN, "<!-- demo figures: lines of demo_qwen3_vl/results/ablation/report.md, "
        "checked by make demo-qwen3-vl -->"
    )  # fmt: skip
    (tmp_path / "README.md").write_text(readme(MACHINE_A, FIGURES_A) + qwen)
    source = "demo_qwen3_vl/results/ablation/report.md"
    assert quoted_lines(qwen, source) != quoted_lines(readme(MACHINE_A, FIGURES_A))
    args = [str(tmp_path / "README.md"), str(tmp_path / "report.md"), "--threads", "2"]
    for figures, demo, said in [
        (FIGURES_A, "demo", 0),
        (FIGURES_B, "demo_qwen3_vl", 0),
        (FIGURES_A, "demo_qwen3_vl", 1),
        (FIGURES_B, "demo", 1),
    ]:
        (tmp_path / "report.md").write_text(report(figures))
        assert main([*args, "--demo", demo]) == said, (demo, said)
