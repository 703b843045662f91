"""A model as the phases score it: layout (which layout a model runs), batch (the one batch builder), head
(each architecture's own output head), logps (chunked per-sequence log-probs), pair (the one chosen/rejected
type, policy and reference alike), sequence_parallel (a rank's slice of the rows and the group sum). No
deepspeed here: dpo_ds.engine wraps these."""
