"""bench/lance_datasets.py --quick: every section runs and reports positive figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_bench_reports_every_section(tmp_path):
    out = tmp_path / "lance.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "lance_datasets.py"), "--quick", "--workdir",
                             str(tmp_path / "work"), "--json", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())

    series = report["commits"]["series"]
    assert set(series) == {"json manifest (0.1)", "lance, no compaction", "lance, compact every 5",
                           "lance, compact every version (tag_version)"}
    for figures in series.values():
        assert figures["commits"] == 20 and sorted(figures["checkpoints"]) == ["1", "10", "20"]
        assert figures["commit_s"]["p50"] > 0 and figures["commit_s"]["max"] >= figures["commit_s"]["p99"]
        for at in figures["checkpoints"].values():
            assert at["commit_s"] > 0 and at["written_bytes"] > 0 and at["read_bytes"] > 0 and at["open_s"] > 0
    manifest = series["json manifest (0.1)"]["checkpoints"]
    assert manifest["20"]["written_bytes"] > 5 * manifest["1"]["written_bytes"]  # every version's files, rewritten
    assert series["lance, compact every version (tag_version)"]["checkpoints"]["20"]["fragments"] == 1

    reads = report["reads"]["figures"]
    paths = ("parquet stream, file order (today)", "lance take, random order", "lance take, same rows in sequence")
    assert set(reads) == {f"{path} [{cache}]" for path in paths for cache in ("warm", "cold")}
    for figures in reads.values():
        assert figures["samples"] == 1000 and figures["samples_per_s"] > 0 and figures["ratio_to_parquet_stream"] > 0

    dedup = report["dedup"]
    assert dedup["rows"] == 12_000 and dedup["build"] == "trained" and dedup["build_s"] > 0
    assert dedup["qps_max_version"] > 0 and dedup["qps_no_filter"] > 0 and dedup["next_build"] == "extended"
    assert dedup["planted_source_is_exact_top1"] == 1.0 and dedup["recall_at_1"] >= 0.9
    assert "c. dedup queries" in result.stdout and "b. training reads" in result.stdout
