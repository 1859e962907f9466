"""Dedup on a corpus with planted exact and near duplicates at known Jaccard similarities."""
from __future__ import annotations

import random

import pytest

from pipelines.data.dedup import (
    DedupConfig,
    connected_components,
    dedup_in_memory,
    exact_jaccard,
    resolve_duplicates,
    shingle_hashes,
)

HIGH, LOW = 0.8, 0.6  # pairs at or above HIGH must merge; pairs at or below LOW must not


def planted_corpus(seed: int = 7, bases: int = 120):
    """Unrelated random documents, each with one variant at a spread of similarities, plus exact copies."""
    rng = random.Random(seed)
    vocabulary = [f"w{rng.getrandbits(40):x}" for _ in range(20_000)]
    docs, pairs = [], []
    for b in range(bases):
        words = [rng.choice(vocabulary) for _ in range(300)]
        docs.append({"id": f"base-{b:04d}", "text": " ".join(words)})
        edits = rng.choice([0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64])  # spaced edits break 5-grams
        variant = list(words)
        for pos in rng.sample(range(300), edits):
            variant[pos] = rng.choice(vocabulary)
        docs.append({"id": f"near-{b:04d}", "text": " ".join(variant)})
        similarity = exact_jaccard(shingle_hashes(docs[-2]["text"], 5), shingle_hashes(docs[-1]["text"], 5))
        pairs.append((f"base-{b:04d}", f"near-{b:04d}", similarity))
        if b % 10 == 0:  # exact duplicates differ only in case and whitespace
            docs.append({"id": f"copy-{b:04d}", "text": "  " + " ".join(words).upper() + "\n"})
    rng.shuffle(docs)
    return docs, pairs


def keeper_of(doc_id: str, removed: dict) -> str:
    return removed[doc_id][0] if doc_id in removed else doc_id


def assert_quality(removed: dict, pairs: list) -> None:
    high = [(a, b) for a, b, s in pairs if s >= HIGH]
    low = [(a, b) for a, b, s in pairs if s <= LOW]
    assert len(high) >= 30 and len(low) >= 15, "the planted corpus must cover both sides of the threshold"
    found = sum(keeper_of(a, removed) == keeper_of(b, removed) for a, b in high)
    false = sum(keeper_of(a, removed) == keeper_of(b, removed) for a, b in low)
    assert found / len(high) >= 0.95
    assert false / len(low) <= 0.05
    # Precision: every near removal is explained by a planted pair (random documents share nothing).
    for doc, (target, kind) in removed.items():
        assert doc.split("-")[1] == target.split("-")[1], (doc, target)


@pytest.mark.parametrize("verify", ["signature", "exact", "none"])
def test_planted_duplicates_found_in_process(verify):
    docs, pairs = planted_corpus()
    removed = dedup_in_memory(docs, DedupConfig(verify=verify))
    if verify != "none":  # without a check, LSH's S-curve merges some pairs around 0.6 by design
        assert_quality(removed, pairs)
    copies = [d["id"] for d in docs if d["id"].startswith("copy-")]
    assert all(removed[c] == (c.replace("copy", "base"), "exact") for c in copies)
    # Every removed document points at one that is kept.
    assert not {target for target, _ in removed.values()} & set(removed)


def test_connected_components_keep_the_smallest_id():
    roots = connected_components([("c", "d"), ("b", "c"), ("x", "y")])
    assert roots == {"b": "b", "c": "b", "d": "b", "x": "x", "y": "x"}
    removed = resolve_duplicates([["d", "e"]], [("c", "d"), ("b", "c")])
    assert removed == {"c": ("b", "near"), "d": ("b", "near"), "e": ("b", "exact")}


@pytest.mark.ray
def test_cluster_dedup_matches_in_process(ray_cluster):
    import ray

    from pipelines.data.dedup import dedup_dataset

    docs, pairs = planted_corpus()
    cfg = DedupConfig()
    ds = ray.data.from_items(docs, override_num_blocks=8)
    removed, stats = dedup_dataset(ds, cfg)
    assert removed == dedup_in_memory(docs, cfg)
    assert_quality(removed, pairs)
    assert stats["documents"] == len(docs) and stats["exact_groups"] >= 12  # copies, plus variants with no edit


@pytest.mark.ray
def test_signed_dedup_on_the_driver_equals_the_shuffles(ray_cluster):
    """Small corpora are grouped on the driver (dedup.local_max_documents): the same duplicates as
    the two distributed shuffles and as the in-process reference."""
    import ray

    from pipelines.data.dedup import dedup_dataset, new_minhash, sign_document

    docs, pairs = planted_corpus()
    cfg = DedupConfig()
    prototype = new_minhash(cfg)
    rows = []
    for doc in docs:
        exact, signature, keys = sign_document(doc["text"], cfg, prototype)
        rows.append({"id": doc["id"], "exact_hash": exact, "signature": signature, "band_keys": keys.tolist(),
                     "t_dedup": 0.001})
    ds = ray.data.from_items(rows, override_num_blocks=8)
    local, local_stats = dedup_dataset(ds, cfg, signed=True)
    # One document over the limit: the driver path gives way to the two shuffles (one run covers both
    # the fallback and the shuffles; local_max_documents=0 takes the same shuffles).
    shuffled, shuffled_stats = dedup_dataset(ds, cfg.model_copy(update={"local_max_documents": len(docs) - 1}),
                                             signed=True)
    assert local == shuffled == dedup_in_memory(docs, cfg)
    assert local_stats == shuffled_stats
    assert_quality(local, pairs)
