"""What a run shows: its metrics (log: OUT/metrics.jsonl; trackers: --report_to), its picture (plot:
OUT/report.png) and the model card of what it exported (card: final/README.md)."""
