"""MLflow bookkeeping shared by every workflow step: where the store is, which experiment, which run."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from curation.redact import redact_config, redact_uri

log = logging.getLogger("reelforge.tracking")


def tracking_uri(configured: str | None, default_dir: str | os.PathLike) -> str:
    """The configured URI, else MLFLOW_TRACKING_URI, else a SQLite store under `default_dir` (created)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    directory = Path(default_dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{directory / 'mlflow.db'}"


def _is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def experiment_id(client, name: str, uri: str) -> str:
    """Get or create `name`. For a local store the artifacts go beside the database (mlflow's default would be
    ./mlruns under whatever directory the command happened to run in); a server decides for itself."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        db_path = Path(uri.removeprefix("sqlite:///"))
        location = (db_path.parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def open_run(uri: str, experiment: str, run_id: str | None = None, run_name: str | None = None,
             tags: dict[str, str] | None = None, parent_run_id: str | None = None,
             start_time: int | None = None) -> str:
    """`run_id` if it is an active run of this store (marked RUNNING again), else a new run; returns its id.
    `start_time` (ms since the epoch) for a run opened after the work it records (evaluate's per-model runs), so
    the UI's duration is the work's, not the logging's.

    Callers keep the id beside their outputs, which is what makes a restarted job log into the same run."""
    client = client_for(uri)
    if run_id:
        try:
            run = client.get_run(run_id)
            if run.info.lifecycle_stage == "active":
                if run.info.status != "RUNNING":
                    client.update_run(run_id, status="RUNNING")
                return run_id
            log.warning("run %s was deleted from %s; starting a new run", run_id, redact_uri(uri))
        except Exception as err:  # noqa: BLE001 - a run from another store: start afresh
            log.warning("run %s is not usable in %s (%s); starting a new run", run_id, redact_uri(uri),
                        redact_uri(str(err)))
    # Tags and names are written into the store: they carry paths and URIs, never their credentials.
    all_tags = {key: redact_uri(str(value)) for key, value in (tags or {}).items()}
    run_name = redact_uri(run_name) if run_name else run_name
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if run_name:
        all_tags["mlflow.runName"] = run_name
    run = client.create_run(experiment_id(client, experiment, uri), tags=all_tags, run_name=run_name,
                            start_time=start_time)
    return run.info.run_id


def log_params(client, run_id: str, params: dict) -> None:
    """Log flattened params, skipping keys already logged with the same value (MLflow refuses to change a param,
    and a resumed run logs its config again). Every param passes through the scrubber: this is where configs with
    credentials in their URIs reach the store."""
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    fresh = []
    for key, value in redact_config(dict(params)).items():
        text = str(value)[:6000]
        if key in existing:
            if existing[key] != text:
                log.warning("param %s was %r in this run and is now %r; keeping the first value", key, existing[key],
                            text)
            continue
        fresh.append(Param(key, text))
    for start in range(0, len(fresh), 100):
        client.log_batch(run_id, params=fresh[start:start + 100])


def data_params(table) -> dict:
    """What a run records of the curated data it read (a training.dataset.ClipTable): the exact rows
    (data_version), the reelforge dataset version to name in `--data DIR@vN`, the Lance version of its shards."""
    return {"data_version": table.version, "data_dataset_version": table.number,
            "data_lance_version": table.lance_version}


def finish_run(uri: str, run_id: str, status: str = "FINISHED", end_time: int | None = None) -> None:
    client_for(uri).set_terminated(run_id, status=status, end_time=end_time)


DIGEST_LIMIT = 36  # MLflow's longest dataset digest


def dataset_input(table, context: str):
    """The curated (or latent) dataset version `table` (training.dataset.ClipTable, LatentTable) as an MLflow
    dataset input: named DIR@vN, its digest the version's fingerprint (`table.version`, which changes with any row),
    its source the data URI without credentials; a ClipTable's clip metadata (no video bytes) gives the schema and
    row count the UI shows."""
    import mlflow.data
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    source = redact_uri(table.data_uri)
    name = source.rstrip("/").rsplit("/", 1)[-1]
    digest = table.version
    if len(digest) > DIGEST_LIMIT:  # a fingerprint MLflow cannot hold whole: its hash, and the whole as a tag
        import hashlib

        digest = hashlib.sha256(digest.encode()).hexdigest()[:DIGEST_LIMIT]
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():  # a local path matches the local source registered twice by MLflow: either is it
        warnings.simplefilter("ignore", UserWarning)
        origin = resolve_dataset_source(source)
    if hasattr(table, "metadata"):
        import pandas as pd

        with warnings.catch_warnings():  # MLflow's hint about integer columns and missing values: none are missing
            warnings.simplefilter("ignore", UserWarning)
            data = mlflow.data.from_pandas(pd.DataFrame(table.metadata()), source=origin, name=name, digest=digest)
    else:
        data = MetaDataset(origin, name=name, digest=digest)
    entity = Dataset(**data.to_dict())
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag("reelforge.data_version", table.version)]
    return DatasetInput(entity, tags=tags)


def log_dataset_input(client, run_id: str, table, context: str) -> None:
    """Record `table`'s version as a dataset input of the run (logging it again is a no-op). Lineage is
    bookkeeping: a store that refuses it gets a warning, the step goes on."""
    try:
        client.log_inputs(run_id, datasets=[dataset_input(table, context)])
    except Exception as err:  # noqa: BLE001 - e.g. a server of an older MLflow without dataset inputs
        log.warning("the dataset input %s was not logged to run %s: %s", redact_uri(table.data_uri), run_id,
                    redact_uri(str(err)))


def model_uri(name: str, version: str | int) -> str:
    return f"models:/{name}/{version}"


def registered_version(client, model_path: str) -> dict | None:
    """The model version registered from `model_path` (an exported model folder: OUTPUT/model, OUTPUT/models/<sha16>,
    or OUTPUT itself), found through the run id its train or distill output keeps (OUTPUT/mlflow_run_id), in this
    store or in the output's own mlflow.db: {"client", "name", "version", "run_id", "uri", "tags"}; None if none."""
    from mlflow.tracking import MlflowClient

    folder = Path(model_path.removeprefix("file://"))
    candidates = [folder / RUN_ID_FILE, folder.parent / RUN_ID_FILE]
    if folder.parent.name == "models":  # a published export: the output is two levels up
        candidates.append(folder.parent.parent / RUN_ID_FILE)
    for candidate in candidates:
        if not candidate.is_file():
            continue
        run_id = candidate.read_text().strip()
        clients = [client]
        if (candidate.parent / "mlflow.db").is_file():
            clients.append(MlflowClient(tracking_uri=f"sqlite:///{(candidate.parent / 'mlflow.db').resolve()}"))
        for store in clients:
            try:
                versions = store.search_model_versions(f"run_id = '{run_id}'")
            except Exception as err:  # noqa: BLE001 - lineage is looked up, never a reason to fail a step
                log.debug("no model version lookup for run %s: %s", run_id, err)
                continue
            if versions:
                newest = max(versions, key=lambda v: int(v.version))
                return {"client": store, "name": newest.name, "version": str(newest.version), "run_id": run_id,
                        "uri": model_uri(newest.name, newest.version), "tags": dict(newest.tags)}
    return None


CLOSED_TAG = "reelforge.closed_reason"


def close_dangling(uri: str, run_id: str, reason: str) -> bool:
    """Mark `run_id` KILLED, with `reason` as a tag, if it is still RUNNING: the run of a process that died (kill -9,
    a lost node) between its last write and closing its run. Call it only where no live process can own the run
    (while holding the output's lease). Returns whether it closed the run."""
    client = client_for(uri)
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - a run of another store, or deleted: nothing to close
        return False
    if run.info.status != "RUNNING":
        return False
    client.set_tag(run_id, CLOSED_TAG, redact_uri(reason)[:5000])
    client.set_terminated(run_id, status="KILLED")
    log.warning("MLflow run %s was left RUNNING by a process that is gone; marked KILLED: %s", run_id,
                redact_uri(reason))
    return True


RUN_ID_FILE = "mlflow_run_id"


def output_run(output: str, configured_uri: str | None, experiment: str, tags: dict[str, str],
               parent_run_id: str | None = None) -> tuple[str, str]:
    """(tracking URI, run id) of a step writing to `output`: the run whose id the output keeps (a restarted or rerun
    job logs into it again), else a new one whose id is written there. The store is `configured_uri`, else
    MLFLOW_TRACKING_URI, else SQLite beside a local output (./mlruns for a remote one)."""
    from curation.outputs import OutputDir

    out = OutputDir(output)
    local = "://" not in output or output.startswith("file://")
    uri = tracking_uri(configured_uri, output if local else "mlruns")
    recorded = out.read_text(RUN_ID_FILE).strip() if out.exists(RUN_ID_FILE) else None
    run_id = open_run(uri, experiment, recorded, run_name=Path(output).name, tags=tags, parent_run_id=parent_run_id)
    if run_id != recorded:
        out.write_bytes_atomic(RUN_ID_FILE, run_id.encode())
    return uri, run_id
