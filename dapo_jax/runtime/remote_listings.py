"""Object-store directory listings that are never stale (gs://, s3://).

gcsfs (and s3fs) cache every directory listing for the life of the process and invalidate it only on
their own writes. Orbax writes checkpoint arrays through TensorStore, behind that cache, and then
asks `exists()` of the item folder it just wrote: with a listing of `checkpoints/` cached from before
the step existed (a resumed run lists it to find its step), the answer is "no", and the save fails
with "Checkpoint directory does not exist: .../checkpoints/<step>/accumulator". A restore or a
reader following a running workdir has the same problem. Listings are cheap next to a checkpoint, so
every process that touches a workdir lists afresh.
"""

from __future__ import annotations

_PROTOCOLS = ("gcs", "gs", "s3")


def uncached_remote_listings() -> None:
    """Makes every later gs:// / s3:// filesystem list afresh; idempotent.

    Sets fsspec's per-protocol defaults (`use_listings_cache=False`) and drops the filesystems that
    etils.epath has already made, so the next path operation builds one with the new defaults.
    """
    import fsspec.config

    changed = False
    for protocol in _PROTOCOLS:
        options = fsspec.config.conf.setdefault(protocol, {})
        if options.get("use_listings_cache", True) is not False:
            options["use_listings_cache"] = False
            changed = True
    if changed:
        try:
            from etils.epath import backend
        except ImportError:  # epath without its fsspec backend: nothing cached
            return
        type(backend.fsspec_backend)._get_filesystem.cache_clear()
