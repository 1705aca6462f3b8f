"""The latent cache (training/latent_cache.py) on a real Lance dataset: round trips, keys that must not collide,
idempotent rewrites and concurrent writers."""

import multiprocessing

import numpy as np

from training.latent_cache import CacheKey, LatentCache


def _latent(seed: int, shape=(4, 2, 8, 8), dtype=np.float16) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def test_latents_round_trip_exactly_and_keys_do_not_collide(tmp_path):
    cache = LatentCache(str(tmp_path / "latents.lance"))
    vae, t5 = "vae:x@rev1", "t5:y@rev2"
    keys = [CacheKey("clip-a", 0, "s1", vae, t5), CacheKey("clip-a", 1, "s1", vae, t5),
            CacheKey("clip-a", 0, "s2", vae, t5), CacheKey("clip-a", 0, "s1", "vae:x@rev9", t5)]
    items = [(k, _latent(i), _latent(100 + i, (7, 16)) if i % 2 == 0 else None) for i, k in enumerate(keys)]
    cache.put(items)
    got = cache.get(keys)
    assert len(got) == 4
    for key, latent, text in items:
        assert got[key][0].dtype == np.float16 and np.array_equal(got[key][0], latent)
        assert (got[key][1] is None) == (text is None)
        if text is not None:
            assert np.array_equal(got[key][1], text)
    # Another codec revision or text encoder is a miss, not a stale hit.
    other = CacheKey("clip-a", 0, "s1", "vae:x@rev1", "t5:y@rev3")
    assert cache.missing([keys[0], other]) == [other]


def test_rewriting_a_key_replaces_it(tmp_path):
    cache = LatentCache(str(tmp_path / "latents.lance"))
    key = CacheKey("clip-b", 0, "s1", "pixels")
    cache.put([(key, _latent(1), None)])
    cache.put([(key, _latent(2), None)])
    assert len(cache) == 1 and np.array_equal(cache.get([key])[key][0], _latent(2))


def _fill(uri: str, worker: int) -> None:
    cache = LatentCache(uri)
    for i in range(5):
        cache.put([(CacheKey(f"w{worker}-{i}", 0, "s1", "pixels"), _latent(worker * 10 + i, (2, 2)), None)])


def test_writers_in_several_processes_lose_nothing(tmp_path):
    uri = str(tmp_path / "latents.lance")
    LatentCache(uri).put([(CacheKey("seed", 0, "s1", "pixels"), _latent(0, (2, 2)), None)])
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_fill, args=(uri, w)) for w in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    keys = [CacheKey(f"w{w}-{i}", 0, "s1", "pixels") for w in range(3) for i in range(5)]
    got = LatentCache(uri).get(keys)
    assert len(LatentCache(uri)) == 16 and all(np.array_equal(got[CacheKey(f"w{w}-{i}", 0, "s1", "pixels")][0],
                                                              _latent(w * 10 + i, (2, 2)))
                                               for w in range(3) for i in range(5))
