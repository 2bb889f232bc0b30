"""The `hetero` command: one verb per pipeline stage, and `run` for all of them.

Each stage reads what the previous one wrote under the family directory, so stages can be re-run alone.
Errors a user can fix (bad config, missing stage output, failed conversion, a directory another stage
holds) print one paragraph and exit with status 2; failed verification exits with status 1.

The rooms, top to bottom: ``parser`` (verbs and flags), the verbs in ``stages``, ``gallery`` and
``runtimes``, then ``tables`` (every console table) and ``progress`` (the console and progress lines).
`main` (the console script ``hetero.cli:main``) stays here.
"""
from __future__ import annotations

import logging
import signal
import sys
from contextlib import contextmanager

from hetero.cli.parser import build_parser
from hetero.cli.progress import LogLines, console, log_width
from hetero.cli.stages import evaluate_family, export_family, train_family, verify_bundle_file, verify_family

__all__ = ["LogLines", "build_parser", "console", "evaluate_family", "export_family", "log_width", "main",
           "train_family", "verify_bundle_file", "verify_family"]


@contextmanager
def _terminate_like_interrupt():
    """SIGTERM unwinds like Ctrl-C, so half-written files are removed and locks released on the way out."""
    def terminate(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    from hetero.errors import HeteroError

    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("hetero").setLevel(logging.INFO if args.verbose else logging.WARNING)
    with _terminate_like_interrupt():
        try:
            return args.handler(args)
        except HeteroError as err:
            console.print(f"error: {err}", style="bold red", markup=False, highlight=False)
            return 2
        except KeyboardInterrupt:
            console.print("interrupted; nothing half-written was kept. To go on, run the command again: a training "
                          "with --resume starts from its last finished epoch, a gallery build (or an import into a "
                          "database) keeps the rows it wrote and skips them", style="yellow")
            return 130


if __name__ == "__main__":
    sys.exit(main())
