"""join_uri: a per-video or per-shard URI keeps its base URI's credentials and query options (no server needed;
tests/test_s3.py checks the same against a real S3-compatible store)."""

import pyarrow.fs as pafs
import pytest

from curation.discover import join_uri

QUERY = "endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"


@pytest.mark.parametrize(("base", "path", "expected"), [
    (f"s3://key:se%2Fcret@bkt/dump?{QUERY}", "bkt/dump/a.mp4", f"s3://key:se%2Fcret@bkt/dump/a.mp4?{QUERY}"),
    (f"s3://bkt?{QUERY}", "bkt/dump/a.mp4", f"s3://bkt/dump/a.mp4?{QUERY}"),
    (f"s3://bkt/?{QUERY}", "bkt/a.mp4", f"s3://bkt/a.mp4?{QUERY}"),
    (f"s3://bkt/dump/v.mp4?{QUERY}", "bkt/dump/v.json", f"s3://bkt/dump/v.json?{QUERY}"),  # a sidecar
    ("file:///data/dump/", "/data/dump/x/a.mp4", "file:///data/dump/x/a.mp4"),
    ("/data/dump", "/data/dump/a.mp4", "/data/dump/a.mp4"),
])
def test_join_uri_changes_only_the_path(base, path, expected):
    assert join_uri(base, path) == expected


def test_join_uri_quotes_names_that_would_end_the_path():
    uri = join_uri(f"s3://bkt/dump?{QUERY}", "bkt/dump/sub dir/a #1?.mp4")
    assert uri == f"s3://bkt/dump/sub%20dir/a%20%231%3F.mp4?{QUERY}"
    assert pafs.FileSystem.from_uri(uri)[1] == "bkt/dump/sub dir/a #1?.mp4"


def test_join_uri_refuses_a_path_of_another_bucket_and_hides_the_secret():
    with pytest.raises(ValueError, match="not on the filesystem") as err:
        join_uri(f"s3://key:hunter2@bkt/dump?{QUERY}", "bkt2/dump/a.mp4")
    assert "hunter2" not in str(err.value)


def test_a_sidecar_is_found_and_parsed_through_a_uri_with_options_and_no_secret_is_quoted(tmp_path):
    # join_uri keeps the query on every derived URI: the sidecar's kind must come from its path, not the URI's end
    from curation.captions import find_sidecar

    (tmp_path / "a.mp4").write_bytes(b"not decoded here")
    (tmp_path / "a.txt").write_text("a red circle moving left\n")
    (tmp_path / "b.mp4").write_bytes(b"not decoded here")
    (tmp_path / "b.json").write_text("{not json")
    options = "?access_key=AKIAEXAMPLE&secret_key=s3cr3t-value"
    sidecar, problems = find_sidecar((tmp_path / "a.mp4").as_uri() + options)
    assert sidecar is not None and sidecar.caption == "a red circle moving left" and problems == []
    sidecar, problems = find_sidecar((tmp_path / "b.mp4").as_uri() + options)
    assert sidecar is None and len(problems) == 1 and "b.json" in problems[0]
    assert "s3cr3t-value" not in problems[0]
