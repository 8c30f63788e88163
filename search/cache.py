"""`EvalCache`: objective values persisted in SQLite, keyed by (context, canonical config hash).

The context names everything a value depends on besides the config (the objective, the space
fingerprint, the checkpoint or profile checksum, evaluation settings), so reruns and other
searches reuse evaluations and functionally equivalent configs (same canonical hash) are never
evaluated twice. WAL mode lets several searches share one file. A corrupt database is moved aside
and recreated with a warning; a database error mid-search degrades to an in-memory cache rather
than stopping the search.
"""

from __future__ import annotations

import os
import sqlite3
import warnings
from collections.abc import Iterable
from pathlib import Path

from typing_extensions import Self

SCHEMA = "CREATE TABLE IF NOT EXISTS evals (context TEXT NOT NULL, hash TEXT NOT NULL, value REAL NOT NULL, " \
         "PRIMARY KEY (context, hash)) WITHOUT ROWID"


class CacheWarning(UserWarning):
    """The evaluation cache had to be recreated or dropped; results are unaffected."""


class EvalCache:
    """Persistent (or, with `path=None`, in-memory) store of objective values."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self.hits = 0
        self.misses = 0
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        if self.path is None:
            return self._connect(":memory:")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = self._connect(str(self.path))
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            return db
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(self.path.name + ".corrupt")
            warnings.warn(f"evaluation cache {self.path} is corrupt ({exc}); moved to {aside} and recreated",
                          CacheWarning, stacklevel=3)
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    os.replace(src, str(aside) + suffix)
            return self._connect(str(self.path))

    @staticmethod
    def _connect(where: str) -> sqlite3.Connection:
        db = sqlite3.connect(where, timeout=30.0)
        if where != ":memory:":
            db.execute("PRAGMA journal_mode=WAL")
        db.execute(SCHEMA)
        db.commit()
        return db

    def _degrade(self, exc: Exception) -> None:
        warnings.warn(f"evaluation cache {self.path} failed ({exc}); continuing with an in-memory cache",
                      CacheWarning, stacklevel=3)
        try:
            self._db.close()
        except sqlite3.Error:
            pass
        self.path = None
        self._db = self._connect(":memory:")

    def get(self, context: str, hashes: Iterable[str]) -> dict[str, float]:
        """The cached values among `hashes` (counted as hits; the rest as misses)."""
        hashes = list(dict.fromkeys(hashes))
        found: dict[str, float] = {}
        try:
            for i in range(0, len(hashes), 500):
                chunk = hashes[i:i + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(f"SELECT hash, value FROM evals WHERE context = ? AND hash IN ({marks})",
                                        [context, *chunk])
                found.update(rows.fetchall())
        except sqlite3.DatabaseError as exc:
            self._degrade(exc)
            found = {}
        self.hits += len(found)
        self.misses += len(hashes) - len(found)
        return found

    def put(self, context: str, values: dict[str, float]) -> None:
        try:
            self._db.executemany("INSERT OR REPLACE INTO evals VALUES (?, ?, ?)",
                                 [(context, h, float(v)) for h, v in values.items()])
            self._db.commit()
        except sqlite3.DatabaseError as exc:
            self._degrade(exc)
            self.put(context, values)

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM evals").fetchone()[0]

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
