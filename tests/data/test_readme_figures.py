import pytest

from robovqa_ft.readme_figures import BEGIN, END, main, stale_lines

REPORT = "# Ablation\n\n| group | curriculum |\n|---|---|\n| success | 86.0% |\n"


def readme(*lines: str) -> str:
    return "intro\n" + BEGIN + "\n" + "\n".join(lines) + "\n" + END + "\noutro | 1 |\n"


def test_lines_of_the_report_pass_and_a_changed_figure_is_named(tmp_path):
    assert stale_lines(readme("| group | curriculum |", "|---|---|", "| success | 86.0% |"),
                       REPORT) == []  # fmt: skip
    assert stale_lines(readme("| success | 90.0% |"), REPORT) == ["| success | 90.0% |"]
    (tmp_path / "README.md").write_text(readme("| success | 90.0% |"))
    (tmp_path / "report.md").write_text(REPORT)
    assert main(str(tmp_path / "README.md"), str(tmp_path / "report.md")) == 1
    (tmp_path / "README.md").write_text(readme("| success | 86.0% |", "|:-|-:|"))
    assert main(str(tmp_path / "README.md"), str(tmp_path / "report.md")) == 0


def test_a_readme_without_the_block_is_an_error():
    with pytest.raises(ValueError, match="no demo-figure block"):
        stale_lines("just text", REPORT)


def test_the_readme_quotes_the_demo_report_in_a_checked_block():
    from pathlib import Path

    from robovqa_ft.readme_figures import quoted_lines

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    lines = quoted_lines(readme)
    assert len(lines) >= 8 and any("yes/no accuracy (macro)" in line for line in lines)
