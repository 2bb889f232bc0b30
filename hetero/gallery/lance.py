"""Galleries in LanceDB: an embedded vector database (a Rust engine in the process, tables in a folder on local
disk or in object storage), with the same contract as a Milvus collection.

A table holds one row per image (`id`, `vector`); its embedding space (space id, family, member, dimension,
metric) is the metadata of its vector column, so a query from another space is refused before any search,
whoever wrote the table.  Rows are upserted by id, so a resumed ingestion never duplicates: ids the table may
hold go through a merge on the key, the others are appended (a merge joins the batch with every key in the
table, so a build by merges alone slows and grows with the table; see `KeyDigest`).  LanceDB has no aliases:
a one-row-per-alias table (`_aliases`) names the table each alias serves (looked up before a table of that
name), and moving an alias is one committed merge, so a search sees the old table or the new one, never a
half-built one.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from hetero.gallery.stores import (FLAT_MAX_ROWS, ID, IVF_NPROBE, MAX_ID_LENGTH, VECTOR, WRITER, DatabaseStore,
                                   Identity, StoreError, new_claim)

ALIASES = "_aliases"  # alias -> table: LanceDB has no aliases of its own
DIGEST_RUNS = 32  # sorted runs of fresh hashes a KeyDigest keeps before it merges them


class KeyDigest:
    """8-byte hashes of the ids a table holds, read from it once (8 bytes a row, never the ids themselves), then
    kept up to date with this process's own writes.  A hash is in the digest when its id may be in the table:
    deleted rows and hash collisions only send an id the slow, exact way, so the digest may hold too much but
    never too little; the store rereads it when the table moved on by another writer's commit."""

    def __init__(self, hashes: np.ndarray, version: int):
        self.runs, self.version = [np.sort(hashes)], version

    @staticmethod
    def of(ids: list[str]) -> np.ndarray:  # Python's hash is salted per process: a digest is never stored
        return np.fromiter((hash(i) for i in ids), np.int64, len(ids))

    def may_hold(self, ids: list[str]) -> np.ndarray:
        wanted = self.of(ids)
        found = np.zeros(len(ids), bool)
        for run in filter(len, self.runs):
            found |= run[np.minimum(np.searchsorted(run, wanted), len(run) - 1)] == wanted
        return found

    def add(self, ids: list[str]) -> None:
        self.runs.append(np.sort(self.of(ids)))
        if len(self.runs) > DIGEST_RUNS:  # merge: a search per run per write would grow with the ingestion
            self.runs = [np.sort(np.concatenate(self.runs))]


