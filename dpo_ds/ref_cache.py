"""The reference cache's verifier under the name the README gave it before the cache became a package:

    python -m dpo_ds.ref_cache verify CACHE_DIR --data PREPARED_DIR [--model SFT_DIR]

is `dpo-ds verify CACHE_DIR --data ...` (dpo_ds/verify.py), which it runs after one line saying so.
"""
from __future__ import annotations

import sys

from dpo_ds import verify


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["verify"]:
        print("usage: python -m dpo_ds.ref_cache verify CACHE_DIR --data PREPARED_DIR [--model SFT_DIR]\n"
              "error: the only command here is verify; it is now `dpo-ds verify` (python -m dpo_ds.verify)",
              file=sys.stderr)
        raise SystemExit(2)
    print("note: `python -m dpo_ds.ref_cache verify` is now `dpo-ds verify` (python -m dpo_ds.verify); running it",
          file=sys.stderr)
    verify.main(argv[1:])


if __name__ == "__main__":
    main()
