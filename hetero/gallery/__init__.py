"""Galleries: embed a folder or zip of images with the cloud member into sharded files, index them with
FAISS, and search them with any member of the family or any exported artifact of the same space.

A gallery directory holds::

    gallery.json                       space id, member, dim, source, plan, shards, index (written last)
    shards/shard-00000.safetensors     float32 "embeddings" [rows, dim]; metadata "hetero": space id, member
    shards/shard-00000.json            the names of its rows, unreadable images skipped, the tensor file's
                                       sha256: the shard's "done" marker, written after the tensor file
    index.faiss                        FAISS index over every row, rows numbered in shard order

The rooms, bottom to top: `base` (file names, errors, the member), `images` (listing, reading, the one
batched embed loop), `index` (FAISS indexes, `Gallery`), `build` (sharded build), `vectors` (import of
vectors from elsewhere, proved by re-embedding), `query` (query models, `search_images`); `stores` holds the
`VectorStore` interface and the Milvus store, `db` the gallery verbs on a Milvus collection.
"""
from __future__ import annotations

from hetero.gallery.base import FORMAT, GALLERY, INDEX_FILE, GalleryError, SpaceMismatch, member_record
from hetero.gallery.build import build_gallery, clear_gallery, finish_gallery, plan_fingerprint, write_shard
from hetero.gallery.images import ImageEntry, ImageFiles, collate_images, embed_batches, in_batches, list_images
from hetero.gallery.index import (FLAT_MAX_ROWS, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, INDEX_KINDS,
                                  IVF_NPROBE, Gallery, build_index, choose_index, iter_shards, ivf_lists, make_index)
from hetero.gallery.query import QueryModel, exit_summary, open_query_model, search_images
from hetero.gallery.stores import MutableVectorStore, VectorStore
from hetero.gallery.vectors import COSINE_TO_ACCEPT, VECTOR_SUFFIXES, import_gallery, prove_space, read_vectors

__all__ = [
    "COSINE_TO_ACCEPT", "FLAT_MAX_ROWS", "FORMAT", "GALLERY", "HNSW_EF_CONSTRUCTION", "HNSW_EF_SEARCH", "HNSW_M",
    "INDEX_FILE", "INDEX_KINDS", "IVF_NPROBE", "VECTOR_SUFFIXES",
    "Gallery", "GalleryError", "ImageEntry", "ImageFiles", "MutableVectorStore", "QueryModel", "SpaceMismatch",
    "VectorStore",
    "build_gallery", "build_index", "choose_index", "clear_gallery", "collate_images", "embed_batches",
    "exit_summary", "finish_gallery", "import_gallery", "in_batches", "iter_shards", "ivf_lists", "list_images",
    "make_index", "member_record", "open_query_model", "plan_fingerprint", "prove_space", "read_vectors",
    "search_images", "write_shard",
]
