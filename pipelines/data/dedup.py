"""Deduplication: exact (hash of normalised text), then MinHash-LSH near duplicates.

Near-duplicate detection follows the usual recipe (Broder 1997; Lee et al. 2022; datatrove):

1. word 5-gram shingles -> a datasketch ``MinHash`` signature (112 permutations by default).
   Shingle hashes are computed with numpy (crc32 per word, a polynomial over each 5-gram) and fed
   to ``MinHash.update_batch`` with an identity hash function: the same datasketch permutations and
   min-reduction, without one Python sha1 call per shingle, which is what makes it fast.
2. The signature is cut into 14 bands of 8 rows; each band is hashed into one bucket key.
3. Documents sharing a bucket are candidates. In Ray Data the (bucket, id) rows are grouped with a
   distributed ``groupby`` (a shuffle across the cluster), never one in-memory index on one node.
4. Candidates can be checked: ``signature`` keeps a pair whose MinHash estimate of Jaccard
   similarity reaches ``jaccard_threshold``; ``exact`` computes the true Jaccard of the shingle
   sets (on the driver, for the candidate documents only); ``none`` trusts LSH.
5. Pairs are joined into connected components (union-find over the edge list, which holds only
   documents that have a duplicate). One document per component is kept: the smallest id, so the
   choice is the same on every run and every cluster. Every removed document records that id.

The pure functions here are shared by the Ray path (:func:`dedup_dataset`) and an in-process
reference (:func:`dedup_in_memory`) that tests compare it with.
"""
from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Callable, Iterable
from itertools import combinations
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from pipelines.config import StrictModel

_WORD = re.compile(r"\w+")
_SPACES = re.compile(r"\s+")
_PRIME = np.uint64(0x100000001B3)  # FNV-64 prime: a good odd multiplier for polynomial hashing
_MASK32 = np.uint64(0xFFFFFFFF)
_CHUNK = 16384  # shingles per update_batch call: bounds the [shingles, permutations] temporary
PAIRWISE_BUCKET_LIMIT = 32  # buckets up to this size are checked pair by pair, larger ones as a star


class DedupConfig(StrictModel):
    exact: bool = Field(True, description="remove documents whose normalised text is identical")
    near: bool = Field(True, description="remove near duplicates with MinHash-LSH")
    ngram: int = Field(5, ge=1, description="words per shingle")
    num_perm: int = Field(112, ge=2, description="MinHash permutations")
    bands: int = Field(14, ge=1, description="LSH bands")
    rows_per_band: int = Field(8, ge=1, description="signature rows per band (bands * rows == num_perm)")
    verify: Literal["none", "signature", "exact"] = Field(
        "signature", description="check LSH candidates: MinHash estimate, true Jaccard of shingles, or not at all")
    jaccard_threshold: float = Field(0.7, gt=0, le=1, description="candidates below this similarity are not merged")
    minhash_seed: int = Field(1, description="seed of datasketch's permutations")
    local_max_documents: int = Field(
        50_000, ge=0, description="up to this many signed documents are grouped on the driver (the same "
                                  "functions, the same result) instead of by two distributed shuffles, which "
                                  "cost seconds of scheduling each on a small corpus; 0: always shuffle")

    @model_validator(mode="after")
    def _bands_cover_signature(self) -> DedupConfig:
        if self.bands * self.rows_per_band > self.num_perm:
            raise ValueError(f"bands * rows_per_band ({self.bands * self.rows_per_band}) exceeds num_perm "
                             f"({self.num_perm})")
        return self


# ---------------------------------------------------------------- pure functions

def normalize_for_exact(text: str) -> str:
    """Case and whitespace do not make a document different."""
    return _SPACES.sub(" ", text.lower()).strip()


