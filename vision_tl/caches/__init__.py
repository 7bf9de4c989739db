"""The kit's caches as a whole: what they hold and removing what nobody uses (``vision-tl cache``).

Example:
    >>> from vision_tl.caches import cache_root, clear_entries, list_entries, unused_for
    >>> root = cache_root("decoded")
    >>> old = unused_for(list_entries(root), days=30)
    >>> clear_entries(root, old, days=30, dry_run=False).bytes
    1610612736
"""

from vision_tl.caches.inventory import (
    CacheAdminError,
    CacheEntry,
    CacheRoot,
    ClearReport,
    cache_root,
    clear_entries,
    list_entries,
    unused_for,
)

__all__ = ["CacheAdminError", "CacheEntry", "CacheRoot", "ClearReport", "cache_root", "clear_entries",
           "list_entries", "unused_for"]
