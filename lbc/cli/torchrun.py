"""``lbc-torchrun [torchrun options] [key=value ...]``: ``torchrun -m lbc.cli.train`` with one-line errors.

    lbc-torchrun --nproc_per_node=8 model=resnet50 data=imagenet data.root=/data/imagenet
    lbc-torchrun --nnodes=2 --nproc_per_node=8 --rdzv_endpoint=host:29500 -- experiment=...

Options before the first ``key=value`` (or before ``--``) go to torchrun, the rest to ``lbc-train``.
When the ranks stop at start-up with our one-line error (exit status 2, printed by rank 0 only),
torchrun's own report of the failed children (a traceback and a table per rank) is left out and the
launcher exits 2 as well; any other failure is reported by torchrun as usual.
``lbc-torchrun --help`` says so and points at ``lbc-train --help`` and ``torchrun --help``; it starts nothing.
"""

from __future__ import annotations

import logging
import sys

HELP = """\
usage: lbc-torchrun [torchrun options] [--] [lbc-train flags] [key=value ...]

lbc-train on several processes or machines (DDP): torchrun -m lbc.cli.train, with a start-up error
as one line and exit status 2. The arguments before the first key=value (or before --) are
torchrun's options; the rest go to lbc-train (put lbc-train's flags, such as -m or --cfg job, after
--: before it, -m is torchrun's).

  lbc-torchrun --nproc_per_node=8 model=resnet50 data=imagenet data.root=/data/imagenet
  lbc-torchrun --standalone --nproc_per_node=2 trainer=smoke
  lbc-torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
      -- experiment=table1/resnet50_lbc_2x4 data.root=/data/imagenet

More: lbc-train --help (the commands, config groups and options), torchrun --help (torchrun's own
options), docs/runs.md "Many GPUs" (the batch per process, lr scaling).
"""

_AGENT_LOGGERS = ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api")


class _DropConfigExits(logging.Filter):
    """torchrun's log lines about children that exited with our status 2 (or were closed after one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "(exitcode: 2)" not in message and "closing signal" not in message.lower()


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun options, lbc-train overrides): split at ``--`` or at the first ``key=value``."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    i = next((k for k, a in enumerate(argv) if not a.startswith("-") and "=" in a), len(argv))
    return argv[:i], argv[i:]


def main(argv: list[str] | None = None) -> None:
    """The ``lbc-torchrun`` console script (``-h``/``--help`` anywhere: what it is, nothing started)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(HELP, end="", flush=True)
        return
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    options, overrides = split_argv(argv)
    args = parse_args([*options, "-m", "lbc.cli.train", *overrides])
    for name in _AGENT_LOGGERS:
        logging.getLogger(name).addFilter(_DropConfigExits())
    try:
        run(args)
    except ChildFailedError as e:
        codes = {failure.exitcode for failure in e.failures.values()}
        if 2 in codes and codes <= {2, -15, 143}:  # rank 0 printed our one line; the others followed
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
