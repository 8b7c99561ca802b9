"""The command line: one flag per FinetuneConfig field, so the flags, the YAML keys and the saved config agree."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from finetune.config import ConfigError, FinetuneConfig, build

EPILOG = """examples:
  python -m finetune train.json --model THUDM/chatglm3-6b --out lora-med --method qlora
  python -m finetune train.jsonl --out lora-sql --max-steps 500 --save-steps 100
  python -m finetune --config lora.yaml          # any flag as a YAML key
  python -m finetune train.json --out lora-med --resume
  python -m finetune --model THUDM/chatglm3-6b --method qlora --plan
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m finetune", description=__import__("finetune").__doc__.split("\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)  # only what is typed overrides the YAML
    for f in fields(FinetuneConfig):
        default = f.default if f.default is not MISSING else None
        help_text = f"{f.metadata['help']} (default: {default!r})" if default not in ("", None) else f.metadata["help"]
        if f.metadata.get("positional"):
            p.add_argument(f.name, nargs="?", help=f.metadata["help"])
            continue
        flags = [f.metadata.get("flag") or "--" + f.name.replace("_", "-")]
        if f.name == "learning_rate":
            flags.append("--lr")
        if isinstance(default, bool):
            p.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            p.add_argument(*flags, dest=f.name, type=type(default), choices=f.metadata.get("choices"),
                           help=help_text)
    return p


def main(argv: list[str] | None = None) -> None:
    args = vars(parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from finetune.data import DataError
    from server.errors import EngineError

    try:
        cfg = build(args)
        if cfg.plan:
            from finetune.plan import format_training_plan

            print(format_training_plan(cfg))
            return
        from finetune.run import run

        result = run(cfg)
    except (ConfigError, DataError) as exc:
        sys.exit(f"finetune: {exc}")
    except EngineError as exc:
        sys.exit(f"finetune: {exc.message}")
    except KeyboardInterrupt:
        from finetune.checkpoint import latest

        last = latest(Path(args.get("out", "")))
        where = f"the last checkpoint is {last}; add --resume to the same command to continue from it" if last \
            else "no checkpoint was saved yet"
        print(f"\nfinetune: interrupted; {where}", file=sys.stderr)
        sys.exit(130)
    print(result.text)


def config_from_argv(argv: list[str]) -> FinetuneConfig:
    """The config a command line means (tests and tools use it to run in-process)."""
    return build(vars(parser().parse_args(argv)))