def exact_hash(text: str) -> str:
    return hashlib.blake2b(normalize_for_exact(text).encode("utf-8"), digest_size=16).hexdigest()


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """Unique 32-bit hashes of the word n-grams of a lower-cased, punctuation-free text."""
    words = _WORD.findall(text.lower())
    if not words:
        return np.zeros(0, dtype=np.uint64)
    word_hashes = np.fromiter((zlib.crc32(w.encode("utf-8")) for w in words), dtype=np.uint64, count=len(words))
    n = min(ngram, len(words))  # a short document is one shingle of all its words
    count = len(words) - n + 1
    combined = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps on purpose
        for k in range(n):
            combined = combined * _PRIME + word_hashes[k:k + count] + np.uint64(k + 1)
        folded = (combined ^ (combined >> np.uint64(32))) & _MASK32
    return np.unique(folded)


def _identity(value: Any) -> Any:
    return value


def new_minhash(cfg: DedupConfig):
    from datasketch import MinHash

    return MinHash(num_perm=cfg.num_perm, seed=cfg.minhash_seed, hashfunc=_identity)


def minhash_signature(shingles: np.ndarray, prototype) -> np.ndarray:
    """datasketch MinHash of pre-hashed shingles (copying a prototype reuses its permutations)."""
    minhash = prototype.copy()
    for start in range(0, len(shingles), _CHUNK):
        minhash.update_batch(shingles[start:start + _CHUNK])
    return np.asarray(minhash.hashvalues, dtype=np.uint32)


