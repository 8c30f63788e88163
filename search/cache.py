"""`EvalCache`: objective values persisted in SQLite, keyed by (context, canonical config hash).

The context names everything a value depends on besides the config (the objective, the space
fingerprint, the checkpoint or profile checksum, evaluation settings), so reruns and other
searches reuse evaluations and functionally equivalent configs (same canonical hash) are never
evaluated twice. WAL mode lets several searches share one file. A corrupt cache (a SQLite file
whose integrity check fails) is moved aside with its -wal file and recreated with a warning;
anything else at the path (a folder, another kind of file, a database of another schema) is
refused and left untouched. A database error mid-search degrades to an in-memory cache rather
than stopping the search.
"""

from __future__ import annotations

import os
import sqlite3
import warnings
from collections.abc import Iterable
from pathlib import Path

from typing_extensions import Self

from nestnas.errors import ConfigError

SCHEMA = "CREATE TABLE IF NOT EXISTS evals (context TEXT NOT NULL, hash TEXT NOT NULL, value REAL NOT NULL, " \
         "PRIMARY KEY (context, hash)) WITHOUT ROWID"
COLUMNS = ["context", "hash", "value"]
SQLITE_HEADER = b"SQLite format 3\x00"


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
        problem = self._inspect()
        if problem is not None:
            self._move_aside(problem)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return self._connect(str(self.path))
        except OSError as exc:
            raise ConfigError(f"evaluation cache {self.path}: cannot create {self.path.parent} ({exc.strerror})") \
                from None
        except sqlite3.Error as exc:
            raise ConfigError(f"evaluation cache {self.path} cannot be opened: {exc}") from None

    def _refuse(self, what: str) -> ConfigError:
        return ConfigError(f"evaluation cache {self.path} is {what}, not a nestnas evaluation cache; "
                           "it was left untouched: give another --cache path")

    def _inspect(self) -> str | None:
        """None if the path is absent or a usable cache (or an empty database); the reason if it
        is a corrupt SQLite file; raises ConfigError for anything that is not ours to replace.
        Only reads: a file that is refused stays byte for byte as it was."""
        path = self.path
        try:
            if not path.exists():
                if path.parent.exists() and not path.parent.is_dir():
                    raise ConfigError(f"evaluation cache {path}: {path.parent} is a file, not a folder")
                return None
            if path.is_dir():
                raise self._refuse("a folder")
            if not path.is_file():
                raise self._refuse("not a regular file")
            with open(path, "rb") as f:
                header = f.read(len(SQLITE_HEADER))
        except OSError as exc:
            raise ConfigError(f"evaluation cache {path} cannot be read: {exc.strerror}") from None
        if not header:
            return None  # an empty file is an empty database to SQLite
        if header != SQLITE_HEADER:
            raise self._refuse("not a SQLite database")
        # A read-only connection to a WAL database makes -wal/-shm files it cannot remove; remove
        # the ones made here unless the cache is used (then this process's connection owns them).
        made = [f for f in (Path(f"{path}-wal"), Path(f"{path}-shm")) if not f.exists()]
        reason: str | None = "refused"  # until checked: an exception leaves nothing behind either
        try:
            reason = self._check_database()
        finally:
            if reason is not None:
                for f in made:
                    f.unlink(missing_ok=True)
        return reason

    def _check_database(self) -> str | None:
        """None for a nestnas cache or an empty database, the reason for a corrupt one; raises
        ConfigError for a database of another schema or one that cannot be read."""
        db = None
        try:
            db = sqlite3.connect(self.path.absolute().as_uri() + "?mode=ro", uri=True, timeout=30.0)
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                return f"integrity check: {check}"
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                               "AND name NOT LIKE 'sqlite%'")]
            columns = [r[1] for r in db.execute("PRAGMA table_info(evals)")]
        except sqlite3.OperationalError as exc:  # locked, unreadable: not evidence of corruption
            raise ConfigError(f"evaluation cache {self.path} cannot be opened: {exc}") from None
        except sqlite3.DatabaseError as exc:
            return str(exc)
        finally:
            if db is not None:
                db.close()
        if tables and (tables != ["evals"] or columns != COLUMNS):
            raise self._refuse(f"a SQLite database of another schema (tables: {', '.join(sorted(tables))})")
        return None

    def _move_aside(self, reason: str) -> None:
        """Move a corrupt cache and its -wal if any (uncheckpointed pages, kept for inspection) to a
        free `.corrupt` name; an empty -wal and the -shm (an index of the -wal) are removed."""
        n = 0
        while True:
            aside = Path(f"{self.path}.corrupt" + (f"-{n}" if n else ""))
            if not any(Path(f"{aside}{s}").exists() for s in ("", "-wal")):
                break
            n += 1
        wal, shm = Path(f"{self.path}-wal"), Path(f"{self.path}-shm")
        try:
            os.replace(self.path, aside)
            if wal.exists() and wal.stat().st_size:
                os.replace(wal, f"{aside}-wal")
            wal.unlink(missing_ok=True)
            shm.unlink(missing_ok=True)
        except OSError as exc:
            raise ConfigError(f"evaluation cache {self.path} is corrupt ({reason}) and cannot be moved aside: "
                              f"{exc.strerror}") from None
        warnings.warn(f"evaluation cache {self.path} is corrupt ({reason}); moved to {aside} and recreated",
                      CacheWarning, stacklevel=4)

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
