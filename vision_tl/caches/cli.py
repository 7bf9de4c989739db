"""``vision-tl cache list | clear``: see what the feature and decoded-image caches hold, and
reclaim the space of entries no run has used for a while.

Bad input prints ``error: <message>`` and exits with status 2; an entry that could not be
deleted (permissions) makes ``clear`` exit 1 after the others are done.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from vision_tl.caches.inventory import (
    KINDS,
    NAMES,
    OPTIONS,
    CacheAdminError,
    CacheEntry,
    CacheRoot,
    cache_root,
    clear_entries,
    count_entries,
    entry_name,
    format_bytes,
    list_entries,
    unused_for,
)
from vision_tl.utils import env_on, files
from vision_tl.utils.files import path_arg

EXAMPLES = """examples:
  vision-tl cache list                              both caches, at their default places
  vision-tl cache list --json                       the same, for scripts
  vision-tl cache clear --older-than 30             what would go: entries unused for 30 days
  vision-tl cache clear --older-than 30 --yes       delete them
  vision-tl cache clear --kind decoded --yes        delete every decoded-image entry not in use

Roots: --features DIR (default $VISION_TL_CACHE or ~/.cache/vision_tl/features) and --decoded DIR
(default $VISION_TL_DECODED_CACHE or ~/.cache/vision_tl/decoded). Giving one of them alone, without
--kind, works on that cache only.

Only the caches' own files are ever deleted: entries recognised by their names and metadata, and
temporary files that killed runs left (whatever --older-than says, once no process holds them and they
are over a minute old). An entry a running fit, extract or notebook holds is skipped and named.
"Last used" is the newest modification time of an entry's files; the kit touches an entry each time
it opens it.
"""


def days_arg(text: str) -> float:
    """``argparse`` type of ``--older-than``: days, 0 or more (fractions allowed)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of days, 0 or more (e.g. 30, or 0.5 for 12 hours), "
                                         f"got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="vision-tl cache", formatter_class=fmt, epilog=EXAMPLES,
                                     description="See and reclaim the feature cache and the decoded-image cache.")
    commands = parser.add_subparsers(dest="action", metavar="{list,clear}")
    commands.required = True
    listing = commands.add_parser("list", formatter_class=fmt, epilog=EXAMPLES,
                                  help="one row per entry: what it is, size, last used; totals per cache",
                                  description="One row per cache entry: kind, what it holds (from its own "
                                              "metadata), size on disk, last used; the total per cache folder.")
    clear = commands.add_parser("clear", formatter_class=fmt, epilog=EXAMPLES,
                                help="delete entries (unused for --older-than DAYS); needs --yes",
                                description="Delete cache entries no process holds: all of them, or with "
                                            "--older-than those unused for that long. Without --yes, only "
                                            "says what would go.")
    for sub in (listing, clear):
        sub.add_argument("--features", type=path_arg, default=None, metavar="DIR",
                         help="feature cache folder (default $VISION_TL_CACHE or ~/.cache/vision_tl/features)")
        sub.add_argument("--decoded", type=path_arg, default=None, metavar="DIR",
                         help="decoded-image cache folder (default $VISION_TL_DECODED_CACHE or "
                              "~/.cache/vision_tl/decoded)")
        sub.add_argument("--kind", choices=(*KINDS, "all"), default=None,
                         help="which cache (default: all, or only those given with --features/--decoded)")
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
    clear.add_argument("--older-than", type=days_arg, default=None, metavar="DAYS",
                       help="only entries not used for DAYS days (fractions allowed; default: every entry)")
    clear.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    clear.add_argument("--yes", action="store_true", help="really delete (without it: a dry run)")
    return parser


def _roots(args: argparse.Namespace) -> list[CacheRoot]:
    given = {"features": args.features, "decoded": args.decoded}
    if args.kind in KINDS:
        other = next(k for k in KINDS if k != args.kind)
        if given[other] is not None:
            raise CacheAdminError(f"--kind {args.kind} with {OPTIONS[other]} {given[other]}: the {NAMES[other]} "
                                  f"would be left alone; drop {OPTIONS[other]}, or use --kind all")
        kinds = [args.kind]
    elif args.kind == "all" or not any(v is not None for v in given.values()):
        kinds = list(KINDS)
    else:  # --features DIR alone means that cache, not also the default decoded one
        kinds = [k for k in KINDS if given[k] is not None]
    return [cache_root(kind, given[kind]) for kind in kinds]


def _when(seconds: float, now: float) -> str:
    age = max(0.0, now - seconds) / 86400
    ago = "today" if age < 1 else f"{age:.0f} day{'s' if round(age) != 1 else ''} ago"
    return f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(seconds))} ({ago})"