def band_keys(signature: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One int64 bucket key per band; the band index is mixed in so bands never share buckets."""
    sig = signature[: bands * rows].astype(np.uint64).reshape(bands, rows)
    with np.errstate(over="ignore"):
        keys = np.arange(1, bands + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        for r in range(rows):
            keys = (keys ^ sig[:, r]) * _PRIME
    return keys.view(np.int64)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def exact_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) == 0 and len(b) == 0:
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def bucket_edges(ids: list[str], signatures: list[np.ndarray] | None, cfg: DedupConfig) -> list[tuple[str, str]]:
    """Candidate pairs from one bucket, filtered by the signature check when that is on."""
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    ids = [ids[i] for i in order]
    if signatures is not None:
        signatures = [signatures[i] for i in order]
    if len(ids) <= PAIRWISE_BUCKET_LIMIT:
        pairs: Iterable[tuple[int, int]] = combinations(range(len(ids)), 2)
    else:  # huge buckets (boilerplate): a star keeps them connected without n^2 pairs
        pairs = ((0, j) for j in range(1, len(ids)))
    edges = []
    for i, j in pairs:
        if cfg.verify == "signature" and signatures is not None:
            if estimated_jaccard(signatures[i], signatures[j]) < cfg.jaccard_threshold:
                continue
        edges.append((ids[i], ids[j]))
    return edges


def connected_components(edges: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Every id in an edge -> the smallest id of its component (union-find with path halving)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            # The smaller id becomes the root, so each root is its component's minimum.
            if rb < ra:
                ra, rb = rb, ra
            parent[rb] = ra
    return {x: find(x) for x in list(parent)}


def resolve_duplicates(exact_groups: Iterable[list[str]], near_edges: Iterable[tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """removed id -> (kept id, "exact" | "near"); every chain ends at a document that is kept."""
    removed: dict[str, tuple[str, str]] = {}
    for group in exact_groups:
        keeper = min(group)
        for doc in group:
            if doc != keeper:
                removed[doc] = (keeper, "exact")
    roots = connected_components(near_edges)
    for doc, root in roots.items():
        if doc != root:
            removed[doc] = (root, "near")
    # An exact duplicate of a near duplicate points at the document finally kept.
    for doc, (target, kind) in list(removed.items()):
        if target in removed:
            removed[doc] = (removed[target][0], kind)
    return removed


def filter_edges_exact(edges: list[tuple[str, str]], texts: dict[str, str], cfg: DedupConfig) -> list[tuple[str, str]]:
    shingles = {doc: shingle_hashes(text, cfg.ngram) for doc, text in texts.items()}
    return [(a, b) for a, b in edges if exact_jaccard(shingles[a], shingles[b]) >= cfg.jaccard_threshold]


def dedup_in_memory(docs: list[dict[str, str]], cfg: DedupConfig) -> dict[str, tuple[str, str]]:
    """Reference implementation in one process: the same functions, plain dicts instead of a shuffle."""
    exact_groups: dict[str, list[str]] = {}
    for doc in docs:
        key = exact_hash(doc["text"]) if cfg.exact else doc["id"]
        exact_groups.setdefault(key, []).append(doc["id"])
    dup_groups = [g for g in exact_groups.values() if len(g) > 1]
    exact_removed = {d for g in dup_groups for d in g if d != min(g)}
    edges: list[tuple[str, str]] = []
    if cfg.near:
        prototype = new_minhash(cfg)
        buckets: dict[int, list[tuple[str, np.ndarray]]] = {}
        for doc in docs:
            if doc["id"] in exact_removed:
                continue
            sig = minhash_signature(shingle_hashes(doc["text"], cfg.ngram), prototype)
            for key in band_keys(sig, cfg.bands, cfg.rows_per_band).tolist():
                buckets.setdefault(key, []).append((doc["id"], sig))
        for members in buckets.values():
            if len(members) > 1:
                edges.extend(bucket_edges([m[0] for m in members], [m[1] for m in members], cfg))
        edges = sorted(set(edges))
        if cfg.verify == "exact":
            texts = {d["id"]: d["text"] for d in docs if d["id"] in {x for e in edges for x in e}}
            edges = filter_edges_exact(edges, texts, cfg)
    return resolve_duplicates(dup_groups, edges)


# ---------------------------------------------------------------- Ray Data

def sign_document(text: str, cfg: DedupConfig, prototype) -> tuple[str, bytes, np.ndarray]:
    """(exact hash, MinHash signature bytes, band keys) of one document; empty ones when near is off."""
    if not cfg.near:
        return exact_hash(text), b"", np.zeros(0, dtype=np.int64)
    sig = minhash_signature(shingle_hashes(text, cfg.ngram), prototype)
    return exact_hash(text), sig.tobytes(), band_keys(sig, cfg.bands, cfg.rows_per_band)


class _Signer:
    """map_batches UDF: exact hash, MinHash signature and band keys of each kept document."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.prototype = new_minhash(cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import time

        started = time.perf_counter()
        signed = [sign_document(text, self.cfg, self.prototype) for text in batch["text"]]
        n = len(signed)
        return {"id": batch["id"], "exact_hash": np.array([s[0] for s in signed], dtype=object),
                "signature": np.array([s[1] for s in signed], dtype=object), "band_keys": [s[2] for s in signed],
                "t_dedup": np.full(n, (time.perf_counter() - started) / max(n, 1))}


# Both groupbys shuffle on a coarse part of the key (``key % parts``): every row of one bucket lands
# in the same group, and the UDF groups a part's rows by the full key in a dict. The bands are still
# grouped across the cluster by a distributed hash shuffle, but the UDF runs once per part instead of
# once per bucket (Ray's per-group call costs far more than the few rows most buckets hold).

def _exact_parts(batch: dict[str, np.ndarray], parts: int) -> dict[str, np.ndarray]:
    hashes = batch["exact_hash"]
    return {**batch, "part": np.array([int(h[:15], 16) % parts for h in hashes], dtype=np.int64)}


def _exact_group(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Groups of documents with the same exact hash (ids joined) in one part, and its signing seconds.

    Carrying the seconds here sums them in the same pass, instead of a separate aggregation job.
    """
    members: dict[str, list[str]] = {}
    for doc, h in zip(group["id"], group["exact_hash"]):
        members.setdefault(str(h), []).append(str(doc))
    joined = ["\t".join(sorted(ids)) for ids in members.values() if len(ids) > 1]
    seconds = [float(np.sum(group["t_dedup"]))] + [0.0] * max(len(joined) - 1, 0)
    return {"ids": np.array(joined or [""], dtype=object), "t_dedup": np.array(seconds)}


def _explode_bands(batch: dict[str, np.ndarray], skip: set[str], parts: int) -> dict[str, np.ndarray]:
    """One row per (document, band) with its bucket key, vectorised over the batch."""
    keep = np.array([str(i) not in skip for i in batch["id"]], dtype=bool)
    ids = np.asarray(batch["id"], dtype=object)[keep]
    signatures = np.asarray(batch["signature"], dtype=object)[keep]
    band_rows = [np.asarray(k, dtype=np.int64) for k, kept in zip(batch["band_keys"], keep) if kept]
    keys = np.concatenate(band_rows) if band_rows else np.zeros(0, dtype=np.int64)
    per_doc = np.array([len(k) for k in band_rows], dtype=np.int64)
    return {"part": np.remainder(keys, parts), "key": keys,  # remainder >= 0, like Python's %
            "id": np.repeat(ids, per_doc), "signature": np.repeat(signatures, per_doc)}


def _bucket_group(group: dict[str, np.ndarray], cfg: DedupConfig) -> dict[str, np.ndarray]:
    buckets: dict[int, list[int]] = {}
    for i, key in enumerate(group["key"].tolist()):
        buckets.setdefault(key, []).append(i)
    edges: list[tuple[str, str]] = []
    for rows in buckets.values():
        if len(rows) < 2:
            continue
        ids = [str(group["id"][i]) for i in rows]
        sigs = [np.frombuffer(group["signature"][i], dtype=np.uint32) for i in rows]
        edges.extend(bucket_edges(ids, sigs, cfg))
    return {"a": np.array([e[0] for e in edges], dtype=object), "b": np.array([e[1] for e in edges], dtype=object)}


SIGNED_COLUMNS = ("id", "exact_hash", "signature", "band_keys", "t_dedup")


TextsOf = Callable[[set[str]], dict[str, str]]


def _dataset_texts(kept) -> TextsOf:
    """The texts of a set of ids, read from the Ray Dataset ``kept`` (for ``verify="exact"``)."""
    def texts_of(ids: set[str]) -> dict[str, str]:
        return {r["id"]: r["text"] for r in kept.select_columns(["id", "text"]).filter(
            lambda r: r["id"] in ids).take_all()}
    return texts_of


def dedup_signed_rows(rows: list[dict[str, Any]], cfg: DedupConfig,
                      texts_of: TextsOf | None = None) -> tuple[dict[str, tuple[str, str]], dict[str, Any]]:
    """:func:`dedup_dataset` on the driver for signed rows (dicts of :data:`SIGNED_COLUMNS`): the same
    groups, buckets, edge checks and components as the two shuffles compute, so the same result.
    ``texts_of`` (ids -> texts) is called only for ``verify="exact"``, for the texts of candidate pairs."""
    seconds = float(sum(row["t_dedup"] or 0.0 for row in rows))
    dup_groups: list[list[str]] = []
    if cfg.exact:
        members: dict[str, list[str]] = {}
        for row in rows:
            members.setdefault(str(row["exact_hash"]), []).append(str(row["id"]))
        dup_groups = sorted(sorted(ids) for ids in members.values() if len(ids) > 1)
    exact_removed = {d for g in dup_groups for d in g if d != min(g)}
    edges: list[tuple[str, str]] = []
    if cfg.near:
        buckets: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            if str(row["id"]) in exact_removed:
                continue
            for key in np.asarray(row["band_keys"], dtype=np.int64).tolist():
                buckets.setdefault(key, []).append(i)
        found: set[tuple[str, str]] = set()
        for members_at in buckets.values():
            if len(members_at) > 1:
                found.update(bucket_edges([str(rows[i]["id"]) for i in members_at],
                                          [np.frombuffer(rows[i]["signature"], dtype=np.uint32) for i in members_at],
                                          cfg))
        edges = sorted(found)
    return _resolve(texts_of, dup_groups, edges, len(rows), seconds, cfg)


def dedup_dataset(kept, cfg: DedupConfig, signed: bool = False) -> tuple[dict[str, tuple[str, str]], dict[str, Any]]:
    """Duplicates among the rows of ``kept`` (a Ray Dataset with ``id`` and ``text``, or with
    :data:`SIGNED_COLUMNS` already computed by :func:`sign_document` when ``signed``).

    Returns (removed id -> (kept id, kind), statistics).
    """
    import ray

    # A few partitions per CPU: the default (hundreds) costs seconds of scheduling on small corpora.
    partitions = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    if signed and cfg.local_max_documents:
        # Small corpora: one job brings the signatures to the driver (at most local_max_documents
        # rows of ~0.6 KB), instead of materialising them and shuffling twice.
        rows = kept.select_columns(list(SIGNED_COLUMNS)).take(cfg.local_max_documents + 1)
        if len(rows) <= cfg.local_max_documents:
            return dedup_signed_rows(rows, cfg, _dataset_texts(kept))
    if signed:
        signed = kept.select_columns(list(SIGNED_COLUMNS)).materialize()
    else:
        signed = kept.select_columns(["id", "text"]).map_batches(
            _Signer(cfg), batch_format="numpy", batch_size=64).materialize()
    n_signed = signed.count()  # known from the materialized blocks' metadata: no extra job
    # Enough parts to balance the shuffle, few enough that the per-part UDF call is cheap.
    parts = max(8 * partitions, n_signed * cfg.bands // 50_000)
    seconds = 0.0
    dup_groups: list[list[str]] = []
    if cfg.exact and n_signed:
        grouped = signed.select_columns(["id", "exact_hash", "t_dedup"]).map_batches(
            _exact_parts, fn_kwargs={"parts": parts}, batch_format="numpy").groupby(
            "part", num_partitions=partitions).map_groups(_exact_group, batch_format="numpy")
        rows = grouped.take_all()
        seconds = float(sum(row["t_dedup"] for row in rows))
        dup_groups = sorted(row["ids"].split("\t") for row in rows if row["ids"])
    elif n_signed:
        seconds = float(signed.sum("t_dedup") or 0.0)
    exact_removed = {d for g in dup_groups for d in g if d != min(g)}
    edges: list[tuple[str, str]] = []
    if cfg.near:
        bands = signed.select_columns(["id", "signature", "band_keys"]).map_batches(
            _explode_bands, fn_kwargs={"skip": exact_removed, "parts": parts}, batch_format="numpy")
        pairs = bands.groupby("part", num_partitions=partitions).map_groups(_bucket_group, fn_kwargs={"cfg": cfg}, batch_format="numpy")
        edges = sorted({(row["a"], row["b"]) for row in pairs.take_all()})
    return _resolve(_dataset_texts(kept), dup_groups, edges, n_signed, seconds, cfg)


def _resolve(texts_of: TextsOf | None, dup_groups, edges: list, documents: int, seconds: float, cfg) -> tuple:
    """The end shared by the driver and shuffle paths: verify candidate pairs on their texts (when
    ``cfg.verify`` is exact), resolve exact groups and near pairs into removals, and the stats."""
    candidate_pairs = len(edges)
    if cfg.verify == "exact" and edges:
        if texts_of is None:
            raise ValueError("dedup.verify=exact needs the texts of candidate pairs")
        edges = filter_edges_exact(edges, texts_of({x for e in edges for x in e}), cfg)
    removed = resolve_duplicates(dup_groups, edges)
    stats = {"documents": documents, "exact_groups": len(dup_groups), "candidate_pairs": candidate_pairs,
             "verified_pairs": len(edges), "cpu_seconds_signatures": round(seconds, 3)}
    return removed, stats
