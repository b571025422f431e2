"""Train a model with any normalization layer: classification, segmentation or detection, on one process or many."""

from __future__ import annotations

import argparse
import sys

from .config import (
    CHECKPOINT,
    DEFAULTS,
    RESULT,
    STATS_LOG,
    add_arguments,
    check_config,
    config_from_args,
    config_from_file,
)
from .evaluate import evaluate
from .loop import learning_rate, run_or_resume, train

__all__ = [
    "CHECKPOINT",
    "DEFAULTS",
    "RESULT",
    "STATS_LOG",
    "add_arguments",
    "check_config",
    "config_from_args",
    "evaluate",
    "learning_rate",
    "run_or_resume",
    "train",
    "run",
    "main",
]


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """Entry point of ``mabn train`` (``parser`` resolves ``--config``)."""
    if args.config is not None:
        if parser is None:
            parser = argparse.ArgumentParser()
            add_arguments(parser)
        config = config_from_file(args.config, args, parser)
    else:
        config = config_from_args(args)
    result = train(
        config, resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after, progress=args.progress
    )
    return 0 if result else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m mabn.train``: the same options and error handling as ``mabn train``."""
    from .. import enable_huge_pages
    from ..cli import CLIError

    enable_huge_pages()

    parser = argparse.ArgumentParser(prog="mabn train", description=(__doc__ or "").splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args, parser)
    except (CLIError, ValueError, TypeError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        print(f"mabn train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mabn train: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
