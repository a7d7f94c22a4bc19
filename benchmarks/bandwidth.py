#!/usr/bin/env python
"""Memory bandwidth probe (the one `vila-edge bench` takes after every run).

    python benchmarks/bandwidth.py [--threads 2] [--size-mib 512] [--samples 5] [--interval 10] [--json]

read: numpy max() over float64 chunks, one chunk per thread; copy: numpy copyto, bytes read + written
(STREAM convention). Best of 5 repeats per sample. On shared VMs bandwidth drifts by 2x within minutes:
take several samples (--samples, --interval seconds apart) before comparing with a roofline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from vila_edge.bench import default_threads, measure_bandwidth, measure_matmul


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    threads = a.threads or default_threads()
    out = []
    for k in range(a.samples):
        if k:
            time.sleep(a.interval)
        bw = measure_bandwidth(threads, a.size_mib)
        out.append(bw)
        if not a.json:
            print(f"sample {k + 1}: read {bw['read_gbs']:.1f} GB/s, copy {bw['copy_gbs']:.1f} GB/s ({threads} threads)")
    mm = measure_matmul(threads)
    if a.json:
        print(json.dumps({"bandwidth": out, "matmul": mm}, indent=2))
    else:
        reads = [b["read_gbs"] for b in out]
        print(f"read median {statistics.median(reads):.1f} GB/s (min {min(reads):.1f}, max {max(reads):.1f}); "
              f"fp32 matmul {mm['fp32_tflops'] * 1e3:.0f} GFLOPS")
    return out


if __name__ == "__main__":
    main()
