"""Exact and near-duplicate detection that scales past one node: keys hashed into shards, one actor per shard.

Exact duplicates share a 64-bit hash of the normalised (query, positive). Near duplicates are found with
MinHash over byte shingles (see MinHasher) and LSH banding (Broder 1997; Leskovec et al., *Mining of Massive Datasets* ch. 3):
`perms` hash functions split into `bands` bands of r = perms / bands rows; two texts collide in some band with
probability 1 − (1 − J^r)^bands for Jaccard similarity J, a threshold near (1 / bands)^(1 / r) (0.77 for 64/8).
A row is a near duplicate when one of its band keys was seen before; a colliding band is taken as the match
(no pairwise check, the usual LSH approximation).

Every key goes to the `DedupShard` actor `key % num_shards`; a shard keeps its keys as sorted uint64 runs with the id
of the row that claimed each (16 bytes a key, merged like an LSM tree), so state per actor is bounded by its share of
the unique keys and shards spread over nodes. A row meeting a key it claimed itself is not its own duplicate: a
batch that Ray retries after its keys reached the shards loses no row. Which copy of a duplicate survives depends on
arrival order (input order with curation.deterministic); how many survive does not.
"""

from __future__ import annotations

import hashlib

import numpy as np

def exact_keys(texts: list[str]) -> np.ndarray:
    """64-bit keys of whole texts (blake2b, so they agree across processes and machines)."""
    return np.array([int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little")
                     for t in texts], dtype=np.uint64)


def content_keys(texts: list[str]) -> np.ndarray:
    """exact_keys as int64 (torch tensors and the token shards' Arrow column are signed): equal text, equal key."""
    return exact_keys(texts).view(np.int64)


