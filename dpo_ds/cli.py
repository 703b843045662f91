"""dpo-ds: one command for every phase (each is also `python -m dpo_ds.<module>`).

    dpo-ds prepare    --dataset ultrafeedback --tokenizer SFT_DIR --output_dir DATA
    dpo-ds precompute --model SFT_DIR --data DATA --output_dir CACHE
    dpo-ds verify     CACHE --data DATA [--model SFT_DIR]
    dpo-ds train      --deepspeed ds_configs/zero3.json --model SFT_DIR --data DATA --ref_cache CACHE --output_dir OUT
    dpo-ds evaluate   --model OUT/final --data DATA --ref_cache CACHE
    dpo-ds report     OUT                                   # redraw OUT/report.png
    dpo-ds tiny       --output_dir DIR                      # the embedded tiny model and data
    dpo-ds --version

On several ranks the launcher runs the same command on each:
    deepspeed --num_gpus 8 --no_python dpo-ds train ...     (or: deepspeed --module dpo_ds.train ...)
`dpo-ds COMMAND --help` lists a command's flags.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {"prepare": "dpo_ds.prepare", "precompute": "dpo_ds.precompute", "verify": "dpo_ds.ref_cache",
            "train": "dpo_ds.train", "evaluate": "dpo_ds.evaluate", "report": "dpo_ds.report", "tiny": "dpo_ds.tiny"}


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("dpo_ds")
    except PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        return "unknown (not installed)"


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the deepspeed launcher puts --local_rank=N before the script's own arguments: the phases take it anywhere
    command = next((a for a in argv if not a.startswith("-")), None)
    if "--version" in argv and command is None:
        print(f"dpo-ds {version()}")
        return
    if command not in COMMANDS:
        print(__doc__, file=sys.stderr if command else sys.stdout)
        if command:
            print(f"error: unknown command {command!r} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        raise SystemExit(2 if command else 0)
    at = argv.index(command)
    rest = argv[:at] + argv[at + 1:]
    sys.argv[0] = f"dpo-ds {command}"
    module = importlib.import_module(COMMANDS[command])
    module.main((["verify"] if command == "verify" else []) + rest)


if __name__ == "__main__":
    main()
