"""The runtimes verb: isolated environments for the runtime versions devices run (add, list, remove)."""
from __future__ import annotations

import time

from rich.markup import escape

from hetero.cli.progress import console


def cmd_runtimes(args) -> int:
    from hetero import runtimes
    from hetero.cli.tables import format_runtimes
    from hetero.errors import ConfigError

    if args.action == "add":
        wanted = list(args.requirement or [])
        for name in args.profile or []:
            from hetero.profiles import load_profile

            profile = load_profile(name)
            wanted += [r for r in profile.runtimes if runtimes.needs_environment(r)]
        if not wanted:
            raise ConfigError("runtimes add: give a requirement (e.g. tflite-runtime==2.14.0) or --profile NAME")
        for requirement in dict.fromkeys(wanted):
            started = time.perf_counter()
            env = runtimes.add(requirement, python=args.python)
            console.print(f"created {escape(env.label)} in {escape(str(env.path))} (Python {env.python}, "
                          f"{time.perf_counter() - started:.0f} s)")
        return 0
    if args.action == "remove":
        if len(args.requirement) != 1:
            raise ConfigError("runtimes remove: give one environment name or requirement (see `hetero runtimes list`)")
        for env in runtimes.remove(args.requirement[0]):
            console.print(f"removed {escape(env.label)} ({escape(str(env.path))})")
        return 0
    rows = runtimes.describe_environments()
    table = format_runtimes(rows, runtimes.home())
    console.print(table if rows else "no runtime environments yet: `hetero runtimes add tflite-runtime==2.14.0`")
    return 0
