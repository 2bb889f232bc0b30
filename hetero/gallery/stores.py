"""Gallery stores: the interface every backend offers (`VectorStore`), and galleries in a vector database:
Milvus, embedded (Milvus Lite, a local path) or a server, one client API.

`--uri runs/omniglot/gallery.db` runs Milvus Lite inside the process (no server; what the tests use);
`--uri http://host:19530` talks to a standalone or distributed Milvus, or to `milvus-lite server`, with the
same pymilvus client: moving from a laptop to a cluster changes the URI, not the code.

The collection carries its embedding space in its own properties (space id, family, member, dimension,
metric), so a search from another space is refused before any query is sent, whoever wrote the
collection; one written by another tool is refused until `hetero gallery adopt` proves its space.  Rows
are keyed by the image's name: writing a row again replaces it, so a resumed ingestion never duplicates.
"""
from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from hetero.errors import ManifestError

FORMAT = "hetero-gallery/1"
PREFIX = "hetero."
ID, VECTOR = "id", "vector"
WRITER = PREFIX + "writer"  # the property holding the one builder's claim
MAX_ID_LENGTH = 2048
METRIC = "IP"  # unit vectors: inner product is the cosine
# A builder's claim on a collection expires when it has not been renewed for this long (a crashed builder).
LEASE_SECONDS = 600
# Index by size, as for FAISS files (hetero.gallery): exact search up to 100k rows, IVF-Flat above with
# nlist ~ sqrt(rows) and nprobe 32 (HNSW's build took ~13 min per million rows on 2 cores here).
FLAT_MAX_ROWS = 100_000
IVF_NPROBE = 32


class VectorStore(Protocol):
    """What a gallery backend offers a search, whichever holds the rows: FAISS files (`hetero.gallery.Gallery`)
    or a Milvus collection (`MilvusStore`).  `search_images` takes any of them.

    A store knows the embedding space of its vectors and refuses a query from another one before any query
    is sent.  Writing is not part of it: a FAISS gallery is written whole (`hetero gallery build` or `import`:
    sharded files, then one index), while a collection takes rows one by one (`MutableVectorStore`).
    """

    @property
    def space_id(self) -> str | None:
        """The space the stored vectors are in (None: a store that does not say, such as an unadopted
        collection another tool wrote)."""

    def count(self) -> int:
        """Rows stored."""

    def check_space(self, query_space: str | None, query: str) -> object:
        """Refuse a query embedded in another space than the store's (an error naming both spaces, a subclass
        of `ManifestError`), before any query is sent; what it returns otherwise is the backend's own."""

    def nearest(self, queries: np.ndarray, k: int, query_space: str | None, query: str = "the query model",
                nprobe: int | None = None) -> list[list[dict]]:
        """Per query, its k nearest rows as {"name", "score", ...}, best first; the space is checked first."""


class MutableVectorStore(VectorStore, Protocol):
    """A store that takes rows one by one, keyed by the image's name: writing a name again replaces its row."""

    def present(self, ids: list[str]) -> set[str]:
        """Which of `ids` the store already holds."""

    def upsert(self, ids: list[str], vectors: np.ndarray) -> None:
        """Write the rows `ids` -> `vectors`, replacing any with the same id."""

    def delete(self, ids: list[str]) -> None:
        """Remove the rows `ids`."""


class StoreError(ManifestError):
    """A vector store that cannot be reached or used as asked, with a message for people."""


class StoreSpaceMismatch(StoreError):
    """A collection from another embedding space, or one that does not say which."""


@dataclass(frozen=True)
class Identity:
    """What a collection's vectors are: the space, the model that embedded them, their shape."""

    space_id: str
    family: str
    member: str
    dim: int
    metric: str = METRIC
    format: str = FORMAT

    def properties(self) -> dict[str, str]:
        return {PREFIX + key: str(value) for key, value in asdict(self).items()}

    @classmethod
    def from_properties(cls, properties: dict) -> "Identity | None":
        values = {key[len(PREFIX):]: value for key, value in (properties or {}).items() if key.startswith(PREFIX)}
        try:
            return cls(space_id=values["space_id"], family=values["family"], member=values["member"],
                       dim=int(values["dim"]), metric=values.get("metric", METRIC), format=values.get("format", FORMAT))
        except (KeyError, ValueError):
            return None


