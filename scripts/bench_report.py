"""scripts/bench.py's report: OUT/bench.json's figures and ratios, and the table it prints."""
from __future__ import annotations

import os


def build_report(a, pre: dict, runs: list, trainers: list, lay_stats: dict, mem: dict) -> dict:
    """OUT/bench.json: every section's figures and the ratios the targets name."""
    pick = lambda mode, beta: next(r for r in runs if r["mode"] == mode and r["beta"] == beta)  # noqa: E731
    mid = a.sweep[len(a.sweep) // 2]
    cached, baseline = pick("cached", mid), pick("baseline", mid)
    one_rank, bare, stats, precompute_wall = pre["one_rank"], pre["bare"], pre["stats"], pre["wall"]
    report = {
        "machine": {"cpus": os.cpu_count(), "ranks": a.ranks, "device": "cpu" if not _cuda() else "cuda"},
        "settings": vars(a),
        "train_step": {"cached": cached, "baseline": baseline,
                       "step_time_ratio": cached["median_step_s"] / baseline["median_step_s"],
                       "rss_ratio": cached["peak_rss_mb_per_rank"] / baseline["peak_rss_mb_per_rank"]},
        "precompute": {"tokens_per_s": one_rank["tokens_per_s"], "bare_forward_tokens_per_s": bare["tokens_per_s"],
                       "ratio": one_rank["tokens_per_s"] / bare["tokens_per_s"],
                       "padding_fraction": one_rank["padding_fraction"],
                       f"tokens_per_s_{a.ranks}_ranks": stats["tokens_per_s"]},
        "logp_memory": {**mem, "ratio": mem["naive"]["peak_mb"] / max(mem["chunked"]["peak_mb"], 1e-9)},
        "trainers": trainers,
        "layouts": lay_stats,
        "amortisation": {"precompute_s": precompute_wall,
                         "cached_runs_s": sum(r["wall_s"] for r in runs if r["mode"] == "cached"),
                         "baseline_runs_s": sum(r["wall_s"] for r in runs if r["mode"] == "baseline"), "k": len(a.sweep)},
    }
    am = report["amortisation"]
    am["ratio"] = (am["precompute_s"] + am["cached_runs_s"]) / am["baseline_runs_s"]
    saved_per_step = baseline["median_step_s"] - cached["median_step_s"]
    am["break_even_steps_per_run"] = am["precompute_s"] / (am["k"] * saved_per_step) if saved_per_step > 0 else None
    return report


def table_rows(a, report: dict) -> list[tuple]:
    """(measure, value, ratio, target) of sections 1-4."""
    cached, baseline = report["train_step"]["cached"], report["train_step"]["baseline"]
    am = report["amortisation"]
    ts, pc, lm = report["train_step"], report["precompute"], report["logp_memory"]
    rows = [
        ("train step, median s (cached / two-model)", f"{cached['median_step_s']:.3f} / {baseline['median_step_s']:.3f}",
         f"{ts['step_time_ratio']:.2f}x", "<= 0.75x"),
        ("peak RSS per rank, MB (cached / two-model)",
         f"{cached['peak_rss_mb_per_rank']:.0f} / {baseline['peak_rss_mb_per_rank']:.0f}", f"{ts['rss_ratio']:.2f}x", ""),
        ("precompute tok/s (1 rank) / bare forward", f"{pc['tokens_per_s']:.0f} / {pc['bare_forward_tokens_per_s']:.0f}",
         f"{pc['ratio']:.2f}x", ">= 0.9x"),
        ("precompute padding", f"{100 * pc['padding_fraction']:.1f}%", "", ""),
        (f"log-prob peak MB, V={a.vocab} T={a.seq} B={a.logp_batch} (naive / chunked)",
         f"{lm['naive']['peak_mb']:.0f} / {lm['chunked']['peak_mb']:.0f}", f"{lm['ratio']:.1f}x lower", ">= 8x"),
        (f"precompute + {am['k']} runs vs {am['k']} two-model runs, s",
         f"{am['precompute_s'] + am['cached_runs_s']:.0f} / {am['baseline_runs_s']:.0f}", f"{am['ratio']:.2f}x", ""),
        (f"  break-even run length (K={am['k']}), steps", f"{am['break_even_steps_per_run'] or float('nan'):.0f}", "", ""),
    ]
    return rows


def trainer_rows(a, report: dict) -> list[tuple]:
    """Section 5's rows: dpo_ds beside TRL, one process and on the ranks of section 1."""
    cached, rows = report["train_step"]["cached"], []
    trainers = [t for t in report["trainers"] if not t.get("lora_r")]
    by = {(t["mode"], t.get("ds", ""), t["ranks"]): t["median_step_s"] for t in trainers}
    rss = {(t["mode"], t.get("ds", ""), t["ranks"]): t.get("peak_rss_mb_per_rank") for t in trainers}
    online, pre = by.get(("trl_online", "", 1)), by.get(("trl_precompute", "", 1))
    pre_rss = rss.get(("trl_precompute", "", 1))
    for (mode, ds_name, _), seconds in by.items():
        if mode == "cached":
            ratio = f"{seconds / online:.2f}x / {seconds / pre:.2f}x" if online and pre else ""
            rows.append((f"1 process: dpo_ds ({ds_name}) step s, vs TRL online / precompute", f"{seconds:.3f}", ratio,
                         "<= 0.75x / 1.0x"))
            mb = rss[(mode, ds_name, 1)]
            if mb:  # (a bench.json of an older bench has no peak here)
                rows.append((f"1 process: dpo_ds ({ds_name}) peak RSS MB, vs TRL precompute", f"{mb:.0f}",
                             f"{mb / pre_rss:.2f}x" if pre_rss else "", "<= 1.0x"))
    if online and pre:
        rows.append(("1 process: TRL step s (online / precompute_ref_log_probs)", f"{online:.3f} / {pre:.3f}", "", ""))
        if pre_rss and rss.get(("trl_online", "", 1)):
            rows.append(("1 process: TRL peak RSS MB (online / precompute_ref_log_probs)",
                         f"{rss[('trl_online', '', 1)]:.0f} / {pre_rss:.0f}", "", ""))
    lora = {t["mode"]: t for t in report["trainers"] if t.get("lora_r")}
    if "cached" in lora:
        ours, online_l, pre_l = lora["cached"], lora.get("trl_online"), lora.get("trl_precompute")
        versus = (f"{ours['median_step_s'] / online_l['median_step_s']:.2f}x / "
                  f"{ours['median_step_s'] / pre_l['median_step_s']:.2f}x") if online_l and pre_l else ""
        rows.append((f"1 process, LoRA r {ours['lora_r']}: dpo_ds step s, vs TRL online / precompute",
                     f"{ours['median_step_s']:.3f}", versus, "<= 0.75x / 1.0x"))
        if online_l and pre_l:
            rows.append(("1 process, LoRA: TRL step s (online / precompute_ref_log_probs)",
                         f"{online_l['median_step_s']:.3f} / {pre_l['median_step_s']:.3f}", "", ""))
            rows.append(("1 process, LoRA: peak RSS MB, dpo_ds / TRL online / TRL precompute",
                         f"{ours['peak_rss_mb_per_rank']:.0f} / {online_l['peak_rss_mb_per_rank']:.0f} / "
                         f"{pre_l['peak_rss_mb_per_rank']:.0f}", "", ""))
    online_n, pre_n = by.get(("trl_online", "", a.ranks)), by.get(("trl_precompute", "", a.ranks))
    if online_n and pre_n:
        rows.append((f"{a.ranks} ranks ZeRO-3: dpo_ds cached step s, vs TRL online / precompute",
                     f"{cached['median_step_s']:.3f}",
                     f"{cached['median_step_s'] / online_n:.2f}x / {cached['median_step_s'] / pre_n:.2f}x", "<= 0.75x / -"))
        rows.append((f"{a.ranks} ranks ZeRO-3: TRL step s (online / precompute_ref_log_probs)",
                     f"{online_n:.3f} / {pre_n:.3f}", "", ""))
    return rows


def layout_rows(a, lay_stats: dict) -> list[tuple]:
    """Section 6's rows: the plain layout beside the defaults."""
    old, new = lay_stats["plain"], lay_stats["new"]
    per_pair = {k: v["precompute"]["slots"] / v["precompute"]["examples"] for k, v in lay_stats.items()}
    return [
        ("layout (UltraFeedback-like lengths), plain / new:", "", "", ""),
        ("  tokens computed per pair, padding included", f"{per_pair['plain']:.0f} / {per_pair['new']:.0f}",
         f"{per_pair['new'] / per_pair['plain']:.2f}x", ""),
        *((f"  train step s ({label}, micro 2 x accum 8)",
           f"{old[key]['median_step_s']:.2f} / {new[key]['median_step_s']:.2f}",
           f"{new[key]['median_step_s'] / old[key]['median_step_s']:.2f}x", "<= 0.7x")
          for key, label in (("train_1", "1 process, no ZeRO"), (f"train_{a.ranks}", f"{a.ranks} ranks, ZeRO-3"))),
        ("  precompute pairs/s (1 process)",
         f"{old['precompute']['examples_per_s']:.1f} / {new['precompute']['examples_per_s']:.1f}",
         f"{new['precompute']['examples_per_s'] / old['precompute']['examples_per_s']:.2f}x", ">= 1.4x"),
        ("  evaluate s (1 process)", f"{old['eval']['seconds']:.2f} / {new['eval']['seconds']:.2f}",
         f"{new['eval']['seconds'] / old['eval']['seconds']:.2f}x", ""),
        (f"  peak RSS per rank in training ({a.ranks} ranks), MB",
         f"{old[f'train_{a.ranks}']['peak_rss_mb_per_rank']:.0f} / {new[f'train_{a.ranks}']['peak_rss_mb_per_rank']:.0f}",
         "", ""),
    ]


def print_table(rows: list[tuple]) -> None:
    w = max(len(r[0]) for r in rows)
    print(f"\n{'measure':<{w}}  {'value':>22}  {'ratio':>12}  target")
    for r in rows:
        print(f"{r[0]:<{w}}  {r[1]:>22}  {r[2]:>12}  {r[3]}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