class MinHasher:
    """MinHash signatures and LSH band keys for a batch of texts, vectorised over the whole batch.

    One-permutation hashing with densification by rotation (Li, Owen & Zhang 2012; Shrivastava & Li 2014): each
    shingle is hashed once and lands in one of `perms` bins; a signature entry is its bin's minimum, and an empty
    bin borrows the next non-empty bin to its right (plus an offset per step). Collisions still estimate Jaccard
    similarity, at O(shingles) cost instead of O(shingles × perms).
    """

    ROTATION = np.uint64(0x9E3779B1)  # added per step an empty bin borrows from, so borrowed values differ

    def __init__(self, perms: int = 64, bands: int = 8, shingle_bytes: int = 8, seed: int = 1):
        if perms % bands or perms & (perms - 1):
            raise ValueError(f"minhash perms ({perms}) must be a power of two and a multiple of bands ({bands})")
        self.perms, self.bands, self.shingle_bytes = perms, bands, shingle_bytes
        self.salt = np.uint64(np.random.default_rng(seed).integers(1, 1 << 62))
        self.bin_shift = np.uint64(64 - perms.bit_length() + 1)

    def shingle_hashes(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(row index, 64-bit hash) of every overlapping byte shingle of every text (short texts: one shingle)."""
        k = self.shingle_bytes
        padded = [e if len(e) >= k else e.ljust(k, b"\0") for e in (t.encode("utf-8") for t in texts)]
        sizes = np.array([len(e) for e in padded], dtype=np.int64)
        counts = sizes - k + 1
        data = np.frombuffer(b"".join(padded), dtype=np.uint8)
        windows = np.lib.stride_tricks.sliding_window_view(data, k)
        keep = np.ones(len(windows), dtype=bool)  # drop windows that straddle two texts
        ends = np.cumsum(sizes)
        for j in range(1, k):
            keep[ends[:-1] - k + j] = False
        shingles = np.zeros(int(keep.sum()), dtype=np.uint64)
        windows = windows[keep]
        for j in range(k):
            shingles = shingles * np.uint64(257) + windows[:, j]
        hashed = _mix64(shingles ^ self.salt)
        return np.repeat(np.arange(len(texts)), counts), hashed

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(len(texts), perms) uint32 signatures."""
        n, p = len(texts), self.perms
        rows, hashed = self.shingle_hashes(texts)
        bins = (hashed >> self.bin_shift).astype(np.int64)
        values = (hashed & np.uint64(0xFFFFFFFF))
        empty_value = np.uint64(1 << 32)
        sig = np.full(n * p, empty_value, dtype=np.uint64)
        np.minimum.at(sig, rows * p + bins, values)
        sig = sig.reshape(n, p)
        # densify: an empty bin takes the nearest non-empty bin to its right (circularly) + ROTATION per step
        doubled = np.concatenate([sig, sig], axis=1)
        position = np.where(doubled != empty_value, np.arange(2 * p), 2 * p)
        source = np.minimum.accumulate(position[:, ::-1], axis=1)[:, ::-1][:, :p]
        steps = (source - np.arange(p)).astype(np.uint64)
        filled = np.take_along_axis(doubled, source, axis=1) + steps * self.ROTATION
        return (filled & np.uint64(0xFFFFFFFF)).astype(np.uint32)

    def band_keys(self, texts: list[str], *more: list[str]) -> np.ndarray:
        """(len(texts), bands) uint64 keys: a hash of each band's rows, salted with the band's index.

        With `more` lists (e.g. queries, then positives), a band's key covers that band of every list, so two rows
        collide only when all their texts agree on the band."""
        if not texts:
            return np.zeros((0, self.bands), dtype=np.uint64)
        sig = np.concatenate([self.signatures(t).astype(np.uint64).reshape(len(texts), self.bands, -1)
                              for t in (texts, *more)], axis=2)
        keys = np.zeros(sig.shape[:2], dtype=np.uint64)
        for j in range(sig.shape[2]):
            keys = _mix64(keys ^ sig[:, :, j])
        return _mix64(keys ^ np.arange(self.bands, dtype=np.uint64)[None, :])


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread 64-bit hash of 64-bit integers (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class HashSet64:
    """A set of uint64 keys, each with the uint64 id of the row that first claimed it, stored as a few sorted arrays
    (16 bytes a key). add_new answers membership and inserts; a key met again from the row that claimed it counts as
    new, so a batch that a retried task sends twice gets the same answers both times."""

    def __init__(self):
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted keys, their owners)

    def __len__(self) -> int:
        return sum(len(keys) for keys, _ in self.runs)

    @property
    def nbytes(self) -> int:
        """Bytes held by the keys and their owners."""
        return sum(keys.nbytes + owners.nbytes for keys, owners in self.runs)

    def add_new(self, keys: np.ndarray, owners: np.ndarray | None = None) -> np.ndarray:
        """True for each key seen neither before (unless claimed by the same owner) nor earlier in `keys`; all keys
        are in the set afterwards. `owners`: the id of each key's row (None: no row claims a key)."""
        keys = np.asarray(keys, dtype=np.uint64)
        claims = owners is not None
        owners = np.asarray(owners, dtype=np.uint64) if claims else np.zeros(len(keys), dtype=np.uint64)
        new = np.zeros(len(keys), dtype=bool)
        unique, first = np.unique(keys, return_index=True)
        fresh = np.ones(len(unique), dtype=bool)
        mine = np.zeros(len(unique), dtype=bool)
        for run_keys, run_owners in self.runs:
            pos = np.searchsorted(run_keys, unique).clip(max=len(run_keys) - 1)
            found = run_keys[pos] == unique
            mine |= found & (run_owners[pos] == owners[first]) & claims
            fresh &= ~found
        new[first[fresh | mine]] = True
        if fresh.any():
            self.runs.append((unique[fresh], owners[first[fresh]]))
            # merge runs of similar size, so lookups touch O(log n) runs and inserts cost O(log n) amortised
            while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
                (a_keys, a_owners), (b_keys, b_owners) = self.runs[-2], self.runs.pop()
                keys_, owners_ = np.concatenate([a_keys, b_keys]), np.concatenate([a_owners, b_owners])
                order = np.argsort(keys_, kind="stable")  # the runs hold no key in common
                self.runs[-1] = (keys_[order], owners_[order])
        return new


class DedupShard:
    """Ray actor owning one hash range of the exact and near-duplicate keys."""

    def __init__(self):
        self.sets = {"exact": HashSet64(), "near": HashSet64()}

    def add_new(self, kind: str, keys: np.ndarray, owners: np.ndarray) -> np.ndarray:
        """HashSet64.add_new on the `exact` or `near` key set."""
        return self.sets[kind].add_new(keys, owners)

    def stats(self) -> dict:
        """Keys and bytes held per set."""
        return {kind: {"keys": len(s), "bytes": s.nbytes} for kind, s in self.sets.items()}


def first_seen(shards: list, kind: str, keys: np.ndarray, owners: np.ndarray) -> np.ndarray:
    """Route keys (with their rows' ids) to their shard actors (key % shards) and gather which are new, in the keys'
    order."""
    import ray

    keys, owners = np.asarray(keys, dtype=np.uint64), np.asarray(owners, dtype=np.uint64)
    owner = (keys % np.uint64(len(shards))).astype(np.int64)
    parts = {i: np.nonzero(owner == i)[0] for i in range(len(shards))}
    refs = {i: shards[i].add_new.remote(kind, keys[idx], owners[idx]) for i, idx in parts.items() if len(idx)}
    new = np.zeros(len(keys), dtype=bool)
    for i, ref in refs.items():
        new[parts[i]] = ray.get(ref)
    return new
