#!/usr/bin/env python
"""python scripts/prepare_dpo.py --dataset ultrafeedback --output_dir data/dpo_ultrafeedback --tokenizer SFT_DIR
A thin wrapper of `python -m dpo_ds.prepare` (see its --help)."""
from dpo_ds.prepare import main

if __name__ == "__main__":
    main()
