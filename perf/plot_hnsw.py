"""Draw the recall@10 / queries-per-second plot from perf/bench_hnsw.py's JSON.

    .venv/bin/python perf/plot_hnsw.py [--json perf/results/bench_hnsw.json] [--out perf/hnsw_recall_qps.png]

One curve per library (vibrato, hnswlib, faiss), one point per ef, median q/s over the runs with
the min..max range of the runs as error bars; the recall@10 = 0.95 line is marked.
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=str(HERE / "results" / "bench_hnsw.json"))
    ap.add_argument("--out", default=str(HERE / "hnsw_recall_qps.png"))
    args = ap.parse_args()
    res = json.loads(Path(args.json).read_text())
    rows = res["curve"]["rows"]
    env = res["env"]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    styles = {"vibrato": ("tab:red", "o"), "hnswlib": ("tab:blue", "s"), "faiss": ("tab:green", "^")}
    for name, (color, marker) in styles.items():
        rec = [r[name]["recall"] for r in rows]
        qps = [r[name]["qps"] for r in rows]
        lo = [q - min(r[name]["qps_runs"]) for q, r in zip(qps, rows)]
        hi = [max(r[name]["qps_runs"]) - q for q, r in zip(qps, rows)]
        ax.errorbar(rec, qps, yerr=[lo, hi], color=color, marker=marker, ms=4, capsize=2, lw=1.5, label=name)
        if name == "vibrato":
            for r, x, y in zip(rows, rec, qps):
                ax.annotate(f"ef={r['ef']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=color)
    ax.axvline(0.95, color="gray", ls="--", lw=1)
    ax.text(0.951, 0.03, "recall@10 = 0.95", color="gray", fontsize=8, transform=ax.get_xaxis_transform())
    ax.set_yscale("log")
    ax.set_xlabel("recall@10 (exact inner-product ground truth)")
    ax.set_ylabel("queries per second (1 thread, batch of 500)")
    ax.set_title(f"HNSW on text 20k x 128 (M=16, ef_construction=200), ef 10..400\n"
                 f"{env.get('cpus')} vCPU {env.get('machine')}, vibrato ISA {env.get('vibrato_isa')}, "
                 f"median of {env.get('runs')} runs", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
