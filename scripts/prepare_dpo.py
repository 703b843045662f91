#!/usr/bin/env python
"""python scripts/prepare_dpo.py --dataset ultrafeedback --output_dir data/dpo_ultrafeedback --tokenizer SFT_DIR
A thin wrapper of `python -m dpo_ds.prepare` (see its --help)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout need not be installed
from dpo_ds.prepare import main  # noqa: E402

if __name__ == "__main__":
    main()
