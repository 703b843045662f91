"""Verify a reference cache: manifest, hashes, coverage and fingerprint against the prepared data (and the
model, when given), and (format 3) every row's pair key against its prepared tokens; print a summary, with where
the values came from when some were reused.

    dpo-ds verify CACHE_DIR --data PREPARED_DIR [--model SFT_DIR] [--trust_remote_code]
    python -m dpo_ds.verify ...
"""
from __future__ import annotations

import argparse

from dpo_ds.cache import open_cache, summary
from dpo_ds.cache.reuse import check_keys
from dpo_ds.cli import main_guard


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dpo-ds verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache_dir")
    p.add_argument("--data", required=True, help="the prepared data directory the cache must match")
    p.add_argument("--model", help="also check the cache was computed from this model")
    p.add_argument("--trust_remote_code", action="store_true", help="allow code shipped with the tokenizer to run")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> str:
    verified = open_cache(args.cache_dir, args.data, args.model, trust_remote_code=args.trust_remote_code)
    return summary(verified) + "\n  " + check_keys(verified)


def main(argv=None) -> None:
    main_guard(lambda: print(run(parse(argv))))


if __name__ == "__main__":
    main()
