"""dpo_ds: DPO on DeepSpeed ZeRO-3 against a precomputed reference log-prob cache."""
