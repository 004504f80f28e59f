"""`make bench`: run every benchmark, each in its own process, and merge their results.

Writes ``bench/results/latest.json``: a list of rows
``{"bench", "metric", "haif", "baseline", "baseline_name", "ratio", "higher_is_better", "target"}``,
both sides of each row measured in the same run. ``--merge`` runs nothing: it merges the
results each bench last wrote (after one bench was run alone, e.g. ``python -m bench.engine``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from bench.common import RESULTS_DIR, Row, print_table

SUITE = [
    "overhead", "p2p", "engine", "torch_batching", "structured", "structured_vllm", "lora", "embeddings", "artifacts", "rollout",
    "chaos", "admin",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merge", action="store_true", help="merge the last results; run nothing")
    merge_only = parser.parse_args().merge
    rows: list[dict] = []
    failed: list[str] = []
    for bench in SUITE:
        result = RESULTS_DIR / f"{bench}.json"
        if not merge_only:
            print(f"\n=== bench.{bench} ===", flush=True)
            result.unlink(missing_ok=True)
            proc = subprocess.run([sys.executable, "-m", f"bench.{bench}"], check=False)
            if proc.returncode != 0:
                failed.append(bench)
                continue
        if not result.exists():
            failed.append(bench)
            continue
        rows.extend(json.loads(result.read_text()))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "latest.json").write_text(json.dumps(rows, indent=2) + "\n")
    fields = ("bench", "metric", "haif", "baseline", "baseline_name", "higher_is_better", "target")
    print_table("all benchmarks (ratio = haif / baseline)", [Row(**{k: r[k] for k in fields}) for r in rows])
    print(f"\nwrote {RESULTS_DIR / 'latest.json'}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
