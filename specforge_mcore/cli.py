"""``specforge-mcore <command>``: the one entry point.

Each command lives in the module that owns its work and exposes ``add_arguments(parser)`` and
``main(args) -> int``; this file only maps names to modules (imported lazily, so ``--help`` is fast and
a command never pays for another's imports).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "prepare-target": ("specforge_mcore.target.prepare", "fetch/convert a real target (SmolLM2) into an HF directory"),
    "verify-target": ("specforge_mcore.target.verify", "load a target in a TP/EP/PP layout and compare with HF transformers"),
    "prepare-data": ("specforge_mcore.data.prepare", "tokenise conversations with the chat template and cache them"),
    "regenerate": ("specforge_mcore.data.regenerate", "answer a dataset's assistant turns again with the target (endpoint or local)"),
    "build-vocab": ("specforge_mcore.data.vocab", "build the draft vocabulary (d2t/t2d) from loss-masked tokens"),
    "train": ("specforge_mcore.train.cli", "train an EAGLE-3 draft against the frozen target"),
    "export": ("specforge_mcore.export.cli", "write an SGLang or speculators checkpoint from a training checkpoint"),
    "dump-features": ("specforge_mcore.features.dump", "write the target's features of the training and held-out rows to an offline store"),
    "import-draft": ("specforge_mcore.export.importer", "turn an EAGLE-3 draft trained elsewhere into a checkpoint of ours"),
    "eval": ("specforge_mcore.eval.cli", "speculative decoding with the exported draft: acceptance length, lossless check"),
    "eval-table": ("specforge_mcore.eval.table", "one table from several eval outputs (drafts x prompt sets x configs)"),
    "bench": ("specforge_mcore.bench.cli", "benchmarks: loss, projection, teacher, attention, train, recipe"),
    "plan": ("specforge_mcore.train.plan", "per-rank memory plan of a run config"),
}


def launch_rank() -> int:
    """This process's rank as its launcher (torchrun/spawn, Slurm, MPI) tells it; 0 when none did."""
    env = os.environ
    return int(env.get("RANK", env.get("SLURM_PROCID", env.get("OMPI_COMM_WORLD_RANK", "0"))))


class _RankFilter(logging.Filter):
    """INFO and above on rank 0, WARNING and above elsewhere. The rank is read when a record is emitted:
    ranks forked by ``parallel.spawn`` get their RANK after the logging was configured."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or launch_rank() == 0


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "specforge_mcore: " + (f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else "")
        return prefix + super().format(record)


def configure_logging() -> None:
    """Show the package's log lines (``specforge_mcore.*`` loggers: backend choices, notes) on stderr:
    INFO on rank 0, WARNING on the other ranks, as ``specforge_mcore: message``. Idempotent; when the
    application already has root handlers (pytest, an embedding program) only the level is set, so no
    line is printed twice."""
    logger = logging.getLogger("specforge_mcore")
    logger.setLevel(logging.INFO)
    if logging.getLogger().handlers or any(getattr(h, "_specforge_mcore", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler._specforge_mcore = True  # type: ignore[attr-defined]
    handler.setFormatter(_Formatter("%(message)s"))
    handler.addFilter(_RankFilter())
    logger.addHandler(handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specforge-mcore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"specforge-mcore: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    from specforge_mcore.platform import quiet_known_warnings

    quiet_known_warnings()
    configure_logging()
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"specforge-mcore {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    # Intermixed: `train --config X --resume key=value` (overrides after a flag) must parse as the README
    # shows; a command that forwards its remaining arguments (bench) cannot be parsed that way.
    has_remainder = any(action.nargs == argparse.REMAINDER for action in parser._actions)
    args = parser.parse_args(rest) if has_remainder else parser.parse_intermixed_args(rest)
    from specforge_mcore.errors import UserError

    try:
        return int(module.main(args) or 0)
    except UserError as exc:
        # One line per job, not one per rank (every rank of a torchrun/srun/mpirun job raises it).
        if launch_rank() == 0:
            print(f"specforge-mcore {name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
