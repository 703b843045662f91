"""What a run shows: its metrics (log: OUT/metrics.jsonl; trackers: --report_to), its picture (plot:
OUT/report.png), the model card of what it exported (card: final/README.md) and the memory each rank used
(memory: measured peaks)."""
