"""Answers about clips the workflow never saw, from a trained run (its adapter or merged model).

    robovqa-ask RUN_DIR (--frames DIR | --video FILE | --tfrecord SHARD [--clip ID])
        --question "put the cup in the bin Q: satisfied?"
    robovqa-ask RUN_DIR [--tfrecord SHARD] --questions pairs.jsonl --out answers.jsonl

The command line; robovqa_ft.tools.answering does the work (how a clip becomes frames, the prompt,
the generation).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from robovqa_ft.core.devices import allocated_gpus

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="robovqa-ask", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="a finished training run, e.g. results/stage2")  # fmt: skip
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--frames", type=Path, metavar="DIR", help="a folder of frames")
    source.add_argument("--video", type=Path, metavar="FILE", help="a video (MP4, MKV, ...)")
    source.add_argument("--tfrecord", type=Path, metavar="SHARD", help="a RoboVQA shard")
    parser.add_argument("--clip", help="with --tfrecord: the clip's video id or unique_id")
    asked = parser.add_mutually_exclusive_group(required=True)
    asked.add_argument("--question", help='as the data phrase them: "<task> Q: <question>"')
    asked.add_argument("--questions", type=Path, metavar="PAIRS.jsonl",
                       help='lines of {"clip": path or shard id, "question": ...}')  # fmt: skip
    parser.add_argument("--out", type=Path, metavar="ANSWERS.jsonl",
                        help="with --questions: where the answers go")  # fmt: skip
    parser.add_argument("--merged", action="store_true", help="use RUN_DIR/merged/")
    parser.add_argument("--configfile", type=Path, default=Path("config/config.yaml"),
                        help="the workflow config (default: %(default)s)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.question is not None and not (args.frames or args.video or args.tfrecord):
        parser.error("--question needs a clip: --frames, --video or --tfrecord")
    if args.questions is not None and (args.frames or args.video or args.clip or not args.out):
        parser.error("--questions takes the clips from its lines (and --tfrecord), and --out")
    if args.clip is not None and args.tfrecord is None:
        parser.error("--clip names a clip of a --tfrecord shard")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # One GPU of those no job holds (a training may hold the others), chosen before the
    # library is imported: importing peft starts CUDA, which then sees every GPU.
    with allocated_gpus(1):
        from robovqa_ft.core.settings import ConfigError
        from robovqa_ft.tools.answering import (
            AskError,
            ask,
            check_kind,
            read_pairs,
            workflow_config,
            write_answers,
        )

        try:
            config = workflow_config(args.configfile)
            if args.questions is not None:
                pairs = read_pairs(args.questions)
            else:
                clip = args.clip if args.tfrecord else str(args.frames or args.video)
                check_kind(args.frames, args.video)
                pairs = [{"clip": clip, "question": args.question}]
            answers = ask(args.run_dir, pairs, config, args.tfrecord, args.merged)
        except (AskError, ConfigError) as error:
            sys.exit(f"error: {error}")
    if args.questions is None:
        print(answers[0])
    else:
        write_answers(args.out, pairs, answers)
        log.info("%d answers written to %s", len(answers), args.out)


if __name__ == "__main__":
    main()
