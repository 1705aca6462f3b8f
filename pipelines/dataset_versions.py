"""`reelforge dataset-versions --data DIR`: the finished versions of a curated dataset, one line each, to pick the
`DIR@vN` a training reads or to compare versions before comparing their MLflow runs."""

from __future__ import annotations

from curation.dataset import CuratedDataset, split_version

COLUMNS = ("version", "videos", "quarantined", "clips", "kept", "config", "mlflow run", "made by")


def version_rows(data: str) -> list[dict]:
    """One dict per finished version, oldest first: its counts, config hash and the run that made it."""
    uri, _ = split_version(data)
    dataset = CuratedDataset(uri)
    dataset.open("videos")  # the clear error for a missing or unmigrated dataset
    rows = []
    for version in dataset.versions():
        record = version.record
        counts = record.get("counts", {})
        rows.append({
            "version": f"v{version.number}",
            "videos": counts.get("videos", 0),
            "quarantined": sum(counts.get("quarantined", {}).values()),
            "clips": counts.get("clips", 0),
            "kept": counts.get("clips_kept", 0),
            "config": (record.get("config_sha256") or "-")[:12],
            "mlflow run": record.get("run", {}).get("mlflow_run_id") or "-",
            "made by": "migrate-dataset" if record.get("migrated_from") else "curate",
        })
    return rows


def versions_text(data: str) -> str:
    rows = version_rows(data)
    if not rows:
        return f"{CuratedDataset(split_version(data)[0]).shown}: no finished version yet"
    cells = [list(COLUMNS)] + [[str(row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in cells)
