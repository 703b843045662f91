#!/usr/bin/env python
"""deepspeed --num_gpus 8 scripts/train_dpo.py --deepspeed ds_configs/zero3.json --model SFT --data PREP --ref_cache CACHE --output_dir OUT
A thin wrapper of `python -m dpo_ds.train` (see its --help)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout need not be installed
from dpo_ds.train import main  # noqa: E402

if __name__ == "__main__":
    main()
