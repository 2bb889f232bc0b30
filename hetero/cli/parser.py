"""The argument parser: every verb, its flags and help, and the handler each verb runs.

docs/gen_reference.py walks this parser (`build_parser`) to write docs/reference/cli.md.
"""
from __future__ import annotations

import argparse

from hetero.cli.gallery import cmd_gallery
from hetero.cli.runtimes import cmd_runtimes
from hetero.cli.stages import (cmd_calibrate, cmd_eval, cmd_export, cmd_profiles, cmd_run, cmd_search, cmd_train,
                               cmd_verify)
from hetero.latency import LATENCY_RUNS


def count(minimum: int):
    """argparse type: an integer of at least `minimum`, refused with the value otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hetero", description="Train, evaluate, export and verify compatible cloud-edge embedding families.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log every epoch and step detail, and show the converters' own output")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _training_verbs(verbs)
    _stage_verbs(verbs)
    _gallery_verbs(verbs)
    _runtime_verbs(verbs)
    return parser


def _runtime_verbs(verbs) -> None:
    p = verbs.add_parser("runtimes", help="isolated environments for the runtime versions devices run",
                         description="`add` creates a virtual environment (in the user's cache directory) for one "
                                     "runtime package at one version, e.g. tflite-runtime==2.14.0, where verify and "
                                     "export run artifacts out of process; `list` shows them; `remove` deletes one.")
    p.add_argument("action", choices=["add", "list", "remove"])
    p.add_argument("requirement", nargs="*", help="add: package requirements; remove: a requirement or name")
    p.add_argument("--profile", action="append", help="add: every isolated runtime this profile declares")
    p.add_argument("--python", help="add: the interpreter for the environment (default: this one)")
    p.set_defaults(handler=cmd_runtimes)


def _training_verbs(verbs) -> None:
    def training_options(p):
        p.add_argument("config", help="family config (YAML), e.g. examples/quickstart.yaml")
        p.add_argument("--out", required=True, help="family directory to write (checkpoints, manifest, reports)")
        again = p.add_mutually_exclusive_group()
        again.add_argument("--resume", action="store_true", help="continue from the last finished epoch in --out")
        again.add_argument("--overwrite", action="store_true", help="replace the family in --out (removes the files "
                                                                     "it wrote, none of yours)")
        p.add_argument("--quiet", action="store_true", help="no progress bars (nor, in a log, progress lines)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config value, e.g. --set train.epochs=3 --set 'train.amp=\"off\"' "
                            "(a dotted key and a YAML value; repeatable; validated like the file)")

    p = verbs.add_parser("run", help="the whole pipeline: train, eval, export, verify",
                         description="Train the family, evaluate compatibility, export every edge member for the "
                                     "config's export.profiles and verify the exported files.")
    training_options(p)
    p.set_defaults(handler=cmd_run)
    p = verbs.add_parser("train", help="train a family jointly", description="Train every member of the family "
                         "on the same batches and write checkpoints and DIR/manifest.json.")
    training_options(p)
    p.set_defaults(handler=cmd_train)
    p = verbs.add_parser("search", help="find the best compatible student per device profile",
                         description="Train one weight-sharing supernet (the config's `search` section), rank its "
                                     "sub-networks by M[candidate][cloud] on held-out training classes and by "
                                     "latency measured with each target profile's runtime, and write the chosen "
                                     "students into the family as ordinary members (DIR/search/ holds the Pareto "
                                     "fronts).")
    training_options(p)
    p.set_defaults(handler=cmd_search)


def _stage_verbs(verbs) -> None:
    p = verbs.add_parser("eval", help="compatibility matrix on held-out classes",
                         description="Evaluate every (query member, gallery member) pair on classes never seen in "
                                     "training; write DIR/report.json.")
    p.add_argument("dir", help="family directory written by `hetero train`")
    p.set_defaults(handler=cmd_eval)

    p = verbs.add_parser("calibrate", help="pick a multi-exit member's exit thresholds",
                         description="Pick the entropy thresholds of a multi-exit member on the training images held "
                                     "out of training (train.early_exit.held_out; never test classes) for a target: "
                                     "a top-1 loss budget against its last exit, or a mean FLOPs budget; optionally "
                                     "send the least sure share of queries to the cloud. Stored in the manifest and "
                                     "carried by later exports.")
    p.add_argument("dir", help="family directory written by `hetero train`")
    p.add_argument("--member", help="the multi-exit member (default: the only one)")
    p.add_argument("--top1-loss", type=float, help="top-1 given up against the last exit, as a fraction (0.005)")
    p.add_argument("--mean-mflops", type=float, help="mean MFLOPs per query on the edge")
    p.add_argument("--escalate", type=float, default=0.0, help="share of queries the last edge exit sends to the "
                                                               "cloud (the least sure ones), e.g. 0.1")
    p.add_argument("--thresholds", help="explicit thresholds, comma-separated, one per exit before the last")
    p.add_argument("--per-exit", action="store_true", help="search each exit's threshold on its own, not one "
                                                           "quantile for all (fits the held-out queries closer; "
                                                           "check the rule on test data with `hetero eval`)")
    p.add_argument("--kmeans-anchors", type=int, metavar="N",
                   help="first give the member class-free anchors, N k-means centres of the cloud's embeddings of "
                        "the images it trained on (as train.early_exit.anchors_from: kmeans does), and fit its "
                        "temperatures again; rewrites its checkpoint, so export it again afterwards")
    p.set_defaults(handler=cmd_calibrate)

    p = verbs.add_parser("export", help="export members per device profile",
                         description="Convert members to the format of a device profile and register the files in "
                                     "the manifest.  Without --member the most accurate edge member that fits the "
                                     "profile's budgets is chosen.")
    p.add_argument("dir", help="family directory written by `hetero train`")
    p.add_argument("--profile", action="append", help="profile name or .yaml path (repeatable); default: the "
                                                      "config's export.profiles")
    p.add_argument("--all-profiles", action="store_true", help="export for every built-in profile")
    p.add_argument("--member", action="append", help="member to export (repeatable); default: chosen by budget")
    p.add_argument("--allow-over-budget", action="store_true", help="export members that exceed the budgets "
                                                                     "(recorded in the manifest)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_export)

    p = verbs.add_parser("verify", help="check exported files in their runtimes",
                         description="Run every exported artifact in its runtime on real held-out images: identity, "
                                     "structure, parity with the torch member, retrieval against the cloud gallery "
                                     "and budgets (size, params, FLOPs, latency). Exit status 0 only when no check "
                                     "fails (with --strict: and none is skipped). `hetero verify DIR --bundle F` "
                                     "also writes a self-contained bundle; `hetero verify --bundle F` checks one "
                                     "(e.g. on a Mac, for CoreML).")
    p.add_argument("dir", nargs="?", help="family directory with exported artifacts (omit to verify --bundle)")
    p.add_argument("--profile", help="verify only the artifacts of this profile (name, or a .yaml whose budgets "
                                     "and tolerances then apply)")
    p.add_argument("--images", type=count(1), help="number of held-out queries to use (default: export.verify_images)")
    p.add_argument("--bundle", metavar="ZIP", help="with DIR: write a verification bundle; alone: verify it")
    p.add_argument("--junit", metavar="FILE", help="write JUnit XML, one test case per check")
    p.add_argument("--report", metavar="FILE", help="write a report with plots (.html, or .md with PNGs beside)")
    p.add_argument("--json", metavar="FILE", help="bundle mode: where to write the JSON report "
                                                  "(default: beside the bundle)")
    p.add_argument("--latency-runs", type=count(1), default=LATENCY_RUNS,
                   help=f"batch-1 runs for the latency median (default {LATENCY_RUNS}, as the search's)")
    p.add_argument("--strict", action="store_true", help="skipped checks (runtime unavailable here) also fail")
    p.add_argument("--all-runtimes", action="store_true", help="also run each artifact in every other installed "
                                                               "runtime of its format")
    p.set_defaults(handler=cmd_verify)

    p = verbs.add_parser("profiles", help="list or show device profiles",
                         description="List the built-in device profiles or show one in full.")
    p.add_argument("action", choices=["list", "show"])
    p.add_argument("name", nargs="?", help="profile name or path (for show)")
    p.set_defaults(handler=cmd_profiles)


def _gallery_verbs(verbs) -> None:
    p = verbs.add_parser("gallery", help="embed a gallery with the cloud member, index and search it",
                         description="`build` embeds a folder or zip of images into sharded files (resumable, "
                                     "parallel under torchrun) and a FAISS index, or with --store milvus into a "
                                     "Milvus collection (embedded Milvus Lite by default, a server by --uri); "
                                     "`search` queries it with any member or exported artifact of the same "
                                     "embedding space.  On a Milvus collection: `update` re-embeds images, "
                                     "`delete` removes rows by name, `adopt` stamps a collection another tool "
                                     "wrote once a sample proves its space, `migrate` re-embeds into a new "
                                     "collection and moves an alias to it when complete.  `import` makes a FAISS "
                                     "gallery of vectors you already have, once a sample proves their space.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def store_options(a, milvus_only: bool = False, served: bool = False):
        if milvus_only:
            a.add_argument("--store", choices=["milvus", "lance"], default="milvus",
                           help="milvus: a Milvus collection (default); lance: a LanceDB table")
        else:
            a.add_argument("--store", choices=["faiss", "milvus", "lance"], default="faiss",
                           help="faiss: files on this machine (default); milvus: a Milvus collection; lance: a "
                                "LanceDB table (an embedded database folder)")
        if served:
            a.add_argument("--uri", help="milvus, lance (required): the database the gallery is served from (the "
                                         "earlier family's DIR/gallery.db or DIR/gallery.lance, or "
                                         "http://host:19530)")
        else:
            a.add_argument("--uri", help="milvus: a local path (embedded Milvus Lite; default DIR/gallery.db) or "
                                         "http://host:19530 (a server or cluster); lance: a database folder "
                                         "(default DIR/gallery.lance)")
        a.add_argument("--collection", default="gallery", help="milvus, lance: collection (table) or alias "
                                                               "(default: gallery)")

    def embedding_options(a):
        a.add_argument("--member", help="member that embeds the gallery (default: the cloud member)")
        a.add_argument("--batch-size", type=count(1), default=256, help="images per forward pass")
        a.add_argument("--workers", type=count(0), default=1, help="image decoding processes (default 1)")
        a.add_argument("--quiet", action="store_true", help="no progress bar")

    b = actions.add_parser("build", help="embed images into a sharded, indexed gallery or a collection")
    b.add_argument("dir", help="family directory written by `hetero train`")
    b.add_argument("--images", required=True, help="folder or .zip of images (any format Pillow reads)")
    b.add_argument("--out", help="faiss: gallery directory (default: DIR/gallery)")
    store_options(b)
    embedding_options(b)
    b.add_argument("--shard-size", type=count(1), default=4096, help="faiss: images per shard file (default 4096)")
    b.add_argument("--index", choices=["auto", "flat", "ivf", "hnsw"], default="auto",
                   help="faiss: exact flat up to 100k images, IVF above (auto, the default)")
    b.add_argument("--overwrite", action="store_true",
                   help="discard an existing gallery (or collection) and start over")
    s = actions.add_parser("search", help="nearest gallery images of query images")
    s.add_argument("dir", help="family directory (its members are the query models; its config the decoding)")
    s.add_argument("--images", required=True, help="folder or .zip of query images")
    s.add_argument("--gallery", help="faiss: gallery directory (default: DIR/gallery)")
    store_options(s)
    who = s.add_mutually_exclusive_group()
    who.add_argument("--member", help="member that embeds the queries (default: the cloud member)")
    who.add_argument("--artifact", help="exported file (.onnx, ...) that embeds the queries in its runtime, or a "
                                        "multi-exit member's exported chain (<member>.exits/): each query runs stage "
                                        "by stage to the exit its calibrated rule stops at, or goes to the cloud "
                                        "member, and is reported with that exit")
    s.add_argument("--escalate-share", type=float, metavar="SHARE",
                   help="with a chain: send this share of the queries to the cloud whatever they are like, the "
                        "threshold fitted again after each batch to the last --escalate-window queries (starting "
                        "from the calibrated one), instead of the rule's fixed threshold, which sends more of "
                        "queries less sure than the calibration's")
    s.add_argument("--escalate-window", type=count(1), default=1000, metavar="N",
                   help="queries the --escalate-share threshold is fitted on (default 1000)")
    s.add_argument("--escalate-by", choices=["entropy", "margin"], default="entropy",
                   help="which queries --escalate-share sends: the least sure by the last exit's entropy (the "
                        "default), or by the margin of its gallery answer (nearest item against the nearest of "
                        "another class; needs the gallery's images in one folder per class)")
    s.add_argument("-k", type=count(1), default=5, help="neighbours per query (default 5)")
    s.add_argument("--nprobe", type=count(1), help="IVF lists to visit (default: the gallery's own, or 32)")
    s.add_argument("--show", type=count(0), default=20, help="queries to print (default 20)")
    s.add_argument("--json", help="write every query's neighbours to this JSON file")
    i = actions.add_parser("import", help="a gallery (FAISS files or a collection) from vectors you already have, "
                                          "once a sample proves their space")
    i.add_argument("dir", help="family directory (its cloud, or --member, re-embeds the sample)")
    i.add_argument("--vectors", required=True, help=".npy, .safetensors (tensor 'embeddings') or .parquet (columns "
                                                    "'id', 'embedding')")
    i.add_argument("--ids", help="item ids, one per line in row order (needed for .npy)")
    i.add_argument("--images", required=True, help="folder or .zip of the listed images, named as their ids")
    i.add_argument("--out", help="faiss (required): gallery directory to write")
    i.add_argument("--member", help="member that embedded the vectors (default: the cloud member)")
    i.add_argument("--sample", type=count(1), default=64, help="images to re-embed (default 64)")
    i.add_argument("--index", choices=["auto", "flat", "ivf", "hnsw"], default="auto", help="as for build")
    i.add_argument("--overwrite", action="store_true", help="replace what is in --out (or the collection)")
    store_options(i)
    for name, help_, needs_images in (("update", "embed images again and replace their rows", True),
                                      ("migrate", "re-embed into a new collection, then move the alias", True),
                                      ("adopt", "stamp a collection another tool wrote, once a sample proves it", True),
                                      ("delete", "remove rows by image name", False)):
        a = actions.add_parser(name, help=f"milvus: {help_}")
        a.add_argument("dir", help="family directory")
        if needs_images:
            a.add_argument("--images", required=True, help="folder or .zip of images, named as the collection's ids")
        store_options(a, milvus_only=True, served=name == "migrate")
        if name == "delete":
            a.add_argument("--ids", nargs="+", required=True, help="image names to remove")
        elif name == "adopt":
            a.add_argument("--member", help="member that embedded the collection (default: the cloud member)")
            a.add_argument("--sample", type=count(1), default=64, help="images to re-embed (default 64)")
        else:
            embedding_options(a)
    p.set_defaults(handler=cmd_gallery)