class LanceStore(DatabaseStore):
    """One table (or alias) in a LanceDB database folder; every call names the folder and table in its errors.

    Opening a folder that does not exist creates a database there, so only a builder passes `create`: a
    search, delete or adopt with a mistyped --uri is refused instead of leaving an empty one.
    """

    noun, flag = "table", "lance"

    def __init__(self, uri: str, collection: str, create: bool = False):
        self.uri, self.name = str(uri), collection
        if not create and "://" not in self.uri and not Path(self.uri).is_dir():
            raise StoreError(f"--uri {self.uri}: no LanceDB database there; check the path, or make one with "
                             f"`hetero gallery build --store lance`")
        try:
            import lancedb
        except ImportError:
            raise StoreError("galleries in LanceDB need lancedb: pip install lancedb") from None
        self.db = self._call("opening the database", lancedb.connect, self.uri)
        self._table, self._digest = None, None

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StoreError:
            raise
        except Exception as err:  # lancedb raises its own errors, pyarrow and OSError theirs
            raise StoreError(f"{self.uri} table {self.name!r}: {what} failed ({type(err).__name__}: "
                             f"{' '.join(str(err).split())[:300]})") from None

    # -- the table and its identity

    def _tables(self) -> list[str]:
        listed = self._call("listing tables", self.db.list_tables)
        return list(getattr(listed, "tables", listed))

    @property
    def collection(self) -> str:
        """The table `name` is, or the one the alias `name` names."""
        if ALIASES in self._tables():
            rows = self._call("reading the aliases", lambda: self.db.open_table(ALIASES).search()
                              .where(f"alias = {_quote(self.name)}").select(["table"]).limit(1).to_arrow())
            if rows.num_rows:
                return rows["table"][0].as_py()
        return self.name

    def table(self):
        if self._table is None:
            self._table = self._call("opening it", self.db.open_table, self.collection)
        return self._table

    def exists(self) -> bool:
        return self.collection in self._tables()

    def properties(self) -> dict:
        _, vector, _ = self.fields()
        field = self.table().schema.field(vector)
        return {k.decode(): v.decode() for k, v in (field.metadata or {}).items()}

    def create(self, identity: Identity, rows_hint: int = 0) -> None:
        import pyarrow as pa

        schema = pa.schema([pa.field(ID, pa.string()),
                            pa.field(VECTOR, pa.list_(pa.float32(), identity.dim), metadata=identity.properties())])
        self._table = self._call("creating it", self.db.create_table, self.collection, schema=schema)
        self._digest = None

    def _set_properties(self, what: str, values: dict) -> None:
        _, vector, _ = self.fields()
        table = self.table()
        self._call("reading its version", table.checkout_latest)
        current = self._digest is not None and self._digest.version == table.version
        self._call(what, table.update_field_metadata, {"path": vector, "metadata": values})
        if current:  # a metadata commit (a builder renews its claim per block) moves no row: keep the digest
            self._digest.version = table.version

    def stamp(self, identity: Identity) -> None:
        self._set_properties("writing its identity", identity.properties())

    def drop(self) -> None:
        self._call("dropping it", self.db.drop_table, self.collection)
        self._table, self._digest = None, None

    def fields(self) -> tuple[str, str, int]:
        """(id field, vector field, dimension): hetero's, or another tool's (its one string column and its one
        float vector column)."""
        import pyarrow as pa

        schema = self.table().schema
        ids = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
        vectors = [f for f in schema if pa.types.is_fixed_size_list(f.type) and pa.types.is_floating(f.type.value_type)]
        primary = ID if ID in ids else (ids[0] if len(ids) == 1 else None)
        if primary is None or len(vectors) != 1:
            raise StoreError(f"{self.uri} table {self.name!r} needs one string id column and one float vector "
                             f"column (found {len(ids)} and {len(vectors)})")
        return primary, vectors[0].name, vectors[0].type.list_size

    # -- rows

    def count(self) -> int:
        return int(self._call("counting rows", self.table().count_rows))

    def _rows(self, ids: list[str], columns: list[str]):
        primary, _, _ = self.fields()
        found = []
        for begin in range(0, len(ids), 1000):  # one filter per thousand names
            chunk = ", ".join(_quote(i) for i in ids[begin:begin + 1000])
            found.append(self._call("reading rows", lambda: self.table().search().where(f"{primary} IN ({chunk})")
                                    .select(columns).limit(None).to_arrow()))
        return found

    def present(self, ids: list[str]) -> set[str]:
        """Which of `ids` the table already holds (a resumed build skips them); only those the digest may hold
        are looked up."""
        primary, _, _ = self.fields()
        ids = list(ids)
        maybe = [name for name, hit in zip(ids, self.digest().may_hold(ids)) if hit] if ids else []
        return {name for rows in self._rows(maybe, [primary]) for name in rows[primary].to_pylist()}

    def digest(self) -> KeyDigest:
        """The table's KeyDigest: read in batches of ids on first use, and again once another writer commits."""
        table = self.table()
        self._call("reading its version", table.checkout_latest)
        if self._digest is None or self._digest.version != table.version:
            primary, _, _ = self.fields()
            reader = self._call("reading its ids", lambda: table.search().select([primary]).limit(None)
                                .to_batches(65_536))
            hashes = [KeyDigest.of(batch.column(primary).to_pylist()) for batch in reader]
            self._digest = KeyDigest(np.concatenate(hashes) if hashes else np.zeros(0, np.int64), table.version)
        return self._digest

    def vectors(self, ids: list[str]) -> dict[str, np.ndarray]:
        primary, vector, _ = self.fields()
        out = {}
        for rows in self._rows(list(ids), [primary, vector]):
            for name, values in zip(rows[primary].to_pylist(), rows[vector].to_pylist()):
                out[name] = np.asarray(values, dtype=np.float32)
        return out

    def upsert(self, ids: list[str], vectors: np.ndarray) -> None:
        import pyarrow as pa

        long = [i for i in ids if len(i.encode()) > MAX_ID_LENGTH]
        if long:
            raise StoreError(f"image name {long[0][:80]!r}... is longer than {MAX_ID_LENGTH} bytes, the key limit")
        primary, vector, dim = self.fields()
        ids, digest = list(ids), self.digest()
        values = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), dim)
        maybe = digest.may_hold(ids)
        for part in (maybe, ~maybe):  # two commits at most, each whole or absent after a crash
            if not part.any():
                continue
            rows = pa.table({primary: pa.array([i for i, keep in zip(ids, part) if keep], pa.string()),
                             vector: pa.FixedSizeListArray.from_arrays(pa.array(values[part].reshape(-1)), dim)})
            rows = rows.cast(self.table().schema)
            if part is maybe:
                self._call("writing rows", lambda: self.table().merge_insert(primary).when_matched_update_all()
                           .when_not_matched_insert_all().execute(rows))
            else:
                self._call("writing rows", self.table().add, rows)
        digest.add(ids)
        digest.version = self.table().version

    def delete(self, ids: list[str]) -> None:
        primary, _, _ = self.fields()
        for begin in range(0, len(ids), 1000):
            chunk = ", ".join(_quote(i) for i in ids[begin:begin + 1000])
            self._call("deleting rows", self.table().delete, f"{primary} IN ({chunk})")

    def flush(self) -> None:
        """Compact the table (each upsert wrote a small file of its own) and index it: exact search up to
        FLAT_MAX_ROWS rows, IVF-Flat above, trained as FAISS files are (nlist ~ sqrt(rows), 64 training vectors
        per list, 10 k-means iterations; LanceDB's defaults, 256 and 50, took 1.8x as long on 400k rows)."""
        from lancedb.index import IvfFlat

        self._call("compacting it", self.table().optimize)  # older versions are kept (their readers may be on them)
        rows = self.count()
        if rows <= FLAT_MAX_ROWS:
            return
        _, vector, _ = self.fields()
        lists = max(1, 2 ** round(math.log2(math.sqrt(rows))))
        config = IvfFlat(distance_type="dot", num_partitions=lists, sample_rate=64, max_iterations=10)
        self._call("indexing it", self.table().create_index, vector, config=config, replace=True)

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> list[list[tuple[str, float]]]:
        """Per query, (id, score) of its k nearest rows, best first (`nprobe`: IVF lists to visit)."""
        primary, vector, _ = self.fields()
        queries = np.asarray(queries, np.float32)
        if not len(queries):
            return []
        found = self._call("searching", lambda: self.table().search(list(queries), vector_column_name=vector)
                           .distance_type("dot").nprobes(nprobe or IVF_NPROBE).limit(k)
                           .select([primary, "_distance"]).to_arrow())
        # one call for the batch: a query_index column says whose row is whose (absent for a single query)
        which = found["query_index"].to_pylist() if "query_index" in found.column_names else [0] * found.num_rows
        out = [[] for _ in queries]
        for query, name, distance in zip(which, found[primary].to_pylist(), found["_distance"].to_pylist()):
            out[query].append((name, 1.0 - float(distance)))  # LanceDB's dot distance is 1 - <q, v>
        return [sorted(hits, key=lambda hit: -hit[1]) for hits in out]

    # -- writers and aliases

    def claim(self) -> None:
        """Record this process as the table's one builder; refuse while another one's claim is fresh."""
        mine = new_claim(self.properties().get(WRITER), f"{self.uri} table {self.name!r}", "--collection")
        self._set_properties("claiming it", {WRITER: mine})

    def release(self) -> None:
        self._set_properties("releasing it", {WRITER: None})

    def rename(self, new_name: str) -> None:
        """Name this table `new_name` too (LanceDB renames no tables: an alias does it), so that its own name can
        become an alias of another table (an alias is looked up before a table of the same name)."""
        self.point_alias(new_name)
        self.name = new_name

    def point_alias(self, alias: str) -> None:
        """Make `alias` name this table, in one committed merge of the alias table."""
        import pyarrow as pa

        row = pa.table({"alias": [alias], "table": [self.collection]})
        if ALIASES not in self._tables():
            self._call("creating the alias table", self.db.create_table, ALIASES, data=row)
            return
        self._call("moving the alias", lambda: self.db.open_table(ALIASES).merge_insert("alias")
                   .when_matched_update_all().when_not_matched_insert_all().execute(row))

    def close(self) -> None:
        self._table, self._digest = None, None


def _quote(text: str) -> str:
    """A string literal for a LanceDB filter (SQL: a quote is doubled)."""
    return "'" + text.replace("'", "''") + "'"
