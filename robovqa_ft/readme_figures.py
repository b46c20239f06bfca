"""Check that the demo figures the README quotes are those `make demo` just produced.

The README quotes the demo's report between two markers, line for line; every quoted line
must be a line of the fresh report. `make demo` runs this after the workflow and fails on
a mismatch, naming the lines, so a code change that moves a number cannot leave the
README behind. (`make test` does not run the demo.)
"""

from __future__ import annotations

import sys
from pathlib import Path

BEGIN = "<!-- demo figures: lines of demo/results/ablation/report.md, checked by make demo -->"
END = "<!-- end of demo figures -->"


def quoted_lines(readme: str) -> list[str]:
    """The non-empty lines between the markers."""
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"the README has no demo-figure block ({BEGIN!r} … {END!r})")
    block = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip()]


def stale_lines(readme: str, report: str) -> list[str]:
    """Quoted lines that the report does not hold (table separators need not match)."""
    produced = {line.strip() for line in report.splitlines()}
    return [line for line in quoted_lines(readme)
            if line not in produced and set(line) - set("|-: ")]  # fmt: skip


def main(readme_path: str, report_path: str) -> int:
    stale = stale_lines(Path(readme_path).read_text(), Path(report_path).read_text())
    if stale:
        print(f"{readme_path} quotes demo figures that {report_path} does not hold:")
        print("\n".join(f"  {line}" for line in stale))
        print("Copy the fresh lines from the report into the README's demo-figure block.")
        return 1
    print(f"{readme_path}: every quoted demo figure is in {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