def new_claim(recorded: str | None, where: str, flag: str) -> str:
    """This process's claim as the one builder of a store (to record in its properties), after refusing while
    the claim `recorded` there is another live builder's and fresh."""
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "renewed": time.time()}
    other = _claim_holder(recorded)
    if other is not None and (other["pid"], other["host"]) != (mine["pid"], mine["host"]) and \
            time.time() - other["renewed"] < LEASE_SECONDS and _may_be_alive(other):
        raise StoreError(f"{where} is being written by another builder (pid {other['pid']} on {other['host']}, last "
                         f"seen {time.time() - other['renewed']:.0f} s ago); wait for it, or use another {flag}")
    return json.dumps(mine)


def _claim_holder(text: str | None) -> dict | None:
    """A builder's claim as recorded in the collection's properties; None when there is none or it is
    unreadable (a claim nobody can read cannot be honoured)."""
    try:
        claim = json.loads(text) if text else None
    except ValueError:
        return None
    readable = isinstance(claim, dict) and {"pid", "host"} <= set(claim) and \
        isinstance(claim.get("renewed"), (int, float))
    return claim if readable else None


def _may_be_alive(claim: dict) -> bool:
    """False only for a holder on this host whose process is gone (killed with -9: no release ran), so its
    claim is stale at once instead of after LEASE_SECONDS; a holder elsewhere is trusted until its lease ends."""
    if claim["host"] != socket.gethostname():
        return True
    try:
        os.kill(int(claim["pid"]), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        pass  # it exists under another user, or the pid is not a number we can ask about
    return True


def is_embedded(uri: str) -> bool:
    return not uri.startswith(("http://", "https://", "tcp://", "grpc://"))


class DatabaseStore:
    """What a gallery in a vector database offers whatever the database (Milvus, LanceDB): the identity in the
    collection's (table's) own properties, the space check before any query, and `nearest` over the
    backend's `search`.  A backend names its `noun` and `flag` (the `--store` value) in messages."""

    uri: str
    name: str
    noun = "collection"
    flag = "milvus"

    def identity(self) -> Identity | None:
        return Identity.from_properties(self.properties())

    @property
    def space_id(self) -> str | None:
        """The space in the collection's properties; None for one that does not say (another tool wrote it)."""
        identity = self.identity()
        return identity.space_id if identity is not None else None

    def check_space(self, query_space: str | None, query: str) -> Identity:
        """The collection's identity, after refusing a query from another space (before any query is sent)."""
        where = f"{self.uri} {self.noun} {self.name!r}"
        if not self.exists():
            raise StoreError(f"{self.uri}: no {self.noun} or alias {self.name!r}; build one with `hetero gallery "
                             f"build --store {self.flag}`")
        identity = self.identity()
        if identity is None:
            raise StoreSpaceMismatch(
                f"{where} does not say which embedding space its vectors are in (it was not written by hetero); "
                f"prove it with `hetero gallery adopt`, which re-embeds a sample first")
        if identity.space_id != query_space:
            raise StoreSpaceMismatch(
                f"{query} embeds into space {query_space!r} but {where} holds space {identity.space_id!r} (family "
                f"{identity.family!r}, member {identity.member!r}); their vectors are not comparable. Query with a "
                f"model of that family, or migrate the gallery (`hetero gallery migrate`).")
        return identity

    def nearest(self, queries: np.ndarray, k: int, query_space: str | None, query: str = "the query model",
                nprobe: int | None = None) -> list[list[dict]]:
        """Per query, its k nearest rows as {"name", "score"}, best first (`hetero gallery search`)."""
        self.check_space(query_space, query)
        return [[{"name": name, "score": score} for name, score in hits] for hits in self.search(queries, k, nprobe)]


class MilvusStore(DatabaseStore):
    """One collection (or alias) in Milvus; every call names the URI and collection in its errors.

    Opening a Milvus Lite path that does not exist creates a database there, so only a builder passes
    `create`: a search, delete or adopt with a mistyped --uri is refused instead of leaving an empty one.
    """

    def __init__(self, uri: str, collection: str, timeout: float = 20, create: bool = False):
        self.uri, self.name, self.timeout = str(uri), collection, timeout
        if is_embedded(self.uri) and not create and not Path(self.uri).exists():
            raise StoreError(f"--uri {self.uri}: no Milvus Lite database there; check the path, or make one with "
                             f"`hetero gallery build --store milvus`")
        self.client = self._connect()
        self._loaded: str | None = None

    def _connect(self):
        import logging

        # pymilvus logs every failed call with a traceback (a missing alias included), and Milvus Lite's
        # in-process server logs the calls it does not implement: our errors say what matters.
        for name in ("pymilvus", "grpc._server", "milvus_lite"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        try:
            from pymilvus import MilvusClient
        except ImportError:
            raise StoreError("galleries in Milvus need pymilvus and milvus-lite: pip install pymilvus milvus-lite") \
                from None
        if is_embedded(self.uri):
            Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            return MilvusClient(uri=self.uri, timeout=self.timeout)
        except Exception as err:  # pymilvus raises its own MilvusException, and grpc its errors
            kind = "database" if is_embedded(self.uri) else "server"
            raise StoreError(f"--uri {self.uri}: cannot reach a Milvus {kind} there ({type(err).__name__}: "
                             f"{' '.join(str(err).split())[:300]})") from None

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StoreError:
            raise
        except Exception as err:
            raise StoreError(f"{self.uri} collection {self.name!r}: {what} failed ({type(err).__name__}: "
                             f"{' '.join(str(err).split())[:300]})") from None

    # -- the collection and its identity

    @property
    def collection(self) -> str:
        """The collection `name` is, or the one it is an alias of."""
        if self.name in self._aliases():
            return self._call("reading the alias", self.client.describe_alias, self.name)["collection_name"]
        return self.name

    def _aliases(self) -> list[str]:
        found = self._call("listing aliases", self.client.list_aliases)
        return list(found.get("aliases", []) if isinstance(found, dict) else found)

    def _load(self) -> str:
        """The collection, loaded for reading (a collection opened anew starts released); resolved once."""
        if not self._loaded:
            self._loaded = self.collection
            self._call("loading it", self.client.load_collection, self._loaded)
        return self._loaded

    def flush(self) -> None:
        """Seal what was written (Milvus then searches it through its index, not row by row)."""
        self._call("flushing it", self.client.flush, self.collection)

    def exists(self) -> bool:
        return bool(self._call("listing collections", self.client.has_collection, self.collection))

    def properties(self) -> dict:
        return self._call("describing it", self.client.describe_collection, self.collection).get("properties") or {}

    def create(self, identity: Identity, rows_hint: int = 0) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(ID, DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH)
        schema.add_field(VECTOR, DataType.FLOAT_VECTOR, dim=identity.dim)
        index = self.client.prepare_index_params()
        if rows_hint > FLAT_MAX_ROWS:
            nlist = max(1, 2 ** round(math.log2(math.sqrt(rows_hint))))
            index.add_index(field_name=VECTOR, index_type="IVF_FLAT", metric_type=identity.metric,
                            params={"nlist": nlist})
        else:
            index.add_index(field_name=VECTOR, index_type="FLAT", metric_type=identity.metric)
        self._call("creating it", self.client.create_collection, self.collection, schema=schema, index_params=index,
                   properties=identity.properties())

    def stamp(self, identity: Identity) -> None:
        self._call("writing its properties", self.client.alter_collection_properties, self.collection,
                   properties=identity.properties())

    def drop(self) -> None:
        self._call("dropping it", self.client.drop_collection, self.collection)

    def rename(self, new_name: str) -> None:
        self._call(f"renaming it to {new_name!r}", self.client.rename_collection, self.collection, new_name)
        self.name = new_name

    def fields(self) -> tuple[str, str, int]:
        """(id field, vector field, dimension) of any collection, hetero's or another tool's."""
        described = self._call("describing it", self.client.describe_collection, self.collection)
        primary = next((f["name"] for f in described["fields"] if f.get("is_primary")), None)
        vector = next(((f["name"], int(f.get("params", {}).get("dim", 0))) for f in described["fields"]
                       if getattr(f.get("type"), "name", str(f.get("type"))) == "FLOAT_VECTOR"), None)
        if primary is None or vector is None:
            raise StoreError(f"{self.uri} collection {self.name!r} has no primary key or no float vector field")
        return primary, vector[0], vector[1]

    # -- rows

    def count(self) -> int:
        answer = self._call("counting rows", self.client.query, self._load(), filter="", output_fields=["count(*)"])
        return int(answer[0]["count(*)"])

    def present(self, ids: list[str]) -> set[str]:
        """Which of `ids` the collection already holds (a resumed build skips them)."""
        if not ids:
            return set()
        found = self._call("reading rows", self.client.get, self._load(), ids=list(ids), output_fields=[ID])
        return {row[ID] for row in found}

    def vectors(self, ids: list[str]) -> dict[str, np.ndarray]:
        primary, vector, _ = self.fields()
        found = self._call("reading rows", self.client.get, self._load(), ids=list(ids),
                           output_fields=[primary, vector])
        return {row[primary]: np.asarray(row[vector], dtype=np.float32) for row in found}

    def upsert(self, ids: list[str], vectors: np.ndarray) -> None:
        long = [i for i in ids if len(i.encode()) > MAX_ID_LENGTH]
        if long:
            raise StoreError(f"image name {long[0][:80]!r}... is longer than {MAX_ID_LENGTH} bytes, the key limit")
        rows = [{ID: name, VECTOR: vector.tolist()} for name, vector in zip(ids, np.asarray(vectors, np.float32))]
        self._call("writing rows", self.client.upsert, self.collection, rows)

    def delete(self, ids: list[str]) -> None:
        self._call("deleting rows", self.client.delete, self.collection, ids=list(ids))

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> list[list[tuple[str, float]]]:
        """Per query, (id, score) of its k nearest rows, best first (`nprobe`: IVF lists to visit)."""
        params = {"metric_type": METRIC, "params": {"nprobe": nprobe or IVF_NPROBE}}
        data = np.asarray(queries, np.float32).tolist()
        primary, vector, _ = self.fields()  # an adopted collection names its key and vector fields its own way
        answer = self._call("searching", self.client.search, self._load(), data=data, limit=k, search_params=params,
                            anns_field=vector, output_fields=[primary])
        return [[(hit["entity"][primary], float(hit["distance"])) for hit in hits] for hits in answer]

    # -- writers and aliases

    def claim(self) -> None:
        """Record this process as the collection's one builder; refuse while another one's claim is fresh."""
        mine = new_claim(self.properties().get(WRITER), f"{self.uri} collection {self.name!r}", "--collection")
        self._call("claiming it", self.client.alter_collection_properties, self.collection,
                   properties={WRITER: mine})

    def release(self) -> None:
        self._call("releasing it", self.client.drop_collection_properties, self.collection, property_keys=[WRITER])

    def point_alias(self, alias: str) -> None:
        """Make `alias` name this collection (created, or moved in one step from the collection it named)."""
        if alias in self._aliases():
            self._call("moving the alias", self.client.alter_alias, self.collection, alias)
        else:
            self._call("creating the alias", self.client.create_alias, self.collection, alias)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass
