"""The ``vblora`` command: ``train``, ``eval``, ``merge``, ``export-lora``, ``inspect`` and ``serve``.

``vblora train`` with no arguments fine-tunes the packaged MiniLM-L6 on the packaged Rotten Tomatoes
snippets, offline, in a few minutes on two CPU cores. Every command that writes a folder writes it
under a temporary name and renames it into place at the end, so a failed or interrupted run leaves
no half-written output. Bad inputs end with a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..formats.readers import FormatError
from ..training.data import DataError
from ..training.loop import RunError
from . import evaluate, export_lora, inspect, merge, serve, train

EXIT_BAD_INPUT = 2
COMMANDS = (train, evaluate, merge, export_lora, inspect, serve)  # each: add_parser(sub), run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vblora",
        description="VB-LoRA fine-tuning for Hugging Face models, offline. `vblora train` runs the demo.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad inputs)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `train --nproc-per-node` relaunches it
    try:
        status = args.func(args)  # None, or the status of a run whose workers reported their errors
    except (RunError, DataError, FormatError) as err:
        message = " ".join(str(err).split())  # one line, whatever the source wrote
        print(f"vblora {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"vblora {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `vblora inspect ... | head`: the reader left, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except (ValueError, OverflowError, RecursionError, OSError, MemoryError) as err:
        # a bad value found deeper (a config field, a size), or the system's refusal (a full disk,
        # a name too long): one line too; VBLORA_TRACEBACK=1 shows where
        if os.environ.get("VBLORA_TRACEBACK"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"vblora {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT if isinstance(err, (ValueError, OverflowError, RecursionError)) else 1
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
