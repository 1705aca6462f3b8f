"""The order in which the curate plan hands videos to the video actors."""

from curation.plan import largest_first


def test_largest_files_go_first_and_ties_keep_their_order():
    pending = [{"video_id": "a", "size_bytes": 10}, {"video_id": "b", "size_bytes": 500},
               {"video_id": "c", "size_bytes": 10}, {"video_id": "d", "size_bytes": 70}]
    assert [row["video_id"] for row in largest_first(pending)] == ["b", "d", "a", "c"]
    assert [row["video_id"] for row in pending] == ["a", "b", "c", "d"]  # the caller's list is left as it was
