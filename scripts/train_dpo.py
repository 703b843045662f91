#!/usr/bin/env python
"""deepspeed --num_gpus 8 scripts/train_dpo.py --deepspeed ds_configs/zero3.json --model SFT --data PREP --ref_cache CACHE --output_dir OUT
A thin wrapper of `python -m dpo_ds.train` (see its --help)."""
from dpo_ds.train import main

if __name__ == "__main__":
    main()