def _name(root: CacheRoot, entry: CacheEntry) -> str:
    return entry_name(root.path, entry.path)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _entry_json(root: CacheRoot, entry: CacheEntry) -> dict:
    return {"kind": entry.kind, "path": str(entry.path), "name": _name(root, entry), "what": entry.description,
            **{k: v for k, v in entry.details.items()}, "bytes": entry.bytes,
            "last_used": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.last_used)),
            "in_use": entry.in_use}


def _root_header(root: CacheRoot) -> str:
    where = f"{NAMES[root.kind]}: {root.path} ({root.origin})"
    return where if root.exists else f"{where}: not there yet, nothing cached"


def _list(roots: list[CacheRoot], as_json: bool) -> int:
    now = time.time()
    listed = [(root, list_entries(root)) for root in roots]
    if as_json:
        print(json.dumps({"last_used": "newest modification time of the entry's files (touched on every read)",
                          "caches": [{"kind": r.kind, "root": str(r.path), "origin": r.origin, "exists": r.exists,
                                      "bytes": sum(e.bytes for e in es),
                                      "entries": [_entry_json(r, e) for e in es]} for r, es in listed]}, indent=1))
        return 0
    for root, entries in listed:
        print(_root_header(root))
        if entries:
            rows = [["KIND", "ENTRY", "WHAT", "SIZE", "LAST USED (mtime)"]]
            rows += [[e.kind, _name(root, e), e.description, format_bytes(e.bytes),
                      _when(e.last_used, now) + ("  [in use]" if e.in_use else "")] for e in entries]
            print("\n".join(_table(rows)))
        if root.exists:
            print(f"  total: {count_entries(len(entries))}, {format_bytes(sum(e.bytes for e in entries))}")
    return 0


NO_LOCKS_MIN_DAYS = 1.0  # without file locks (Windows): only entries unused this long are deleted


def _clear(roots: list[CacheRoot], args: argparse.Namespace) -> int:
    dry = args.dry_run or not args.yes
    if files.fcntl is None and (args.older_than is None or args.older_than < NO_LOCKS_MIN_DAYS):
        raise CacheAdminError(
            "this system has no file locks (Windows), so cache clear cannot tell the entries a running fit, "
            "extract or notebook is using; it only deletes entries unused for at least a day: add "
            f"--older-than {NO_LOCKS_MIN_DAYS:g} (or more)")
    failed = 0
    out: dict = {"dry_run": dry, "caches": []}
    for root in roots:
        chosen = unused_for(list_entries(root, check_use=False), args.older_than)
        report = clear_entries(root, chosen, args.older_than, dry_run=dry)
        failed += len(report.failed)
        out["caches"].append({"kind": root.kind, "root": str(root.path), "bytes": report.bytes,
                              "deleted" if not dry else "would_delete": [_entry_json(root, e) for e in report.deleted],
                              "skipped_in_use": [_entry_json(root, e) for e in report.busy],
                              "failed": [{**_entry_json(root, e), "error": why} for e, why in report.failed]})
        if not args.json:
            _print_clear(root, report, dry, args.older_than)
    if args.json:
        print(json.dumps(out, indent=1))
    elif dry and any(c["bytes"] or c["would_delete"] for c in out["caches"]) and not args.dry_run:
        print("nothing was deleted: add --yes to delete the entries above")
    return 1 if failed else 0


def _print_clear(root: CacheRoot, report, dry: bool, days: float | None) -> None:
    print(_root_header(root))
    verb = "would delete" if dry else "deleted"
    for entry in report.deleted:
        note = f" ({entry.note})" if entry.note else ""
        print(f"  {verb} {_name(root, entry)}: {entry.description}, {format_bytes(entry.bytes)}{note}")
    for entry in report.busy:
        print(f"  skipped {_name(root, entry)}: in use by a running process (or used just now); not deleted")
    for entry, why in report.failed:
        print(f"  could not delete {_name(root, entry)}: {why}", file=sys.stderr)
    if root.exists:
        unused = "" if days is None else f" unused for {days:g} day{'s' if days != 1 else ''}"
        print(f"  {verb} {count_entries(len(report.deleted))}{unused}: {format_bytes(report.bytes)}"
              + ("" if dry else " freed"))


def main(argv: list[str] | None = None) -> int:
    """Run ``vision-tl cache ARGV`` (``argv`` without the command name).

    Example:
        >>> main(["clear", "--older-than", "30", "--yes"])
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # (vision_tl.errors.user_errors would import torch for its backbone errors: this command
    # answers in a fraction of a second without it)
    try:
        roots = _roots(args)
        return _list(roots, args.json) if args.action == "list" else _clear(roots, args)
    except (CacheAdminError, OSError) as exc:
        if isinstance(exc, BrokenPipeError) or env_on("VISION_TL_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2

