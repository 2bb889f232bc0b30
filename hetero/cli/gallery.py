"""The gallery verbs: build, search and import a FAISS gallery, or keep a Milvus collection (gallery-db)."""
from __future__ import annotations

from rich.markup import escape

from hetero.cli.progress import console
from hetero.cli.stages import open_family


def cmd_gallery(args) -> int:
    from hetero import distributed, gallery
    from hetero.gallery import GalleryError

    store = open_family(args.dir)
    if getattr(args, "json", None):
        from hetero.files import check_output

        check_output(args.json, "--json")
    if args.action in ("delete", "update", "adopt", "migrate") or getattr(args, "store", "faiss") != "faiss":
        return _gallery_db(args, store)
    if args.action == "import":
        if not args.out:
            raise GalleryError("gallery import --store faiss needs --out: the gallery directory to write")
        record = gallery.import_gallery(store, args.vectors, args.images, args.out, ids=args.ids, member=args.member,
                                        sample=args.sample, index=args.index, overwrite=args.overwrite)
        proof = record["proof"]
        console.print(f"imported {record['rows']} vectors into {escape(str(args.out))}: {proof['checked']} re-embedded "
                      f"images match their stored vectors (min cosine {proof['min_cosine']:.6f}); stamped with space "
                      f"{record['space_id']}, {record['index']['kind']} index")
        return 0
    if args.action == "build":
        record = gallery.build_gallery(store, args.images, args.out, member=args.member, shard_size=args.shard_size,
                                       batch_size=args.batch_size, workers=args.workers, index=args.index,
                                       overwrite=args.overwrite, progress=not args.quiet)
        if distributed.is_main():
            index = record["index"]
            console.print(f"gallery of {record['rows']} images ({record['skipped']} unreadable skipped) embedded by "
                          f"{escape(record['member'])} in space {record['space_id']}: {len(record['shards'])} "
                          f"shard(s), {index['kind']} index in {escape(str(args.out or store.root / 'gallery'))}")
        return 0
    _search(args, store, args.gallery or store.root / "gallery")
    return 0


def _search(args, store, target) -> None:
    from hetero import gallery

    model = gallery.open_query_model(store, member=args.member, artifact=args.artifact,
                                     escalate_share=args.escalate_share, escalate_window=args.escalate_window,
                                     escalate_by=args.escalate_by)
    results = gallery.search_images(target, args.images, model, k=args.k, nprobe=args.nprobe)
    where = f"{target.uri} collection {target.name}" if hasattr(target, "uri") else str(target)
    exits = gallery.exit_summary(results, model)
    if args.json:
        from hetero.files import atomic_write_json

        atomic_write_json(args.json, {"gallery": where, "query_model": model.label, "space_id": model.space_id,
                                      "k": args.k, **({"exits": exits} if exits else {}), "queries": results})
    _print_search(results, model, where, args)
    if exits:
        shares = ", ".join(f"{where} {share:.1%}" for where, share in exits["shares"].items())
        console.print(f"exits of {exits['queries']} queries: {shares}; mean edge cost "
                      f"{exits['mean_edge_mflops']:.2f} MFLOPs per query")


def _gallery_db(args, store) -> int:
    """The gallery verbs on a Milvus collection (embedded by default, in DIR/gallery.db) or a LanceDB table
    (DIR/gallery.lance)."""
    from hetero.gallery import db as gallery_db
    from hetero.gallery.stores import StoreError

    if args.action == "migrate" and not args.uri:  # DIR's own database is the new family's: it holds no gallery yet
        raise StoreError("gallery migrate needs --uri: the database the gallery is served from (the earlier "
                         "family's DIR/gallery.db, or http://host:19530)")
    backend = args.store
    uri = args.uri or str(store.root / ("gallery.lance" if backend == "lance" else "gallery.db"))
    if args.action == "search":
        _search(args, store, gallery_db.open_store(uri, args.collection, backend))
    elif args.action in ("build", "update", "migrate"):
        options = {"member": args.member, "batch_size": args.batch_size, "workers": args.workers,
                   "progress": not args.quiet, "backend": backend}
        if args.action == "migrate":
            record = gallery_db.migrate(store, args.images, uri, args.collection, **options)
        else:
            record = gallery_db.build(store, args.images, uri, args.collection, overwrite=args.action == "build"
                                      and args.overwrite, replace=args.action == "update", **options)
        console.print(f"wrote {record['written']} rows into {escape(uri)} collection {escape(record['collection'])} "
                      f"({record['already_there']} already there, {len(record['skipped'])} unreadable skipped; "
                      f"{record['rows']} rows in all) in {record['seconds']:.1f} s, {record['rows_per_s']:.0f} rows/s"
                      + (f"; alias {escape(record['alias'])} now names it" if args.action == "migrate" else ""))
    elif args.action == "import":
        record = gallery_db.import_vectors(store, args.vectors, args.images, uri, args.collection, ids=args.ids,
                                           member=args.member, sample=args.sample, overwrite=args.overwrite,
                                           backend=backend)
        proof = record["proof"]
        console.print(f"imported {record['written']} vectors into {escape(uri)} collection "
                      f"{escape(record['collection'])} ({record['rows']} rows in all) at {record['rows_per_s']:.0f} "
                      f"rows/s: {proof['checked']} re-embedded images match their stored vectors (min cosine "
                      f"{proof['min_cosine']:.6f}); stamped with space {record['space_id']}")
    elif args.action == "delete":
        removed, absent = gallery_db.delete(store, uri, args.collection, args.ids, backend)
        console.print(f"deleted {removed} of {len(args.ids)} row(s) from {escape(uri)} collection "
                      f"{escape(args.collection)}" + (f"; {absent} not there" if absent else ""))
    else:
        record = gallery_db.adopt(store, uri, args.collection, args.images, member=args.member, sample=args.sample,
                                  backend=backend)
        console.print(f"adopted {escape(uri)} collection {escape(args.collection)}: {record['checked']} re-embedded "
                      f"images match their stored vectors (min cosine {record['min_cosine']:.6f}); it now says space "
                      f"{record['space_id']}")
    return 0


def _print_search(results: list[dict], model, location, args) -> None:
    from hetero.cli.tables import format_search_results

    console.print(format_search_results(results, model, location, args.k, args.show))
    if len(results) > args.show:
        console.print(f"... {len(results) - args.show} more" + (f" in {escape(args.json)}" if args.json else
                                                                " (use --json FILE for all)"))
