"""``slora`` command line: ``demo`` (the main job), ``eval``, ``analyze``, ``bench``, ``env``.

Every subcommand is an ``add_arguments(parser)`` / ``run(args)`` pair in its own module; this
one only wires them.  Also runs as ``python -m slora`` (no console script needed).
"""

from __future__ import annotations

import argparse
import sys

from slora import analyze_cli, bench, env
from slora.demo import cli as demo_cli
from slora.evaluation import cli as eval_cli

# name -> (module with add_arguments/run, help)
COMMANDS = {
    "demo": (demo_cli, "Sensitivity-LoRA vs uniform LoRA on the embedded default"),
    "eval": (eval_cli, "compare LoRA rank allocations on your CSV (or the published --suite)"),
    "analyze": (analyze_cli, "sensitivity table and ranks on the embedded default"),
    "bench": (bench, "kernel benchmark table for this machine"),
    "env": (env, "versions, devices and kernel backends, for bug reports"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
