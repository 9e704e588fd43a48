"""Ingest benchmark: slices/s and peak RSS for a 20-volume 512²×200 phantom down to 256².

Compares `pipeline ingest` with the floor, a plain nibabel load (decompression) of the same image
and label files, measured in the same run. Each measurement runs in its own subprocess so peak
RSS is that job's alone. Prints a table and writes bench/results/ingest.json.

    .venv/bin/python bench/ingest.py [--volumes 20] [--size 512] [--slices 200] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

BASELINE = """
import sys, pathlib, numpy as np, nibabel as nib
n = 0
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.nii.gz")):
    a = np.asanyarray(nib.load(p).dataobj)
    n += a.shape[2]
print(n // 2)
"""

INGEST = """
import sys, pathlib
from pipeline.ingest import IngestConfig, ingest
from pipeline.workspace import open_workspace
ws = open_workspace(pathlib.Path(sys.argv[2]))
r = ingest(ws, pathlib.Path(sys.argv[1]), IngestConfig(size=256, min_foreground=0.0))
print(r.added_slices)
"""


def peak_of(code: str, *args: str) -> tuple[float, float, int]:
    """(seconds, peak RSS MiB of this child alone, printed count) of a fresh Python running code."""
    import os

    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    out = proc.stdout.read() if proc.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child failed: {code[:40]!r}")
    return seconds, usage.ru_maxrss / 1024, int(out.strip().splitlines()[-1])


def main() -> None:
    """Run the benchmark and print/write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--data", type=Path, default=None, help="reuse/keep the phantom here")
    args = ap.parse_args()

    data = args.data or RESULTS / f"phantom-{args.volumes}x{args.size}x{args.slices}"
    if not (data / "preview.png").exists():
        print(f"writing phantom to {data} ...", flush=True)
        from pipeline.phantom import write_phantom

        write_phantom(data, volumes=args.volumes, size=args.size, n_slices=args.slices)
    rows = []
    for rep in range(args.repeats):
        t_base, rss_base, n_base = peak_of(BASELINE, str(data))
        ws = Path(tempfile.mkdtemp(prefix="bench-ws-"))
        try:
            t_ing, rss_ing, n_ing = peak_of(INGEST, str(data), str(ws / "ws"))
        finally:
            shutil.rmtree(ws, ignore_errors=True)
        rows.append(
            {
                "repeat": rep,
                "nibabel_s": t_base,
                "nibabel_rss_mib": rss_base,
                "ingest_s": t_ing,
                "ingest_rss_mib": rss_ing,
                "slices": n_ing,
                "ratio": t_ing / t_base,
            }
        )
        assert n_base == n_ing, (n_base, n_ing)
    best = min(rows, key=lambda r: r["ratio"])
    print(f"\n{args.volumes} volumes {args.size}²×{args.slices} → 256², {best['slices']} slices")
    print(f"{'job':<22}{'seconds':>9}{'slices/s':>10}{'peak RSS MiB':>14}")
    for r in rows:
        n = r["slices"]
        for label, sec, rss in (
            ("nibabel load (floor)", r["nibabel_s"], r["nibabel_rss_mib"]),
            ("pipeline ingest", r["ingest_s"], r["ingest_rss_mib"]),
        ):
            print(f"{label:<22}{sec:>9.1f}{n / sec:>10.0f}{rss:>14.0f}")
        print(f"{'ratio ingest/floor':<22}{r['ratio']:>9.2f}   (target ≤ 2.0; RSS target < 2048)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "ingest.json"
    out.write_text(
        json.dumps(
            {
                "params": vars(args) | {"data": str(data)},
                "runs": rows,
                "machine": platform.platform(),
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
