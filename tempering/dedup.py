"""Deduplication and decontamination, the library behind the ``dedup`` stage.

Owns the steps every row goes through, all configured by one :class:`~tempering.config.DedupParams`
(``dedup`` in params.yaml):

- text and hashing: :func:`row_text` (what is compared), :func:`normalize` / :func:`words`,
  :class:`WordHasher`, word n-gram and shingle hashes, :func:`jaccard`;
- decontamination (``decontam_ngram``): :class:`ContaminationIndex`, the benchmark items' n-grams;
- exact and MinHash near duplicates (``threshold``, ``num_perm``, ``shingle``): :class:`MinHasher`
  (vectorised, datasketch-compatible signatures) and datasketch's LSH for candidates, exact Jaccard
  to decide;
- the incremental earlier-snapshot index (``index``, ``snapshot``): :class:`DedupIndex`, which
  loads earlier snapshots' signatures, records this snapshot's kept rows and saves them;
- the steps, each a callable returning the row's quarantine record or None, in this order:
  :class:`Decontamination`, :class:`ExactDedup`, :class:`NearDedup` (the last two also against the
  earlier snapshots, :class:`Prior`); :func:`dedup_kind` / :func:`dedup_rows` run them over one
  kind / every kind.

``tasks/dedup.py`` is the stage wiring (read, held-out split, write, report). See its docstring for
the rules in words.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np

from tempering import TemperingError
from tempering.config import DedupParams
from tempering.io import atomic_path, write_json

KINDS = ("sft", "preference", "text")
MIN_SHORT_ITEM_WORDS = 8
# Candidates come from an LSH index at (threshold - LSH_MARGIN); exact Jaccard decides.
LSH_MARGIN = 0.1
MINHASH_SEED = 1

_WORD = re.compile(r"\w+")
_PUNCT = re.compile(r"[^\w\s]")
_SPACE = re.compile(r"\s+")
_PRIME = np.uint64(1099511628211)  # FNV-64 prime: the rolling n-gram hash multiplier
_M32 = np.uint64(0xFFFFFFFF)


# ----------------------------------------------------------------------------- text + hashing


def row_text(kind: str, row: dict, *, with_rejected: bool = False) -> str:
    """The text compared for a row (see the module docstring)."""
    if kind == "sft":
        return "\n".join(m["content"] for m in row["messages"])
    if kind == "preference":
        parts = [m["content"] for m in row["prompt"]] + [row["chosen"]]
        if with_rejected:
            parts.append(row["rejected"])
        return "\n".join(parts)
    return row["text"]


def normalize(text: str) -> str:
    """Exact-dedup normal form: lowercase, punctuation stripped, whitespace collapsed."""
    return _SPACE.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class WordHasher:
    """Stable 64-bit word hashes (blake2b), cached: each distinct word is hashed once."""

    def __init__(self) -> None:
        self._cache: dict[str, int] = {}

    def __call__(self, tokens: list[str]) -> np.ndarray:
        cache = self._cache
        for tok in set(tokens).difference(cache):
            cache[tok] = int.from_bytes(hashlib.blake2b(tok.encode("utf-8"), digest_size=8).digest(), "little")
        return np.fromiter(map(cache.__getitem__, tokens), dtype=np.uint64, count=len(tokens))


def ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """Rolling 64-bit hashes of every n-word window (vectorised; uint64 arithmetic wraps)."""
    m = len(word_hashes) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    acc = word_hashes[:m].copy()
    for j in range(1, n):
        acc = acc * _PRIME + word_hashes[j:j + m]
    return acc


def shingle_hashes(word_hashes: np.ndarray, k: int) -> np.ndarray:
    """k-word shingle hashes (may repeat); a row shorter than k words is one shingle of all its words."""
    if len(word_hashes) == 0:
        return np.empty(0, dtype=np.uint64)
    return ngram_hashes(word_hashes, min(k, len(word_hashes)))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two shingle-hash multisets, taken as sets."""
    a, b = np.unique(a), np.unique(b)
    if len(a) == 0 or len(b) == 0:
        return 0.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (datasketch's affine32 pre-mix)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class MinHasher:
    """datasketch ``affine32`` MinHash computed in one numpy operation per row."""

    def __init__(self, num_perm: int, seed: int = MINHASH_SEED) -> None:
        from datasketch import MinHash

        self.seed = seed
        template = MinHash(num_perm=num_perm, seed=seed, scheme="affine32")
        self.permutations = template.permutations
        self.a = template.permutations[0].astype(np.uint32)[None, :]
        self.b = template.permutations[1].astype(np.uint32)[None, :]

    def values(self, shingles: np.ndarray) -> np.ndarray:
        hv = ((shingles ^ (shingles >> np.uint64(32))) & _M32).astype(np.uint32)
        hv = _fmix32(hv)[:, None]
        return (hv * self.a + self.b).min(axis=0)

    def minhash(self, shingles: np.ndarray) -> "_Sketch":
        return _Sketch(self.values(shingles))


class _Sketch:
    """The part of a datasketch ``MinHash`` that ``MinHashLSH`` reads (hash values, scheme, length).

    Building a full ``MinHash`` re-validates the permutation arrays on every row (~30% of the
    per-row cost); the values here are exactly what ``MinHash(scheme="affine32")`` computes.
    """

    __slots__ = ("hashvalues",)
    scheme = "affine32"

    def __init__(self, hashvalues: np.ndarray) -> None:
        self.hashvalues = hashvalues

    def __len__(self) -> int:
        return len(self.hashvalues)


# ----------------------------------------------------------------------------- benchmarks


class ContaminationIndex:
    """n-gram hashes of benchmark items -> (benchmark, item id)."""

    def __init__(self, benchmarks: dict[str, list[dict]], n: int, hasher: WordHasher) -> None:
        self.n = n
        self.hasher = hasher
        self.by_len: dict[int, dict[int, tuple[str, str]]] = {}
        self._sequences: list[list[str]] = []
        self._lengths: list[int] = []
        if n <= 0:
            return
        for name, items in benchmarks.items():
            for i, item in enumerate(items):
                q = words(item["question"])
                choices = [words(str(c)) for c in item["choices"]]
                seqs = [q + [w for c in choices for w in c], q]
                ans = item.get("answer")
                if isinstance(ans, int) and 0 <= ans < len(choices):
                    seqs.append(q + choices[ans])
                item_id = str(item.get("id", f"{name}:{i + 1}"))
                for seq in seqs:
                    if len(seq) >= n:
                        length = n
                    elif len(seq) >= MIN_SHORT_ITEM_WORDS:
                        length = len(seq)
                    else:
                        continue
                    self._sequences.append(seq)
                    table = self.by_len.setdefault(length, {})
                    for h in ngram_hashes(hasher(seq), length).tolist():
                        table.setdefault(h, (name, item_id))
        self._lengths = sorted(self.by_len)
        self._keys = {length: np.sort(np.fromiter(table.keys(), dtype=np.uint64, count=len(table)))
                      for length, table in self.by_len.items()}
        # Prefilter: every p-gram (p = the shortest indexed length) of every indexed sequence. A row
        # can only match if it shares one of them, so most rows cost one hash pass and one search.
        self._p = self._lengths[0] if self._lengths else 0
        pre = set()
        for seq in self._sequences:
            pre.update(ngram_hashes(hasher(seq), self._p).tolist())
        self._prefilter = np.sort(np.fromiter(pre, dtype=np.uint64, count=len(pre)))
        del self._sequences

    def __bool__(self) -> bool:
        return bool(self.by_len)

    @staticmethod
    def _member(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        pos = np.minimum(np.searchsorted(keys, values), len(keys) - 1)
        return keys[pos] == values

    def match(self, word_hashes: np.ndarray) -> tuple[str, str] | None:
        """The (benchmark, item id) of the first shared sequence, or None."""
        n = len(word_hashes)
        if not self._lengths or n < self._p:
            return None
        if not self._member(self._prefilter, ngram_hashes(word_hashes, self._p)).any():
            return None
        # Rare path: one pass builds the rolling hashes of every indexed length (the L-gram hashes
        # are the (L-1)-gram hashes times the prime plus the next word).
        acc = word_hashes
        for length in range(2, min(self._lengths[-1], n) + 1):
            m = n - length + 1
            acc = acc[:m] * _PRIME + word_hashes[length - 1:length - 1 + m]
            keys = self._keys.get(length)
            if keys is None:
                continue
            hit = self._member(keys, acc)
            if hit.any():
                return self.by_len[length][int(acc[int(np.argmax(hit))])]
        return None


# ----------------------------------------------------------------------------- incremental index

INDEX_VERSION = 1
INDEX_FILE = "index.json"


class DedupIndex:
    """Exact hashes and MinHash signatures of every row kept by earlier snapshots (a folder).

    ``index.json`` names the signature parameters and one shard per snapshot label
    (``snap-<label>.npz``: kind, exact-hash digest, signature, id and source of every kept row).
    Texts are never stored: a later snapshot is deduplicated against the signatures alone.
    """

    def __init__(self, folder: str | Path, cfg: DedupParams) -> None:
        self.folder = Path(folder)
        self.cfg = cfg
        self.meta = {"version": INDEX_VERSION, "num_perm": cfg.num_perm, "shingle": cfg.shingle,
                     "seed": MINHASH_SEED, "scheme": "affine32", "normal_form": "lowercased \\w+ words",
                     "snapshots": {}}
        self.prior: dict[str, dict[str, np.ndarray]] = {k: {} for k in KINDS}
        self._pending: dict[str, list] = {}  # this snapshot's kept rows (record), written by save()
        path = self.folder / INDEX_FILE
        if self.folder.exists() and not self.folder.is_dir():
            raise TemperingError(f"{self.folder}: dedup index must be a folder")
        if not path.exists():
            return
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise TemperingError(f"{path}: unreadable dedup index ({exc}); restore it (dvc checkout) or delete "
                                 "the folder to start a new one") from None
        earlier = {k: v for k, v in meta.get("snapshots", {}).items() if k != cfg.snapshot}
        if earlier:
            for key in ("version", "num_perm", "shingle", "seed"):
                if meta.get(key) != self.meta[key]:
                    raise TemperingError(
                        f"{path}: built with {key}={meta.get(key)} but dedup.{key if key != 'seed' else 'seed'} is "
                        f"{self.meta[key]}; signatures of earlier snapshots ({', '.join(earlier)}) are not comparable. "
                        "Restore the old value or delete the index to start over")
        self.meta["snapshots"] = dict(meta.get("snapshots", {}))
        parts: dict[str, list[dict]] = {k: [] for k in KINDS}
        for label, info in earlier.items():
            shard = self.folder / info["file"]
            try:
                with np.load(shard, allow_pickle=False) as z:
                    data = {name: z[name] for name in z.files}
            except (OSError, ValueError, KeyError) as exc:
                raise TemperingError(f"{shard}: unreadable dedup index shard ({exc})") from None
            for code, kind in enumerate(KINDS):
                sel = data["kind"] == code
                if sel.any():
                    parts[kind].append({"exact": data["exact"][sel], "sig": data["sig"][sel],
                                        "has_sig": data["has_sig"][sel], "id": data["id"][sel],
                                        "source": data["source"][sel],
                                        "snapshot": np.full(int(sel.sum()), label)})
        for kind, chunks in parts.items():
            if chunks:
                self.prior[kind] = {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}

    def record(self, entries: dict[str, list]) -> None:
        """Remember this snapshot's kept rows ({kind: [(digest, signature, id, source)]}) for :meth:`save`."""
        self._pending = {kind: list(rows) for kind, rows in entries.items()}

    def earlier_rows(self) -> dict[str, int]:
        return {label: sum(info["rows"].values()) for label, info in self.meta["snapshots"].items()
                if label != self.cfg.snapshot}

    def save(self) -> dict:
        """Write this snapshot's shard (replacing the same label's) and the updated ``index.json``."""
        entries = self._pending

        self.folder.mkdir(parents=True, exist_ok=True)
        kinds, exact, sigs, has, ids, sources = [], [], [], [], [], []
        empty = np.zeros(self.cfg.num_perm, dtype=np.uint32)
        for code, kind in enumerate(KINDS):
            for digest, sig, row_id, source in entries.get(kind, []):
                kinds.append(code)
                exact.append(digest)
                sigs.append(empty if sig is None else sig.astype(np.uint32))
                has.append(sig is not None)
                ids.append(row_id)
                sources.append(source)
        name = f"snap-{self.cfg.snapshot}.npz"
        with atomic_path(self.folder / name) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(
                    fh, kind=np.asarray(kinds, dtype=np.uint8),
                    exact=np.frombuffer(b"".join(exact), dtype=np.uint8).reshape(len(exact), 20),
                    sig=np.asarray(sigs, dtype=np.uint32).reshape(len(sigs), self.cfg.num_perm),
                    has_sig=np.asarray(has, dtype=bool), id=np.asarray(ids, dtype=str),
                    source=np.asarray(sources, dtype=str))
        self.meta["snapshots"][self.cfg.snapshot] = {
            "file": name, "rows": {kind: len(entries.get(kind, [])) for kind in KINDS},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_json(self.folder / INDEX_FILE, self.meta)
        return self.meta


# ----------------------------------------------------------------------------- dedup


def _where(row: dict) -> tuple[str, int | None]:
    src = str(row.get("source", ""))
    path, _, num = src.rpartition(":")
    return (path, int(num)) if path and num.isdigit() else (src, None)


def _quarantine(row: dict, reason: str, message: str, duplicate_of: str | None, **extra) -> dict:
    path, num = _where(row)
    return {"source": path, "row": num, "reason": reason, "message": f"{row.get('source')}: {message}",
            "stage": "dedup", "original": row, "duplicate_of": duplicate_of, **extra}


@functools.lru_cache(maxsize=8)
def _lsh_params(cfg: DedupParams) -> tuple[int, int]:
    """(bands, rows) datasketch picks for the candidate threshold (computed once: it integrates)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=max(0.05, cfg.threshold - LSH_MARGIN), num_perm=cfg.num_perm)
    return lsh.b, lsh.r


class Decontamination:
    """Step 1 (``dedup.decontam_ngram``): drop a row sharing an n-word sequence with a benchmark item."""

    def __init__(self, index: ContaminationIndex | None, hasher: WordHasher) -> None:
        self.index, self.hasher = index, hasher
        self.by_benchmark: dict[str, int] = {}

    def __call__(self, kind: str, row: dict, text: str, wh: np.ndarray) -> dict | None:
        """The quarantine row when ``row`` is contaminated (preference rows: rejected read too)."""
        if not self.index:
            return None
        dtext = row_text(kind, row, with_rejected=True) if kind == "preference" else text
        dwh = wh if dtext is text else self.hasher(words(dtext))
        hit = self.index.match(dwh)
        if not hit:
            return None
        bench, item = hit
        self.by_benchmark[bench] = self.by_benchmark.get(bench, 0) + 1
        return _quarantine(row, "contaminated", f"shares a {self.index.n}-word sequence with benchmark {bench} "
                           f"item {item}", None, benchmark=bench, benchmark_item=item)


class Prior:
    """The earlier snapshots' entries of one kind (from :class:`DedupIndex`), as the dedup steps see them."""

    def __init__(self, prior: dict[str, np.ndarray] | None) -> None:
        self.data = prior or {}
        # first occurrence of each exact digest
        self.exact: dict[bytes, int] = ({d.tobytes(): i for i, d in reversed(list(enumerate(self.data["exact"])))}
                                        if self.data else {})

    def __bool__(self) -> bool:
        return bool(self.data)

    def row(self, i: int) -> tuple[str, str, str]:
        """(id, source, snapshot) of earlier entry ``i``."""
        return str(self.data["id"][i]), str(self.data["source"][i]), str(self.data["snapshot"][i])


class ExactDedup:
    """Step 2: the same hash of the normalized text as an earlier row (this snapshot or an earlier one)."""

    def __init__(self, prior: Prior) -> None:
        self.prior = prior
        self.seen: dict[bytes, dict] = {}

    @staticmethod
    def key(tokens: list[str], text: str) -> bytes:
        norm = " ".join(tokens)  # == normalize(text), reusing the tokens
        return hashlib.sha1((norm if norm else "raw:" + _SPACE.sub(" ", text).strip()).encode("utf-8")).digest()

    def __call__(self, row: dict, key: bytes) -> dict | None:
        """The quarantine row for a duplicate; otherwise ``key`` is remembered for ``row``."""
        first = self.seen.get(key)
        if first is not None:
            return _quarantine(row, "exact_duplicate", f"exact duplicate of {first.get('source')} (id {first['id']})",
                               first["id"])
        if key in self.prior.exact:
            pid, psrc, snap = self.prior.row(self.prior.exact[key])
            return _quarantine(row, "exact_duplicate", f"exact duplicate of {psrc} (id {pid}) in earlier snapshot "
                               f"{snap}", pid, of_snapshot=snap)
        self.seen[key] = row
        return None


class NearDedup:
    """Step 3 (``dedup.threshold``, ``num_perm``, ``shingle``): MinHash LSH candidates at
    ``threshold - LSH_MARGIN``; within this snapshot the exact Jaccard of the shingle sets decides,
    against an earlier snapshot (signatures only) the MinHash estimate."""

    def __init__(self, cfg: DedupParams, minhasher: MinHasher, prior: Prior) -> None:
        from datasketch import MinHashLSH

        self.cfg, self.minhasher, self.prior = cfg, minhasher, prior
        self.lsh = MinHashLSH(threshold=max(0.05, cfg.threshold - LSH_MARGIN), num_perm=cfg.num_perm,
                              params=_lsh_params(cfg))
        self.kept: list[dict] = []
        self.kept_shingles: list[np.ndarray] = []
        if prior:
            with self.lsh.insertion_session() as session:
                for i in np.flatnonzero(prior.data["has_sig"]).tolist():
                    session.insert(-(i + 1), _Sketch(prior.data["sig"][i]))

    def __call__(self, row: dict, shingles: np.ndarray) -> tuple[dict | None, "_Sketch | None"]:
        """(the quarantine row or None, the row's MinHash or None when it has no shingle)."""
        if not len(shingles):
            return None, None
        mh = self.minhasher.minhash(shingles)
        best, best_j = None, 0.0
        for cand in self.lsh.query(mh):
            if cand >= 0:  # this snapshot: the exact Jaccard of the shingle sets decides
                j = jaccard(shingles, self.kept_shingles[cand])
            else:  # an earlier snapshot: only its signature is kept, so the MinHash estimate decides
                j = float(np.mean(self.prior.data["sig"][-cand - 1] == mh.hashvalues))
            if j >= self.cfg.threshold and (best is None or j > best_j or (j == best_j and cand < best)):
                best, best_j = cand, j
        if best is None:
            return None, mh
        if best >= 0:
            orig = self.kept[best]
            oid, osrc, extra, where = orig["id"], orig.get("source"), {}, ""
        else:
            oid, osrc, snap = self.prior.row(-best - 1)
            extra, where = {"of_snapshot": snap}, f" in earlier snapshot {snap}"
        return _quarantine(row, "near_duplicate", f"near duplicate (Jaccard {best_j:.3f}) of {osrc} (id {oid}){where}",
                           oid, similarity=round(best_j, 4), **extra), mh

    def keep(self, row: dict, shingles: np.ndarray, mh: "_Sketch | None") -> None:
        if mh is not None:
            self.lsh.insert(len(self.kept), mh)
        self.kept.append(row)
        self.kept_shingles.append(shingles)


def dedup_kind(kind: str, rows: list[dict], cfg: DedupParams, index: ContaminationIndex | None,
               hasher: WordHasher, minhasher: MinHasher, prior: dict[str, np.ndarray] | None = None,
               ) -> tuple[list[dict], list[dict], dict, list]:
    """Decontaminate, exact- and near-dedup one kind's rows, also against ``prior`` (earlier snapshots'
    index entries). Returns (kept, quarantined, counts, index entries of the kept rows)."""
    earlier = Prior(prior)
    decontaminate, exact, near = Decontamination(index, hasher), ExactDedup(earlier), NearDedup(cfg, minhasher, earlier)
    entries: list[tuple[bytes, np.ndarray | None, str, str]] = []
    removed: list[dict] = []
    counts = {"read": len(rows), "kept": 0, "exact_duplicate": 0, "near_duplicate": 0, "contaminated": 0,
              "of_earlier_snapshot": 0}

    for row in rows:
        text = row_text(kind, row)
        tokens = words(text)
        wh = hasher(tokens)
        q = decontaminate(kind, row, text, wh)
        if q is None:
            key = ExactDedup.key(tokens, text)
            q = exact(row, key)
        if q is None:
            shingles = shingle_hashes(wh, cfg.shingle)
            q, mh = near(row, shingles)
        if q is not None:
            removed.append(q)
            counts[q["reason"]] += 1
            counts["of_earlier_snapshot"] += "of_snapshot" in q
            continue
        near.keep(row, shingles, mh)
        entries.append((key, None if mh is None else mh.hashvalues, str(row.get("id")), str(row.get("source"))))
    counts["kept"] = len(near.kept)
    if counts["kept"] + len(removed) != counts["read"]:  # the bookkeeping invariant
        raise AssertionError(f"dedup {kind}: kept {counts['kept']} + removed {len(removed)} != read {counts['read']}")
    counts["contaminated_by_benchmark"] = decontaminate.by_benchmark
    return near.kept, removed, counts, entries


def dedup_rows(rows_by_kind: dict[str, list[dict]], cfg: DedupParams,
               benchmarks: dict[str, list[dict]] | None = None, dedup_index: DedupIndex | None = None,
               ) -> tuple[dict[str, list[dict]], list[dict], dict]:
    """Dedup every kind (also against ``dedup_index``'s earlier snapshots, whose entry for this
    snapshot is then replaced); returns (kept rows per kind, quarantine rows, metrics)."""
    started = time.time()
    hasher = WordHasher()
    minhasher = MinHasher(cfg.num_perm)
    index = ContaminationIndex(benchmarks or {}, cfg.decontam_ngram, hasher)
    kept, removed, per_kind, entries = {}, [], {}, {}
    for kind in KINDS:
        prior = dedup_index.prior[kind] if dedup_index is not None else None
        kept[kind], rem, per_kind[kind], entries[kind] = dedup_kind(kind, rows_by_kind.get(kind, []), cfg, index,
                                                                    hasher, minhasher, prior)
        removed.extend(rem)
    elapsed = time.time() - started
    read = sum(c["read"] for c in per_kind.values())
    by_bench = {name: 0 for name in (benchmarks or {})}
    for c in per_kind.values():
        for name, n in c.pop("contaminated_by_benchmark").items():
            by_bench[name] = by_bench.get(name, 0) + n
    totals = {key: sum(c[key] for c in per_kind.values())
              for key in ("read", "kept", "exact_duplicate", "near_duplicate", "contaminated", "of_earlier_snapshot")}
    sources: dict[str, dict] = {}
    for kind, rows in ((k, rows_by_kind.get(k, [])) for k in KINDS):
        for row in rows:
            s = sources.setdefault(_where(row)[0], {"kind": kind, "read": 0, "kept": 0, "exact_duplicate": 0,
                                                    "near_duplicate": 0, "contaminated": 0})
            s["read"] += 1
    for q in removed:
        sources[q["source"]][q["reason"]] += 1
    for s in sources.values():
        s["kept"] = s["read"] - s["exact_duplicate"] - s["near_duplicate"] - s["contaminated"]
    index_info = None
    if dedup_index is not None:
        index_info = {"snapshot": cfg.snapshot, "earlier_snapshots": dedup_index.earlier_rows(),
                      "folder": str(dedup_index.folder)}
    metrics = {
        **totals,
        "removed": len(removed),
        "removed_share": round(len(removed) / read, 4) if read else 0.0,
        "kinds": per_kind,
        "contaminated_by_benchmark": by_bench,
        "benchmark_items": {name: len(items) for name, items in (benchmarks or {}).items()},
        "docs_per_s": round(read / elapsed, 1) if elapsed > 0 else None,
        "dedup_s": round(elapsed, 3),
        "index": index_info,
        "sources": sources,
    }
    assert totals["kept"] + len(removed) == totals["read"]
    if dedup_index is not None:
        dedup_index.record(entries)
    return kept, removed, metrics
