#!/usr/bin/env python3
"""http_bucket: keep the files that ephemeral processes hand over by HTTP.

    python3 http_bucket.py [PORT] [-b ADDR] [-d ARCHIVE_DIR]
    curl -F 'file=@results.xml' localhost:8000/upload
    curl -I localhost:8000/checksum/<md5|sha1|sha256|sha512>

One file, standard library only (python-magic is used when importable).
Uploads are streamed to disk through hashlib, stored once under their
sha256 (``blob/ab/cd/<sha256>``) and named by hardlinks; archives and
compressed files are expanded into the same store.  The in-memory checksum
index is rebuilt at startup from ARCHIVE_DIR, which stays the truth.
README.md documents what users and operators see.

The map: sections in order, each using only those above it.

1. Limits and defaults -- every fixed limit with its reason.
2. Errors -- BucketError and one subclass per HTTP status; raise_storage_error.
3. Small helpers -- sizes, the name rules (check_segment, client_filename,
   header_segment, split_url_path, contained), time, files.
4. Configuration -- SETTINGS (flag, variable, default, parser), Config.
5. Request bodies -- BodyReader (Content-Length, chunked), MultipartParser
   (sans-IO, events), multipart_boundary.
6. Blobs on the way in -- Digester (all digests in one pass), StagedBlob
   (hash while writing), Journal (per-process record).
7. Index -- IndexBase and BlobIndex (the memory: digests, pins, keep
   marks, last uses, totals), BulkLoad (a cold load), RemovedBlobs (why
   blobs went), the snapshot (write_snapshot, read_snapshot), JournalSet
   (replay, reconcile, snapshots, compaction).
8. Store -- Transaction (undo log and commit point), Store (blobs, names,
   space, reclaiming).
9. Archives -- sniff, guess_mime, Budget (expansion limits), TreeBuilder,
   expand_zip/expand_tar, Expander (decompressed blob, explode tree).
10. Organizing -- ReplicaTemplate and make_replicas, retention, Sweeper
    (expiry), Evictor (size cap and free-space floor, LRU).
11. Uploads log -- parse_metadata, UploadQuery, UploadsLog (a JSON line per
    upload, per process, read backwards).
12. Upload transaction -- Incoming, Received, StoredFile, UploadTransaction.
13. Resumable uploads -- PartialUpload (resumable/<token>/ on disk),
    Resumables (their hash states and turns).
14. HTTP pieces -- Headers, ChunkedWriter, stated_digests, receipts,
    listings, folder archives.
15. The web page -- PAGE_CSS, PAGE_JS (cached assets), page_html and the
    renderers: home, listings, the uploads log, the token form.
16. HTTP handler -- Handler: request head, the one dispatcher, routes.
17. Client: push and pull -- Remote (http.client, proxies, TLS), RetryPolicy,
    Progress, push (collect_sources, hash_items, missing_digests, push_item,
    ResumableUpload), pull (pull_items, local_path, Download), client_main.
18. Server and command line -- Reaper, BucketServer, load_config, main.

The path of an upload: Handler.dispatch routes ``PUT /upload/<name>`` to
route_put_upload; receive_raw checks the stated digests, reads the body
through a BodyReader into a StagedBlob (hashed as it is written, fsynced)
and returns a Received; UploadTransaction.commit publishes the blob (B
journal record, then a hardlink into blob/), pins it, lets the Expander
decompress or explode it, makes its names or replicas, and writes the
remaining journal records at the commit point -- or undoes every step if
anything fails; the handler turns the StoredFiles into the JSON receipt.
"""

__version__ = "1.0.0"

# ===========================================================================
# Imports and optional dependencies
# ===========================================================================

import argparse
import array
import bisect
import base64
import binascii
import bz2
import collections
import concurrent.futures
import datetime
import email.utils
import errno
import fnmatch
import fcntl
import gc
import hashlib
import heapq
import hmac
import html
import http.client
import importlib
import itertools
import json
import lzma
import mmap
import mimetypes
import operator
import os
import posixpath
import queue
import random
import re
import secrets
import select
import shutil
import signal
import socket
import ssl
import stat
import struct
import sys
import tarfile
import threading
import time
import traceback
import urllib.parse
import urllib.request
import zipfile
import zlib
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

try:  # Python 3.14+: zstd in the standard library (compression.zstd);
    # imported by name so that older interpreters' stdlib lists do not
    # mistake the 3.14 package for a third-party one.
    _zstd = importlib.import_module("compression.zstd")
except ImportError:  # pragma: no cover - depends on the interpreter
    _zstd = None

# python-magic gives better MIME types when it is installed; the built-in
# sniffer below answers for the formats the store itself must recognize.
# HTTP_BUCKET_NO_MAGIC=1 switches it off, so tests cover both paths.
HAVE_MAGIC = False
if not os.environ.get("HTTP_BUCKET_NO_MAGIC"):
    try:
        import magic  # type: ignore

        HAVE_MAGIC = hasattr(magic, "from_buffer")
    except Exception:  # ImportError, or libmagic missing under the binding
        HAVE_MAGIC = False

# ===========================================================================
# Limits and defaults.  These protocol limits are fixed, each with its
# reason; the limits an operator tunes are settings (SETTINGS, below).
# ===========================================================================

CHUNK_SIZE = 1024 * 1024            # bytes per read of a body: 1 MiB keeps
                                    # hashlib (GIL released) busy per call
SMALL_BODY = 4 * 1024 * 1024       # bodies up to this are hashed inline;
                                    # larger ones by one thread per digest
                                    # (threads for every 1 MiB upload took
                                    # 64 concurrent ones to 108 MiB RSS)
WRITE_BACK_BYTES = 32 * 1024 * 1024  # a body this far past its last flush
                                    # starts one in the background, so the
                                    # disk writes while the body arrives and
                                    # the fsync at its end waits for the tail
                                    # alone (512 MiB PUT, --digests sha256:
                                    # ~350 -> 450-1,050 MB/s)
MAX_REQUEST_LINE = 8192             # bytes, like most servers' URL limit
MAX_HEADER_LINE = 8192              # bytes per header line
MAX_HEADERS = 100                   # header lines per request (http.client's)
MAX_PART_HEADERS = 4096 + 128       # bytes of one part's header block:
                                    # 4 KiB is plenty (multipart.py's figure)
MAX_FIELD_SIZE = 64 * 1024          # bytes of a form field without filename
MAX_FIELDS = 128                    # form fields per request
MAX_CHUNK_LINE = 1024               # bytes of a chunk-size line (extensions)
MAX_TRAILERS = 8192                 # bytes of chunked trailers in all
MAX_NAME_BYTES = 255                # one path segment (NAME_MAX on Linux)
MAX_PATH_BYTES = 4096               # a whole relative path (PATH_MAX)
MAX_LINKS_FOLLOWED = 40             # symlinks of an archive one resolution
                                    # may follow (the kernel's ELOOP limit):
                                    # "l1 -> l0/l0/..", "l2 -> l1/l1/.." costs
                                    # 10**depth steps without it
MAX_BOUNDARY = 70                   # characters of a multipart boundary
                                    # (RFC 2046 5.1.1)
MAX_BOUNDARY_PADDING = 1024         # spaces/tabs after a boundary (RFC 2046
                                    # allows "transport padding")
MAX_JSON_LIST = 10000               # members listed in a response's
                                    # "extracted.files" (count says all)
MAX_RETAIN_DAYS = 36500             # a retention of 100 years: beyond it a
                                    # number is a mistake, not a wish
MAX_REPLICA_NUMBER = 100000         # <name>.<stamp>.<n> tried per minute
NAME_DIGEST_CACHE = 10000           # inodes whose digests are remembered
                                    # where blobs have no digests xattr
NAMES_IN_CONFLICT = 20              # names listed by a 409 of DELETE
                                    # /checksum (the count says all)
LISTING_PAGE = 1000                 # rows per HTML listing page (a browser
                                    # slows past a few thousand); JSON gives
                                    # all entries unless ?limit= is given
INDEX_WAIT = 30.0                   # seconds a lookup waits for the startup
                                    # index load before answering
ESTALE_RETRIES = 5                  # reads retried on ESTALE/ENOENT races
                                    # of a shared filesystem (dfs/README.md)
SHUTDOWN_GRACE = 30.0               # seconds SIGTERM waits for uploads
MAX_WORKERS = 64                    # worker processes at most (--workers)
WORKER_RESTART_MAX = 30.0           # seconds at most between restarts of a
                                    # worker that keeps dying
LINGER_SECONDS = 2.0                # an answer sent before the body was read:
LINGER_BYTES = 64 * 1024 * 1024     # the rest is read and dropped for this
                                    # long at most, so the client reads the
                                    # answer instead of a reset (nginx's
                                    # lingering close)
MIN_BODY_RATE = 16 * 1024           # bytes/s a body must average over each
                                    # read (beyond --timeout): a client
                                    # dripping a byte per second is dropped

DEFAULT_DIGESTS = ("md5", "sha256", "sha512")
LOOKUP_LENGTHS = {32: "md5", 40: "sha1", 64: "sha256", 128: "sha512"}
XATTR_DIGESTS = "user.http_bucket.digests"  # "md5=..;sha256=..;name=.." on
                                            # each blob inode: any name (a
                                            # hardlink) tells its blob, its
                                            # digests and the file name it
                                            # was last uploaded as (quoted)
MAX_META_KEYS = 32                  # metadata keys of one upload
MAX_META_BYTES = 256                # bytes of one metadata key or value
UPLOADS_PAGE = 100                  # records per /uploads page by default
MAX_UPLOADS_PAGE = 1000             # ... and at most (?limit=)
UPLOADS_BLOCK = 1024 * 1024         # bytes read at a time when the uploads
                                    # log is scanned backwards
GONE_REASONS_DAYS = 365             # why a blob went (R records) is kept
                                    # this long across restarts
HARD_LIMIT_RATIO = 1.05             # uploads are refused past max-size times
                                    # this, while eviction catches up
LOW_WATERMARK = 0.90                # eviction goes down to max-size times this
EVICT_BATCH = 256                   # least recently used blobs looked at,
EVICT_BATCH_MAX = 65536             # ... at most, per pass over the table
EVICT_INTERVAL = 5.0                # seconds between checks of the limits
                                    # (an upload past them wakes it at once)
SYNC_EVICT_SECONDS = 10.0           # an upload needing room waits this long
                                    # for eviction before it is refused
RETRY_AFTER_EVICTING = 5            # Retry-After of a 507 eviction can cure
SPACE_CACHE = 0.25                  # seconds a statvfs reading is reused
USE_FLUSH_SECONDS = 30.0            # uses are journaled this often (T lines)
SNAPSHOT_FILE = "snapshot.bin"      # the index as one file, in index/,
SNAPSHOT_PREVIOUS = "snapshot.prev.bin"  # ... and the one before it
SNAPSHOT_HEADER = 65536             # bytes: magic, JSON header (the journal
                                    # offsets it covers), padding
SCAN_THREADS = 8                    # threads listing blob directories at
                                    # startup (a listing waits on the disk)
JOURNAL_BLOCK = 4 * 1024 * 1024     # bytes of a journal read at a time
SNAPSHOT_MARGIN = 120.0             # seconds of its own journal a snapshot
                                    # leaves to be read again at startup:
                                    # a record is written before its change
                                    # is in memory, and reading it twice is
                                    # harmless
MAX_BATCH_DIGESTS = 10000           # digests in one POST /checksum
MAX_BATCH_BODY = 1024 * 1024        # bytes of one POST /checksum body

# ===========================================================================
# Errors: each carries its HTTP status; the dispatcher turns them into JSON
# ===========================================================================


class BucketError(Exception):
    """A refusal for the client: ``status`` and a message saying why.

    ``headers`` travel with the response (``Allow``, ``WWW-Authenticate``,
    ``Retry-After``); ``extra`` are more members of the JSON body (the
    RFC 9457 problem type and details of a resumable upload's refusal).
    """

    status = 500

    def __init__(self, message, headers=None, extra=None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}


class BadRequest(BucketError):
    status = 400


class Unauthorized(BucketError):
    status = 401


class NotFound(BucketError):
    status = 404


class MethodNotAllowed(BucketError):
    status = 405


class Conflict(BucketError):
    status = 409


class LengthRequired(BucketError):
    status = 411


class PreconditionFailed(BucketError):
    status = 412


class TooLarge(BucketError):
    status = 413


class UnsupportedMediaType(BucketError):
    status = 415


class RangeNotSatisfiable(BucketError):
    status = 416


class Gone(BucketError):
    status = 410


class Locked(BucketError):
    status = 423


class URITooLong(BucketError):
    status = 414


class ExpectationFailed(BucketError):
    status = 417


class HeaderFieldsTooLarge(BucketError):
    status = 431


class ServiceUnavailable(BucketError):
    status = 503


class InsufficientStorage(BucketError):
    status = 507


class ClientGone(Exception):
    """The client closed or stalled mid-request; nothing can be answered."""


class ConfigError(Exception):
    """A setting with a bad value; the message names the setting."""


def raise_storage_error(exc):
    """Raise what an OSError of the store means for the client.

    A full disk or quota (ENOSPC, EDQUOT) becomes InsufficientStorage (507);
    any other error is raised as it is.  Always raises.
    """
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise InsufficientStorage("not enough disk space to store the upload") from exc
    raise exc


# ===========================================================================
# Small helpers: sizes, names, paths, time
# ===========================================================================

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib|t|tb|tib)?\s*$", re.I)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text):
    """``'16gb'`` -> bytes, binary units as the original server had them (1kb = 1024).

    Raises ValueError for anything else.
    """
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError("expected <int> or <int>kb|mb|gb, got %r" % (text,))
    unit = (match.group(2) or "").lower()[:1]
    return int(match.group(1)) * _SIZE_UNITS[unit]


def check_segment(segment, what="path"):
    """Refuse (BadRequest) a path segment that could leave its directory."""
    if segment in ("", ".", ".."):
        raise BadRequest("%s segment %r is not allowed" % (what, segment))
    if "\x00" in segment or "/" in segment or "\\" in segment:
        raise BadRequest("%s segment %r holds a separator or NUL" % (what, segment))
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in segment):
        raise BadRequest("%s segment %r holds a control character" % (what, segment))
    if len(segment.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise BadRequest("%s segment longer than %d bytes" % (what, MAX_NAME_BYTES))
    return segment


RESERVED_PREFIX = ".~"  # the store's own temporary names in every directory
MADE_FILE = RESERVED_PREFIX + "made"  # "<time>\t<name>" per name made in a
                                      # directory (Store.made_file)


def check_new_name(segment, what="name"):
    """A segment of a name a client creates: check_segment, and not one of
    the store's temporary names (``.~...``, hidden from listings)."""
    check_segment(segment, what)
    if segment.startswith(RESERVED_PREFIX):
        raise BadRequest("%s %r: names starting with %r are reserved"
                         % (what, segment, RESERVED_PREFIX))
    return segment


def client_filename(raw, what="file name"):
    """The one rule for a file name a client sends, however it arrives.

    A multipart ``filename`` may carry the sender's directories (old
    browsers send ``C:\\dir\\a.txt``): only the part after the last slash
    or backslash is kept.  The rest is checked like a URL path segment
    (check_new_name): refused with BadRequest, never rewritten, so
    ``PUT /upload/<name>`` and ``-F file=@<name>`` store the same name.
    """
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    return check_new_name(name, what)


_UNSAFE_SEGMENT_CHARS = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')


def header_segment(value):
    """A request header's value made one harmless directory name (replicas).

    Header values are free text: separators, control and shell-hostile
    characters become ``_``, leading dots go (no ``..``, no hidden or
    reserved names), the result is cut to MAX_NAME_BYTES of UTF-8; ``_``
    when nothing is left.
    """
    name = _UNSAFE_SEGMENT_CHARS.sub("_", value or "").strip().lstrip(".").strip()
    if not name:
        return "_"
    encoded = name.encode("utf-8", "surrogatepass")
    if len(encoded) > MAX_NAME_BYTES:
        name = encoded[:MAX_NAME_BYTES].decode("utf-8", "ignore")
    return name


def split_url_path(raw, what="path"):
    """Percent-decode a URL path segment by segment, refusing traversal.

    Returns the list of decoded segments.  Each segment is decoded on its
    own, so ``%2F`` or ``%2e%2e`` can never become a separator or ``..``.
    """
    if len(raw) > MAX_PATH_BYTES:
        raise BadRequest("%s longer than %d bytes" % (what, MAX_PATH_BYTES))
    segments = []
    pieces = raw.split("/")
    for position, piece in enumerate(pieces):
        if piece == "":
            if position < len(pieces) - 1:  # only a trailing slash may be empty
                raise BadRequest("%s has an empty segment (an absolute path or '//')" % what)
            continue
        try:
            segment = urllib.parse.unquote(piece, errors="strict")
        except UnicodeDecodeError:
            raise BadRequest("%s segment %r is not UTF-8 once percent-decoded" % (what, piece[:60]))
        segments.append(check_segment(segment, what))
    return segments


def contained(root, *parts):
    """``root/parts`` after resolving links, or NotFound if it leaves root.

    The one containment check for every name from outside: URL paths,
    archive members, replica header values and ``.latest`` links.
    """
    path = os.path.realpath(os.path.join(root, *parts))
    real_root = os.path.realpath(root)
    if path != real_root and not path.startswith(real_root + os.sep):
        raise NotFound("path leaves the archive directory")
    return path


def utc_now():
    return time.time()


def http_date(timestamp=None):
    return email.utils.formatdate(timestamp, usegmt=True)


def parse_http_date(text):
    try:
        parsed = email.utils.parsedate_tz(text)
        return None if parsed is None else email.utils.mktime_tz(parsed)
    except (TypeError, ValueError, OverflowError):
        return None


def parse_time(text, what):
    """Epoch seconds of ISO 8601 (UTC unless it says otherwise) or of an
    epoch number; BadRequest naming ``what`` for anything else."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadRequest("%s must be ISO 8601 (2026-11-30, 2026-11-30T05:00:00Z) or epoch "
                         "seconds, got %r" % (what, text[:60]))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def iso_time(epoch):
    """UTC ISO 8601 with milliseconds: ``2026-11-30T05:26:56.123Z``."""
    moment = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (moment.microsecond // 1000)


def free_space(directory, min_free):
    """(free bytes, floor bytes, statvfs) of the filesystem of ``directory``
    for the MinFree setting ``min_free``."""
    st = os.statvfs(directory)
    floor = min_free.size or int(st.f_blocks * st.f_frsize * min_free.percent / 100)
    return st.f_bavail * st.f_frsize, floor, st


def human_bytes(count):
    """``1536`` -> ``1.5 KiB``: a size for people (exact bytes elsewhere)."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            if unit == "bytes":
                return "1 byte" if count == 1 else "%d bytes" % count
            return "%.1f %s" % (count, unit)
        count /= 1024.0
    return "%d bytes" % count  # not reached


def fsync_dir(path):
    """fsync a directory so a new name in it survives a crash."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def makedirs(path):
    os.makedirs(path, exist_ok=True)


def retry_stale(func, *args):
    """Call ``func(*args)``, retrying ESTALE/ENOENT briefly.

    A path replaced by another host of a shared filesystem (rename-over,
    symlink flip) is briefly unreadable; dfs/README.md measured 0.01-0.2 %.
    """
    for attempt in range(ESTALE_RETRIES):
        try:
            return func(*args)
        except OSError as exc:
            if exc.errno not in (errno.ESTALE, errno.ENOENT) or attempt == ESTALE_RETRIES - 1:
                raise
            time.sleep(0.002 * (attempt + 1))
    return None  # not reached


def json_bytes(obj):
    # backslashreplace: a lone surrogate from a non-UTF-8 name never makes a 500
    return (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode(
        "utf-8", "backslashreplace")


_HEX = re.compile(r"^[0-9a-fA-F]+$")



def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass



def _rmdir_quietly(path):
    try:
        os.rmdir(path)
    except OSError:
        pass



def replace_atomically(path, make):
    """Make a new ``path`` by ``make(temporary)`` beside it, then rename it
    over ``path`` (atomic: readers see the old or the new, never none).
    The temporary is removed when anything fails."""
    temporary = os.path.join(os.path.dirname(path), RESERVED_PREFIX + secrets.token_hex(6))
    try:
        make(temporary)
        os.replace(temporary, path)
    except BaseException:
        _unlink_quietly(temporary)
        raise


def _scandirs(path):
    try:
        return sorted((entry for entry in os.scandir(path)
                       if entry.is_dir(follow_symlinks=False)), key=lambda e: e.name)
    except FileNotFoundError:
        return []



def _listings(path):
    """[(path of a subdirectory of ``path``, the names in it)], sorted."""
    found = []
    for entry in _scandirs(path):
        try:
            found.append((entry.path, os.listdir(entry.path)))
        except OSError:
            pass  # gone meanwhile
    return found


def _return_free_memory():
    """Give the memory startup used and freed back to the system.

    Reading journals and scanning the blob tree leave freed heap behind
    that glibc keeps; RSS after reconciling 100,000 blobs was 511 bytes a
    blob against 282 when the index was ready.  Best effort: glibc only.
    """
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError, ImportError):
        pass


# ===========================================================================
# Configuration: one table of settings -> flags, variables, /config, README
# ===========================================================================


def _port(text):
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("a TCP port is 0 to 65535 (0: any free port)")
    return value


def usable_cores():
    """Cores this process may use: its CPU affinity, lowered by a cgroup v2
    CPU quota (``docker run --cpus 2`` on a 64-core host is 2)."""
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as handle:
            quota, period = handle.read().split()[:2]
        if quota != "max":
            cores = min(cores, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


#: The cores a worker pinned to one core had before (pin_to_core): the
#: threads that hash large bodies take them all again (unpin_thread).
PINNED_FROM = None


def pin_to_core(slot):
    """Keep this thread (and the threads it starts) on one core, the
    ``slot``-th of those it may use (a worker of ``--workers N``, like
    nginx's worker_cpu_affinity).  A Python process hands its GIL from
    thread to thread at every system call; on one core the hand-off is
    cheap, across cores it is what limits a process: pinned, a worker
    answered 1.6 x the HEAD requests and 1.2 x the small uploads (README,
    Workers).  Linux only; elsewhere nothing happens."""
    global PINNED_FROM
    if not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) > 1:
        PINNED_FROM = set(cores)
        os.sched_setaffinity(0, {cores[slot % len(cores)]})


def unpin_thread():
    """This thread may run on every core again (a digest thread: hashlib
    releases the GIL, so hashing a large body uses every core)."""
    if PINNED_FROM:
        os.sched_setaffinity(0, PINNED_FROM)


def _workers(text):
    """``auto`` (one per usable core) or a positive number of worker processes."""
    if str(text).strip().lower() == "auto":
        return min(usable_cores(), MAX_WORKERS)
    value = int(text)
    if not 1 <= value <= MAX_WORKERS:
        raise ValueError("must be auto or 1 to %d" % MAX_WORKERS)
    return value


def _positive_int(text):
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise ValueError("must be a number >= 0")
    return value


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise ValueError("must be a number > 0")
    return value


def _digests(text):
    names = [name.strip().lower() for name in str(text).split(",") if name.strip()]
    for name in names:
        try:
            hashlib.new(name)
        except (ValueError, TypeError):
            raise ValueError("unknown hashlib algorithm %r" % name)
        if name.startswith("shake_"):
            raise ValueError("%s has no fixed digest length" % name)
    if "sha256" not in names:
        names.append("sha256")  # blobs are addressed by it
    return tuple(dict.fromkeys(names))


def _bool(text):
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _choice(*choices):
    def parse(text):
        if text not in choices:
            raise ValueError("expected one of %s" % ", ".join(choices))
        return text
    return parse


def _path_or_empty(text):
    return os.path.abspath(text) if text else ""


#: A free-space floor: ``percent`` of the filesystem, or ``size`` bytes.
MinFree = collections.namedtuple("MinFree", "percent size")


def _min_free(text):
    """``5%`` (of the filesystem) or a size (``<int>[kb|mb|gb]``)."""
    text = str(text).strip()
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            percent = -1.0
        if not 0 <= percent < 100:
            raise ValueError("a percentage must be from 0%% to 99%%, got %r" % text)
        return MinFree(percent, 0)
    return MinFree(0.0, parse_size(text))


Setting = collections.namedtuple(
    "Setting", "dest flags env default parse metavar help secret")

#: Every setting: its flags, its environment variable, its default (as text,
#: parsed like a user's value), and what it means.  Flags win over variables.
SETTINGS = [
    Setting("port", ("port",), "BUCKET_PORT", "8000", _port, "PORT",
            "TCP port to listen on", False),
    Setting("bind", ("-b", "--bind"), "BUCKET_BIND", "", str, "ADDRESS",
            "address to bind; empty = all interfaces", False),
    Setting("directory", ("-d", "--directory"), "ARCHIVE_DIR", "./archive",
            os.path.abspath, "DIR", "where everything is stored", False),
    Setting("uri", ("--uri",), "ARCHIVE_URI", "", str, "URL",
            "base of absolute urls in responses; empty = relative urls", False),
    Setting("checksum_type", ("--checksum-type",), "CHECKSUM_TYPE", "sha256",
            _choice("md5", "sha1", "sha256", "sha512"), "ALG",
            "digest in the original 'checksum' response key", False),
    Setting("digests", ("--digests",), "BUCKET_DIGESTS", ",".join(DEFAULT_DIGESTS),
            _digests, "ALG,..", "hashlib algorithms computed for every blob "
            "(sha256 always)", False),
    Setting("max_content_length", ("--max-content-length",), "MAX_CONTENT_LENGTH",
            "16gb", parse_size, "BYTES",
            "largest request body, <int> or <int>kb|mb|gb; 0 = no limit", False),
    Setting("max_members", ("--max-members",), "BUCKET_MAX_MEMBERS", "100000",
            _positive_int, "COUNT", "archive members expanded at most", False),
    Setting("max_expanded", ("--max-expanded",), "BUCKET_MAX_EXPANDED", "16gb",
            parse_size, "BYTES", "bytes an archive or compressed file may "
            "expand to", False),
    Setting("max_ratio", ("--max-ratio",), "BUCKET_MAX_RATIO", "250",
            _non_negative_float, "RATIO", "expanded : compressed size ratio "
            "allowed; 0 = no limit", False),
    Setting("max_size", ("--max-size",), "BUCKET_MAX_SIZE", "0", parse_size, "BYTES",
            "total bytes of blobs; above it the least recently used content is "
            "evicted down to 90%; 0 = no cap", False),
    Setting("min_free", ("--min-free",), "BUCKET_MIN_FREE", "5%", _min_free, "BYTES|PCT",
            "free space kept on the filesystem of ARCHIVE_DIR: uploads that would "
            "go below it are refused (507)", False),
    Setting("resumable_max_age", ("--resumable-max-age",), "BUCKET_RESUMABLE_MAX_AGE", "86400",
            _positive_float, "SECONDS", "an unfinished resumable upload idle this long is "
            "removed", False),
    Setting("retain_days", ("--retain-days",), "BUCKET_RETAIN_DAYS", "0",
            _non_negative_float, "DAYS", "default retention of uploads and "
            "names; 0 = keep forever", False),
    Setting("sweep_interval", ("--sweep-interval",), "BUCKET_SWEEP_INTERVAL", "60",
            _positive_float, "SECONDS", "how often expired names are "
            "removed", False),
    Setting("snapshot_interval", ("--snapshot-interval",), "BUCKET_SNAPSHOT_INTERVAL",
            "600", _positive_float, "SECONDS", "how often the index snapshot is "
            "written while the index changes", False),
    Setting("token", ("--token",), "BUCKET_TOKEN", "", str, "TOKEN",
            "token required to POST, PUT and DELETE", True),
    Setting("read_token", ("--read-token",), "BUCKET_READ_TOKEN", "", str, "TOKEN",
            "token required to read", True),
    Setting("token_file", ("--token-file",), "BUCKET_TOKEN_FILE", "",
            _path_or_empty, "FILE", "file holding the write token "
            "(first line), instead of BUCKET_TOKEN", False),
    Setting("read_token_file", ("--read-token-file",), "BUCKET_READ_TOKEN_FILE", "",
            _path_or_empty, "FILE", "file holding the read token", False),
    Setting("certfile", ("--certfile",), "BUCKET_CERTFILE", "", _path_or_empty,
            "FILE", "TLS certificate chain (PEM); enables HTTPS", False),
    Setting("keyfile", ("--keyfile",), "BUCKET_KEYFILE", "", _path_or_empty,
            "FILE", "TLS private key (PEM)", False),
    Setting("workers", ("--workers",), "BUCKET_WORKERS", "auto", _workers, "N|auto",
            "server processes sharing the port and the store (auto: one per "
            "usable core)", False),
    Setting("send_104", ("--send-104",), "BUCKET_SEND_104", "true", _bool, "BOOL",
            "announce a resumable upload with 104 before its final answer; false "
            "behind a proxy that cannot pass 1xx responses on (nginx)", False),
    Setting("max_connections", ("--max-connections",), "BUCKET_MAX_CONNECTIONS",
            "256", _positive_int, "COUNT", "connections served at once; "
            "more get 503", False),
    Setting("timeout", ("--timeout",), "BUCKET_TIMEOUT", "30",
            _non_negative_float, "SECONDS", "idle and per-read timeout of a "
            "connection", False),
    Setting("fsync", ("--fsync",), "BUCKET_FSYNC", "true", _bool, "BOOL",
            "fsync every blob before publishing it", False),
    Setting("log_format", ("--log-format",), "BUCKET_LOG_FORMAT", "text",
            _choice("text", "json"), "FORMAT", "access log: text or json", False),
]

REPLICATE_VARIABLES = ["REPLICATE_%d" % number for number in range(10)]


class Config:
    """The effective settings: one object, built by ``load_config``."""

    def __init__(self, **values):
        for setting in SETTINGS:
            setattr(self, setting.dest, setting.parse(setting.default))
        self.replicate = []
        for name, value in values.items():
            setattr(self, name, value)

    def public(self):
        """The settings as JSON-able dict, without secrets (GET /config)."""
        shown = {}
        for setting in SETTINGS:
            value = getattr(self, setting.dest)
            if setting.secret:
                value = bool(value)  # says whether one is set, never which
            elif isinstance(value, MinFree):
                value = "%g%%" % value.percent if value.percent else value.size
            elif isinstance(value, tuple):
                value = list(value)
            shown[setting.dest] = value
        shown["replicate"] = [template.text for template in self.replicate]
        shown["retention"] = (
            "names and uploads expire %g days after upload unless X-Retain-Days "
            "says otherwise" % self.retain_days if self.retain_days else
            "kept until deleted unless X-Retain-Days or ?retain_days= is given")
        shown["magic"] = HAVE_MAGIC
        shown["version"] = __version__
        return shown


# ===========================================================================
# Request bodies: Content-Length and chunked reading, multipart push parser
# ===========================================================================


class BodyReader:
    """The body of one request, read from ``rfile`` and never past its end.

    Framed by ``length`` (Content-Length) or, with ``chunked``, by chunked
    transfer coding (RFC 9112 section 7.1), decoded here because
    http.server does not.  ``limit`` bounds the decoded size (0: none).
    ``before_first_read`` is called once before the first byte is read
    (the handler answers ``Expect: 100-continue`` there).

    ``read`` returns bytes, b"" at the end; raises BadRequest for a
    malformed framing, TooLarge past ``limit``, ClientGone when the client
    closes or times out before the end.
    """

    def __init__(self, rfile, length=None, chunked=False, limit=0,
                 before_first_read=None, guard=None):
        self.rfile = rfile
        self.guard = guard  # (reaper, connection): reads must keep a pace
        self.chunked = chunked
        self.remaining = 0 if chunked else (length or 0)
        self.limit = limit
        self.received = 0
        self.finished = not chunked and not length
        self.cut = False  # the connection ended early; the bytes before it were returned
        self._before_first_read = before_first_read

    def read(self, size=CHUNK_SIZE):
        if self.finished:
            return b""
        if self.cut:
            raise ClientGone("client closed the connection mid-body")
        if self._before_first_read is not None:
            callback, self._before_first_read = self._before_first_read, None
            callback()
        if self.chunked and self.remaining == 0:
            self._next_chunk()
            if self.finished:
                return b""
        data = self._read_exactly(min(size, self.remaining))
        self.remaining -= len(data)
        self.received += len(data)
        if self.limit and self.received > self.limit:
            raise TooLarge("request body over MAX_CONTENT_LENGTH (%d bytes)" % self.limit)
        if self.remaining == 0:
            if self.chunked:
                if self._read_exactly(2) != b"\r\n":
                    raise BadRequest("chunked body: chunk data not followed by CRLF")
            else:
                self.finished = True
        return data

    def _read_exactly(self, size):
        if self.guard:
            self.guard[0].watch(self.guard[1], size / MIN_BODY_RATE)
        try:
            data = self.rfile.read(size)
        except (socket.timeout, ConnectionError, ssl.SSLError, OSError) as exc:
            raise ClientGone("reading the body: %s" % exc)
        finally:
            if self.guard:
                self.guard[0].release(self.guard[1])
        if len(data) < size:
            if not data:
                raise ClientGone("client closed the connection mid-body")
            self.cut = True  # what came before the cut first; the next read raises
        return data

    def _readline(self, limit, what):
        if self.guard:
            self.guard[0].watch(self.guard[1], limit / MIN_BODY_RATE)
        try:
            line = self.rfile.readline(limit + 1)
        except (socket.timeout, ConnectionError, ssl.SSLError, OSError) as exc:
            raise ClientGone("reading the body: %s" % exc)
        finally:
            if self.guard:
                self.guard[0].release(self.guard[1])
        if not line:
            raise ClientGone("client closed the connection mid-body")
        if len(line) > limit or not line.endswith(b"\n"):
            raise BadRequest("chunked body: %s longer than %d bytes" % (what, limit))
        return line

    def _next_chunk(self):
        line = self._readline(MAX_CHUNK_LINE, "chunk-size line")
        size_text = line.split(b";", 1)[0].strip()
        if not size_text or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
            raise BadRequest("chunked body: bad chunk size %r" % size_text[:40].decode("latin-1"))
        self.remaining = int(size_text, 16)
        if self.limit and self.received + self.remaining > self.limit:
            raise TooLarge("chunked body: a chunk of %d bytes would take the body over "
                           "MAX_CONTENT_LENGTH (%d bytes)" % (self.remaining, self.limit))
        if self.remaining == 0:
            self._skip_trailers()
            self.finished = True

    def _skip_trailers(self):
        total = 0
        while True:
            line = self._readline(MAX_TRAILERS, "trailer section")
            total += len(line)
            if total > MAX_TRAILERS:
                raise BadRequest("chunked body: trailer section over %d bytes" % MAX_TRAILERS)
            if line in (b"\r\n", b"\n"):
                return


PartInfo = collections.namedtuple("PartInfo", "name filename content_type headers")

_PARAM_RE = re.compile(
    r';\s*([^\s=;"]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)', re.S)


def parse_header_params(value):
    """``'form-data; name="f"; filename*=UTF-8''%C3%A9'`` -> (type, params).

    Quoted strings lose their quotes; ``\\"`` and ``\\\\`` are unescaped, any
    other backslash is kept (old browsers send Windows paths unescaped).
    RFC 5987 ``name*`` values are decoded and win over ``name``.
    """
    main, _, rest = value.partition(";")
    params = {}
    extended = {}
    for match in _PARAM_RE.finditer(";" + rest):
        key, raw = match.group(1).lower(), match.group(2).strip()
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            raw = re.sub(r'\\(["\\])', r"\1", raw[1:-1])
            # Browsers (HTML's multipart/form-data encoding) send '"', CR
            # and LF in names as %22, %0D, %0A; nothing else is escaped.
            raw = raw.replace("%22", '"').replace("%0D", "\r").replace("%0A", "\n")
        if key.endswith("*"):
            decoded = _decode_rfc5987(raw)
            if decoded is not None:
                extended[key[:-1]] = decoded
        else:
            params[key] = raw
    params.update(extended)
    return main.strip().lower(), params


def _decode_rfc5987(value):
    charset, sep, rest = value.partition("'")
    if not sep:
        return None
    _language, sep, encoded = rest.partition("'")
    if not sep or charset.lower() not in ("utf-8", "iso-8859-1", "us-ascii", ""):
        return None  # RFC 5987 3.2.1: UTF-8 and ISO-8859-1 are what must work
    try:
        return urllib.parse.unquote(encoded, encoding=charset or "utf-8", errors="strict")
    except (LookupError, UnicodeError, ValueError):
        return None


class MultipartParser:
    """Sans-IO ``multipart/form-data`` parser (RFC 7578, RFC 2046 5.1).

    ``feed(chunk)`` takes bytes as they arrive and returns a list of events:
    ``("part", PartInfo)``, ``("data", bytes-like)``, ``("end", None)`` for
    each part, in order.  ``close()`` is called at the end of the body and
    raises BadRequest if the closing delimiter was not seen.  Between
    feeds at most ``len(delimiter) - 1`` body bytes are held back (a
    delimiter may be split across reads); everything else is emitted at
    once, as memoryview slices of the fed chunk where possible (valid until
    the chunk is dropped).  Malformed input raises BadRequest saying what.
    """

    PREAMBLE, AFTER_DELIMITER, HEADERS, BODY, EPILOGUE = range(5)

    def __init__(self, boundary, max_header_size=MAX_PART_HEADERS):
        if not boundary or len(boundary) > MAX_BOUNDARY:
            raise BadRequest("multipart boundary must be 1 to %d characters" % MAX_BOUNDARY)
        if isinstance(boundary, str):
            boundary = boundary.encode("latin-1")
        self.delimiter = b"\r\n--" + boundary
        self.max_header_size = max_header_size
        self.state = self.PREAMBLE
        # The body's first delimiter has no CRLF before it: pretend it had.
        self.carry = b"\r\n"
        self.header_buf = bytearray()
        self.parts = 0

    def feed(self, chunk):
        if not isinstance(chunk, bytes):
            chunk = bytes(chunk)
        events = []
        data, pos = self._join_carry(chunk, events)
        while pos < len(data) and self.state != self.EPILOGUE:
            if self.state in (self.BODY, self.PREAMBLE):
                pos = self._body(data, pos, events)
            elif self.state == self.AFTER_DELIMITER:
                pos = self._after_delimiter(data, pos, events)
            else:
                pos = self._headers(data, pos, events)
        return events

    def close(self):
        if self.state != self.EPILOGUE:
            where = {self.PREAMBLE: "before the first boundary",
                     self.HEADERS: "inside a part's headers"}.get(self.state, "inside a part")
            raise BadRequest("multipart body ended %s (no closing boundary)" % where)

    def _join_carry(self, chunk, events):
        """(data, pos) to parse next, with held-back bytes put in front.

        In a part body a large chunk is not copied: the few held-back bytes
        are checked against the chunk's head alone.
        """
        if not self.carry:
            return chunk, 0
        carry, self.carry = self.carry, b""
        size = len(self.delimiter)
        if self.state == self.BODY and len(chunk) >= size:
            head = carry + bytes(chunk[:size])
            found = head.find(self.delimiter)
            if 0 <= found < len(carry):
                if found:
                    events.append(("data", carry[:found]))
                events.append(("end", None))
                self.state = self.AFTER_DELIMITER
                return chunk, found + size - len(carry)
            events.append(("data", carry))
            return chunk, 0
        return carry + bytes(chunk), 0

    def _body(self, data, pos, events):
        found = data.find(self.delimiter, pos)
        in_body = self.state == self.BODY
        if found >= 0:
            if in_body:
                if found > pos:
                    events.append(("data", memoryview(data)[pos:found]))
                events.append(("end", None))
            self.state = self.AFTER_DELIMITER
            return found + len(self.delimiter)
        keep = self._partial_delimiter_start(data, pos)
        if in_body and keep > pos:
            events.append(("data", memoryview(data)[pos:keep]))
        self.carry = bytes(data[keep:])
        return len(data)

    def _partial_delimiter_start(self, data, pos):
        """Where a possible start of the delimiter begins at data's end."""
        start = max(pos, len(data) - len(self.delimiter) + 1)
        while True:
            cr = data.find(b"\r", start)
            if cr < 0:
                return len(data)
            if self.delimiter.startswith(bytes(data[cr:])):
                return cr
            start = cr + 1

    def _after_delimiter(self, data, pos, events):
        tail = bytes(data[pos:pos + 2])
        if tail == b"--":
            self.state = self.EPILOGUE
            return len(data)
        if len(tail) < 2 and tail in (b"", b"-", b"\r", b" ", b"\t"):
            self.carry = tail
            return len(data)
        end = pos
        while end < len(data) and data[end] in b" \t":  # transport padding
            end += 1
            if end - pos > MAX_BOUNDARY_PADDING:
                raise BadRequest("multipart boundary line too long")
        rest = bytes(data[end:end + 2])
        if rest == b"\r\n":
            self.state = self.HEADERS
            self.header_buf = bytearray(b"\r\n")
            return end + 2
        if rest in (b"", b"\r"):
            self.carry = bytes(data[pos:])
            return len(data)
        raise BadRequest("multipart boundary not followed by CRLF or '--'")

    def _headers(self, data, pos, events):
        start = len(self.header_buf)
        self.header_buf += data[pos:pos + self.max_header_size + 4]
        found = self.header_buf.find(b"\r\n\r\n", max(0, start - 3))
        if found < 0:  # + 2: the CRLF before; + 3: a CRLFCRLF cut short
            if len(self.header_buf) > self.max_header_size + 2 + 3:
                raise BadRequest("multipart part headers over %d bytes" % self.max_header_size)
            return len(data)
        if found > self.max_header_size + 2:
            raise BadRequest("multipart part headers over %d bytes" % self.max_header_size)
        block = bytes(self.header_buf[2:found])
        self.header_buf = bytearray()
        events.append(("part", self._part_info(block)))
        self.state = self.BODY
        self.parts += 1
        return pos + (found + 4 - start)

    def _part_info(self, block):
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError:
            text = block.decode("latin-1")
        headers = {}
        last = None
        for line in text.split("\r\n") if text else ():
            if line[:1] in (" ", "\t") and last:  # obsolete line folding
                headers[last] += " " + line.strip()
                continue
            name, sep, value = line.partition(":")
            if not sep or not name.strip() or name != name.rstrip():
                raise BadRequest("multipart part header line without 'name: value': %r" % line[:60])
            if re.search("[\x00-\x08\x0a-\x1f\x7f]", value):
                raise BadRequest("multipart part header %r holds a control character"
                                 % name.strip()[:60])
            last = name.strip().lower()
            headers[last] = value.strip()
        disposition = headers.get("content-disposition")
        if disposition is None:
            raise BadRequest("multipart part without Content-Disposition")
        kind, params = parse_header_params(disposition)
        if kind != "form-data" or "name" not in params:
            raise BadRequest("multipart part's Content-Disposition is not form-data with a name")
        return PartInfo(params["name"], params.get("filename"),
                        headers.get("content-type", "text/plain"), headers)


def multipart_boundary(content_type):
    """The boundary of a ``multipart/form-data`` Content-Type.

    Raises UnsupportedMediaType for another type, BadRequest without boundary.
    """
    kind, params = parse_header_params(content_type or "")
    if kind != "multipart/form-data":
        raise UnsupportedMediaType(
            "POST needs Content-Type multipart/form-data (got %r); "
            "use PUT for a raw body" % (kind or "none"))
    boundary = params.get("boundary", "")
    if not boundary:
        raise BadRequest("multipart/form-data Content-Type without boundary")
    try:
        return boundary.encode("latin-1")
    except UnicodeEncodeError:
        raise BadRequest("multipart boundary must be ASCII")


# ===========================================================================
# Blobs on the way in: hashing while writing, staging, the journal
# ===========================================================================


class Digester:
    """All configured digests of a stream, computed in one pass.

    Small streams are hashed inline.  Past SMALL_BODY bytes each algorithm
    gets a thread of its own: hashlib releases the GIL on large buffers, so
    md5 (506 MB/s here), sha256 and sha512 (455 MB/s) run on all cores.
    One digest alone gets its thread too: it hashes a block while the
    request's thread reads and writes the next (``--digests sha256``, 512
    MiB PUT: ~610 -> ~830 MB/s).
    ``update`` takes bytes or a memoryview of immutable bytes (the worker
    threads read it later).  ``hexdigests`` returns {name: hex}; ``close``
    stops the threads (safe to call twice).
    """

    def __init__(self, algorithms, hashes=None, size=0):
        """New digests of ``algorithms``; or, with ``hashes`` (hashlib
        objects that already took ``size`` bytes), the same stream resumed."""
        self.hashes = hashes or {name: hashlib.new(name) for name in algorithms}
        self.size = size
        self._queues = None
        self._threads = ()

    def update(self, data):
        self.size += len(data)
        if self._queues is None and self.size > SMALL_BODY:
            self._start_threads()
        if self._queues:
            for work in self._queues:
                work.put(data)
        else:
            for digest in self.hashes.values():
                digest.update(data)

    def _start_threads(self):
        self._queues = []
        threads = []
        for digest in self.hashes.values():
            work = queue.Queue(maxsize=8)  # 8 MiB in flight at most
            thread = threading.Thread(target=self._run, args=(digest, work),
                                      daemon=True, name="digest-" + digest.name)
            thread.start()
            self._queues.append(work)
            threads.append(thread)
        self._threads = threads

    @staticmethod
    def _run(digest, work):
        unpin_thread()
        while True:
            data = work.get()
            if data is None:
                return
            digest.update(data)

    def close(self):
        """Stop the threads (after they hashed what they were given); the
        digests stay, and ``update`` may go on (threads start again)."""
        if self._queues:
            for work in self._queues:
                work.put(None)
            for thread in self._threads:
                thread.join()
        self._queues, self._threads = None, ()

    def hexdigests(self):
        self.close()
        return {name: digest.hexdigest() for name, digest in self.hashes.items()}


def blob_xattr(digests, name):
    """The value of a blob's XATTR_DIGESTS: its digests and upload name."""
    items = ["%s=%s" % item for item in sorted(digests.items())]
    if name:
        items.append("name=" + urllib.parse.quote(name, safe=""))
    return ";".join(items).encode("ascii")


def read_blob_xattr(path):
    """(digests, upload name or None) from a blob's xattr; ({}, None)
    when it has none (copied in, no user xattrs on this filesystem)."""
    try:
        text = os.getxattr(path, XATTR_DIGESTS).decode("ascii")
        items = dict(item.split("=", 1) for item in text.split(";"))
    except (OSError, AttributeError, UnicodeDecodeError, ValueError):
        return {}, None
    name = items.pop("name", None)
    return items, name and urllib.parse.unquote(name)


class StagedBlob:
    """A file being written under this process's staging directory.

    ``write`` hashes and writes; ``finish`` fsyncs, makes it read-only and
    returns its digests; ``discard`` removes it (always call it, also after
    publishing: the blob and names are hardlinks, so the staged name can go).
    Raises InsufficientStorage when the disk is full.
    """

    SNIFF_BYTES = 4096

    def __init__(self, store, filename="upload", path=None, digester=None):
        """A new file in staging; or, with ``path``, an existing one written
        on at its end (a resumable upload's data, hashed so far by
        ``digester``, whose size must be the file's)."""
        self.store = store
        self.filename = filename
        self.digests = None
        self.charged = 0  # bytes counted in Store.in_flight
        if path is None:
            self.path = os.path.join(store.staging_dir, "up-" + secrets.token_hex(8))
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self.head, self.size = b"", 0
        else:
            self.path = path
            with open(path, "rb") as handle:
                self.head = handle.read(self.SNIFF_BYTES)
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            self.size = os.fstat(self.fd).st_size
        self.digester = digester or Digester(store.algorithms)
        self.write_back = WriteBack(self.fd) if store.config.fsync else None

    def write(self, data):
        """Hash and write ``data``.  Raises InsufficientStorage when it
        would cross a storage limit (Store.charge) or the disk is full."""
        self.store.charge(len(data))
        self.charged += len(data)
        if len(self.head) < self.SNIFF_BYTES:
            self.head += bytes(data[:self.SNIFF_BYTES - len(self.head)])
        view = memoryview(data)
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
        except OSError as exc:
            raise_storage_error(exc)
        self.digester.update(data)
        self.size += len(data)
        if self.write_back:
            self.write_back.written(len(data))

    def _stop_write_back(self):
        """Wait for a background flush (before the fd is closed); raises
        InsufficientStorage or the OSError it met."""
        if self.write_back:
            write_back, self.write_back = self.write_back, None
            error = write_back.wait()
            if error is not None:
                raise_storage_error(error)

    def finish(self, sync=True):
        """Seal the file: returns {algorithm: hex}.

        ``sync=False`` leaves the fsync to the caller (a batch of members).
        """
        self.digests = self.digester.hexdigests()
        self.digester = None
        try:
            self._stop_write_back()
            try:  # before fchmod: a user xattr needs write permission
                os.setxattr(self.fd, XATTR_DIGESTS, blob_xattr(self.digests, self.filename))
            except (OSError, AttributeError):
                pass  # no user xattrs here: names are hashed when asked
            if sync and self.store.config.fsync:
                os.fsync(self.fd)
            os.fchmod(self.fd, 0o444)  # blobs are read-only on disk
        except OSError as exc:
            raise_storage_error(exc)
        finally:
            os.close(self.fd)
            self.fd = None
        return self.digests

    def suspend(self):
        """Stop writing but keep the file (a resumable upload cut or paused):
        it is fsynced, and its Digester (which has hashed every byte of it)
        is returned to hash the rest later."""
        try:
            self._stop_write_back()
            if self.store.config.fsync:
                os.fsync(self.fd)
        except (OSError, InsufficientStorage):
            pass  # the size read back later says what is there
        finally:
            os.close(self.fd)
            self.fd = None
            self.uncharge()
        digester, self.digester = self.digester, None
        digester.close()
        return digester

    def uncharge(self):
        """Its bytes no longer count as in flight (published, or gone)."""
        self.store.charge(-self.charged)
        self.charged = 0

    def discard(self):
        self.uncharge()
        if self.digester is not None:
            self.digester.close()
        if self.write_back:
            self.write_back.wait()  # its error does not matter: the file goes
            self.write_back = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.discard()


class WriteBack:
    """Flushes a file being written in the background, one fdatasync at a
    time, each WRITE_BACK_BYTES written: the page cache would otherwise
    hold a whole large body until the final fsync, which then writes all
    of it while the client waits (a 512 MiB PUT spent a third of its time
    there).  The fd must stay open until ``wait`` returns, which also
    returns the OSError a flush met: the kernel reports a write-back error
    to one fsync only, so it is passed on rather than lost."""

    def __init__(self, fd):
        self.fd = fd
        self.pending = 0
        self.thread = None
        self.error = None

    def written(self, count):
        self.pending += count
        if self.pending >= WRITE_BACK_BYTES and not (self.thread and self.thread.is_alive()):
            self.pending = 0
            self.thread = threading.Thread(target=self._flush, name="write-back", daemon=True)
            self.thread.start()

    def _flush(self):
        unpin_thread()  # mostly waiting for the disk; any core will do
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            self.error = self.error or exc

    def wait(self):
        if self.thread:
            self.thread.join()
        return self.error


BlobInfo = collections.namedtuple("BlobInfo", "sha256 size digests new path")


class Journal:
    """This process's append-only record of blobs, pins and retention.

    One file per process in ``index/`` (several processes may share the
    directory), tab-separated lines:

        B <time> <size> <alg>=<hex> ...      a blob and its digests
        P <time> <sha256> <retain_until>      pinned: kept without a name
        U <time> <sha256>                     unpinned
        D <time> <sha256> <derived sha256>    decompressed from it: goes with it
        E <time> <retain_until> <relpath>     a name's expiry (0: none)
        R <time> <sha256> <reason> <size>     blob removed (deleted, expired,
                                              evicted, undone, reclaimed)
        K <time> <sha256>                     kept: never evicted
        T <time> <sha256 first 16 hex>        last used then (written in
                                              batches, not per use)

    The file is locked (fcntl) while its process lives: an unlockable
    journal belongs to a live process.  Lines are written whole with one
    O_APPEND write: a B line before the blob it describes becomes visible,
    an R line after the blob is gone, the other lines of a request at its
    commit point (Transaction).
    """

    KINDS = ("B", "P", "U", "D", "E", "R", "K", "T")

    def __init__(self, directory, process_id):
        self.directory = directory
        self.path = os.path.join(directory, process_id + ".log")
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.lock = threading.Lock()
        self.size = os.fstat(self.fd).st_size
        self.marks = collections.deque([(0.0, self.size)])  # (time, size then)

    def covered(self, when):
        """How much of this journal surely has its effects in memory by
        ``when``: its size at the last mark (one a second, kept for
        SNAPSHOT_MARGIN) before then."""
        with self.lock:
            size = 0
            for mark, at in self.marks:
                if mark > when:
                    break
                size = at
            return size

    @staticmethod
    def line(kind, *fields):
        """One journal line: the kind, the time now, the fields."""
        return "%s\t%.3f\t%s\n" % (kind, utc_now(), "\t".join(str(field) for field in fields))

    def write(self, kind, *fields):
        self.write_lines([self.line(kind, *fields)])

    def write_lines(self, lines):
        """Append whole lines with one write; raises InsufficientStorage
        when the disk is full."""
        data = "".join(lines).encode("utf-8", "surrogateescape")
        with self.lock:
            try:
                os.write(self.fd, data)
            except OSError as exc:
                raise_storage_error(exc)
            self.size += len(data)
            now = utc_now()
            if now - self.marks[-1][0] >= 1.0:
                self.marks.append((now, self.size))
                while len(self.marks) > 2 and self.marks[1][0] < now - 2 * SNAPSHOT_MARGIN:
                    self.marks.popleft()

    def blob(self, size, digests):
        self.write("B", size, *("%s=%s" % item for item in sorted(digests.items())))

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @staticmethod
    def owner_alive(path):
        """True when the process that wrote journal ``path`` still runs."""
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # also releases a lock we took
        return False


def parse_journal_line(line):
    """One journal line -> (kind, time, fields) or None when torn/unknown."""
    if not line.endswith("\n"):
        return None  # torn by a crash mid-write: ignored
    fields = line[:-1].split("\t")
    if len(fields) < 3 or fields[0] not in Journal.KINDS:
        return None
    try:
        return fields[0], float(fields[1]), fields[2:]
    except ValueError:
        return None


def _forever(fields):
    """True for the fields of a P record that pins with no retention."""
    return len(fields) < 2 or fields[1] in ("0", "0.0", "0.000")


# ===========================================================================
# Index: digest prefixes in sorted arrays and a delta, the snapshot file,
# the journals read back (JournalSet)
# ===========================================================================


def digest_key(hexdigest):
    """The index key of a digest: its first 8 bytes as an unsigned int."""
    return int(hexdigest[:16], 16)


def _extend(target, source, start, end):
    """Append ``source[start:end]`` to array ``target`` at C speed
    (``source``: an array, or a memoryview of a mapped snapshot)."""
    if end > start:
        view = memoryview(source)
        size = view.itemsize
        target.frombytes(view.cast("B")[start * size:end * size])


def _clamp_seconds(when):
    return min(max(int(when), 0), 0xFFFFFFFF)


class IndexBase:
    """The bulk of the index: sorted fixed-width arrays, built in memory or
    mapped from a snapshot file (then shared by every process that maps
    it: the kernel keeps one copy of its pages).

    ``keys``: the first 8 bytes of each blob's sha256, ascending ('Q');
    ``used``: its last use, Unix seconds ('I'); ``flags``: BlobIndex flags
    ('B'); ``aliases``: {algorithm: (akeys, skeys)}, the first 8 bytes of
    each blob's digest of that algorithm, ascending, beside the first 8
    bytes of its sha256.  8 + 4 + 1 + 16 per alias: 45 bytes a blob with
    md5 and sha512.  Never changed once made: a new one replaces it.
    """

    def __init__(self, keys, used, flags, aliases, count=0, size=0):
        self.keys, self.used, self.flags, self.aliases = keys, used, flags, aliases
        self.count, self.bytes = count, size

    @classmethod
    def empty(cls, aliases):
        return cls(array.array("Q"), array.array("I"), array.array("B"),
                   {name: (array.array("Q"), array.array("Q")) for name in aliases})

    def find(self, key):
        """Position of ``key`` in ``keys``, or -1."""
        spot = bisect.bisect_left(self.keys, key)
        return spot if spot < len(self.keys) and self.keys[spot] == key else -1

    def alias_targets(self, name, akey):
        """sha256 keys of the blobs whose ``name`` digest starts like ``akey``."""
        akeys, skeys = self.aliases.get(name, ((), ()))
        spot = bisect.bisect_left(akeys, akey)
        found = []
        while spot < len(akeys) and akeys[spot] == akey:
            found.append(skeys[spot])
            spot += 1
        return found


class BlobIndex:
    """Everything a process keeps in memory about the blobs, compact.

    It is the checksum index (any digest -> the blob), the pins (blobs
    kept without a name), the keep marks, each blob's last use (eviction
    order) and the totals (blobs, bytes).  The bulk is an IndexBase: sorted
    arrays, usually the mapped snapshot (JournalSet).  What changed since
    is in ``delta`` {key: [last use, flags]} and ``alias_delta`` {algorithm:
    {akey: key or (keys,)}}, read first.  When the delta reaches
    SNAPSHOT_AFTER keys, ``on_grow`` asks for a snapshot (which every
    process then maps, dropping what it covers from its delta: ``adopt``);
    at COMPACT_EVERY keys (no snapshot could be written) it is folded into
    a private base (slices of the arrays copied around the new keys: C
    speed).  Keys are 8-byte prefixes: a digest found here is confirmed
    against the blob on disk (Store.lookup), so two digests sharing a
    prefix can slow a lookup but never give a wrong answer.  Readers take
    no lock (``delta`` and ``base`` are replaced, base first, never changed
    in place but for single dict operations); writers hold ``lock``.
    """

    RECORDED, PINNED, KEPT, GONE = 1, 2, 4, 8   # flags of a key
    SNAPSHOT_AFTER = 16384
    COMPACT_EVERY = 65536

    def __init__(self, algorithms):
        self.aliases = tuple(name for name in algorithms if name != "sha256")
        self.base = IndexBase.empty(self.aliases)
        self.delta = {}
        self.alias_delta = {name: {} for name in self.aliases}
        self.pins_until = {}   # sha256 -> retain_until: the few pins with an end
        self.dirty = {}        # key -> time of uses not journaled yet (T lines)
        self.count = self.bytes = 0
        self.on_grow = None    # called when the delta reaches SNAPSHOT_AFTER
        self.compact_every = self.COMPACT_EVERY
        self.base_private = False  # compacted here: not a snapshot's
        self.tracking = self.alias_tracking = None  # see copy_state
        self.lock = threading.RLock()

    # -- reading -------------------------------------------------------------

    def entry(self, key):
        """[last use, flags] of ``key`` (a copy when from the base), or None."""
        found = self.delta.get(key)
        if found is not None:
            return found
        base = self.base
        spot = base.find(key)
        return None if spot < 0 else [float(base.used[spot]), base.flags[spot]]

    def stored(self, key):
        entry = self.entry(key)
        return bool(entry and entry[1] & self.RECORDED and not entry[1] & self.GONE)

    def candidates(self, algorithm, hexdigest):
        """16-hex prefixes of the sha256 of the blobs that may have this
        ``algorithm`` digest (each to be confirmed on disk)."""
        akey = digest_key(hexdigest)
        found = self.alias_delta.get(algorithm, {}).get(akey)
        targets = list(found) if isinstance(found, tuple) else [] if found is None else [found]
        targets += self.base.alias_targets(algorithm, akey)
        return ["%016x" % skey for skey in dict.fromkeys(targets)]

    def last_use(self, sha256):
        entry = self.entry(digest_key(sha256))
        stored = entry is not None and entry[1] & self.RECORDED and not entry[1] & self.GONE
        return entry[0] if stored else None

    def is_kept(self, sha256):
        entry = self.entry(digest_key(sha256))
        return bool(entry and entry[1] & self.KEPT)

    def pinned(self, sha256):
        if sha256 in self.pins_until:
            return True
        entry = self.entry(digest_key(sha256))
        return bool(entry and entry[1] & self.PINNED)

    def __len__(self):
        return self.count

    # -- blobs ---------------------------------------------------------------

    def _set(self, key, used, flags):
        self.delta[key] = [used, flags]
        if self.tracking is not None:
            self.tracking.add(key)
        size = len(self.delta)
        if size == self.SNAPSHOT_AFTER and self.on_grow is not None:
            self.on_grow()
        elif size >= self.compact_every:
            self.compact()

    def add(self, digests, size, when):
        """A blob was stored at ``when`` (a B record, or published here):
        True when it is newly counted (a second record of the same blob
        only moves its last use)."""
        return self.add_keys(digest_key(digests["sha256"]), [
            (name, digest_key(digests[name])) for name in self.aliases if name in digests],
            size, when)

    def add_records(self, names, records):
        """B records as JournalSet._parse splits them: [b"B", time, size,
        "<name>=<hex>" per name of ``names``]; raises ValueError (nothing
        added) for one that is not."""
        columns = [(name, 3 + spot, len(name) + 1) for spot, name in enumerate(names)]
        parsed = []
        for record in records:  # all converted first: a bad one adds nothing
            keys = {name: int(record[column][skip:skip + 16], 16)
                    for name, column, skip in columns}
            parsed.append((keys, int(record[2]), float(record[1])))
        for keys, size, when in parsed:
            self.add_keys(keys["sha256"], [(name, keys[name]) for name in self.aliases
                                           if name in keys], size, when)

    def pin_records(self, digests):
        """sha256 (hex, bytes) of P records that pin forever."""
        for sha256 in digests:
            try:
                self.pin(sha256.decode("ascii"))
            except (ValueError, UnicodeDecodeError):
                pass  # a damaged line is skipped

    def add_keys(self, key, alias_keys, size, when):
        """``add`` by keys: the blob's, and [(algorithm, key)] of its aliases."""
        with self.lock:
            entry = self.entry(key)
            if entry is not None and entry[1] & self.RECORDED and not entry[1] & self.GONE:
                if when > entry[0]:
                    self._set(key, when, entry[1])
                return False
            for name, akey in alias_keys:
                table = self.alias_delta.get(name)
                if table is not None:
                    known = table.get(akey)
                    if known is None:
                        table[akey] = key
                    elif known != key and not (isinstance(known, tuple) and key in known):
                        table[akey] = (known if isinstance(known, tuple) else (known,)) + (key,)
                    if self.alias_tracking is not None:
                        self.alias_tracking.append((name, akey, key))
            flags = self.RECORDED | (entry[1] & self.PINNED if entry else 0)
            self.count += 1
            self.bytes += size
            self._set(key, max(when, entry[0]) if entry else when, flags)
            return True

    def remove(self, sha256, size, when):
        """The blob was removed at ``when`` (R record): uncounted, unless it
        was stored or used again after that.  Its pin and keep mark go."""
        key = digest_key(sha256)
        with self.lock:
            self.pins_until.pop(sha256, None)
            entry = self.entry(key)
            if entry is None or not entry[1] & self.RECORDED or entry[1] & self.GONE \
                    or entry[0] > when:
                return False
            self.count = max(0, self.count - 1)
            self.bytes = max(0, self.bytes - size)
            self.dirty.pop(key, None)
            self._set(key, entry[0], self.GONE)
            return True

    def touch(self, key, when, persist=True):
        """Blob ``key`` was used at ``when``."""
        with self.lock:
            entry = self.entry(key)
            if entry is None or entry[1] & self.GONE or entry[0] >= when:
                return
            if persist:
                self.dirty[key] = when
            self._set(key, when, entry[1])

    def keep(self, sha256):
        """Never evict this blob (an upload said X-Bucket-Keep)."""
        key = digest_key(sha256)
        with self.lock:
            entry = self.entry(key)
            if entry is not None and entry[1] & self.RECORDED and \
                    not entry[1] & (self.KEPT | self.GONE):
                self._set(key, entry[0], entry[1] | self.KEPT)

    def take_dirty(self):
        """{key: time} of the uses since the last call (for T records)."""
        with self.lock:
            dirty, self.dirty = self.dirty, {}
        return dirty

    # -- pins ----------------------------------------------------------------

    def pin(self, sha256, retain_until=0.0):
        """Pin; True when this changed anything (a pin is never shortened)."""
        key = digest_key(sha256)
        with self.lock:
            entry = self.entry(key) or [0.0, 0]
            if entry[1] & self.PINNED:
                return False
            if not retain_until:
                self.pins_until.pop(sha256, None)
                self._set(key, entry[0], entry[1] | self.PINNED)
                return True
            if self.pins_until.get(sha256, 0.0) >= retain_until:
                return False
            self.pins_until[sha256] = retain_until
            return True

    def unpin(self, sha256):
        """Unpin; True when it was pinned."""
        key = digest_key(sha256)
        with self.lock:
            was = self.pinned(sha256)
            self.pins_until.pop(sha256, None)
            entry = self.entry(key)
            if entry is not None and entry[1] & self.PINNED:
                self._set(key, entry[0], entry[1] & ~self.PINNED)
            return was

    def pin_state(self, sha256):
        """What ``pin_restore`` needs to undo a change to this blob's pin."""
        entry = self.entry(digest_key(sha256))
        return bool(entry and entry[1] & self.PINNED), self.pins_until.get(sha256)

    def pin_restore(self, sha256, state):
        forever, until = state
        key = digest_key(sha256)
        with self.lock:
            entry = self.entry(key) or [0.0, 0]
            if bool(entry[1] & self.PINNED) != forever:
                self._set(key, entry[0], entry[1] | self.PINNED if forever
                          else entry[1] & ~self.PINNED)
            if until is None:
                self.pins_until.pop(sha256, None)
            else:
                self.pins_until[sha256] = until

    # -- eviction --------------------------------------------------------------

    def oldest(self, limit, skip=()):
        """Up to ``limit`` (last use, key) of the least recently used blobs
        that are stored, not kept and not in ``skip``, oldest first."""
        with self.lock:
            base, delta = self.base, dict(self.delta)
        keys, used, flags = base.keys, base.used, base.flags
        wrong = self.KEPT | self.GONE
        bulk = ((used[spot], keys[spot]) for spot in range(len(keys))
                if flags[spot] & self.RECORDED and not flags[spot] & wrong
                and keys[spot] not in delta and keys[spot] not in skip)
        changed = ((entry[0], key) for key, entry in delta.items()
                   if entry[1] & self.RECORDED and not entry[1] & wrong and key not in skip)
        return heapq.nsmallest(limit, itertools.chain(changed, bulk))

    # -- the base ----------------------------------------------------------------

    def copy_state(self, track=False):
        """(base, delta, alias_delta, count, bytes): a consistent copy to
        merge without holding the lock.  With ``track`` (a snapshot is
        being made of it) the keys changed from now on are noted, so that
        ``adopt(..., tracked=True)`` keeps only those."""
        with self.lock:
            if track:
                self.tracking, self.alias_tracking = set(), []
            return (self.base, dict(self.delta),
                    {name: dict(table) for name, table in self.alias_delta.items()},
                    self.count, self.bytes)

    def compact(self):
        """Fold the delta into a new private base (when no snapshot took it
        in time); not while a snapshot is being made of the index."""
        with self.lock:
            if self.tracking is not None:
                return
            self.base = merge_index(*self.copy_state())
            self.base_private = True
            self.delta = {}
            self.alias_delta = {name: {} for name in self.aliases}

    def adopt(self, base, tracked=False):
        """Use ``base`` (a snapshot just mapped) as the bulk.  ``tracked``:
        it was made from this index (copy_state(track=True)), and the delta
        keeps what changed since; else the delta keeps what the snapshot
        does not already say (this process's newer changes, or ones it has
        not read yet: those are read later).  The counts stay this
        process's own."""
        with self.lock:
            if tracked and self.tracking is not None:
                delta = {key: self.delta[key] for key in self.tracking if key in self.delta}
                aliases = {name: {} for name in self.aliases}
                for name, akey, key in self.alias_tracking:
                    table, known = aliases[name], self.alias_delta[name].get(akey)
                    if known is not None:
                        table[akey] = known
            else:
                delta = {}
                for key, entry in self.delta.items():
                    spot = base.find(key)
                    if spot < 0:
                        if entry[1] & (self.RECORDED | self.PINNED) and not entry[1] & self.GONE:
                            delta[key] = entry
                    elif base.flags[spot] != entry[1] or \
                            base.used[spot] != _clamp_seconds(entry[0]):
                        delta[key] = entry
                aliases = {}
                for name, table in self.alias_delta.items():
                    aliases[name] = kept = {}
                    for akey, target in table.items():
                        known = base.alias_targets(name, akey)
                        targets = target if isinstance(target, tuple) else (target,)
                        if any(skey not in known for skey in targets):
                            kept[akey] = target
            self.tracking = self.alias_tracking = None
            self.base = base           # readers look at the delta first:
            self.delta = delta         # base before delta keeps them right
            self.alias_delta = aliases
            self.base_private = False

    def keep_in_delta(self, key):
        """Keep ``key`` in the delta when the snapshot being made is adopted
        (the snapshot says otherwise of it: an uncommitted pin)."""
        with self.lock:
            if self.tracking is not None:
                self.tracking.add(key)

    def stop_tracking(self):
        """A snapshot that was being made of the index was not written."""
        with self.lock:
            self.tracking = self.alias_tracking = None


def _without(data, spots):
    """A copy of array ``data`` without the items at ``spots`` (ascending)."""
    kept, start = array.array(data.typecode), 0
    for spot in spots:
        _extend(kept, data, start, spot)
        start = spot + 1
    _extend(kept, data, start, len(data))
    return kept


def _alias_pairs(table):
    """Sorted (akey << 64 | skey) of an alias table {akey: key or (keys,)}."""
    pairs = [akey << 64 | skey for akey, target in table.items()
             for skey in (target if isinstance(target, tuple) else (target,))]
    pairs.sort()
    return pairs


def _build_index(names, delta, alias_delta, count, size, drop_gone):
    """merge_index into an empty base: arrays built from sorted lists (the
    startup without a snapshot: a million keys in about a second)."""
    wanted = BlobIndex.RECORDED | BlobIndex.PINNED
    order = sorted(delta)
    if drop_gone:
        gone = {key for key in order if delta[key][1] & BlobIndex.GONE or
                not delta[key][1] & wanted}
        order = [key for key in order if key not in gone]
    else:
        gone = ()
    entries = [delta[key] for key in order]
    used = array.array("I", [_clamp_seconds(entry[0]) for entry in entries])
    flags = array.array("B", [entry[1] if entry[1] & wanted else BlobIndex.GONE
                              for entry in entries])
    aliases = {}
    mask = (1 << 64) - 1
    for name in names:
        pairs = _alias_pairs(alias_delta.get(name, {}))
        if gone:
            pairs = [pair for pair in pairs if pair & mask not in gone]
        aliases[name] = (array.array("Q", [pair >> 64 for pair in pairs]),
                         array.array("Q", [pair & mask for pair in pairs]))
    return IndexBase(array.array("Q", order), used, flags, aliases, count, size)


def merge_index(base, delta, alias_delta, count, size, drop_gone=False):
    """A new IndexBase: ``base`` with ``delta`` folded in.  Removed blobs
    stay as GONE keys (their aliases with them) until ``drop_gone``, when a
    snapshot is written: then they and their aliases are dropped (a pass
    over every alias, in Python: not at every compaction)."""
    if not len(base.keys):
        return _build_index(base.aliases, delta, alias_delta, count, size, drop_gone)
    keys, used, flags = array.array("Q"), array.array("I"), array.array("B")
    start = 0
    gone = set()
    wanted = BlobIndex.RECORDED | BlobIndex.PINNED
    for key in sorted(delta):
        when, bits = delta[key]
        spot = bisect.bisect_left(base.keys, key, start)
        _extend(keys, base.keys, start, spot)
        _extend(used, base.used, start, spot)
        _extend(flags, base.flags, start, spot)
        start = spot + (spot < len(base.keys) and base.keys[spot] == key)
        if not bits & wanted:
            bits = BlobIndex.GONE
        if drop_gone and bits & BlobIndex.GONE and not bits & BlobIndex.PINNED:
            gone.add(key)
            continue
        keys.append(key)
        used.append(_clamp_seconds(when))
        flags.append(bits)
    _extend(keys, base.keys, start, len(base.keys))
    _extend(used, base.used, start, len(base.keys))
    _extend(flags, base.flags, start, len(base.keys))
    if drop_gone:  # GONE keys the base kept (GONE alone: not pinned since)
        raw = flags.tobytes()
        spots = []
        spot = raw.find(b"\x08")
        while spot >= 0:
            spots.append(spot)
            spot = raw.find(b"\x08", spot + 1)
        if spots:
            gone.update(keys[spot] for spot in spots)
            keys, used, flags = (_without(data, spots) for data in (keys, used, flags))
    aliases = {}
    for name, (akeys, skeys) in base.aliases.items():
        new_akeys, new_skeys = array.array("Q"), array.array("Q")
        added = sorted((akey, skey) for akey, target in alias_delta.get(name, {}).items()
                       for skey in (target if isinstance(target, tuple) else (target,)))
        start = 0
        for akey, skey in added:
            spot = bisect.bisect_left(akeys, akey, start)
            _extend(new_akeys, akeys, start, spot)
            _extend(new_skeys, skeys, start, spot)
            start = spot
            new_akeys.append(akey)
            new_skeys.append(skey)
        _extend(new_akeys, akeys, start, len(akeys))
        _extend(new_skeys, skeys, start, len(skeys))
        if gone:
            kept = [spot for spot, skey in enumerate(new_skeys) if skey not in gone]
            if len(kept) < len(new_skeys):
                new_akeys = array.array("Q", [new_akeys[spot] for spot in kept])
                new_skeys = array.array("Q", [new_skeys[spot] for spot in kept])
        aliases[name] = (new_akeys, new_skeys)
    return IndexBase(keys, used, flags, aliases, count, size)


class BulkLoad:
    """Journals read whole into an empty index (a startup without a
    snapshot): the B, T and kept-forever P records gathered in flat arrays
    and sorted once into the IndexBase (``install``), three times faster
    than adding them one by one, in a third of the memory.  Takes the
    calls JournalSet._read makes of a BlobIndex."""

    def __init__(self, aliases):
        self.keys, self.whens, self.sizes = array.array("Q"), array.array("d"), array.array("Q")
        self.aliases = {name: (array.array("Q"), array.array("Q")) for name in aliases}
        self.pins = array.array("Q")
        self.touches, self.touched = array.array("Q"), array.array("d")

    def add_records(self, names, records):
        """B records as JournalSet._parse splits them: [b"B", time, size,
        "<name>=<hex>" per name of ``names``]; raises ValueError (nothing
        added) for one that is not."""
        columns = {name: (3 + spot, len(name) + 1) for spot, name in enumerate(names)}
        column, skip = columns["sha256"]
        keys = [int(record[column][skip:skip + 16], 16) for record in records]
        whens = [float(record[1]) for record in records]
        sizes = [int(record[2]) for record in records]
        aliases = {}
        for name, (column, skip) in columns.items():
            if name in self.aliases:
                aliases[name] = [int(record[column][skip:skip + 16], 16) for record in records]
        self.keys.extend(keys)
        self.whens.extend(whens)
        self.sizes.extend(sizes)
        for name, akeys in aliases.items():
            self.aliases[name][0].extend(akeys)
            self.aliases[name][1].extend(keys)

    def touch(self, key, when, persist=False):
        self.touches.append(key)
        self.touched.append(when)

    def pin_records(self, digests):
        """sha256 (hex, bytes) of P records that pin forever."""
        try:
            self.pins.extend([int(sha256[:16], 16) for sha256 in digests])
        except ValueError:  # a damaged one: the others still count
            for sha256 in digests:
                try:
                    self.pins.append(int(sha256[:16], 16))
                except ValueError:
                    pass

    def install(self, blobs):
        """Make what was gathered the base of ``blobs`` (an empty index).

        Arrays are sorted by argsort (``sorted(range(n), key=...)``) and
        permuted with list comprehensions: with a million keys, dicts
        looked up in key order took twice as long (cache misses)."""
        keys, whens = self.keys, self.whens
        spots = sorted(range(len(keys)), key=keys.__getitem__)
        order = [keys[spot] for spot in spots]
        if any(map(operator.eq, order, itertools.islice(order, 1, None))):
            used = {}  # recorded twice: counted once, with the later record's time
            sizes = {}
            for key, when, size in zip(keys, whens, self.sizes):
                if when >= used.get(key, when):
                    used[key], sizes[key] = when, size
            total = sum(sizes.values())
        else:
            used = None
            total = sum(self.sizes)
        if self.touches:
            used = used if used is not None else dict(zip(keys, whens))
            for key, when in zip(self.touches, self.touched):
                if when > used.get(key, when):
                    used[key] = when
        pinned = set(self.pins)
        count = len(used) if used is not None else len(order)
        extra = pinned.difference(used if used is not None else order)
        if used is not None or extra:
            if used is None:
                used = dict(zip(keys, whens))
            order = sorted(pinned.union(used))
            seconds = [used.get(key, 0) for key in order]
        else:
            seconds = [whens[spot] for spot in spots]
        try:
            seconds = array.array("I", [int(when) for when in seconds])
        except OverflowError:  # a time before 1970 or after 2106
            seconds = array.array("I", [_clamp_seconds(when) for when in seconds])
        recorded, both = BlobIndex.RECORDED, BlobIndex.RECORDED | BlobIndex.PINNED
        if not extra and not pinned:
            flags = array.array("B", bytes([recorded]) * len(order))
        elif not extra and len(pinned) == len(order):  # every blob pinned: uploads to /upload
            flags = array.array("B", bytes([both]) * len(order))
        else:
            present = used if used is not None else set(order)
            flags = array.array("B", [(recorded if key in present else 0) |
                                      (BlobIndex.PINNED if key in pinned else 0)
                                      for key in order])
        aliases = {}
        for name, (akeys, skeys) in self.aliases.items():
            spots = sorted(range(len(akeys)), key=akeys.__getitem__)
            aliases[name] = (array.array("Q", [akeys[spot] for spot in spots]),
                             array.array("Q", [skeys[spot] for spot in spots]))
        base = IndexBase(array.array("Q", order), seconds, flags, aliases, count, total)
        with blobs.lock:
            blobs.base, blobs.delta = base, {}
            blobs.alias_delta = {name: {} for name in blobs.aliases}
            blobs.count, blobs.bytes = base.count, base.bytes
            blobs.base_private = True


class RemovedBlobs:
    """Why blobs were removed (R journal records): sha256 -> reason.

    8 bytes a blob: a sorted array of 64-bit words, 40 bits of the sha256,
    the day of the removal (16 bits) and a reason code (8); new entries
    wait in a dict and are merged in MERGE_EVERY at a time (slices of the
    array copied around them: a copy of the array, not a Python loop over
    it).  A 40-bit prefix shared by two removed blobs gives the later
    one's reason to both: a reason is a note for people, never a decision.
    Reasons older than GONE_REASONS_DAYS are dropped when a snapshot is
    written.
    """

    REASONS = ("deleted", "expired", "evicted", "undone", "reclaimed")
    MERGE_EVERY = 4096

    def __init__(self):
        self.words = array.array("Q")
        self.recent = {}
        self.lock = threading.Lock()

    @staticmethod
    def key(sha256):
        return int(sha256[:10], 16)

    def add(self, sha256, reason, when=None):
        code = self.REASONS.index(reason) if reason in self.REASONS else 0
        day = min(int((utc_now() if when is None else when) // 86400), 0xFFFF)
        with self.lock:
            self.recent[self.key(sha256)] = day << 8 | code
            if len(self.recent) >= self.MERGE_EVERY:
                self._merge()

    def get(self, sha256):
        """The reason blob ``sha256`` was removed, or None if unknown."""
        key = self.key(sha256)
        low = self.recent.get(key)
        if low is None:
            words = self.words
            spot = bisect.bisect_left(words, key << 24)
            if spot < len(words) and words[spot] >> 24 == key:
                low = words[spot] & 0xFFFFFF
        return None if low is None else self.REASONS[low & 0xFF]

    def __len__(self):
        return len(self.words) + len(self.recent)

    def load(self, data):
        """Take the words of a snapshot (bytes-like)."""
        words = array.array("Q")
        words.frombytes(data)
        with self.lock:
            self.words, self.recent = words, {}

    def dump(self, since_day):
        """The words to snapshot: every reason noted on or after ``since_day``."""
        with self.lock:
            self._merge()
            words = self.words
        return array.array("Q", [word for word in words if (word >> 8) & 0xFFFF >= since_day])

    def _merge(self):
        merged = array.array("Q")
        start = 0
        for key in sorted(self.recent):
            spot = bisect.bisect_left(self.words, key << 24, start)
            _extend(merged, self.words, start, spot)
            merged.append(key << 24 | self.recent[key])
            start = spot + (spot < len(self.words) and self.words[spot] >> 24 == key)
        _extend(merged, self.words, start, len(self.words))
        self.words, self.recent = merged, {}


# -- the snapshot: the index as one file, mapped by every process ---------------

SNAPSHOT_MAGIC = b"HTTP_BUCKET_SNAPSHOT 1\n"


def write_snapshot(path, base, offsets, extra, sections=()):
    """Write ``base`` (an IndexBase), ``extra`` (JSON: pins with an end,
    expiries, derivations) and the arrays of ``sections`` (name, array) to
    ``path`` atomically: a temporary file beside it, fsynced, renamed over
    it.  The header records the journal ``offsets`` it covers, where each
    section is and a CRC-32 of them all, so a torn or damaged file is
    never trusted.  Sections start at multiples of 8 bytes (mapped as
    arrays of 8-byte words)."""
    parts = [("keys", base.keys), ("used", base.used), ("flags", base.flags)]
    for name, (akeys, skeys) in sorted(base.aliases.items()):
        parts += [("alias:%s:keys" % name, akeys), ("alias:%s:blobs" % name, skeys)]
    parts += list(sections)
    parts.append(("extra", json.dumps(extra, ensure_ascii=False).encode("utf-8")))
    layout, position, crc = {}, SNAPSHOT_HEADER, 0
    for name, data in parts:
        length = len(memoryview(data).cast("B"))
        layout[name] = [position, length]
        position += length + (-length) % 8
    header = SNAPSHOT_MAGIC + json.dumps({
        "version": 1, "created": utc_now(), "count": base.count, "bytes": base.bytes,
        "offsets": offsets, "sections": layout}).encode() + b"\n"
    temporary = "%s.%s.tmp" % (path, secrets.token_hex(4))
    try:
        with open(temporary, "wb") as handle:
            handle.write(b"\0" * SNAPSHOT_HEADER)
            for name, data in parts:
                raw = memoryview(data).cast("B")
                handle.write(raw)
                handle.write(b"\0" * ((-len(raw)) % 8))
                crc = zlib.crc32(raw, crc)
            header += json.dumps({"crc32": crc}).encode() + b"\n"
            if len(header) > SNAPSHOT_HEADER:
                raise OSError(errno.EFBIG, "the snapshot header is over %d bytes (%d journals)"
                              % (SNAPSHOT_HEADER, len(offsets)))
            handle.seek(0)
            handle.write(header)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        _unlink_quietly(temporary)
        raise
    fsync_dir(os.path.dirname(path))


def _file_id(path, st=None):
    """What tells one file at ``path`` from the next one put there (its
    stat ``st`` when the caller has it): inode, mtime, size."""
    st = st or os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


def read_snapshot(path, aliases):
    """(IndexBase mapped from ``path``, header, {section: memoryview}) or
    None when there is no such file; raises ValueError for one that is
    torn, damaged or made for other digests (the caller falls back).
    ``header["file_id"]`` is the _file_id of the file mapped (``path`` may
    name a newer one by the time this returns)."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return None
    with handle:
        st = os.fstat(handle.fileno())
        size = st.st_size
        if size < SNAPSHOT_HEADER:
            raise ValueError("shorter than its header")
        mapping = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_READ)
    # No mapping.close(): the arrays read from it stay valid as long as a
    # view of them lives; the pages are unmapped when the last one goes.
    try:
        lines = mapping[:SNAPSHOT_HEADER].split(b"\n")
        if lines[0] + b"\n" != SNAPSHOT_MAGIC or len(lines) < 3:
            raise ValueError("no snapshot header")
        header, trailer = json.loads(lines[1]), json.loads(lines[2])
        crc, views = 0, {}
        for name, (offset, length) in sorted(header["sections"].items(),
                                             key=lambda item: item[1][0]):
            if offset < SNAPSHOT_HEADER or offset + length > size:
                raise ValueError("section %s lies outside the file" % name)
            views[name] = memoryview(mapping)[offset:offset + length]
            crc = zlib.crc32(views[name], crc)
        if crc != trailer["crc32"]:
            raise ValueError("its CRC-32 does not match: the file is damaged")
        found = sorted(name for name in views if name.startswith("alias:"))
        if found != sorted("alias:%s:%s" % (name, part)
                           for name in aliases for part in ("blobs", "keys")):
            raise ValueError("made for other digests (%s)" % ", ".join(found))
        keys = views["keys"].cast("Q")
        used, flags = views["used"].cast("I"), views["flags"]
        if len(used) != len(keys) or len(flags) != len(keys):
            raise ValueError("its sections do not agree")
        table = {name: (views["alias:%s:keys" % name].cast("Q"),
                        views["alias:%s:blobs" % name].cast("Q")) for name in aliases}
        base = IndexBase(keys, used, flags, table, int(header["count"]), int(header["bytes"]))
        if not isinstance(header["offsets"], dict):
            raise ValueError("no journal offsets")
        header["file_id"] = _file_id(path, st)
        return base, header, views
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ValueError(str(exc) or exc.__class__.__name__)


class JournalSet:
    """Every process's journal as this process reads them, and the snapshot.

    ``load`` (startup): map ``index/snapshot.bin`` when it is sound (else
    the one before it, ``snapshot.prev.bin``; with neither, or both
    damaged or stale, the journals are read whole, and the startup line
    says why), read each journal from the offset the snapshot covers, and
    set ``store.ready``.  Then ``reconcile`` in the background: what dead
    processes left in staging (a blob published but not yet named or
    pinned when the process was killed is reclaimed), the blob tree listed
    for blobs no journal records (directories only, no stat per blob;
    yielding to requests after each directory; what is found is hashed
    once and kept), then a snapshot when anything changed, and the
    compaction of journals.

    Compaction: a dead process's journal is deleted once the snapshot and
    the one before it both cover it whole (so either can rebuild the
    index); nothing is ever copied from journal to journal.  Removed blobs
    leave the index when a snapshot is written.

    ``refresh`` reads what the journals gained since the last call;
    ``maintain`` (every EVICT_INTERVAL, from the Evictor thread) maps a
    newer snapshot another process wrote, and writes one when the delta
    has grown past BlobIndex.SNAPSHOT_AFTER or ``--snapshot-interval``
    has passed with changes (and at a clean shutdown: ``close``).
    """

    def __init__(self, store):
        self.store = store
        self.offsets = {}        # journal path -> bytes read so far
        self.snapshot_path = os.path.join(store.index_dir, SNAPSHOT_FILE)
        self.previous_path = os.path.join(store.index_dir, SNAPSHOT_PREVIOUS)
        self.snapshot_id = None  # _file_id of the snapshot mapped
        self.written = time.monotonic()
        self.wanted = threading.Event()  # the delta grew: snapshot soon
        self.lock = threading.RLock()
        self.writing = threading.Lock()  # fcntl locks do not part threads
        self.names = sorted(store.algorithms)  # the digests of a B line, in order
        self.scan_next = secrets.randbelow(256)  # the background scan's next blob/ab

    # -- startup ---------------------------------------------------------------

    def load(self):
        """Startup: the index from the snapshot and journals, then reconcile.

        Runs in a background thread; sets ``store.ready`` when lookups may
        trust the index, ``store.reconciled`` at the end.
        """
        store = self.store
        started = time.monotonic()
        with self.lock:
            source = self.use_snapshot()
            bulk = not self.offsets and not len(store.blobs.base.keys)
            collecting = gc.isenabled()
            if bulk and collecting:  # millions of short-lived lists: the cycle
                gc.disable()         # collector tripled the time of a load
            try:
                self.refresh(bulk=bulk)
            finally:
                if collecting:
                    gc.enable()
        store.load_seconds = time.monotonic() - started
        store.ready.set()
        if store.counters is not None:
            store.counters.add("ready")
        store.log("indexed %d blobs in %.3f s (%s; %s)" % (
            store.blobs.count, store.load_seconds, human_bytes(store.blobs.bytes), source))
        try:
            self.reconcile()
        except Exception:  # the index stands; only the cleanup is missed
            store.log("reconciling with the disk failed:\n" + traceback.format_exc())
        finally:
            _return_free_memory()
            store.reconcile_seconds = time.monotonic() - started
            store.reconciled.set()
            if store.counters is not None:
                store.counters.add("reconciled")

    def use_snapshot(self):
        """Map the newest sound snapshot into the index; returns what the
        startup line says of it."""
        problems = []
        for path in (self.snapshot_path, self.previous_path):
            try:
                found = read_snapshot(path, self.store.blobs.aliases)
            except (ValueError, OSError) as exc:
                problems.append("%s: %s" % (os.path.basename(path), exc))
                continue
            if found is None:
                continue
            base, header, views = found
            offsets, stale = {}, None
            for name, offset in header["offsets"].items():
                journal = os.path.join(self.store.index_dir, name)
                try:
                    size = os.path.getsize(journal)
                except FileNotFoundError:
                    continue  # folded: covered whole by this snapshot
                if size < offset:
                    stale = "%s is shorter than it covers" % name
                    break
                offsets[journal] = offset
            if stale:
                problems.append("%s: stale: %s" % (os.path.basename(path), stale))
                continue
            self.install(base, views, offsets)
            if path == self.snapshot_path:
                self.snapshot_id = header["file_id"]
            note = "; ".join(problems + ["snapshot %s of %d blobs" % (
                os.path.basename(path), len(base.keys))])
            return note
        return "; ".join(problems + ["no sound snapshot: journals read whole"])

    def install(self, base, views, offsets):
        """Startup: a mapped snapshot becomes the index and the memory."""
        store = self.store
        store.blobs.adopt(base)
        store.blobs.count, store.blobs.bytes = base.count, base.bytes
        extra = json.loads(bytes(views["extra"]).decode("utf-8"))
        store.blobs.pins_until = {sha256: float(until)
                                  for sha256, until in extra.get("pins_until", {}).items()}
        store.expiries = {relpath: float(until)
                          for relpath, until in extra.get("expiries", {}).items()}
        for source, derived in extra.get("derived", {}).items():
            store.set_derived(source, derived)
        if "removed" in views:
            store.removed.load(views["removed"])
        self.offsets = offsets

    # -- reading journals ------------------------------------------------------

    def refresh(self, bulk=False):
        """Read what the other journals (live and dead processes') gained
        since the last call, in time order.  ``bulk``: the index is empty
        and the journals are read whole (a startup without a snapshot):
        gathered by a BulkLoad first."""
        store = self.store
        own = store.journal.path
        sink = BulkLoad(store.blobs.aliases) if bulk else store.blobs
        with self.lock:
            events, ranges = [], []
            for entry in os.scandir(store.index_dir):
                if not entry.name.endswith(".log") or entry.path == own:
                    continue
                start = self.offsets.get(entry.path, 0)
                try:
                    grown = entry.stat().st_size > start
                except FileNotFoundError:
                    continue
                if grown:
                    self._read(entry.path, events, sink)
                    ranges.append((entry.path, start, self.offsets[entry.path]))
            if bulk:
                sink.install(store.blobs)
            events.sort(key=lambda event: event[1])
            for kind, when, fields in events:
                self._apply(kind, when, fields)
            unpinned = {}
            for kind, when, fields in events:
                if kind == "U":
                    key = digest_key(fields[0])
                    unpinned[key] = max(when, unpinned.get(key, 0.0))
            if unpinned:
                self._repin_later(ranges, unpinned)

    def _repin_later(self, ranges, unpinned):
        """Pins kept forever are applied as they are read (collecting them
        for a sort cost 300 bytes a blob of RSS); an unpin applied after
        them in time order is undone here when the same blob was pinned
        again later, by re-reading what was read for those keys alone."""
        blobs = self.store.blobs
        for path, start, end in ranges:
            try:
                with open(path, "rb") as handle:
                    handle.seek(start)
                    data = handle.read(end - start)
            except FileNotFoundError:
                continue
            for raw in data.split(b"\n"):
                if not raw.startswith(b"P\t"):
                    continue
                parsed = parse_journal_line(raw.decode("utf-8", "replace") + "\n")
                if parsed is None or not _forever(parsed[2]):
                    continue
                if parsed[1] > unpinned.get(digest_key(parsed[2][0]), parsed[1]):
                    blobs.pin(parsed[2][0])

    def _read(self, path, events, sink):
        """Read ``path`` from where this process stopped, in blocks of
        whole lines (a line still being written is read next time)."""
        offset = self.offsets.get(path, 0)
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                rest = b""
                while True:
                    block = handle.read(JOURNAL_BLOCK)
                    if not block:
                        break
                    data = rest + block
                    cut = data.rfind(b"\n") + 1
                    data, rest = data[:cut], data[cut:]
                    offset += cut
                    self._parse(data, events, sink)
        except FileNotFoundError:
            pass
        self.offsets[path] = offset

    def _parse(self, data, events, sink):
        """Whole lines of a journal: B, T and pins kept forever go to
        ``sink`` at once (the BlobIndex, or a BulkLoad; order does not
        matter for them), split in bulk (a million lines in about a
        second); the rest is added to ``events``."""
        names = self.names
        width = 3 + len(names)
        lines = data.split(b"\n")
        blobs = [line.split(b"\t") for line in lines if line[:2] == b"B\t"]
        good = [fields for fields in blobs if len(fields) == width]
        try:
            if len(good) < len(blobs) or good and any(
                    not good[spot][3 + at].startswith(name.encode() + b"=")
                    for spot in (0, -1) for at, name in enumerate(names)):
                raise ValueError("not this server's digests")
            sink.add_records(names, good)
        except ValueError:  # other digests (the settings changed), damaged lines
            for fields in blobs:
                self._apply_line(b"\t".join(fields), events)
        for line in lines:
            if line[:2] == b"T\t":
                fields = line.split(b"\t")
                try:
                    sink.touch(int(fields[2][:16], 16), float(fields[1]), persist=False)
                except (ValueError, IndexError):
                    pass  # a damaged line is skipped
        pins = [line.split(b"\t") for line in lines if line[:2] == b"P\t"]
        forever = [fields[2] for fields in pins if len(fields) == 3 and len(fields[2]) == 64
                   or len(fields) == 4 and fields[3] in (b"0", b"0.0", b"0.000")]
        if forever:
            sink.pin_records(forever)
        if len(forever) < len(pins):
            for fields in pins:
                if not (len(fields) == 3 and len(fields[2]) == 64 or len(fields) == 4 and
                        fields[3] in (b"0", b"0.0", b"0.000")):
                    self._apply_line(b"\t".join(fields), events)
        for line in lines:
            if line and line[:2] not in (b"B\t", b"T\t", b"P\t"):
                self._apply_line(line, events)

    def _apply_line(self, line, events):
        parsed = parse_journal_line(line.decode("utf-8", "surrogateescape") + "\n")
        if parsed is None:
            return
        if parsed[0] == "B":
            self._apply(*parsed)
        else:
            events.append(parsed)

    def _apply(self, kind, when, fields):
        store = self.store
        blobs = store.blobs
        try:
            if kind == "B":
                digests = dict(field.split("=", 1) for field in fields[1:] if "=" in field)
                if len(digests.get("sha256", "")) == 64:
                    blobs.add(digests, int(fields[0]), when)
            elif kind == "T" and fields[0]:
                blobs.touch(digest_key(fields[0]), when, persist=False)
            elif kind == "P":
                blobs.pin(fields[0], float(fields[1]) if len(fields) > 1 else 0.0)
            elif kind == "U":
                blobs.unpin(fields[0])
            elif kind == "D" and len(fields) >= 2:
                store.set_derived(fields[0], fields[1])
            elif kind == "E" and len(fields) >= 2:
                store.expire_in_memory(fields[1], float(fields[0]))
            elif kind == "R" and len(fields) >= 2 and len(fields[0]) == 64:
                store.removed.add(fields[0], fields[1], when)
                size = int(fields[2]) if len(fields) > 2 and fields[2].isdigit() else 0
                blobs.remove(fields[0], size, when)
            elif kind == "K" and len(fields[0]) == 64:
                blobs.keep(fields[0])
        except ValueError:
            pass  # a damaged field: the line is skipped

    # -- reconciling -------------------------------------------------------------

    def reconcile(self):
        """After startup: what dead processes left in staging; when the
        index was rebuilt from the journals (no sound snapshot), the whole
        blob tree scanned for blobs without a record; then a snapshot and
        the compaction.  With a snapshot the tree is scanned in the
        background instead, a ``blob/ab`` at a time (``scan_step``)."""
        store = self.store
        reclaimed = store.clear_dead_staging()
        if reclaimed:
            store.log("reclaimed %d blobs left without a name by a process that died "
                      "mid-upload" % reclaimed)
        if self.snapshot_id is None:
            found = self.scan_blobs()
            if found:
                store.log("hashed %d blobs found without a record" % found)
        self.compact_journals()

    def scan_step(self):
        """One step of the background scan of the blob tree: the next
        ``blob/ab`` (256 directory listings; a pass over the tree takes
        256 steps, one every EVICT_INTERVAL: about 21 minutes)."""
        levels = _scandirs(os.path.join(self.store.root, "blob"))
        if not levels:
            return 0
        level = levels[self.scan_next % len(levels)]
        self.scan_next = (self.scan_next + 1) % len(levels)
        found = sum(self._check_listing(path, names) for path, names in _listings(level.path))
        if found:
            self.store.log("hashed %d blobs found without a record in blob/%s"
                           % (found, level.name))
        return found

    def scan_blobs(self):
        """Hash and keep the blobs no journal records (copied in by hand,
        or recorded only in a journal that was lost).

        Lists the ``blob/ab/cd`` directories (names only: a stat per blob
        costs far more than a listing on a distributed filesystem), in
        SCAN_THREADS threads (a listing waits on the filesystem, which on
        GlusterFS takes milliseconds; a thread lists one ``blob/ab`` at a
        time, a few ahead of the checking), and checks each name against
        the index's keys of its directory (one range of the sorted array),
        yielding to the request threads after each ``blob/ab``."""
        root = os.path.join(self.store.root, "blob")
        found = 0
        with concurrent.futures.ThreadPoolExecutor(SCAN_THREADS, "scan") as pool:
            pending = collections.deque()
            for level1 in _scandirs(root) + [None]:
                if level1 is not None:
                    pending.append(pool.submit(_listings, level1.path))
                while pending and (level1 is None or len(pending) > 2 * SCAN_THREADS):
                    for path, names in pending.popleft().result():
                        found += self._check_listing(path, names)
                    time.sleep(0)  # let requests run
        return found

    def _check_listing(self, path, names):
        """Adopt the blobs of directory ``path`` (blob/ab/cd) not in the index."""
        blobs = self.store.blobs
        try:
            low = int(path[-5:-3] + path[-2:], 16) << 48
        except ValueError:
            return 0
        base, delta = blobs.base, blobs.delta
        keys, flags = base.keys, base.flags
        start = bisect.bisect_left(keys, low)
        end = bisect.bisect_left(keys, low + (1 << 48), start)
        usable = BlobIndex.RECORDED | BlobIndex.GONE
        known = {keys[spot] for spot in range(start, end)
                 if flags[spot] & usable == BlobIndex.RECORDED}
        found = 0
        for name in names:
            try:
                key = int(name[:16], 16)
            except ValueError:
                continue
            if key in known and key not in delta or len(name) != 64 or blobs.stored(key):
                continue
            if _HEX.match(name) and self._adopt(os.path.join(path, name), name):
                found += 1
        return found

    def _adopt(self, path, name):
        """Record a blob found on disk; pin it when no name holds it."""
        store = self.store
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        digests, _ = read_blob_xattr(path)
        if not all(algorithm in digests for algorithm in store.algorithms):
            digester = Digester(store.algorithms)
            try:
                with open(path, "rb") as handle:
                    for data in iter(lambda: handle.read(CHUNK_SIZE), b""):
                        digester.update(data)
            except OSError:
                digester.close()
                return False
            digests = digester.hexdigests()
        if digests.get("sha256") != name:
            store.log("blob %s holds content with sha256 %s: left alone, run --verify"
                      % (name, digests.get("sha256")))
            return False
        digests = {algorithm: digests[algorithm] for algorithm in store.algorithms}
        store.journal.blob(st.st_size, digests)
        store.blobs.add(digests, st.st_size, utc_now())
        if st.st_nlink == 1:
            store.pin(name)  # put there by hand: kept until deleted by checksum
        return True

    # -- snapshots and compaction --------------------------------------------------

    def maintain(self):
        """Map a newer snapshot; write one when it is due."""
        store = self.store
        with self.lock:
            self.follow_snapshot()
        due = self.wanted.is_set() or (
            store.blobs.delta and time.monotonic() - self.written > store.config.snapshot_interval)
        if self.snapshot_id is None and store.blobs.base_private and \
                time.monotonic() - self.written > min(store.config.snapshot_interval, 60):
            due = True  # read from the journals alone: it follows no snapshot until it writes one
        if due:
            self.wanted.clear()
            if self.write_snapshot() is None:
                self.wanted.set()  # another process was writing one: next time
        self.scan_step()

    def close(self):
        """At a clean shutdown: a snapshot of everything, when anything changed."""
        if self.store.blobs.delta and self.store.reconciled.is_set():
            self.write_snapshot(final=True)

    def follow_snapshot(self, tracked=False):
        """Map a newer snapshot: one this process just wrote (``tracked``),
        or another process's (the delta keeps what it does not say yet;
        not while this process's base holds a compaction of its own, which
        that snapshot may lack: the next one written here has it)."""
        try:
            current = _file_id(self.snapshot_path)
        except FileNotFoundError:
            return False
        if current == self.snapshot_id or (self.store.blobs.base_private and not tracked):
            return False
        try:
            found = read_snapshot(self.snapshot_path, self.store.blobs.aliases)
        except (ValueError, OSError) as exc:
            self.store.log("a new index snapshot was not used: %s" % exc)
            self.snapshot_id = current
            return False
        if found is None:
            return False
        self.store.blobs.adopt(found[0], tracked)
        self.snapshot_id = found[1]["file_id"]
        return True

    def compact_journals(self):
        """Fold what the dead processes' journals hold into a snapshot
        (written only when the index changed since the last one, or a dead
        journal is not yet covered by two), then delete the journals it and
        the one before it cover whole."""
        if self.store.blobs.delta or self.snapshot_id is None or any(
                not (self._covered(path, self.snapshot_path) and
                     self._covered(path, self.previous_path)) for path in self._dead()):
            self.write_snapshot()
        else:
            self._fold_dead()

    def write_snapshot(self, final=False):
        """Write a snapshot of everything this process knows (one process
        at a time: the fcntl lock on index/snapshot.lock; skipped, returning
        None, when another holds it), map it, and fold the dead journals it
        covers: True, or False when it could not be written.
        It covers this process's journal but for its last SNAPSHOT_MARGIN
        seconds, or whole when ``final`` (no request is running)."""
        store = self.store
        if not self.writing.acquire(blocking=final):
            return None
        lock = os.open(os.path.join(store.index_dir, "snapshot.lock"),
                       os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return None
            started = time.monotonic()
            with self.lock:
                self.refresh()
                own = store.journal.size if final else \
                    store.journal.covered(utc_now() - SNAPSHOT_MARGIN)
                base, delta, alias_delta, count, size = store.blobs.copy_state(track=True)
                pins_until = dict(store.blobs.pins_until)
                derived = dict(store.derived)
                for (kind, key), before in list(store.pending.items()):
                    if kind == "P":  # a pin not committed yet: as it was
                        entry = delta.get(digest_key(key)) or store.blobs.entry(digest_key(key))
                        if entry is not None:
                            flags = entry[1] | BlobIndex.PINNED if before[0] \
                                else entry[1] & ~BlobIndex.PINNED
                            delta[digest_key(key)] = [entry[0], flags]
                            store.blobs.keep_in_delta(digest_key(key))
                        if before[1] is None:
                            pins_until.pop(key, None)
                        else:
                            pins_until[key] = before[1]
                    elif before is None:
                        derived.pop(key, None)
                    else:
                        derived[key] = before
                extra = {"pins_until": pins_until, "expiries": dict(store.expiries),
                         "derived": derived}
                offsets = {os.path.basename(path): offset
                           for path, offset in self.offsets.items()}
                offsets[os.path.basename(store.journal.path)] = own
            try:
                merged = merge_index(base, delta, alias_delta, count, size, drop_gone=True)
                removed = store.removed.dump(int(utc_now() // 86400) - GONE_REASONS_DAYS)
                if os.path.exists(self.snapshot_path):  # the one before stays
                    replace_atomically(self.previous_path,
                                       lambda path: os.link(self.snapshot_path, path))
                write_snapshot(self.snapshot_path, merged, offsets, extra,
                               [("removed", removed)])
            except BaseException as exc:
                store.blobs.stop_tracking()
                if not isinstance(exc, OSError):
                    raise
                store.log("could not write the index snapshot: %s" % exc)
                return False
            finally:
                self.written = time.monotonic()
            with self.lock:
                if not self.follow_snapshot(tracked=True):
                    store.blobs.stop_tracking()
            folded = self._fold_dead()
            store.log("wrote the index snapshot: %d blobs, %s in %.2f s%s" % (
                len(merged.keys), human_bytes(os.path.getsize(self.snapshot_path)),
                time.monotonic() - started,
                "; %d journals of stopped processes folded" % folded if folded else ""))
            return True
        finally:
            os.close(lock)
            self.writing.release()

    def _dead(self):
        own = self.store.journal.path
        return [entry.path for entry in os.scandir(self.store.index_dir)
                if entry.name.endswith(".log") and entry.path != own
                and not Journal.owner_alive(entry.path)]

    @staticmethod
    def _covered(journal, snapshot):
        """True when ``snapshot``'s header says it covers ``journal`` whole."""
        try:
            with open(snapshot, "rb") as handle:
                lines = handle.read(SNAPSHOT_HEADER).split(b"\n")
            offset = json.loads(lines[1])["offsets"].get(os.path.basename(journal), 0)
            return os.path.getsize(journal) <= offset
        except (OSError, ValueError, KeyError, IndexError, AttributeError):
            return False

    def _fold_dead(self):
        """Delete the dead processes' journals that both snapshots cover whole."""
        folded = 0
        for path in self._dead():
            if self._covered(path, self.snapshot_path) and \
                    self._covered(path, self.previous_path):
                _unlink_quietly(path)
                self.offsets.pop(path, None)
                folded += 1
        return folded


# ===========================================================================
# Store: the directory -- blobs, names, space, reclaiming, one undo log
# ===========================================================================


class Transaction:
    """The changes one request makes to the store: committed or taken back whole.

    Each step registers how to undo itself (``on_undo``) as soon as it is
    done.  The journal lines that describe the request's outcome (pins,
    expiries, derivations) are queued (``record``) and written with one
    write by ``commit``, the commit point; in-memory effects that must wait
    for it are queued with ``on_commit``, and content a replaced name no
    longer uses is released after it (``release_later``).  ``rollback``
    undoes every step in reverse order; an undo step that fails is logged
    and the others still run.  As a context manager: commit when the block
    ends normally, rollback (and re-raise) on any exception.
    """

    def __init__(self, store):
        self.store = store
        self._undo = []
        self._lines = []
        self._after = []
        self._release = []

    def on_undo(self, func, *args):
        self._undo.append((func, args))

    def record(self, kind, *fields):
        self._lines.append(Journal.line(kind, *fields))

    def on_commit(self, func, *args):
        self._after.append((func, args))

    def release_later(self, sha256):
        self._release.append(sha256)

    def commit(self):
        if self._lines:
            self.store.journal.write_lines(self._lines)
        self._undo = []
        for func, args in self._after:
            func(*args)
        for sha256 in self._release:
            try:
                self.store.release(sha256, "deleted")
            except OSError as exc:  # committed already: the sweep retries
                self.store.log("releasing %s after a commit failed: %s" % (sha256, exc))

    def rollback(self):
        undo, self._undo = self._undo, []
        for func, args in reversed(undo):
            try:
                func(*args)
            except Exception:
                self.store.log("undoing %s failed:\n%s" % (
                    getattr(func, "__name__", func), traceback.format_exc()))

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is None:
            try:
                self.commit()
            except BaseException:
                self.rollback()  # the commit point itself failed
                raise
        else:
            self.rollback()
        return False


class Store:
    """ARCHIVE_DIR: blobs, their names, this process's staging and journal.

    The directory is the truth.  The index in memory is rebuilt from the
    journals in ``index/`` by a background thread (JournalSet.load;
    ``ready`` is set when lookups may trust it).  Lookups check the disk
    before answering yes, and re-read the other processes' journals before
    answering no.  Methods that change the store take an optional
    Transaction: with one, they register their undo step and queue their
    journal lines; without, they take effect (and are journaled) at once.
    """

    TOP_DIRS = ("blob", "explode", "replica", "files", "staging", "index", "uploads")

    def __init__(self, config, log=None):
        self.config = config
        self.root = config.directory
        self.algorithms = config.digests
        self.log = log or (lambda message: None)
        for name in self.TOP_DIRS:
            makedirs(os.path.join(self.root, name))
        self.tag = secrets.token_hex(3)  # tells this process's records apart
        self.process_id = "%s-%d-%s" % (
            re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64], os.getpid(), self.tag)
        self.index_dir = os.path.join(self.root, "index")
        self.journal = Journal(self.index_dir, self.process_id)
        self.staging_dir = os.path.join(self.root, "staging", self.process_id)
        makedirs(self.staging_dir)
        self.blobs = BlobIndex(self.algorithms)  # digests, pins, uses, totals
        self.pending = {}     # ("P", sha256) / ("D", source) -> state before an
                              # uncommitted change (snapshots leave it out)
        self.expiries = {}    # relpath -> retain_until, names that expire
        self.removed = RemovedBlobs()  # why blobs went: for the uploads log
        self.in_use = collections.Counter()  # sha256 of blobs uploads are naming
        self.in_flight = 0             # bytes staged by uploads not yet published
        self.space_lock = threading.Lock()
        self._free = (0.0, 0, 0)       # (when read, free bytes, floor bytes)
        self.evictor = None            # the Evictor, once one runs
        self.resumables = None         # the Resumables, once they are set up
        self.counters = None           # the server's SharedCounters, once it runs
        self.partial = (0, 0)          # (partial uploads, bytes), see partial_changed
        self.derived = {}     # sha256 -> sha256 of its decompressed blob
        self.sources = collections.Counter()  # decompressed sha256 -> sources
        self.ready = threading.Event()       # lookups may trust the index
        self.reconciled = threading.Event()  # blob tree scanned, journals merged
        self.journals = JournalSet(self)
        self.blobs.on_grow = self.journals.wanted.set
        self.load_seconds = self.reconcile_seconds = None
        self._name_digests = {}  # (dev, ino, mtime_ns) -> sha256, no xattrs

    # -- paths ---------------------------------------------------------------

    def blob_relpath(self, sha256):
        return "blob/%s/%s/%s" % (sha256[:2], sha256[2:4], sha256)

    def blob_path(self, sha256):
        return os.path.join(self.root, self.blob_relpath(sha256))

    def tree_path(self, sha256):
        """Where the archive with that sha256 is expanded."""
        return os.path.join(self.root, "explode", sha256[:2], sha256[2:4], sha256)

    def relpath(self, path):
        return os.path.relpath(path, self.root).replace(os.sep, "/")

    def path_of(self, relpath):
        return os.path.join(self.root, *relpath.split("/"))

    def clear_dead_staging(self):
        """Remove the staging directories of processes that are gone (never
        a live one's); returns how many blobs that reclaimed.

        A process killed mid-upload may have published a blob it had not
        named or pinned yet: its staged file is then the blob's only other
        link.  Each staged file's blob (from its xattr, else its content)
        is released once the staged file is gone, which removes it when
        nothing else holds it.  A blob caught being removed (``grave-``,
        moved aside) goes back when names still hold it."""
        parent = os.path.dirname(self.staging_dir)
        reclaimed = 0
        for entry in os.scandir(parent):
            if entry.name == self.process_id:
                continue
            journal = os.path.join(self.index_dir, entry.name + ".log")
            if Journal.owner_alive(journal):
                continue
            for directory, _, files in os.walk(entry.path, topdown=False):
                for name in files:
                    reclaimed += self._clear_staged(os.path.join(directory, name), name)
            shutil.rmtree(entry.path, ignore_errors=True)
        return reclaimed

    def _clear_staged(self, path, name):
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
                _unlink_quietly(path)
                return 0  # never published: just a partial file
            sha256 = read_blob_xattr(path)[0].get("sha256")
            if sha256 is None:
                digest = hashlib.sha256()
                with open(path, "rb") as handle:
                    for data in iter(lambda: handle.read(CHUNK_SIZE), b""):
                        digest.update(data)
                sha256 = digest.hexdigest()
            if name.startswith("grave-") and st.st_nlink > 1:
                try:
                    os.link(path, self.blob_path(sha256))  # names hold it: back
                except FileExistsError:
                    pass
            os.unlink(path)
        except OSError:
            return 0
        return int(self.release(sha256, "reclaimed"))

    def refresh_journals(self):
        self.journals.refresh()

    # -- lookups -------------------------------------------------------------

    def lookup(self, hexdigest, refresh=True):
        """sha256 hex of the blob with that digest, or None.

        Before a "no", the other processes' journals are read again (unless
        ``refresh`` is false: the caller just did).  Raises BadRequest for a
        string that is not 32, 40, 64 or 128 hex.
        """
        algorithm = LOOKUP_LENGTHS.get(len(hexdigest))
        if algorithm is None or not _HEX.match(hexdigest):
            raise BadRequest("checksum must be 32 (md5), 40 (sha1), 64 (sha256) or "
                             "128 (sha512) hex digits, got %r" % hexdigest[:140])
        if algorithm not in self.algorithms:
            return None
        hexdigest = hexdigest.lower()
        for attempt in range(2):
            sha256 = self.confirm(algorithm, hexdigest)
            if sha256:
                return sha256  # while the index loads too: the disk said yes
            if attempt == 0:
                if not self.ready.is_set():
                    self.ready.wait(INDEX_WAIT)  # a "no" waits for the whole index
                elif refresh:
                    self.refresh_journals()  # stored by another process?
                else:
                    break
        return None

    def confirm(self, algorithm, hexdigest):
        """The sha256 of the stored blob with this digest, asking the index
        which blobs it may be and the disk whether it is (for a digest
        other than sha256: the digests the blob was stored with)."""
        if algorithm == "sha256":
            return hexdigest if os.path.exists(self.blob_path(hexdigest)) else None
        for prefix in self.blobs.candidates(algorithm, hexdigest):
            for sha256 in self.blob_names(prefix):
                try:
                    if self.digests_of(self.blob_path(sha256)).get(algorithm) == hexdigest:
                        return sha256
                except OSError:
                    continue  # removed meanwhile
        return None

    def blob_names(self, prefix):
        """The sha256 of every blob whose sha256 starts with ``prefix``."""
        try:
            names = os.listdir(os.path.join(self.root, "blob", prefix[:2], prefix[2:4]))
        except FileNotFoundError:
            return []
        return [name for name in names if name.startswith(prefix) and len(name) == 64]

    def find_blob(self, prefix):
        """Full sha256 of the blob whose sha256 starts with ``prefix``, on disk."""
        if len(prefix) == 64:
            return prefix if os.path.exists(self.blob_path(prefix)) else None
        try:
            names = os.listdir(os.path.join(self.root, "blob", prefix[:2], prefix[2:4]))
        except FileNotFoundError:
            return None
        for name in names:
            if name.startswith(prefix) and len(name) == 64:
                return name
        return None

    def stored_blob(self, sha256):
        """(BlobInfo, first bytes) of a stored blob; NotFound when it is gone."""
        path = self.blob_path(sha256)
        try:
            with open(path, "rb") as handle:
                head = handle.read(StagedBlob.SNIFF_BYTES)
                size = os.fstat(handle.fileno()).st_size
        except FileNotFoundError:
            raise NotFound("no stored content has checksum %s" % sha256)
        info = BlobInfo(sha256, size, self.digests_of(path), False, self.blob_relpath(sha256))
        return info, head

    def name_sha256(self, path):
        """sha256 of the file at ``path`` (a name: a hardlink to a blob)."""
        return self.digests_of(path)["sha256"]

    def digests_of(self, path):
        """{algorithm: hex} of a blob or name, from the xattr its blob got
        when stored; content without it (copied in, a filesystem without
        user xattrs) is hashed once and remembered by inode.
        """
        digests, _ = read_blob_xattr(path)
        if all(name in digests for name in self.algorithms):
            return digests
        st = os.stat(path)
        key = (st.st_dev, st.st_ino, st.st_mtime_ns)
        if key not in self._name_digests:
            digester = Digester(self.algorithms)
            with open(path, "rb") as handle:
                for data in iter(lambda: handle.read(CHUNK_SIZE), b""):
                    digester.update(data)
            if len(self._name_digests) > NAME_DIGEST_CACHE:
                self._name_digests.clear()
            self._name_digests[key] = digester.hexdigests()
        return self._name_digests[key]

    def names_by_inode(self, inodes):
        """{inode: [paths]} of every name (files/, explode/, replica/) whose
        inode is in ``inodes``: one walk, inode numbers from the directory
        entries (no stat per name)."""
        found = collections.defaultdict(list)
        stack = [os.path.join(self.root, top) for top in ("files", "explode", "replica")]
        while stack:
            try:
                entries = list(os.scandir(stack.pop()))
            except OSError:
                continue
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.inode() in inodes and entry.is_file(follow_symlinks=False):
                    found[entry.inode()].append(entry.path)
        return found

    def tree_of(self, path):
        """The explode tree (explode/ab/cd/<sha256>) that ``path`` is in, or None."""
        parts = self.relpath(path).split("/")
        if len(parts) > 4 and parts[0] == "explode":
            return os.path.join(self.root, *parts[:4])
        return None

    def remove_dangling_links(self):
        """Remove symlinks in replica/ whose target is gone (a tree or a
        file evicted or deleted): a link to nothing is no name."""
        for parent, dirs, files in os.walk(os.path.join(self.root, "replica")):
            for name in files + dirs:
                path = os.path.join(parent, name)
                if os.path.islink(path) and not os.path.exists(path):
                    _unlink_quietly(path)
                    self.set_expiry(self.relpath(path), 0)

    def blob_name(self, sha256):
        """The file name blob ``sha256`` was last uploaded as, or None."""
        return read_blob_xattr(self.blob_path(sha256))[1]

    def name_blob(self, sha256, name, txn):
        """Remember ``name`` as the file name a stored blob was last
        uploaded as (downloads by checksum offer it); undone on rollback."""
        path = self.blob_path(sha256)
        digests, before = read_blob_xattr(path)
        if not digests or before == name:
            return  # no xattrs on this filesystem, or nothing to change
        self._set_blob_xattr(path, digests, name)
        txn.on_undo(self._set_blob_xattr, path, digests, before)

    @staticmethod
    def _set_blob_xattr(path, digests, name):
        value = blob_xattr(digests, name)
        try:
            os.setxattr(path, XATTR_DIGESTS, value)
        except PermissionError:  # a read-only blob, and not root: writable for a moment
            os.chmod(path, 0o644)
            try:
                os.setxattr(path, XATTR_DIGESTS, value)
            finally:
                os.chmod(path, 0o444)
        except OSError:
            pass

    def gone_reason(self, sha256, expires=None):
        """None while blob ``sha256`` is stored; else why it went:
        "deleted", "expired" or "evicted" (an upload taken back or left
        by a crash counts as deleted; a removal no journal remembers is
        "expired" past ``expires``, else "deleted")."""
        if os.path.exists(self.blob_path(sha256)):
            return None
        reason = self.removed.get(sha256)
        if reason in ("deleted", "expired", "evicted"):
            return reason
        if reason is None and expires and expires <= utc_now():
            return "expired"
        return "deleted"

    def made_file(self, directory):
        """Where the times names of ``directory`` were made are noted: in a
        tree of its own beside the journals, index/made/<relpath>/MADE_FILE
        (not in the directory itself, which holds only what clients named)."""
        return os.path.join(self.index_dir, "made", self.relpath(directory), MADE_FILE)

    def note_made(self, path, when):
        """Note that name ``path`` was made at ``when``: listings show it
        (the inode's times are its content's, shared by all its names)."""
        line = "%.3f\t%s\n" % (when, os.path.basename(path))
        made_file = self.made_file(os.path.dirname(path))
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        try:
            try:
                fd = os.open(made_file, flags, 0o644)
            except FileNotFoundError:
                makedirs(os.path.dirname(made_file))
                fd = os.open(made_file, flags, 0o644)
            try:
                os.write(fd, line.encode("utf-8", "surrogateescape"))
            finally:
                os.close(fd)
        except OSError as exc:  # after the commit point: a listing falls back to ctime
            self.log("could not note when %s was made: %s" % (self.relpath(path), exc))

    def made_times(self, directory):
        """{name: time made} noted for ``directory`` (the last note of a
        name wins); {} when there is none."""
        made = {}
        try:
            with open(self.made_file(directory), "r", encoding="utf-8",
                      errors="surrogateescape") as handle:
                for line in handle:
                    when, sep, name = line.rstrip("\n").partition("\t")
                    if sep and line.endswith("\n"):
                        try:
                            made[name] = float(when)
                        except ValueError:
                            pass
        except OSError:
            pass
        return made

    def names_of(self, sha256, limit):
        """Up to ``limit`` names (relpaths) that are hardlinks of a blob.

        Walks files/, explode/ and replica/ comparing inode numbers (from
        the directory entries: no stat per name) and stops as soon as every
        other link of the blob is found.
        """
        try:
            st = os.stat(self.blob_path(sha256))
        except FileNotFoundError:
            return []
        wanted, found = st.st_nlink - 1, []
        stack = [os.path.join(self.root, top) for top in ("files", "explode", "replica")]
        while stack and len(found) < min(wanted, limit):
            try:
                entries = list(os.scandir(stack.pop()))
            except OSError:
                continue
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.inode() == st.st_ino and entry.is_file(follow_symlinks=False):
                    found.append(self.relpath(entry.path))
        return sorted(found)[:limit]

    # -- writing -------------------------------------------------------------

    def stage(self, filename="upload"):
        """A new StagedBlob; the caller discards it (``with``)."""
        try:
            return StagedBlob(self, filename)
        except OSError as exc:
            raise_storage_error(exc)

    def publish(self, staged, txn=None, durable=True):
        """Make a finished StagedBlob a blob (or find it stored): BlobInfo.

        The record is journaled before the blob becomes visible; an
        identical blob published concurrently wins and this one is
        "existing".  With ``txn``, a new blob is taken back on rollback.
        ``durable=False`` leaves the directory fsync to the caller (one
        os.sync for an archive's members: 10,000 fsyncs took 5 s here).
        """
        digests = staged.digests
        sha256 = digests["sha256"]
        path = self.blob_path(sha256)
        new = False
        if not os.path.exists(path):
            try:
                self.journal.blob(staged.size, digests)
                try:
                    os.link(staged.path, path)
                except FileNotFoundError:  # first blob of its blob/ab/cd
                    makedirs(os.path.dirname(path))
                    os.link(staged.path, path)
                new = True
                if txn is not None:
                    txn.on_undo(self._unpublish, staged, sha256)
                if durable and self.config.fsync:
                    fsync_dir(os.path.dirname(path))
            except FileExistsError:
                pass
            except OSError as exc:
                raise_storage_error(exc)
        self.blobs.add(digests, staged.size, utc_now())  # or: used, when it was stored
        staged.uncharge()
        return BlobInfo(sha256, staged.size, digests, new, self.blob_relpath(sha256))

    def _unpublish(self, staged, sha256):
        staged.discard()  # the staged twin's link would keep the blob
        self.release(sha256, "undone")

    def link_blob(self, info, dest, staged=None, txn=None):
        """Hardlink ``dest`` to the blob of ``info`` (the one place a name's
        source is chosen).  A blob deleted since it was published (by a
        concurrent request) is published again from ``staged`` first; with
        no staged copy that is a Conflict.  ``dest``'s directory must exist.
        """
        try:
            os.link(self.blob_path(info.sha256), dest)
            return
        except FileNotFoundError:
            if not os.path.isdir(os.path.dirname(dest)):
                raise
            if staged is None:
                raise Conflict("content %s was deleted while it was being named; "
                               "send it again" % info.sha256)
        self.publish(staged, txn)
        os.link(self.blob_path(info.sha256), dest)

    def pin(self, sha256, retain_until=0.0, txn=None):
        """Keep a blob without a name (uploads to /upload, adopted blobs).

        The pin holds in memory at once (a concurrent delete must see it);
        with ``txn`` it is journaled at the commit point, and until then a
        snapshot leaves it out (``pending``)."""
        before = self.blobs.pin_state(sha256)
        if txn is not None:
            self._pending(txn, ("P", sha256), before)
        if not self.blobs.pin(sha256, retain_until):
            return
        if txn is None:
            self.journal.write("P", sha256, "%.3f" % retain_until)
        else:
            txn.on_undo(self.blobs.pin_restore, sha256, before)
            txn.record("P", sha256, "%.3f" % retain_until)

    def _pending(self, txn, change, before):
        """Note the state before an uncommitted change, until it ends."""
        if change in self.pending:
            return
        self.pending[change] = before
        txn.on_commit(self.pending.pop, change, None)
        txn.on_undo(self.pending.pop, change, None)

    def unpin(self, sha256):
        if self.blobs.unpin(sha256):
            self.journal.write("U", sha256)

    def add_derived(self, source, derived, txn):
        """``derived`` was decompressed from ``source``: kept while it is."""
        previous = self.derived.get(source)
        if previous == derived:
            return
        self._pending(txn, ("D", source), previous)
        self.set_derived(source, derived)
        txn.on_undo(self._undo_derived, source, derived, previous)
        txn.record("D", source, derived)

    def _undo_derived(self, source, derived, previous):
        if previous is None:
            self._pop_derived(source)
        else:
            self.set_derived(source, previous)
        self.release(derived, "undone")

    def set_derived(self, source, derived):
        self._pop_derived(source)
        self.derived[source] = derived
        self.sources[derived] += 1

    def _pop_derived(self, source):
        derived = self.derived.pop(source, None)
        if derived is not None:
            self.sources[derived] -= 1
            if self.sources[derived] <= 0:
                del self.sources[derived]
        return derived

    def set_expiry(self, relpath, retain_until, txn=None):
        """A name expires at ``retain_until`` (0: never)."""
        if not (retain_until or relpath in self.expiries):
            return
        if txn is None:
            self.journal.write("E", "%.3f" % retain_until, relpath)
            self.expire_in_memory(relpath, retain_until)
        else:
            txn.record("E", "%.3f" % retain_until, relpath)
            txn.on_commit(self.expire_in_memory, relpath, retain_until)

    def expire_in_memory(self, relpath, retain_until):
        if retain_until:
            self.expiries[relpath] = retain_until
        else:
            self.expiries.pop(relpath, None)

    def check_name_target(self, dest):
        """Raise Conflict when ``dest`` cannot become a file name: it is a
        directory, or a file stands where one of its directories would."""
        probe = os.path.dirname(dest)
        while len(probe) > len(self.root):
            if os.path.lexists(probe) and not os.path.isdir(probe):
                raise Conflict("a file is in the way of directory %s" % self.relpath(probe))
            probe = os.path.dirname(probe)
        if os.path.isdir(dest) and not os.path.islink(dest):
            raise Conflict("%s is a directory" % self.relpath(dest))

    def make_parents(self, path, txn=None):
        """Create the directories above ``path``; with ``txn`` the ones
        made here are removed again on rollback (when still empty).
        Raises Conflict when a file is in the way."""
        parent = os.path.dirname(path)
        missing = []
        probe = parent
        while len(probe) > len(self.root) and not os.path.isdir(probe):
            missing.append(probe)
            probe = os.path.dirname(probe)
        if not missing:
            return
        try:
            makedirs(parent)
        except (FileExistsError, NotADirectoryError):
            raise Conflict("a file is in the way of directory %s" % self.relpath(parent))
        except OSError as exc:
            raise_storage_error(exc)
        if txn is not None:
            for directory in reversed(missing):  # undone deepest first
                txn.on_undo(_rmdir_quietly, directory)

    def link_name(self, info, dest, exclusive=False, staged=None, txn=None):
        """Make ``dest`` a name (hardlink) of the blob of ``info``.

        Replaces ``dest`` atomically, or with ``exclusive`` raises
        PreconditionFailed when it exists.  Returns the sha256 of the
        content ``dest`` had before, or None.  Raises Conflict when a
        directory is in the way.  With ``txn``, rollback puts back what
        ``dest`` was (the previous content's blob linked again, if any).
        """
        self.make_parents(dest, txn)
        previous = None
        if exclusive:
            target = dest
            try:
                self.link_blob(info, dest, staged, txn)
            except FileExistsError:
                raise PreconditionFailed("%s exists (If-None-Match: *)" % self.relpath(dest))
            except OSError as exc:
                raise_storage_error(exc)
        else:
            if os.path.isdir(dest) and not os.path.islink(dest):
                raise Conflict("%s is a directory" % self.relpath(dest))
            if os.path.isfile(dest):
                try:
                    previous = self.name_sha256(dest)
                except OSError:
                    previous = None
            target = os.path.join(os.path.dirname(dest), RESERVED_PREFIX + secrets.token_hex(6))
            try:
                self.link_blob(info, target, staged, txn)
                os.replace(target, dest)
            except BaseException as exc:
                _unlink_quietly(target)
                if not isinstance(exc, OSError):
                    raise
                if exc.errno in (errno.EISDIR, errno.ENOTEMPTY):
                    raise Conflict("%s is a directory" % self.relpath(dest))
                raise_storage_error(exc)
        if txn is not None:
            txn.on_undo(self._restore_name, dest, os.lstat(dest).st_ino, previous)
            txn.on_commit(self.note_made, dest, utc_now())
        return previous

    def _restore_name(self, dest, inode, previous):
        """Undo link_name: ``dest`` back to ``previous`` content, or gone,
        unless another request has replaced it meanwhile."""
        try:
            if os.lstat(dest).st_ino != inode:
                return
        except FileNotFoundError:
            return
        if previous and os.path.exists(self.blob_path(previous)):
            replace_atomically(dest, lambda path: os.link(self.blob_path(previous), path))
        else:
            os.unlink(dest)

    # -- use and space ---------------------------------------------------------

    def touch(self, sha256):
        """Blob ``sha256`` was used (looked up, downloaded, uploaded again):
        the last to be evicted.  No disk write (see flush_uses)."""
        self.blobs.touch(digest_key(sha256), utc_now())

    def keep(self, sha256, txn):
        """Never evict blob ``sha256`` (an upload with X-Bucket-Keep)."""
        if not self.blobs.is_kept(sha256):
            self.blobs.keep(sha256)
            txn.record("K", sha256)

    def flush_uses(self):
        """Journal the uses since the last call, one T line per blob used
        (a restart keeps the eviction order; HEADs cost no disk write)."""
        dirty = self.blobs.take_dirty()
        if dirty:
            self.journal.write_lines(["T\t%.3f\t%016x\n" % (when, key)
                                      for key, when in dirty.items()])
        return len(dirty)

    def space(self, fresh=False):
        """(free bytes, floor bytes) of ARCHIVE_DIR's filesystem, read at
        most every SPACE_CACHE seconds unless ``fresh``."""
        when, free, floor = self._free
        if fresh or time.monotonic() - when > SPACE_CACHE:
            free, floor, _ = free_space(self.root, self.config.min_free)
            self._free = (time.monotonic(), free, floor)
        return free, floor

    def used_bytes(self):
        """What counts against max-size: blobs, uploads in flight here, and
        partial (resumable) uploads."""
        return self.blobs.bytes + self.in_flight + self.partial[1]

    def hard_limit(self):
        return int(self.config.max_size * HARD_LIMIT_RATIO)

    def charge(self, count):
        """Count ``count`` more bytes in flight (negative: fewer).  Raises
        InsufficientStorage (with Retry-After: eviction catches up) when
        they would take the blobs past the hard limit, or the filesystem
        under the free-space floor."""
        with self.space_lock:
            self.in_flight += count
            when, free, floor = self._free
            self._free = (when, free - count, floor)  # until it is read again
            if count <= 0:
                return
            over = self.config.max_size and self.used_bytes() > self.hard_limit()
        if over:  # evict here once (or wait for the eviction under way), then look again
            self.evict_now(0)
            over = self.used_bytes() > self.hard_limit()
        if over:
            self.wake_evictor()
            raise InsufficientStorage(
                "the store is at its size limit (BUCKET_MAX_SIZE %d bytes, evicting); "
                "nothing of this upload was kept" % self.config.max_size,
                headers={"Retry-After": str(RETRY_AFTER_EVICTING)})
        free, floor = self.space()
        if free < floor:
            free, floor = self.space(fresh=True)
            if free < floor:
                self.wake_evictor()
                raise self.under_floor(free, floor)

    def check_room(self, length):
        """Before an upload of ``length`` bytes is read: refuse it
        (InsufficientStorage) when it is larger than max-size, or would take
        the blobs past the hard limit or the filesystem under its floor and
        eviction (run here, for at most SYNC_EVICT_SECONDS) cannot make room."""
        max_size = self.config.max_size
        if max_size and length > max_size:
            raise InsufficientStorage(
                "an upload of %d bytes is larger than BUCKET_MAX_SIZE (%d bytes): it can "
                "never be stored" % (length, max_size))
        if max_size:
            self.refresh_journals()  # what other processes stored counts too
        deadline = time.monotonic() + SYNC_EVICT_SECONDS
        evicted = True
        while True:
            stored = self.used_bytes()
            if max_size and stored + length > max_size:
                self.wake_evictor()  # over the soft limit: evict in the background
            over = max_size and stored + length > self.hard_limit()
            free, floor = self.space(fresh=True)
            if not over and free - length >= floor:
                return
            if not max_size or not evicted or time.monotonic() > deadline:
                break  # looked again after an eviction that could do nothing
            evicted = self.evict_now(length)
        if over:
            raise InsufficientStorage(
                "an upload of %d bytes would take the store past its size limit "
                "(BUCKET_MAX_SIZE %d bytes, holding %d) and eviction cannot make room now"
                % (length, max_size, stored), headers={"Retry-After": str(RETRY_AFTER_EVICTING)})
        raise self.under_floor(free - length, floor)

    def partial_changed(self):
        """Count the partial uploads again (all processes' ones: a listing
        of resumable/ and a stat each); their bytes count against the
        limits like blobs."""
        if self.resumables is not None:
            self.partial = self.resumables.totals()

    def wake_evictor(self):
        if self.evictor is not None:
            self.evictor.wake()

    def evict_now(self, need):
        """Evict now for an upload that needs ``need`` bytes of room; False
        when nothing could be done (no Evictor, or nothing to evict)."""
        return self.evictor is not None and self.evictor.evict_for(need)

    def under_floor(self, free, floor):
        """The refusal of an upload that would leave the filesystem under
        its free-space floor; Retry-After when eviction can make room."""
        headers = {"Retry-After": str(RETRY_AFTER_EVICTING)} if self.config.max_size else {}
        return InsufficientStorage(
            "not enough disk space: the filesystem of ARCHIVE_DIR would have %d bytes "
            "free, under BUCKET_MIN_FREE (%d bytes); nothing of this upload was kept"
            % (max(free, 0), floor), headers=headers)

    # -- reclaiming ----------------------------------------------------------

    def release(self, sha256, reason):
        """Remove blob ``sha256`` if no name and no pin keeps it any more.

        ``reason`` is journaled with the removal (R record): deleted,
        expired, evicted, undone or reclaimed.  Safe against a concurrent
        link (here or in another process): the blob is first moved aside,
        and put back if a link appeared.  Returns True when it was removed.
        """
        for attempt in range(2):
            if self.blobs.pinned(sha256) or sha256 in self.sources:
                return False
            if attempt == 0:
                self.refresh_journals()  # another process may have pinned it
        return self._remove_blob(sha256, True, reason)

    def _remove_blob(self, sha256, only_if_unreferenced, reason):
        path = self.blob_path(sha256)
        try:
            if os.stat(path).st_nlink > 1 and only_if_unreferenced:
                return False
            grave = os.path.join(self.staging_dir, "grave-" + secrets.token_hex(6))
            os.rename(path, grave)
        except FileNotFoundError:
            return False
        st = os.stat(grave)
        if st.st_nlink > 1:
            try:
                os.link(grave, path)  # linked meanwhile: it stays
            except FileExistsError:
                pass
            os.unlink(grave)
            return False
        os.unlink(grave)
        self.removed.add(sha256, reason)
        self.blobs.remove(sha256, st.st_size, utc_now())
        try:
            self.journal.write("R", sha256, reason, st.st_size)
        except InsufficientStorage:
            pass  # the blob is gone; a B record without R is only stale
        self._remove_derived(sha256, reason)
        return True

    def _remove_derived(self, sha256, reason):
        """A blob is gone: so are its explode tree and decompressed blob."""
        tree = self.tree_path(sha256)
        if os.path.isdir(tree):
            self.remove_tree(tree, reason)
        derived = self._pop_derived(sha256)
        if derived:
            self.release(derived, reason)

    def delete_blob(self, sha256):
        """DELETE /checksum: remove a blob no name uses, with what hangs off it.

        Raises Conflict naming the names that still use it (the first
        NAMES_IN_CONFLICT, and how many there are).
        """
        path = self.blob_path(sha256)
        try:
            links = os.stat(path).st_nlink
        except FileNotFoundError:
            raise NotFound("no blob with checksum %s" % sha256)
        if links > 1:
            names = self.names_of(sha256, NAMES_IN_CONFLICT)
            shown = ", ".join(names) + (", ..." if links - 1 > len(names) else "")
            raise Conflict("%d name(s) still use blob %s: %s; delete them first"
                           % (links - 1, sha256, shown),
                           headers={"X-Names": str(links - 1)})
        self.unpin(sha256)
        self._remove_blob(sha256, False, "deleted")

    def remove_name(self, path, reason="deleted"):
        """Unlink one name, reclaiming its blob if that was its last.

        Returns (names removed, blobs reclaimed).
        """
        try:
            sha256 = None if os.path.islink(path) else self.name_sha256(path)
        except OSError:
            sha256 = None
        try:
            os.unlink(path)
        except FileNotFoundError:
            return 0, 0
        self.set_expiry(self.relpath(path), 0)
        return 1, int(bool(sha256) and self.release(sha256, reason))

    def remove_tree(self, path, reason="deleted"):
        """Remove a directory of names: (names removed, blobs reclaimed)."""
        names = reclaimed = 0
        for parent, dirs, files in os.walk(path, topdown=False):
            for name in files:
                removed, freed = self.remove_name(os.path.join(parent, name), reason)
                names += removed
                reclaimed += freed
            for name in dirs:
                full = os.path.join(parent, name)
                if os.path.islink(full):
                    os.unlink(full)
                    names += 1
                else:
                    _rmdir_quietly(full)
        _rmdir_quietly(path)
        shutil.rmtree(os.path.dirname(self.made_file(path)), ignore_errors=True)
        self.set_expiry(self.relpath(path), 0)
        return names, reclaimed


# ===========================================================================
# Archives: detection by content, decompression, zip and tar expansion
# ===========================================================================

RATIO_ALLOWANCE = 1 << 20   # bytes expanded before the ratio limit applies:
                            # a 200-byte zip of 60 KB of XML is no bomb

COMPRESSED_KINDS = {  # kind -> (mime, new decompressor object)
    "gzip": ("application/gzip", lambda: zlib.decompressobj(wbits=31)),
    "bzip2": ("application/x-bzip2", bz2.BZ2Decompressor),
    "xz": ("application/x-xz", lzma.LZMADecompressor),
}
if _zstd is not None:  # pragma: no cover - Python 3.14+
    COMPRESSED_KINDS["zstd"] = ("application/zstd", _zstd.ZstdDecompressor)
ARCHIVE_MIMES = {"zip": "application/zip", "tar": "application/x-tar"}
_OTHER_MAGIC = [  # a few common types python-magic would name
    (b"%PDF-", "application/pdf"), (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
    (b"<?xml", "application/xml"), (b"\x7fELF", "application/x-executable"),
    (b"(\xb5/\xfd", "application/zstd"),
]
_DECOMPRESSED_SUFFIXES = {".tgz": ".tar", ".tbz2": ".tar", ".tbz": ".tar",
                          ".txz": ".tar", ".tzst": ".tar"}


def sniff(head):
    """The container kind of content starting with ``head``, or None.

    One of "gzip", "bzip2", "xz", "zstd" (3.14+), "zip", "tar".
    """
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[3:4] != b"0":
        return "bzip2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if head[:4] == b"(\xb5/\xfd" and "zstd" in COMPRESSED_KINDS:
        return "zstd"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return "zip"
    if len(head) >= 512 and (head[257:262] == b"ustar" or _tar_checksum_ok(head)):
        return "tar"
    return None


def _tar_checksum_ok(head):
    """A v7 tar header has no magic, only a checksum (POSIX 1003.1-1988)."""
    try:
        stored = int(head[148:156].replace(b"\x00", b" ").strip() or b"-1", 8)
    except ValueError:
        return False
    computed = sum(head[:148]) + 8 * 32 + sum(head[156:512])
    return stored == computed and head[0:1] != b"\x00"


def guess_mime(head, filename):
    """MIME type from the first bytes (python-magic when present) and name."""
    if HAVE_MAGIC:
        try:
            return magic.from_buffer(bytes(head), mime=True)
        except Exception:  # libmagic errors are not ours to fail on
            pass
    kind = sniff(head)
    if kind in COMPRESSED_KINDS:
        return COMPRESSED_KINDS[kind][0]
    if kind in ARCHIVE_MIMES:
        return ARCHIVE_MIMES[kind]
    for prefix, mime in _OTHER_MAGIC:
        if head.startswith(prefix):
            return mime
    guessed = mimetypes.guess_type(filename or "")[0]
    if guessed:
        return guessed
    if not head:
        return "application/x-empty"
    try:
        head[:-4].decode("utf-8") if len(head) >= 4096 else head.decode("utf-8")
        return "text/plain"
    except UnicodeDecodeError:
        return "application/octet-stream"


def decompressed_name(filename):
    stem, ext = posixpath.splitext(filename)
    if ext.lower() in _DECOMPRESSED_SUFFIXES:
        return stem + _DECOMPRESSED_SUFFIXES[ext.lower()]
    if ext.lower() in (".gz", ".bz2", ".xz", ".zst", ".z", ".gzip"):
        return stem or filename + ".out"
    return filename + ".out"


class ExpansionStopped(Exception):
    """An archive was not expanded: a limit, or corrupt content. Says why."""


class Budget:
    """The expansion limits of one upload, checked as bytes stream out."""

    def __init__(self, config, compressed_size):
        self.config = config
        self.compressed_size = max(compressed_size, 1)
        self.expanded = 0
        self.members = 0

    def add_bytes(self, count):
        self.expanded += count
        limit = self.config.max_expanded
        if self.expanded > limit:
            raise ExpansionStopped("expanded size over %d bytes (BUCKET_MAX_EXPANDED)" % limit)
        ratio = self.config.max_ratio
        if ratio and self.expanded > RATIO_ALLOWANCE and self.expanded > ratio * self.compressed_size:
            raise ExpansionStopped(
                "expanded-to-compressed ratio over %g:1 (BUCKET_MAX_RATIO)" % ratio)

    def add_member(self):
        self.members += 1
        if self.members > self.config.max_members:
            raise ExpansionStopped("more than %d members (BUCKET_MAX_MEMBERS)"
                                   % self.config.max_members)


def copy_limited(source, staged, budget):
    """Stream ``source`` into ``staged``, charging every byte to ``budget``."""
    while True:
        data = source.read(CHUNK_SIZE)
        if not data:
            return
        budget.add_bytes(len(data))
        staged.write(data)


def iter_decompressed(kind, handle):
    """The decompressed bytes of ``handle``, CHUNK_SIZE at most a piece.

    Output is bounded per call (``max_length``), so a bomb expands only as
    far as the caller reads; concatenated streams (multi-member gzip,
    bzip2, xz) are followed, zero padding after gzip is ignored as gzip(1)
    does.  GzipFile's 8 KiB reads cost 2.3 s of 10 for a 1 GiB tgz.
    Raises ExpansionStopped for truncated data; the decompressors' own
    errors (zlib.error, OSError, lzma.LZMAError, EOFError) pass through.
    """
    decompressor = COMPRESSED_KINDS[kind][1]()
    zlib_style = kind == "gzip"  # leftover input in unconsumed_tail
    data, more = b"", False
    while True:
        if not data and not more:
            data = handle.read(CHUNK_SIZE)
            if not data:
                raise ExpansionStopped("%s data is truncated" % kind)
        out = decompressor.decompress(data, CHUNK_SIZE)
        if zlib_style:
            data, more = decompressor.unconsumed_tail, len(out) == CHUNK_SIZE
        else:
            data, more = b"", not decompressor.needs_input
        if out:
            yield out
        if decompressor.eof:
            rest = decompressor.unused_data  # at eof zlib has the rest here too
            while True:
                if kind == "gzip":
                    rest = rest.lstrip(b"\0")
                if rest:
                    break
                rest = handle.read(CHUNK_SIZE)
                if not rest:
                    return
            decompressor = COMPRESSED_KINDS[kind][1]()
            data, more = rest, False


def normalize_member(name):
    """An archive member name -> safe relative path, or (None, reason)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # tarfile's surrogateescape of other bytes
        return None, "name is not UTF-8"
    name = name.replace("\\", "/")
    if name.startswith("/"):
        return None, "absolute path"
    segments = []
    for segment in name.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            return None, "'..' in path"
        if not segments and re.match(r"^[A-Za-z]:", segment):
            return None, "absolute path (drive letter)"
        try:
            check_segment(segment, "member")
        except BadRequest as exc:
            return None, exc.message
        segments.append(segment)
    if not segments:
        return None, "empty name"
    return "/".join(segments), None


class TreeBuilder:
    """An expanded archive assembled in staging, then published whole.

    Members are written as StagedBlobs; ``publish`` links each into the
    blob store and the tree, and renames the tree to its place under
    ``explode/`` (nothing is visible before).  ``discard`` removes it all.
    Duplicate member names: the last one wins (tar's own extraction rule),
    the earlier is listed as skipped.
    """

    def __init__(self, store, budget):
        self.store = store
        self.budget = budget
        self.root = os.path.join(store.staging_dir, "tree-" + secrets.token_hex(6))
        os.mkdir(self.root)
        self.members = collections.OrderedDict()  # relpath -> StagedBlob | ("link", target)
        self.directories = set()
        self.skipped = []

    def skip(self, name, reason):
        printable = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        self.skipped.append({"path": printable, "reason": reason})

    def _claim(self, name):
        """Normalized path for a member, or None (skipped with a reason)."""
        path, reason = normalize_member(name)
        if path is None:
            self.skip(name, reason)
            return None
        parts = path.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in self.members:
                self.skip(name, "a file of the same name is in the way")
                return None
        if path in self.directories:
            self.skip(name, "a directory of the same name exists")
            return None
        if path in self.members:
            self.skip(path, "duplicate name: a later member replaces it")
            previous = self.members.pop(path)
            if isinstance(previous, StagedBlob):
                previous.discard()
        for depth in range(1, len(parts)):
            self.directories.add("/".join(parts[:depth]))
        return path

    def add_file(self, name, source):
        self.budget.add_member()
        path = self._claim(name)
        if path is None:
            return
        staged = self.store.stage(posixpath.basename(path))
        self.members[path] = staged
        copy_limited(source, staged, self.budget)
        staged.finish(sync=False)
        staged.head = b""  # 4 KiB a member adds up over 100,000 members

    def add_directory(self, name):
        self.budget.add_member()
        path, reason = normalize_member(name)
        if path is None:
            self.skip(name, reason)
            return
        parts = path.split("/")
        if any("/".join(parts[:depth]) in self.members for depth in range(1, len(parts) + 1)):
            self.skip(name, "a file or link of the same name is in the way")
            return
        for depth in range(1, len(parts) + 1):
            self.directories.add("/".join(parts[:depth]))

    def add_link(self, name, target, hard):
        """A tar link: kept only when it points inside the tree."""
        self.budget.add_member()
        if hard:
            resolved, _ = normalize_member(target)
            if resolved is None or not isinstance(self.members.get(resolved), StagedBlob):
                self.skip(name, "hardlink to %r, not a file of this archive" % target)
                return
        else:
            if target.startswith("/") or not target:
                self.skip(name, "symlink to absolute path %r" % target)
                return
            normalized, reason = normalize_member(name)
            if normalized is None:
                self.skip(name, reason)
                return
            if not _resolves_inside(posixpath.dirname(normalized), target):
                self.skip(name, "symlink to %r points outside the archive" % target)
                return
        path = self._claim(name)
        if path is not None:
            self.members[path] = ("hardlink" if hard else "symlink", resolved if hard else target)

    def _drop_escaping_symlinks(self):
        """Skip symlinks that leave the tree once other symlinks are followed."""
        changed = True
        while changed:
            changed = False
            for path, member in list(self.members.items()):
                if isinstance(member, tuple) and member[0] == "symlink" and \
                        _resolve_in_tree(self.members, path, member[1]) is None:
                    del self.members[path]
                    self.skip(path, "symlink to %r leads outside the archive through "
                                    "other links" % member[1])
                    changed = True

    def publish(self, key, txn):
        """Link members into the store and the tree; move it to explode/.

        Returns (tree path, list of member dicts, True when this upload
        made the tree); a tree that another upload made meanwhile stands.
        On rollback of ``txn`` the tree made here goes with its new blobs.
        """
        store = self.store
        self._drop_escaping_symlinks()
        if store.config.fsync:
            os.sync()  # one flush for all members (per-file fsync: 10k x 1 ms)
        for directory in sorted(self.directories):
            makedirs(os.path.join(self.root, directory))
        files = []
        blobs = {}
        for path, member in self.members.items():
            if isinstance(member, StagedBlob):
                info = store.publish(member, txn, durable=False)
                store.link_blob(info, os.path.join(self.root, path), member, txn)
                blobs[path] = info
                files.append({"path": path, "size": info.size, "checksums": info.digests})
        for path, member in self.members.items():
            if isinstance(member, tuple):
                kind, link_target = member
                target = os.path.join(self.root, path)
                if kind == "hardlink":
                    os.link(os.path.join(self.root, link_target), target)
                    info = blobs[link_target]
                    files.append({"path": path, "size": info.size, "checksums": info.digests})
                else:
                    os.symlink(link_target, target)
                    files.append({"path": path, "symlink": link_target})
        destination = store.tree_path(key)
        makedirs(os.path.dirname(destination))
        made = True
        try:
            os.rename(self.root, destination)
            txn.on_undo(store.remove_tree, destination, "undone")
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise_storage_error(exc)
            made = False  # expanded meanwhile by another upload: that tree stands
        if store.config.fsync:
            os.sync()  # the new blob and tree names, all at once
        self.discard()
        return destination, files, made

    def discard(self):
        for member in self.members.values():
            if isinstance(member, StagedBlob):
                member.discard()
        shutil.rmtree(self.root, ignore_errors=True)


def _resolve_in_tree(members, path, target, budget=None):
    """Segments ``path -> target`` resolves to inside the tree, or None.

    Follows symlink members on the way (``a/s -> .`` makes ``a/s/s/..``
    shallower than it reads), at most MAX_LINKS_FOLLOWED links in all;
    past that, or above the tree's root, the answer is None.
    """
    budget = [MAX_LINKS_FOLLOWED] if budget is None else budget
    stack = path.split("/")[:-1]
    for segment in target.replace("\\", "/").split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not stack:
                return None
            stack.pop()
            continue
        stack.append(segment)
        member = members.get("/".join(stack))
        if isinstance(member, tuple) and member[0] == "symlink":
            budget[0] -= 1
            if budget[0] < 0:
                return None
            stack = _resolve_in_tree(members, "/".join(stack), member[1], budget)
            if stack is None:
                return None
    return stack


def _resolves_inside(directory, target):
    """True when ``directory/target`` stays inside the tree's root."""
    depth = 0
    for segment in (directory + "/" + target).replace("\\", "/").split("/"):
        if segment in ("", "."):
            continue
        depth += -1 if segment == ".." else 1
        if depth < 0:
            return False
    return depth > 0


def expand_zip(builder, path):
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                mode = info.external_attr >> 16
                if info.is_dir():
                    builder.add_directory(info.filename)
                elif stat.S_ISLNK(mode):
                    builder.add_link(info.filename, archive.read(info).decode(
                        "utf-8", "replace"), hard=False)
                elif stat.S_IFMT(mode) and not stat.S_ISREG(mode):  # no type bits: a file
                    builder.budget.add_member()
                    builder.skip(info.filename, "not a regular file (mode %o)" % mode)
                elif info.flag_bits & 0x1:
                    builder.budget.add_member()
                    builder.skip(info.filename, "encrypted member")
                else:
                    with archive.open(info) as source:
                        builder.add_file(info.filename, source)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError,
            zlib.error, lzma.LZMAError, ValueError, RuntimeError) as exc:
        raise ExpansionStopped("corrupt or unsupported zip: %s" % exc)


def expand_tar(builder, path):
    try:
        with tarfile.open(path, "r:") as archive:
            for member in archive:
                archive.members = []  # TarFile keeps every TarInfo: 100k members = 100 MB
                if member.isreg():
                    source = archive.extractfile(member)
                    builder.add_file(member.name, source)
                elif member.isdir():
                    builder.add_directory(member.name)
                elif member.issym() or member.islnk():
                    builder.add_link(member.name, member.linkname, hard=member.islnk())
                else:
                    builder.budget.add_member()
                    kind = "FIFO" if member.isfifo() else "device" if member.isdev() else "special file"
                    builder.skip(member.name, "%s, not extracted" % kind)
    except (tarfile.TarError, EOFError, zlib.error, ValueError) as exc:
        raise ExpansionStopped("corrupt tar: %s" % exc)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise_storage_error(exc)
        raise ExpansionStopped("corrupt tar: %s" % exc)


DerivedBlob = collections.namedtuple("DerivedBlob", "name blob mime")
#: An explode tree: ``path`` relative to ARCHIVE_DIR, ``files`` the member
#: dicts (path, size, checksums or symlink), ``skipped`` the members left
#: out with reasons, ``existing`` when an earlier upload made it.
TreeInfo = collections.namedtuple("TreeInfo", "path files skipped existing")
#: What expanding one stored blob gave: a DerivedBlob or None, a TreeInfo
#: or None, and why expansion stopped (a limit, corrupt data) or None.
Expansion = collections.namedtuple("Expansion", "decompressed tree error")
NOT_EXPANDED = Expansion(None, None, None)


class Expander:
    """Derived content of one stored blob: decompressed blob, explode tree."""

    def __init__(self, store):
        self.store = store
        self.config = store.config

    def expand(self, info, head, filename, txn):
        """Expansion of blob ``info`` (first bytes ``head``); what it makes
        is taken back on rollback of ``txn``.  Content expanded by an
        earlier upload is described, not expanded again."""
        kind = sniff(head)
        budget = Budget(self.config, info.size)
        decompressed = tree = None
        try:
            if kind in COMPRESSED_KINDS:
                decompressed, inner_head = self._decompress(info, kind, filename, budget, txn)
                if sniff(inner_head) == "tar":
                    tree = self._explode(decompressed.blob.sha256, expand_tar, budget, txn)
            elif kind in ("zip", "tar"):
                tree = self._explode(
                    info.sha256, expand_zip if kind == "zip" else expand_tar, budget, txn)
        except ExpansionStopped as exc:
            return Expansion(decompressed, None, str(exc))
        return Expansion(decompressed, tree, None)

    def _decompress(self, info, kind, filename, budget, txn):
        """(DerivedBlob, its first bytes) of a compressed blob."""
        store = self.store
        name = decompressed_name(filename)
        known = store.derived.get(info.sha256)
        if known:
            try:
                blob, head = store.stored_blob(known)
                return DerivedBlob(name, blob, guess_mime(head, name)), head
            except NotFound:
                pass  # removed meanwhile: decompressed again
        with store.stage(name) as staged:
            try:
                with open(store.blob_path(info.sha256), "rb") as raw:
                    for piece in iter_decompressed(kind, raw):
                        budget.add_bytes(len(piece))
                        staged.write(piece)
            except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as exc:
                if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise_storage_error(exc)
                raise ExpansionStopped("corrupt %s data: %s" % (kind, exc))
            staged.finish()
            inner = store.publish(staged, txn)
            store.add_derived(info.sha256, inner.sha256, txn)
            return DerivedBlob(name, inner, guess_mime(staged.head, name)), staged.head

    def _explode(self, key, walker, budget, txn):
        store = self.store
        tree = store.tree_path(key)
        if os.path.isdir(tree):
            return self.describe_tree(tree)
        builder = TreeBuilder(store, budget)
        try:
            walker(builder, store.blob_path(key))
            path, files, made = builder.publish(key, txn)
        except BaseException:
            builder.discard()
            raise
        if not made:
            return self.describe_tree(path)
        return TreeInfo(store.relpath(path), files, builder.skipped, False)

    def describe_tree(self, tree):
        """The TreeInfo of a tree expanded by an earlier upload."""
        store = self.store
        files = []
        for parent, _dirs, names in os.walk(tree):
            for name in sorted(names):
                full = os.path.join(parent, name)
                rel = os.path.relpath(full, tree).replace(os.sep, "/")
                if os.path.islink(full):
                    files.append({"path": rel, "symlink": os.readlink(full)})
                    continue
                files.append({"path": rel, "size": os.stat(full).st_size,
                              "checksums": store.digests_of(full)})
        return TreeInfo(store.relpath(tree), files, [], True)


# ===========================================================================
# Organizing: named paths, replicas from header templates, retention
# ===========================================================================

_TEMPLATE_TOKEN = re.compile(r"\$\{([^}]*)\}")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class ReplicaTemplate:
    """One REPLICATE_N template such as ``user/${Username}/${Topic}``.

    Raises ConfigError when the template is malformed (unclosed ``${``, a
    bad header name, ``..``, an absolute path).
    """

    def __init__(self, variable, text):
        self.variable = variable
        self.text = text
        if text.startswith("/") or "\\" in text:
            raise ConfigError("%s: template %r must be a relative path" % (variable, text))
        self.headers = []
        for segment in text.split("/"):
            literal = _TEMPLATE_TOKEN.sub("", segment)
            if "${" in literal or "}" in literal or "$" in literal:
                raise ConfigError("%s: template %r has an unclosed or stray '${'" % (variable, text))
            if segment in ("", ".", ".."):
                raise ConfigError("%s: template %r has an empty, '.' or '..' segment"
                                  % (variable, text))
            for header in _TEMPLATE_TOKEN.findall(segment):
                if not _HEADER_NAME.match(header):
                    raise ConfigError("%s: template %r names a bad header %r"
                                      % (variable, text, header))
                self.headers.append(header)
        self.segments = text.split("/")

    def fill(self, headers):
        """(relative path, missing header names) for one request's headers."""
        missing = [name for name in self.headers if not headers.get(name, "").strip()]
        if missing:
            return None, missing

        def value(match):
            return header_segment(headers.get(match.group(1)).strip())

        segments = [_TEMPLATE_TOKEN.sub(value, segment) for segment in self.segments]
        return "/".join(header_segment(segment) for segment in segments), []


def load_replicate_templates(environ):
    return [ReplicaTemplate(name, environ[name]) for name in REPLICATE_VARIABLES
            if environ.get(name)]


def replica_stamp(now=None):
    return time.strftime("%Y%m%d.%H%M", time.gmtime(now if now is not None else utc_now()))


def split_name(name):
    """``results.tar.gz`` -> (``results``, ``.tar.gz``): the replica stem."""
    lowered = name.lower()
    for ext in (".tar.gz", ".tar.bz2", ".tar.xz", ".tar.zst"):
        if lowered.endswith(ext) and len(name) > len(ext):
            return name[:-len(ext)], name[-len(ext):]
    return posixpath.splitext(name)


def make_replicas(store, templates, headers, name, info, staged, tree, retain_until, txn):
    """Replica names for one upload: (created relpaths, skipped notes).

    ``info`` is the blob (BlobInfo) and ``staged`` its staged copy or None;
    ``tree`` the explode tree path or None.  Each template whose headers
    are all present yields ``replica/<path>/<stem>.<yyyymmdd.HHMM>.<n><ext>``
    (a hardlink) and, for an archive, ``<stem>.<stamp>.<n>`` (a relative
    symlink to the tree); ``<stem>.latest<ext>`` is moved to the newest
    atomically.  Everything made here is taken back on rollback of ``txn``.
    """
    created, skipped = [], []
    stem, ext = split_name(name)
    stamp = replica_stamp()
    for template in templates:
        relative, missing = template.fill(headers)
        if relative is None:
            skipped.append({"template": template.variable, "missing_headers": missing})
            continue
        directory = os.path.join(store.root, "replica", *relative.split("/"))
        contained(os.path.join(store.root, "replica"), relative)
        try:
            store.make_parents(os.path.join(directory, "_"), txn)
        except Conflict:
            skipped.append({"template": template.variable, "reason": "a file is in the way"})
            continue
        final = _link_numbered(directory, stem + "." + stamp + ".%d" + ext,
                               lambda path: store.link_blob(info, path, staged, txn), txn)
        _point_latest(directory, stem + ".latest" + ext, os.path.basename(final), txn)
        made = [final]
        if tree is not None:
            link = os.path.relpath(tree, directory)
            tree_name = _link_numbered(directory, stem + "." + stamp + ".%d",
                                       lambda path: os.symlink(link, path), txn)
            _point_latest(directory, stem + ".latest", os.path.basename(tree_name), txn)
            made.append(tree_name)
        for path in made:
            relpath = store.relpath(path)
            store.set_expiry(relpath, retain_until, txn)
            txn.on_commit(store.note_made, path, utc_now())
            created.append(relpath)
    return created, skipped


def _link_numbered(directory, pattern, make, txn):
    """The first free ``pattern % n`` in ``directory``, made by ``make``."""
    for number in range(MAX_REPLICA_NUMBER):
        path = os.path.join(directory, pattern % number)
        try:
            make(path)
        except FileExistsError:
            continue
        txn.on_undo(_unlink_quietly, path)
        return path
    raise Conflict("no free replica name for %s" % pattern)


def _point_latest(directory, name, target, txn):
    """Point the symlink ``directory/name`` at ``target``, atomically; on
    rollback it points back where it did (if still at ``target``)."""
    latest = os.path.join(directory, name)
    try:
        before = os.readlink(latest)
    except OSError:
        before = None
    replace_atomically(latest, lambda path: os.symlink(target, path))
    txn.on_undo(_repoint_latest, latest, target, before)


def _repoint_latest(latest, target, before):
    try:
        if os.readlink(latest) != target:
            return  # a later upload moved it: that stands
    except OSError:
        return
    if before is None:
        _unlink_quietly(latest)
    else:
        replace_atomically(latest, lambda path: os.symlink(before, path))


def retention_until(value, default_days, what):
    """Absolute expiry time from a retain_days value (None: the default)."""
    if value is None or value == "":
        days = default_days
    else:
        try:
            days = float(value)
        except ValueError:
            days = -1.0
        if not days >= 0 or days > MAX_RETAIN_DAYS:
            raise BadRequest("%s must be a number of days from 0 to %d, got %r"
                             % (what, MAX_RETAIN_DAYS, value))
    return utc_now() + days * 86400.0 if days else 0.0


def upload_retention(headers, query, fields, default_days):
    """The expiry time (0: none) of what an upload stores.

    The one place that reads it: the ``X-Retain-Days`` header, else the
    form field ``retain_days``, else the query ``?retain_days=``, else the
    server's default.  Raises BadRequest naming the bad one.
    """
    for value, what in ((headers.get("x-retain-days"), "X-Retain-Days"),
                        (fields.get("retain_days"), "form field retain_days"),
                        (query.get("retain_days"), "?retain_days")):
        if value is not None:
            return retention_until(value, default_days, what)
    return retention_until(None, default_days, "retain_days")


def upload_keep(headers, query, fields):
    """Whether an upload asks never to be evicted: the ``X-Bucket-Keep``
    header, else the form field ``keep``, else ``?keep=``; BadRequest for
    a value that is not a boolean."""
    for value, what in ((headers.get("x-bucket-keep"), "X-Bucket-Keep"),
                        (fields.get("keep"), "form field keep"), (query.get("keep"), "?keep")):
        if value is not None:
            try:
                return _bool(value)
            except ValueError:
                raise BadRequest("%s must be true or false (1 or 0), got %r" % (what, value[:40]))
    return False


class Sweeper(threading.Thread):
    """Removes expired names and pins, then blobs nothing references.

    Runs every ``sweep_interval`` seconds in the background; the expiries
    live in the journals, so they survive restarts.  Never holds a lock a
    request needs while it touches the disk.
    """

    def __init__(self, store, interval):
        super().__init__(name="sweeper", daemon=True)
        self.store = store
        self.interval = interval
        self.stopping = threading.Event()

    def run(self):
        self.store.ready.wait()
        while not self.stopping.wait(self.interval):
            try:
                self.sweep()
            except Exception:  # never let the sweeper die silently
                self.store.log("sweep failed:\n" + traceback.format_exc())

    def sweep(self, now=None):
        """One pass; returns how many names and pins expired."""
        store = self.store
        now = utc_now() if now is None else now
        store.refresh_journals()
        expired = 0
        for relpath, until in list(store.expiries.items()):
            if until > now:
                continue
            path = os.path.join(store.root, *relpath.split("/"))
            if os.path.isdir(path) and not os.path.islink(path):
                store.remove_tree(path, "expired")
            elif os.path.lexists(path):
                store.remove_name(path, "expired")
            store.set_expiry(relpath, 0)
            expired += 1
        for sha256, until in list(store.blobs.pins_until.items()):
            if until <= now:
                store.unpin(sha256)
                store.release(sha256, "expired")
                expired += 1
        if store.resumables is not None:  # unfinished uploads idle past their max-age
            removed = store.resumables.sweep(now)
            if removed:
                store.partial_changed()
                store.log("removed %d unfinished resumable uploads idle over %g s"
                          % (removed, store.resumables.max_age))
            expired += removed
        return expired


class Evictor(threading.Thread):
    """Keeps the store under its limits, evicting least recently used content.

    Wakes every EVICT_INTERVAL seconds, or at once when an upload crosses a
    limit (``wake``); an upload that needs room now evicts in its own
    thread (``evict_for``).  Evicts while blobs exceed LOW_WATERMARK of
    max-size, or the filesystem is under its free-space floor (only with a
    max-size: a store without one is not a cache, and is never evicted).

    One process evicts at a time: the fcntl lock on ``index/evict.lock``,
    which the kernel drops with a process that dies.  A batch takes the
    least recently used blobs that are not kept, not derived from a stored
    blob (those go with their source), and not being named by an upload of
    this process, until they add up to what must go; finds every name of
    them in one walk of files/, replica/ and explode/ (only when one has a
    name: link count > 1); removes the names -- an explode tree with one of
    them goes whole -- and then each blob unless a name was linked to it
    meanwhile (Store._remove_blob re-checks the link count), with its
    derived blob and tree.  Uploads-log records of evicted content say
    ``"gone": "evicted"`` (R records).  Also journals the uses (T lines)
    every USE_FLUSH_SECONDS, and keeps the index snapshot current
    (JournalSet.maintain).
    """

    def __init__(self, store):
        super().__init__(name="evictor", daemon=True)
        self.store = store
        self.config = store.config
        self.event = threading.Event()
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.lock_path = os.path.join(store.index_dir, "evict.lock")
        store.evictor = self

    def wake(self):
        self.event.set()

    def run(self):
        self.store.ready.wait()
        flushed = time.monotonic()
        while not self.stopping.is_set():
            self.event.wait(EVICT_INTERVAL)
            self.event.clear()
            try:
                if time.monotonic() - flushed > USE_FLUSH_SECONDS:
                    self.store.flush_uses()
                    flushed = time.monotonic()
                if self.store.reconciled.is_set():
                    self.store.journals.maintain()
                if self.excess(0) > 0:
                    self.evict(0)
            except Exception:  # never let the evictor die silently
                self.store.log("eviction failed:\n" + traceback.format_exc())

    def stop(self):
        self.stopping.set()
        self.event.set()

    def excess(self, need):
        """Bytes to evict so that ``need`` more bytes fit under the low
        watermark and above the floor; 0 without a max-size."""
        max_size = self.config.max_size
        if not max_size:
            return 0
        store = self.store
        stored = store.used_bytes() + need
        excess = stored - int(max_size * LOW_WATERMARK) if stored > max_size else 0
        free, floor = store.space(fresh=True)
        return max(excess, floor - (free - need))

    def evict_for(self, need):
        """Evict for an upload waiting for ``need`` bytes of room: True when
        something was evicted, or another process is evicting (try again)."""
        return self.evict(need) != 0

    def evict(self, need):
        """Evict until ``need`` bytes fit: bytes evicted, or -1 when another
        process holds the eviction lock."""
        with self.lock:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    time.sleep(0.1)  # another process evicts: let it work
                    return -1
                self.store.refresh_journals()  # its uses, keeps and blobs too
                self.store.partial_changed()
                total = 0
                while True:
                    excess = self.excess(need)
                    if excess <= 0:
                        break
                    freed = self.batch(excess)
                    if not freed:
                        break
                    total += freed
                return total
            finally:
                os.close(fd)  # releases the lock

    def victims(self, excess):
        """[(last use, sha256, size, link count, inode)] of the blobs to
        evict, least recently used first, adding up to ``excess`` bytes."""
        store = self.store
        skip = {digest_key(sha256) for sha256 in list(store.in_use)}
        average = store.blobs.bytes // max(store.blobs.count, 1) or 1
        chosen, total = [], 0
        while total < excess:
            wanted = min(EVICT_BATCH_MAX, max(EVICT_BATCH, 2 * (excess - total) // average))
            candidates = store.blobs.oldest(wanted, skip)
            if not candidates:
                break
            for used, key in candidates:
                skip.add(key)
                sha256 = store.find_blob("%016x" % key)
                if sha256 is None or sha256 in store.sources:
                    continue  # gone meanwhile; derived blobs go with their source
                try:
                    st = os.stat(store.blob_path(sha256))
                except FileNotFoundError:
                    continue
                chosen.append((used, sha256, st.st_size, st.st_nlink, st.st_ino))
                total += st.st_size
                if total >= excess:
                    break
        return chosen

    def batch(self, excess):
        """Evict one batch; returns the bytes it freed."""
        store = self.store
        victims = self.victims(excess)
        if not victims:
            return 0
        inodes = {ino: sha256 for _, sha256, _, links, ino in victims if links > 1}
        names = store.names_by_inode(inodes) if inodes else {}
        before = (store.blobs.bytes, store.blobs.count)
        for used, sha256, size, _, ino in victims:
            for path in names.get(ino, ()):
                tree = store.tree_of(path)
                if tree is not None:
                    store.remove_tree(tree, "evicted")  # never a partial tree
                else:
                    store.remove_name(path, "evicted")
            store.unpin(sha256)
            store._remove_blob(sha256, True, "evicted")
        if inodes:
            store.remove_dangling_links()
        # What went: the victims, and what went with them (trees, derived).
        freed, count = before[0] - store.blobs.bytes, before[1] - store.blobs.count
        if store.counters is not None:
            store.counters.add("evictions", count)
            store.counters.add("evicted_bytes", freed)
        store.log("evicted %d blobs, %d bytes; oldest last use %s" % (
            count, freed, iso_time(victims[0][0])))
        return freed


# ===========================================================================
# Uploads log: a record of every upload, per process, read newest first
# ===========================================================================

_META_KEY = re.compile(r"^[A-Za-z0-9_.-]+$")
META_HEADER = "x-bucket-meta-"
META_FIELD = "meta."


def header_text(value):
    """A header value as text: UTF-8 when its bytes are UTF-8 (clients send
    it so), else ISO-8859-1, the bytes as they came (RFC 9110 5.5)."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def parse_metadata(headers, fields):
    """{key: value} of an upload's ``X-Bucket-Meta-<Key>`` headers and
    ``meta.<key>`` form fields.  Keys are lower-cased.  Raises BadRequest
    naming the bad one: a key outside ``[A-Za-z0-9_.-]``, a key or value
    over MAX_META_BYTES, a control character in a value, more than
    MAX_META_KEYS keys, one key given twice with different values."""
    meta = {}
    given = [(name[len(META_HEADER):], header_text(value), "header X-Bucket-Meta-")
             for name, value in headers.items() if name.startswith(META_HEADER)]
    given += [(name[len(META_FIELD):], value, "form field meta.")
              for name, value in fields.items() if name.lower().startswith(META_FIELD)]
    for key, value, where in given:
        what = "metadata %s%s" % (where, key[:60])
        if not _META_KEY.match(key) or len(key) > MAX_META_BYTES:
            raise BadRequest("%s: a key is 1 to %d of A-Z a-z 0-9 _ . -"
                             % (what, MAX_META_BYTES))
        if len(value.encode("utf-8", "surrogatepass")) > MAX_META_BYTES:
            raise BadRequest("%s: value over %d bytes" % (what, MAX_META_BYTES))
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise BadRequest("%s: value holds a control character" % what)
        key = key.lower()
        if meta.get(key, value) != value:
            raise BadRequest("%s: given twice with different values" % what)
        meta[key] = value
    if len(meta) > MAX_META_KEYS:
        raise BadRequest("metadata: %d keys, at most %d" % (len(meta), MAX_META_KEYS))
    return meta


def record_id(epoch, tag):
    """A record's id: microseconds since the epoch (16 digits: ids sort as
    times until the year 2286) and the writing process's tag."""
    return "%016d-%s" % (int(epoch * 1000000), tag)


#: A query of the uploads log: ``name`` a glob (case-insensitive), ``sha256``
#: the sha256 (or its 32-hex prefix) asked for, ``meta`` {key: value} all
#: of which must match, ``since``/``until`` epoch bounds, ``before`` the
#: cursor (records with smaller ids follow), ``limit`` records per page.
UploadQuery = collections.namedtuple(
    "UploadQuery", "name sha256 meta since until before limit")


def query_needles(query):
    """Byte strings a record's line must contain for ``query`` to match
    (checked before the line is parsed): (bytes, case-insensitive)."""
    needles = []
    if query.sha256:
        needles.append((query.sha256.encode(), False))
    for key, value in sorted(query.meta.items()):
        needles.append((("%s: %s" % (json.dumps(key, ensure_ascii=False),
                                     json.dumps(value, ensure_ascii=False))).encode("utf-8"),
                        False))
    if query.name:
        literal = max(re.split(r"[*?\[\]]", query.name), key=len)
        if literal:
            fragment = json.dumps(literal, ensure_ascii=False)[1:-1].lower()
            needles.append((fragment.encode("utf-8"), True))
    return needles


def record_matches(record, query):
    """The whole test of a parsed record against ``query``."""
    if query.sha256 and not record.get("sha256", "").startswith(query.sha256):
        return False
    meta = record.get("meta") or {}
    if any(meta.get(key) != value for key, value in query.meta.items()):
        return False
    if query.name and not fnmatch.fnmatchcase(record.get("name", "").lower(),
                                              query.name.lower()):
        return False
    return True


class UploadsLog:
    """Every accepted upload, one JSON line each, in ``uploads/``.

    Each process appends to its own file, ``uploads/<process>.jsonl``,
    under a lock, with one write per line (written whole before the upload
    is answered; a torn last line of a crashed process is skipped).  A
    line starts with the record's ``id`` (record_id: time, then the
    process's tag), and ids only grow within a file, so each file is
    sorted by id: ``query`` binary-searches each file for the cursor and
    the time bounds, reads backwards a block at a time, skips lines
    without the query's needles unparsed, and merges the files newest
    first.  Memory: a block per file and one page of records; no index.
    A record is taken back by a later ``{"withdrawn": id}`` line.
    """

    def __init__(self, directory, process_id, tag):
        self.directory = directory
        makedirs(directory)
        self.path = os.path.join(directory, process_id + ".jsonl")
        self.tag = tag
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.lock = threading.Lock()
        self.last = 0

    def append(self, record):
        """Give ``record`` its id and time, write it; returns the id.
        Raises InsufficientStorage when the disk is full."""
        with self.lock:
            micros = max(int(utc_now() * 1000000), self.last + 1)
            self.last = micros
            record_with_id = {"id": record_id(micros / 1000000.0, self.tag),
                              "time": iso_time(micros / 1000000.0)}
            record_with_id.update(record)
            line = json.dumps(record_with_id, ensure_ascii=False, separators=(", ", ": "))
            try:
                os.write(self.fd, (line + "\n").encode("utf-8", "surrogateescape"))
            except OSError as exc:
                raise_storage_error(exc)
        return record_with_id["id"]

    def withdraw(self, rid, record):
        """Take back record ``rid`` (its upload was rolled back): a copy of
        it that says so, which a query meets first (newer) and which holds
        the same needles."""
        self.append(dict(record, withdrawn=rid))

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    # -- reading -------------------------------------------------------------

    def query(self, query):
        """(records newest first, at most query.limit; next cursor or None)."""
        files = [os.path.join(self.directory, name) for name in os.listdir(self.directory)
                 if name.endswith(".jsonl")]
        needles = query_needles(query)
        streams = [self._records(path, query, needles) for path in files]
        merged = heapq.merge(*streams, key=lambda item: item[0], reverse=True)
        page = []
        for rid, record in merged:
            if len(page) == query.limit:
                return page, page[-1]["id"]
            page.append(record)
        return page, None

    def _records(self, path, query, needles):
        """(id, record) of one file's matching records, newest first."""
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            return
        with handle:
            size = os.fstat(handle.fileno()).st_size
            end = size
            if query.before:
                end = _first_at_or_after(handle, size, query.before.encode())
            if query.until is not None:
                upper = record_id(query.until, "~").encode()  # "~" sorts after any tag
                end = min(end, _first_at_or_after(handle, size, upper))
            lower = record_id(query.since, "").encode() if query.since is not None else b""
            withdrawn = set()
            for line in _lines_backwards(handle, end, needles):
                rid = _line_id(line)
                if rid is None:
                    continue
                if rid < lower:
                    return
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # torn by a crash
                if "withdrawn" in record:
                    withdrawn.add(record["withdrawn"])
                elif record["id"] not in withdrawn and record_matches(record, query):
                    yield rid, record


def _line_id(line):
    """The id at the start of a record's line (bytes), or None."""
    if not line.startswith(b'{"id": "'):
        return None
    end = line.find(b'"', 8)
    return line[8:end] if end > 8 else None


def _first_at_or_after(handle, size, key):
    """Offset of the first line whose id is >= ``key`` (ids grow along the
    file), found by bisection on line starts; ``size`` when there is none."""
    low, high = 0, size  # the answer is a line start in [low, high]
    while high - low > UPLOADS_BLOCK:
        middle = (low + high) // 2
        handle.seek(middle)
        handle.readline()  # to the next line start
        start = handle.tell()
        if start >= high:
            break  # a line longer than half the window: scan it all
        rid = _line_id(handle.readline())
        if rid is not None and rid >= key:
            high = start
        else:
            low = start
    handle.seek(low)
    data = handle.read(high - low)
    position = 0
    while position < len(data):
        newline = data.find(b"\n", position)
        if newline < 0:
            break
        rid = _line_id(data[position:newline])
        if rid is not None and rid >= key:
            return low + position
        position = newline + 1
    return high


def _lines_backwards(handle, end, needles):
    """Whole lines of ``handle`` before offset ``end``, last first, skipping
    lines that lack a needle (searched in whole blocks, not per line)."""
    carry = b""
    position = end
    while position > 0:
        start = max(0, position - UPLOADS_BLOCK)
        handle.seek(start)
        block = handle.read(position - start) + carry
        position = start
        first = block.find(b"\n") + 1 if start > 0 else 0
        if start > 0 and first == 0:
            carry = block  # one line longer than a block: keep reading
            continue
        carry, block = block[:first], block[first:]
        for line in reversed(_candidate_lines(block, needles)):
            yield line
    if carry:
        for line in reversed(_candidate_lines(carry, needles)):
            yield line


def _candidate_lines(block, needles):
    """Lines of ``block`` (whole lines, ending in newlines except perhaps
    the last, which is ignored: a line still being written) that contain
    every needle, in order."""
    if not needles:
        return [line for line in block.split(b"\n")[:-1] if line]
    text, case_insensitive = needles[0]
    haystack = block.lower() if case_insensitive else block
    lines, seen = [], -1
    found = haystack.find(text)
    while found >= 0:
        start = block.rfind(b"\n", 0, found) + 1
        stop = block.find(b"\n", found)
        if stop < 0:
            break
        if start > seen:
            line = block[start:stop]
            if all((need in line.lower()) if ci else (need in line) for need, ci in needles[1:]):
                lines.append(line)
            seen = start
        found = haystack.find(text, stop)
    return lines


# ===========================================================================
# Upload transaction: what one request stores, all or nothing
# ===========================================================================

#: One file a request delivered: the client's ``filename``; ``staged``,
#: the finished StagedBlob (None when deployed by checksum); ``deploy``,
#: the sha256 of the stored blob named instead (X-Checksum-Deploy) or
#: None; ``dest``, its name's path under files/, or None for an upload to
#: /upload (pinned and replicated).
Incoming = collections.namedtuple("Incoming", "filename staged deploy dest")
#: What a request delivered, read whole before anything is stored:
#: ``files`` (Incoming), ``exclusive`` (If-None-Match: *), ``retain_until``
#: (0: none), the request ``headers`` (replica templates read them), its
#: ``meta`` {key: value}, ``keep`` (never evicted) and the ``client`` address.
Received = collections.namedtuple(
    "Received", "files exclusive retain_until headers meta keep client")
#: What the store made of one Incoming file: its BlobInfo and MIME type,
#: whether it was deployed by checksum, its Expansion, its name (relpath
#: under files/ or None), its replicas (relpaths) and skipped templates,
#: and the id of its uploads-log record.
StoredFile = collections.namedtuple(
    "StoredFile", "filename blob mime deployed expansion name replicas replicas_skipped "
                  "record")


class UploadTransaction:
    """Stores what one request received: all of it, or nothing.

    ``commit(received)`` checks every name first (If-None-Match: *, a
    directory or a file in the way), then for each file publishes its blob,
    pins it (uploads to /upload), expands it, links its name or its
    replicas and sets its retention; the journal records are written at
    the end, the commit point (Transaction).  Any exception on the way --
    a precondition, a conflict, a full disk, a bug -- rolls back every
    step: no blob, name, tree, replica, pin or expiry of the request is
    left.  The staged files are removed in every case.
    """

    def __init__(self, store, templates, uploads_log):
        self.store = store
        self.templates = templates
        self.uploads_log = uploads_log
        self.expander = Expander(store)

    def commit(self, received):
        """The StoredFile of each received file, in order."""
        self.using = []
        try:
            self.check_names(received)
            with Transaction(self.store) as txn:
                stored = [self._store(received, item, txn) for item in received.files]
                return [self._record(received, item, txn) for item in stored]
        finally:
            for item in received.files:
                if item.staged is not None:
                    item.staged.discard()
            for sha256 in self.using:
                self.store.in_use[sha256] -= 1
                if self.store.in_use[sha256] <= 0:
                    del self.store.in_use[sha256]

    def _use(self, blob, received, txn):
        """``blob`` is part of this upload: not evicted while it is named,
        used now, and kept for good when the upload says X-Bucket-Keep."""
        store = self.store
        store.in_use[blob.sha256] += 1
        self.using.append(blob.sha256)
        store.touch(blob.sha256)
        if received.keep:
            store.keep(blob.sha256, txn)

    def check_names(self, received):
        """Refuse before storing anything: a name that exists under
        If-None-Match: * (PreconditionFailed), a name that cannot be made
        (Conflict).  Races after this are caught when linking."""
        store = self.store
        claimed = set()
        for item in received.files:
            if item.dest is None:
                continue
            relpath = store.relpath(item.dest)
            if received.exclusive and (item.dest in claimed or os.path.lexists(item.dest)):
                raise PreconditionFailed("%s exists (If-None-Match: *)" % relpath)
            claimed.add(item.dest)
            store.check_name_target(item.dest)

    def _store(self, received, item, txn):
        store = self.store
        if item.staged is not None:
            blob = store.publish(item.staged, txn)
            head = item.staged.head
        else:
            blob, head = store.stored_blob(item.deploy)
        self._use(blob, received, txn)
        if not blob.new:  # a new blob got its name when staged
            store.name_blob(blob.sha256, item.filename, txn)
        if item.dest is None:
            store.pin(blob.sha256, received.retain_until, txn)
        expansion = self.expander.expand(blob, head, item.filename, txn)
        if expansion.decompressed:
            self._use(expansion.decompressed.blob, received, txn)
        if expansion.tree and (expansion.tree.existing or received.keep):
            for member in expansion.tree.files:  # a tree is used (and kept) whole
                if "checksums" in member:
                    self._use(BlobInfo(member["checksums"]["sha256"], member["size"],
                                       member["checksums"], False, None), received, txn)
        name, replicas, skipped = None, [], []
        if item.dest is not None:
            previous = store.link_name(blob, item.dest, received.exclusive, item.staged, txn)
            name = store.relpath(item.dest)
            store.set_expiry(name, received.retain_until, txn)
            if previous and previous != blob.sha256:
                txn.release_later(previous)
        else:
            tree = store.path_of(expansion.tree.path) if expansion.tree else None
            replicas, skipped = make_replicas(
                store, self.templates, received.headers, item.filename, blob, item.staged,
                tree, received.retain_until, txn)
        return StoredFile(item.filename, blob, guess_mime(head, item.filename),
                          item.staged is None, expansion, name, replicas, skipped, None)

    def _record(self, received, stored, txn):
        """Write the uploads-log record of a stored file (before the
        journal's commit point: a failure there withdraws it)."""
        expansion = stored.expansion
        record = {
            "name": stored.filename, "size": stored.blob.size, "sha256": stored.blob.sha256,
            "mime": stored.mime, "blob": stored.blob.path,
            "decompressed": expansion.decompressed and expansion.decompressed.blob.path,
            "tree": expansion.tree and expansion.tree.path,
            "names": [stored.name] if stored.name else [], "replicas": stored.replicas,
            "expires": iso_time(received.retain_until) if received.retain_until else None,
            "keep": received.keep, "client": received.client, "meta": received.meta}
        if stored.deployed:
            record["deployed"] = True
        rid = self.uploads_log.append(record)
        txn.on_undo(self.uploads_log.withdraw, rid, record)
        return stored._replace(record=rid)


# ===========================================================================
# Resumable uploads: partial uploads on disk (IETF resumable-upload draft)
# ===========================================================================

RESUMABLE_VERSIONS = range(5, 11)   # Upload-Draft-Interop-Version understood:
                                    # 5-6 drafts -03..-05 (tus-js-client), 7
                                    # -06..-08, 8 -09..-11, 9 -12, 10 -13
PARTIAL_UPLOAD = "application/partial-upload"  # Content-Type of an append
PROBLEM = "https://iana.org/assignments/http-problem-types#"  # RFC 9457 types
RESUMABLE_WAIT = 10.0               # seconds a request on an upload waits for
                                    # the one before it (ended at once in this
                                    # process; in another, by its end or cut)
RESUMABLE_TOKEN = re.compile(r"^[A-Za-z0-9_-]{32}$")  # 24 random bytes
RESUMABLE_KEPT_HEADERS = ("authorization", "cookie", "proxy-authorization")  # never stored


def sf_boolean(value):
    """An RFC 9651 boolean (``?1``/``?0``) -> True/False; None for anything
    else (the draft: other values make the whole field ignored)."""
    return {"?1": True, "?0": False}.get((value or "").strip())


def sf_integer(value, header):
    """A non-negative RFC 9651 integer (at most 15 digits); None when the
    header is absent; BadRequest naming it when it is not one."""
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit() or len(value) > 15:
        raise BadRequest("%s must be a non-negative integer, got %r" % (header, value[:40]))
    return int(value)


def inconsistent_length(message):
    """400 with the draft's problem type for lengths that do not agree."""
    return BadRequest(message, extra={"type": PROBLEM + "inconsistent-upload-length",
                                      "title": "inconsistent length values for upload"})


def upload_completed(version, with_content=False):
    """An append to a completed upload: 400 when it carries bytes (a length
    failure), else 410 Gone (400 for drafts up to -05, interop 6)."""
    if with_content:
        return inconsistent_length("the upload is complete: nothing more can be appended")
    problem = {"type": PROBLEM + "completed-upload", "title": "upload is already completed"}
    if version is not None and version <= 6:
        return BadRequest("the upload is already complete", extra=problem)
    return Gone("the upload is already complete", extra=problem)


class PartialUpload:
    """One resumable upload: the directory ``resumable/<token>/``.

    ``info.json``: what the creating request asked for, written once
    (atomically): the name and target, retention, metadata, keep, the
    digests it stated for the whole representation, the headers replica
    templates read, the length once known.  ``data``: the bytes received so
    far (its size is the offset; its mtime the last activity).  ``lock``:
    held (fcntl) while a request appends, so one request at a time in all
    processes.  ``done.json``: the receipt, once complete.
    """

    def __init__(self, root, token):
        self.token = token
        self.directory = os.path.join(root, token)
        self.data_path = os.path.join(self.directory, "data")
        self.info_path = os.path.join(self.directory, "info.json")
        self.done_path = os.path.join(self.directory, "done.json")
        self.lock_fd = None

    @classmethod
    def create(cls, root, info):
        upload = cls(root, secrets.token_urlsafe(24))
        try:
            os.mkdir(upload.directory, 0o700)
            upload.write_info(info)
            os.close(os.open(upload.data_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as exc:
            shutil.rmtree(upload.directory, ignore_errors=True)
            raise_storage_error(exc)
        return upload

    def write_info(self, info):
        replace_atomically(self.info_path, lambda path: _write_json(path, info))

    def info(self):
        with open(self.info_path, encoding="utf-8") as handle:
            return json.load(handle)

    def offset(self):
        try:
            return os.stat(self.data_path).st_size
        except FileNotFoundError:
            return None  # complete (or being removed)

    def last_active(self):
        for path in (self.data_path, self.done_path, self.info_path):
            try:
                return os.stat(path).st_mtime
            except FileNotFoundError:
                continue
        return 0.0

    def done(self):
        """The receipt of the completed upload, or None."""
        try:
            with open(self.done_path, encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None

    def acquire(self, wait):
        """Take the lock (waiting up to ``wait`` s); Locked when another
        request holds it still."""
        fd = os.open(os.path.join(self.directory, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.lock_fd = fd
                return
            except OSError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise Locked("another request is appending to this upload; try again",
                                 headers={"Retry-After": "1"})
                time.sleep(0.05)

    def release(self):
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # drops the lock
            self.lock_fd = None

    def remove(self):
        shutil.rmtree(self.directory, ignore_errors=True)


def _write_json(path, value):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, ensure_ascii=False)


class Resumables:
    """The partial uploads in ``resumable/`` and what this process keeps of
    them in memory: the hash state of the uploads it appended to last
    (``Digester`` objects, so the digests of the whole representation are
    computed once; another process, or this one after a restart, hashes the
    data file again instead), and the connection appending to each upload
    now (a new request on the same upload ends it, as the draft advises).
    """

    def __init__(self, store, max_age):
        self.store = store
        self.root = os.path.join(store.root, "resumable")
        makedirs(self.root)
        self.max_age = max_age
        self.states = {}      # token -> Digester, its size the offset it hashed
        self.active = {}      # token -> the connection appending now
        self.turns = {}       # token -> [thread lock, requests holding or waiting]
        self.lock = threading.Lock()
        self.expired = 0      # removed by the sweep, for /metrics
        store.resumables = self
        store.partial_changed()

    def find(self, token):
        """The PartialUpload of ``token``; NotFound for a malformed, unknown
        or expired one."""
        if not RESUMABLE_TOKEN.match(token or ""):
            raise NotFound("no such upload")
        upload = PartialUpload(self.root, token)
        if not os.path.isdir(upload.directory) or self.expires(upload) <= utc_now():
            raise NotFound("no such upload (unknown, cancelled or expired)")
        return upload

    def expires(self, upload):
        return upload.last_active() + self.max_age

    def begin(self, upload, connection):
        """Become the one request on ``upload``: end the request appending
        to it in this process (its connection shut: it keeps what it got),
        then take the upload's locks: a thread lock here (fcntl locks do not
        part threads of one process) and the fcntl lock for the others.
        Raises Locked after RESUMABLE_WAIT.  Call ``end`` after."""
        with self.lock:
            previous = self.active.get(upload.token)
            turn = self.turns.setdefault(upload.token, [threading.Lock(), 0])
            turn[1] += 1
        if previous is not None and previous is not connection:
            try:
                previous.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            if not turn[0].acquire(timeout=RESUMABLE_WAIT):
                raise Locked("another request is appending to this upload; try again",
                             headers={"Retry-After": "1"})
            try:
                upload.acquire(RESUMABLE_WAIT)
            except BaseException:
                turn[0].release()
                raise
        except BaseException:
            self._leave(upload.token, turn)
            raise
        with self.lock:
            self.active[upload.token] = connection

    def end(self, upload, connection):
        with self.lock:
            if self.active.get(upload.token) is connection:
                del self.active[upload.token]
            turn = self.turns[upload.token]
        upload.release()
        turn[0].release()
        self._leave(upload.token, turn)

    def _leave(self, token, turn):
        with self.lock:
            turn[1] -= 1
            if turn[1] <= 0 and self.turns.get(token) is turn:
                del self.turns[token]

    def digester(self, upload, algorithms):
        """A Digester that has hashed the upload's data so far: the one kept
        in memory when it is still right, else made by reading the file."""
        offset = upload.offset()
        with self.lock:
            kept = self.states.pop(upload.token, None)
        if kept is not None and kept.size == offset and set(kept.hashes) == set(algorithms):
            return kept
        digester = Digester(algorithms)
        with open(upload.data_path, "rb") as handle:
            for data in iter(lambda: handle.read(CHUNK_SIZE), b""):
                digester.update(data)
        digester.close()
        return digester

    def keep_state(self, upload, digester):
        with self.lock:
            self.states[upload.token] = digester

    def forget(self, upload):
        with self.lock:
            self.states.pop(upload.token, None)

    def totals(self):
        """(partial uploads, bytes they hold) in the whole directory."""
        count = size = 0
        for entry in _scandirs(self.root):
            try:
                size += os.stat(os.path.join(entry.path, "data")).st_size
                count += 1
            except FileNotFoundError:
                pass
        return count, size

    def sweep(self, now):
        """Remove uploads idle past max-age (never one a request holds)."""
        removed = 0
        for entry in _scandirs(self.root):
            upload = PartialUpload(self.root, entry.name)
            if self.expires(upload) > now:
                continue
            try:
                upload.acquire(0)
            except (Locked, OSError):
                continue
            try:
                upload.remove()
                self.forget(upload)
                removed += 1
            finally:
                upload.release()
        self.expired += removed
        return removed


# ===========================================================================
# HTTP pieces: request headers, streamed bodies, integrity headers, the
# JSON receipt of an upload, listings and folder archives
# ===========================================================================


class Headers(dict):
    """Request headers, names lower-cased; repeated fields joined by ", ".

    http.client.parse_headers (the email parser) costs more than a whole
    checksum lookup, so the handler reads header lines itself.
    """

    def get(self, name, default=None):
        return dict.get(self, name.lower(), default)

    def __getitem__(self, name):
        return dict.__getitem__(self, name.lower())

    def __contains__(self, name):
        return dict.__contains__(self, name.lower())


class ChunkedWriter:
    """A file-like sink that sends chunked transfer coding (or plain bytes
    for HTTP/1.0, where the connection's close ends the body)."""

    def __init__(self, wfile, chunked=True, buffer_size=64 * 1024):
        self.wfile = wfile
        self.chunked = chunked
        self.buffer = bytearray()
        self.buffer_size = buffer_size
        self.sent = 0

    def write(self, data):
        self.buffer += data
        if len(self.buffer) >= self.buffer_size:
            self.flush()
        return len(data)

    def flush(self):
        if not self.buffer:
            return
        if self.chunked:
            self.wfile.write(b"%x\r\n" % len(self.buffer) + bytes(self.buffer) + b"\r\n")
        else:
            self.wfile.write(bytes(self.buffer))
        self.sent += len(self.buffer)
        self.buffer = bytearray()

    def close(self):
        self.flush()
        if self.chunked:
            self.wfile.write(b"0\r\n\r\n")


_STATUS_PHRASES = {status.value: status.phrase for status in HTTPStatus}
#: 401 challenges, one per line: browsers ignore a Basic challenge that
#: follows another scheme on the same line (RFC 9110 11.6.1 allows both).
AUTH_CHALLENGES = ('Bearer realm="http_bucket"', 'Basic realm="http_bucket", charset="UTF-8"')
_DATE_CACHE = [0, ""]


def cached_http_date():
    """The Date header, formatted once a second (formatting costs ~10 us)."""
    now = int(time.time())
    if _DATE_CACHE[0] != now:
        _DATE_CACHE[:] = [now, http_date(now)]
    return _DATE_CACHE[1]


def content_disposition(name, disposition="inline"):
    ascii_name = name.encode("ascii", "replace").decode("ascii").replace('"', "_").replace("\\", "_")
    quoted = urllib.parse.quote(name, safe="")
    return '%s; filename="%s"; filename*=UTF-8\'\'%s' % (disposition, ascii_name, quoted)


FILE_MODE, DIR_MODE = 0o644, 0o755  # in downloaded archives: the store's
                                    # read-only modes would follow the files


def walk_tree(root):
    """(path, archive name, is a directory) of everything under ``root``,
    sorted, directories before what they hold.

    Symlinks that stay inside ``root`` and lead to a file are followed
    (the member is a regular file); others are left out.
    """
    real_root = os.path.realpath(root)
    for parent, dirs, files in os.walk(root):
        dirs.sort()
        rel = os.path.relpath(parent, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        for name in dirs:
            if not os.path.islink(os.path.join(parent, name)):
                yield os.path.join(parent, name), prefix + name, True
        for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(parent, d))]:
            if name.startswith(RESERVED_PREFIX):
                continue
            full = os.path.join(parent, name)
            if os.path.islink(full):
                target = os.path.realpath(full)
                if not target.startswith(real_root + os.sep) or not os.path.isfile(target):
                    continue
            yield full, prefix + name, False


def write_tree_zip(sink, root):
    """``root`` as a zip (stored, not compressed) written to ``sink``."""
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for full, arcname, is_dir in walk_tree(root):
            info = zipfile.ZipInfo.from_file(full, arcname)
            if is_dir:
                info.external_attr = (stat.S_IFDIR | DIR_MODE) << 16 | 0x10
                archive.writestr(info, b"")
                continue
            info.external_attr = (stat.S_IFREG | FILE_MODE) << 16
            with open(full, "rb") as source, archive.open(info, "w") as target:
                shutil.copyfileobj(source, target, CHUNK_SIZE)


def write_tree_tar(sink, root, mode):
    """``root`` as a tar (``mode`` "w|" or "w|gz") written to ``sink``:
    regular files and directories only, never hardlink members (names of
    one blob are hardlinks, and extracting one of them alone would fail)."""
    with tarfile.open(fileobj=sink, mode=mode, format=tarfile.PAX_FORMAT) as archive:
        for full, arcname, is_dir in walk_tree(root):
            st = os.stat(full)
            info = tarfile.TarInfo(arcname)
            info.mtime = int(st.st_mtime)
            if is_dir:
                info.type, info.mode = tarfile.DIRTYPE, DIR_MODE
                archive.addfile(info)
                continue
            info.type, info.mode, info.size = tarfile.REGTYPE, FILE_MODE, st.st_size
            with open(full, "rb") as source:
                archive.addfile(info, source)


def listing_entry(store, directory, name, made):
    """One directory entry as JSON: name, type, ``mtime`` (of the content),
    ``made`` (when this name was made: ``made`` holds the directory's
    MADE_FILE times, else the inode's change time), ``expires`` when the
    name has a retention, and for files ``size`` and ``sha256``."""
    full = os.path.join(directory, name)
    try:
        st = os.lstat(full)
    except FileNotFoundError:
        return {"name": name, "type": "gone"}
    entry = {"name": name, "mtime": round(st.st_mtime, 3),
             "made": round(made.get(name, st.st_ctime), 3)}
    expires = store.expiries.get(store.relpath(full))
    if expires:
        entry["expires"] = round(expires, 3)
    if stat.S_ISLNK(st.st_mode):
        entry["type"] = "symlink"
        entry["target"] = os.readlink(full)
    elif stat.S_ISDIR(st.st_mode):
        entry["type"] = "dir"
    else:
        entry["type"] = "file"
        entry["size"] = st.st_size
        try:
            entry["sha256"] = store.name_sha256(full)
        except OSError:
            entry["sha256"] = None
    return entry


def upload_entry(record, store, url):
    """A record of the uploads log as /uploads shows it: with ``urls`` to
    everything it made, ``gone`` (why its content went, or null) and
    ``names_gone`` (its names deleted since, content or not)."""
    entry = dict(record)
    sha256 = record["sha256"]
    expires = parse_time(record["expires"], "expires") if record.get("expires") else None
    entry["gone"] = store.gone_reason(sha256, expires)
    made = record.get("names", []) + record.get("replicas", [])
    entry["names_gone"] = [name for name in made
                           if not os.path.lexists(store.path_of(name))]
    urls = {"download": url("checksum/" + sha256) + "?name=" + urllib.parse.quote(record["name"]),
            "names": [url(name) for name in record.get("names", [])],
            "replicas": [url(name) for name in record.get("replicas", [])],
            "tree": record.get("tree") and url(record["tree"]) + "/",
            "decompressed": record.get("decompressed") and
            url("checksum/" + posixpath.basename(record["decompressed"]))}
    entry["urls"] = urls
    return entry


_DIGEST_BYTES = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}


def stated_digests(headers):
    """{algorithm: (label, hex)} of the digests a client says it sent.

    Content-MD5 (base64 of the 16-byte digest), Repr-Digest /
    Content-Digest (RFC 9530: ``sha-256=:<base64>:``, ``sha-512=...``) and
    X-Checksum-<Alg> (hex).  The label names the header and, for the
    RFC 9530 ones, the algorithm (``Repr-Digest sha-256``).  Raises
    BadRequest for an unreadable value (read before the body) or two
    headers that disagree.
    """
    stated = {}

    def state(algorithm, label, value):
        value = value.lower()
        if algorithm in stated and stated[algorithm][1] != value:
            raise BadRequest("%s and %s disagree" % (stated[algorithm][0], label))
        stated[algorithm] = (label, value)

    def decode(label, algorithm, text, hint):
        try:
            raw = base64.b64decode(text, validate=True)
        except binascii.Error:
            raw = b""
        if len(raw) != _DIGEST_BYTES[algorithm]:
            raise BadRequest("%s must be the base64 of the %d-byte %s digest%s"
                             % (label, _DIGEST_BYTES[algorithm], algorithm, hint))
        state(algorithm, label, raw.hex())

    md5 = headers.get("content-md5")
    if md5:
        decode("Content-MD5", "md5", md5.strip(),
               " (24 characters); a hex digest goes in X-Checksum-Md5")
    for header in ("Repr-Digest", "Content-Digest"):
        value = headers.get(header)
        if not value:
            continue
        for item in value.split(","):
            key, _, encoded = item.strip().partition("=")
            key = key.strip().lower()
            algorithm = {"sha-256": "sha256", "sha-512": "sha512"}.get(key)
            if algorithm is None:
                continue  # RFC 9530: unknown algorithms are ignored
            encoded = encoded.strip()
            label = "%s %s" % (header, key)
            if not (encoded.startswith(":") and encoded.endswith(":")) or len(encoded) < 2:
                raise BadRequest("%s must be :base64: (RFC 9530)" % label)
            decode(label, algorithm, encoded[1:-1], ", between colons")
    for algorithm, length in (("md5", 32), ("sha1", 40), ("sha256", 64), ("sha512", 128)):
        header = "X-Checksum-" + algorithm.capitalize()
        value = headers.get(header)
        if value is None:
            continue
        value = value.strip()
        if len(value) != length or not _HEX.match(value):
            raise BadRequest("%s must be %d hex digits" % (header, length))
        state(algorithm, header, value)
    return stated


def check_stated_digests(expected, digests):
    """Raise BadRequest naming the first stated digest the body does not have."""
    for algorithm, (label, value) in expected.items():
        if digests[algorithm] != value:
            raise BadRequest("%s mismatch: header says %s, body has %s; nothing stored"
                             % (label, value, digests[algorithm]))


def blob_receipt(name, info, mime, url):
    """The receipt's description of one stored blob."""
    return {"name": name, "size": info.size, "mime": mime, "checksums": info.digests,
            "stored": "new" if info.new else "existing", "path": info.path,
            "url": url("checksum/" + info.sha256)}


def file_receipt(stored, url):
    """The receipt entry of one StoredFile."""
    entry = blob_receipt(stored.filename, stored.blob, stored.mime, url)
    entry["id"] = stored.record
    if stored.deployed:
        entry["deployed"] = True
    if stored.name:
        entry["name_path"] = stored.name
        entry["url_name"] = url(stored.name)
    expansion = stored.expansion
    derived, tree = expansion.decompressed, expansion.tree
    entry["decompressed"] = derived and blob_receipt(derived.name, derived.blob,
                                                     derived.mime, url)
    entry["extracted"] = tree and {
        "path": tree.path, "url": url(tree.path), "count": len(tree.files),
        "files": tree.files[:MAX_JSON_LIST], "skipped": tree.skipped,
        "existing": tree.existing}
    entry["expansion_error"] = expansion.error
    entry["tree"] = tree and url(tree.path) + "/"
    if not stored.name:
        entry["replicas"] = stored.replicas
        entry["replicas_skipped"] = stored.replicas_skipped
    return entry


def stored_anything(stored):
    """True when a StoredFile made something new: its blob, a name, a
    decompressed blob or a tree (201 Created; else 200 OK)."""
    expansion = stored.expansion
    return bool(stored.blob.new or stored.name
                or (expansion.tree and not expansion.tree.existing)
                or (expansion.decompressed and expansion.decompressed.blob.new))


def upload_receipt(status, stored, url, checksum_type):
    """The JSON answer to an upload: every file, and the original
    server's "checksum" and "path" keys for the first one."""
    entries = [file_receipt(item, url) for item in stored]
    receipt = {"code": status, "status": "Success", "files": entries}
    receipt.update(legacy_keys(entries[0], checksum_type))
    return receipt


def legacy_keys(entry, checksum_type):
    """The original server's "checksum" and "path" keys for one file."""
    decompressed = entry.get("decompressed")
    extracted = entry.get("extracted")
    archive_key = None
    if extracted:
        archive_key = (decompressed or entry)["checksums"].get(checksum_type)
    return {
        "checksum": {"blob": entry["checksums"].get(checksum_type),
                     "decompressed": decompressed["checksums"].get(checksum_type)
                     if decompressed else None,
                     "archive": archive_key},
        "path": {"blob": entry["path"],
                 "decompressed": decompressed["path"] if decompressed else None,
                 "archive": extracted["path"] if extracted else None,
                 "replicas": entry.get("replicas", [])},
    }


# ===========================================================================
# The web page: one stylesheet and one script (served once, cached), and
# the pages rendered here: home (upload, look up, storage, uploads log),
# listings, the uploads log, the form without JavaScript, the token page
# ===========================================================================

PAGE_CSS = r"""[hidden]{display:none!important}
:root{color-scheme:light dark;--bg:#fff;--fg:#1d2126;--muted:#5d6570;--line:#dde1e6;
 --panel:#f5f7f9;--accent:#0b5cad;--accent-fg:#fff;--ok:#17733a;--bad:#b3261e;--warn:#8a5a00;
 --focus:#f0a500;--code:#eef1f4}
@media (prefers-color-scheme:dark){:root{--bg:#15181c;--fg:#e6e9ed;--muted:#a3acb7;
 --line:#2e343b;--panel:#1d2228;--accent:#6cb0ff;--accent-fg:#0b1726;--ok:#5fd38a;
 --bad:#ff8a80;--warn:#f2c15b;--code:#242a31}}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.5 system-ui,-apple-system,
 "Segoe UI",Roboto,"DejaVu Sans",sans-serif}
a{color:var(--accent)}
a:hover{text-decoration-thickness:2px}
:focus-visible{outline:3px solid var(--focus);outline-offset:2px}
header.top{display:flex;flex-wrap:wrap;gap:.25rem 1rem;align-items:baseline;padding:.6rem 1rem;
 border-bottom:1px solid var(--line);background:var(--panel)}
header.top .brand{font-weight:700;font-size:1.1rem;color:var(--fg);text-decoration:none}
header.top nav{display:flex;flex-wrap:wrap;gap:.2rem .9rem}
header.top .who{margin-left:auto;color:var(--muted);font-size:.9rem}
main{max-width:72rem;margin:0 auto;padding:1rem}
h1{font-size:1.35rem;margin:.4rem 0 .8rem;overflow-wrap:anywhere}
h2{font-size:1.1rem;margin:0 0 .6rem}
section.panel{border:1px solid var(--line);border-radius:8px;padding:1rem;margin:0 0 1rem;
 background:var(--bg)}
.crumbs{margin:0 0 .4rem;color:var(--muted);overflow-wrap:anywhere}
.crumbs a{text-decoration:none}
.muted{color:var(--muted)}
.ok{color:var(--ok)} .bad{color:var(--bad)} .warn{color:var(--warn)}
code,.hash{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:.88em;
 background:var(--code);padding:0 .25rem;border-radius:3px;overflow-wrap:anywhere}
td .hash{white-space:nowrap}
.table-wrap{overflow-x:auto;-webkit-overflow-scrolling:touch;max-width:100%}
table{border-collapse:collapse;width:100%}
th,td{padding:.3rem .5rem;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{font-size:.85rem;color:var(--muted);font-weight:600;white-space:nowrap}
th a{color:inherit}
td.name{overflow-wrap:anywhere;min-width:10rem}
td.num{text-align:right;white-space:nowrap}
td.when{white-space:nowrap}
tr:hover td{background:var(--panel)}
button,.button,input,select,textarea{font:inherit}
button,.button{display:inline-block;border:1px solid var(--accent);background:var(--accent);
 color:var(--accent-fg);border-radius:6px;padding:.3rem .8rem;cursor:pointer;text-decoration:none;
 line-height:1.4}
button.quiet,.button.quiet{background:transparent;color:var(--accent)}
button.danger{background:transparent;color:var(--bad);border-color:var(--bad)}
button:disabled{opacity:.55;cursor:default}
input[type=text],input[type=search],input[type=password],input[type=number],textarea,select{
 background:var(--bg);color:var(--fg);border:1px solid var(--line);border-radius:6px;
 padding:.3rem .5rem;max-width:100%}
textarea{width:100%;min-height:3.2rem;font-family:ui-monospace,"DejaVu Sans Mono",monospace}
label{display:inline-flex;flex-wrap:wrap;gap:.3rem;align-items:center}
.row{display:flex;flex-wrap:wrap;gap:.5rem 1rem;align-items:center;margin:.5rem 0}
.row.stretch>*{flex:1 1 14rem}
.drop{display:block;width:100%;border:2px dashed var(--line);border-radius:8px;padding:1.4rem;
 text-align:center;background:var(--panel);color:var(--fg);cursor:pointer}
.drop.over{border-color:var(--accent)}
.drop strong{color:var(--accent)}
progress{width:100%;height:.8rem;accent-color:var(--accent)}
.queue td.bar{min-width:7rem;width:30%}
.queue .status{font-size:.85rem;overflow-wrap:anywhere}
.result details{margin:.2rem 0}
.filters{display:grid;grid-template-columns:repeat(auto-fit,minmax(10rem,1fr));gap:.5rem .8rem;
 align-items:end;margin:0 0 .8rem}
.filters label{display:flex;flex-direction:column;align-items:stretch;gap:.15rem;font-size:.9rem}
.filters .actions{display:flex;gap:.6rem;align-items:center}
.meta-row{display:flex;flex-wrap:wrap;gap:.3rem;margin:.2rem 0}
.meta-row input{flex:1 1 8rem}
meter{width:100%;height:1rem}
dialog{border:1px solid var(--line);border-radius:10px;background:var(--bg);color:var(--fg);
 max-width:min(32rem,94vw);padding:1rem 1.2rem}
dialog::backdrop{background:rgba(0,0,0,.45)}
.picker-list{list-style:none;padding:0;margin:.5rem 0;max-height:50vh;overflow:auto}
.picker-list li{padding:.15rem 0}
.gone{color:var(--muted)}
.gone s{text-decoration-thickness:1px}
.notice{border-left:4px solid var(--accent);padding:.4rem .8rem;background:var(--panel);margin:.5rem 0}
.notice.bad{border-left-color:var(--bad)}
@media (max-width:40rem){main{padding:.6rem}section.panel{padding:.7rem}
 th,td{padding:.25rem .35rem}header.top .who{margin-left:0}
 table.stack thead{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0)}
 table.stack tr{display:block;border-bottom:1px solid var(--line);padding:.3rem 0}
 table.stack td{display:block;position:relative;border:0;padding:.1rem .35rem .1rem 5.2rem;
  text-align:left;min-width:0;white-space:normal}
 table.stack td::before{content:attr(data-label);position:absolute;left:.35rem;width:4.6rem;
  color:var(--muted);font-size:.85rem}
 table.stack td:empty{display:none}}
"""

PAGE_JS = r""""use strict";
// http_bucket's page script: the token, deletes, the uploader, the lookup.
// Everything shown from data is set with textContent (names are never HTML).
const $ = (selector, root) => (root || document).querySelector(selector);
const $$ = (selector, root) => Array.from((root || document).querySelectorAll(selector));
const TOKEN_KEY = "http_bucket.token";
const RESUMABLE_FROM = 8 * 1024 * 1024;  // larger files go as resumable uploads
const PIECE = 8 * 1024 * 1024;           // bytes per append of a resumable upload
const PARALLEL = 3;                      // files sent at once

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}
function human(bytes) {
  const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes, unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit++; }
  return unit ? value.toFixed(1) + " " + units[unit] : bytes === 1 ? "1 byte" : bytes + " bytes";
}
function sizeNode(bytes) { return el("span", human(bytes), {title: bytes + " bytes"}); }
function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }
function authHeaders(extra) {
  // X-Requested-With: the server then challenges with Bearer only, and the
  // browser shows no login box of its own for the page's requests.
  const headers = Object.assign({"X-Requested-With": "http_bucket"}, extra || {});
  if (token()) headers["Authorization"] = "Bearer " + token();
  return headers;
}
function say(target, text, kind) {
  target.textContent = text;
  target.className = kind || "";
}
function explain(status, body) {
  const error = body && body.error ? body.error : "";
  if (status === 401) return "This needs a token" + (error ? " (" + error + ")" : "") +
    ": the server asks for one to do this. Enter it and try again.";
  if (status === 403) return "Not allowed with this token" + (error ? ": " + error : ".");
  if (status === 507) return "The server is out of room: " + error;
  if (status === 0) return "The server could not be reached (network error).";
  return error || ("HTTP " + status);
}
async function json(response) {
  try { return await response.json(); } catch (e) { return null; }
}

// -- the token: asked once, kept for this tab -------------------------------
const Login = {
  pending: null,
  ask(reason) {
    if (this.pending) return this.pending;
    const dialog = $("#login");
    $("#login-reason").textContent = reason || "This server needs a token.";
    $("#login-error").textContent = "";
    $("#login-token").value = "";
    this.pending = new Promise((resolve) => {
      const done = (ok) => { dialog.close(); this.pending = null; resolve(ok); };
      $("#login-form").onsubmit = async (event) => {
        event.preventDefault();
        const candidate = $("#login-token").value.trim();
        const access = await checkToken(candidate);
        if (!access.read && !access.write) {
          $("#login-error").textContent = "That token is not accepted by this server.";
          return;
        }
        sessionStorage.setItem(TOKEN_KEY, candidate);
        await rememberForNavigation(candidate);
        showWho(access);
        done(true);
      };
      $("#login-cancel").onclick = () => done(false);
      dialog.showModal();
      $("#login-token").focus();
    });
    return this.pending;
  },
};
async function checkToken(candidate) {
  const response = await fetch("/access", {headers: {"Authorization": "Bearer " + candidate,
                                                    "X-Requested-With": "http_bucket"}});
  return (await json(response)) || {};
}
function rememberForNavigation(candidate) {
  // Links and downloads cannot carry a header: let the browser keep the token
  // as Basic credentials for this site (it sends them on every navigation).
  return new Promise((resolve) => {
    const xhr = new XMLHttpRequest();
    xhr.open("GET", "/access?login=1", true, "bucket", candidate);
    xhr.onloadend = () => resolve();
    xhr.send();
  });
}
async function showWho(access) {
  access = access || (await json(await fetch("/access", {headers: authHeaders()}))) || {};
  const who = $("#who"), button = $("#token-button");
  const tokens = access.read_token_required || access.write_token_required;
  if (button) button.hidden = !tokens;
  if (who) {
    const can = [access.read && "read", access.write && "write"].filter(Boolean).join(" and ");
    who.textContent = tokens ? (token() ? "this tab may " + (can || "nothing") :
      "no token in this tab") : "";
  }
  $$("[data-needs-write]").forEach((node) => { node.hidden = !access.write; });
}
async function authorized(url, options, reason) {
  // fetch; on a 401 ask for the token once and try again.
  const request = () => fetch(url, Object.assign({}, options,
    {headers: authHeaders((options || {}).headers)}));
  let response = await request();
  if (response.status === 401 && await Login.ask(reason)) response = await request();
  return response;
}

// -- delete buttons in listings ----------------------------------------------
function wireDeletes() {
  $$("button[data-delete]").forEach((button) => {
    button.addEventListener("click", async () => {
      const path = button.dataset.delete;
      if (!confirm("Delete " + path + "?" + (path.endsWith("/") ?
          " Everything in this folder goes." : ""))) return;
      const status = $("#status");
      const response = await authorized("/" + path.split("/").map(encodeURIComponent).join("/"),
        {method: "DELETE"}, "Deleting needs the write token.");
      const body = await json(response);
      if (response.ok) {
        const row = button.closest("tr");
        if (row) row.remove();
        say(status, "Deleted " + path + " (" + body.names + " name(s), " + body.reclaimed +
            " blob(s) reclaimed).", "ok");
      } else {
        say(status, "Could not delete " + path + ": " + explain(response.status, body), "bad");
      }
    });
  });
}

// -- the uploader ---------------------------------------------------------------
const Uploader = {
  queue: [], running: 0, total: 0, sent: 0, items: [],
  init() {
    const drop = $("#drop");
    if (!drop) return;
    const pick = $("#pick-files"), folder = $("#pick-folder");
    drop.addEventListener("click", () => pick.click());
    $("#choose-folder").addEventListener("click", () => folder.click());
    pick.addEventListener("change", () => { this.add(Array.from(pick.files).map((file) =>
      ({file, path: file.name}))); pick.value = ""; });
    folder.addEventListener("change", () => { this.add(Array.from(folder.files).map((file) =>
      ({file, path: file.webkitRelativePath || file.name}))); folder.value = ""; });
    drop.addEventListener("dragover", (event) => { event.preventDefault();
      drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", async (event) => {
      event.preventDefault();
      drop.classList.remove("over");
      this.add(await droppedFiles(event.dataTransfer));
    });
    $("#cancel-all").addEventListener("click", () => this.items.forEach((item) => item.cancel()));
    $("#add-meta").addEventListener("click", () => addMetaRow());
    $("#pick-target").addEventListener("click", () => Picker.open());
    $$("input[name=target]").forEach((radio) => radio.addEventListener("change", () => {
      $("#folder").disabled = radio.value !== "files" || !radio.checked;
      $("#pick-target").disabled = $("#folder").disabled;
    }));
  },
  options() {
    const target = $("input[name=target]:checked").value;
    const folder = $("#folder").value.trim().replace(/^\/+|\/+$/g, "");
    const headers = {};
    $$(".meta-row").forEach((row) => {
      const key = $(".meta-key", row).value.trim(), value = $(".meta-value", row).value.trim();
      if (key) headers["X-Bucket-Meta-" + key] = value;
    });
    const days = $("#retain").value.trim();
    if (days) headers["X-Retain-Days"] = days;
    if ($("#keep").checked) headers["X-Bucket-Keep"] = "true";
    return {target, folder, headers};
  },
  add(files) {
    if (!files.length) return;
    const options = this.options();
    if (options.target === "files" && !options.folder) {
      say($("#upload-status"), "Type a folder under files/ (or pick one), or send to the bucket.",
          "bad");
      return;
    }
    $("#queue-wrap").hidden = false;
    $("#cancel-all").hidden = false;
    for (const entry of files) {
      const item = new Item(entry.file, entry.path, options);
      this.items.push(item);
      this.queue.push(item);
      this.total += entry.file.size;
    }
    this.pump();
  },
  pump() {
    while (this.running < PARALLEL && this.queue.length) {
      const item = this.queue.shift();
      if (item.cancelled) continue;
      this.running++;
      item.run().finally(() => { this.running--; this.progress(); this.pump();
        if (!this.running && !this.queue.length) this.finished(); });
    }
    this.progress();
  },
  progress() {
    const done = this.items.reduce((sum, item) => sum + item.done, 0);
    const bar = $("#overall");
    bar.max = Math.max(this.total, 1);
    bar.value = done;
    const finished = this.items.filter((item) => item.state !== "waiting" &&
      item.state !== "sending").length;
    $("#overall-text").textContent = finished + " of " + this.items.length + " files, " +
      human(done) + " of " + human(this.total);
  },
  finished() {
    $("#cancel-all").hidden = true;
    const failed = this.items.filter((item) => item.state === "failed").length;
    say($("#upload-status"), failed ? failed + " file(s) failed: see below." :
        "All files stored.", failed ? "bad" : "ok");
    refreshUploads();
    refreshStorage();
  },
};

function targetUrl(options, path) {
  const parts = path.split("/").filter(Boolean).map(encodeURIComponent);
  if (options.target === "bucket") return "/upload/" + parts[parts.length - 1];
  return "/files/" + options.folder.split("/").map(encodeURIComponent).join("/") + "/" +
    parts.join("/");
}

class Item {
  constructor(file, path, options) {
    this.file = file; this.path = path; this.options = options;
    this.done = 0; this.state = "waiting"; this.xhr = null; this.location = null;
    this.cancelled = false;
    this.row = el("tr");
    this.row.appendChild(el("td", path, {class: "name"}));
    const size = el("td", null, {class: "num"});
    size.appendChild(sizeNode(file.size));
    this.row.appendChild(size);
    const bar = el("td", null, {class: "bar"});
    this.bar = el("progress", null, {max: String(Math.max(file.size, 1)), value: "0",
      "aria-label": "progress of " + path});
    bar.appendChild(this.bar);
    this.row.appendChild(bar);
    this.status = el("td", "waiting", {class: "status"});
    this.row.appendChild(this.status);
    const cancelCell = el("td");
    this.cancelButton = el("button", "Cancel", {type: "button", class: "quiet",
      "aria-label": "cancel " + path});
    this.cancelButton.addEventListener("click", () => this.cancel());
    cancelCell.appendChild(this.cancelButton);
    this.row.appendChild(cancelCell);
    $("#queue tbody").appendChild(this.row);
    this.started = 0; this.lastTime = 0; this.lastBytes = 0; this.rate = 0;
  }
  show(sent) {
    this.done = sent;
    this.bar.value = sent;
    const now = performance.now();
    if (now - this.lastTime > 500) {
      if (this.lastTime) this.rate = (sent - this.lastBytes) / ((now - this.lastTime) / 1000);
      this.lastTime = now; this.lastBytes = sent;
    }
    const percent = this.file.size ? Math.floor(sent * 100 / this.file.size) : 100;
    this.status.textContent = percent + " %" + (this.rate ? ", " + human(this.rate) + "/s" : "");
    Uploader.progress();
  }
  cancel() {
    if (this.state === "stored" || this.state === "failed") return;
    this.cancelled = true;
    if (this.xhr) this.xhr.abort();
    if (this.location) fetch(this.location, {method: "DELETE", headers: authHeaders()});
    this.state = "cancelled";
    this.status.textContent = "cancelled: nothing of it is kept";
    this.cancelButton.hidden = true;
    Uploader.progress();
  }
  async run() {
    this.state = "sending";
    this.lastTime = performance.now();
    try {
      const receipt = this.file.size >= RESUMABLE_FROM ? await this.resumable() :
        await this.send("PUT", targetUrl(this.options, this.path), this.options.headers,
                        this.file, 0);
      if (this.cancelled) return;
      this.state = "stored";
      this.done = this.file.size;
      this.bar.value = this.file.size;
      this.cancelButton.hidden = true;
      showResult(this.status, receipt);
    } catch (failure) {
      if (this.cancelled) return;
      this.state = "failed";
      this.cancelButton.hidden = true;
      this.status.textContent = "failed: " + failure.message;
      this.status.className = "status bad";
    }
  }
  send(method, url, headers, body, base) {
    // One XHR (for upload progress); resolves with the JSON answer, rejects
    // with Error(explained text) or Error("network") for a dropped connection.
    return new Promise((resolve, reject) => {
      const attempt = (retried) => {
        const xhr = new XMLHttpRequest();
        this.xhr = xhr;
        xhr.open(method, url);
        for (const [key, value] of Object.entries(authHeaders(headers))) xhr.setRequestHeader(key, value);
        xhr.upload.onprogress = (event) => this.show(base + event.loaded);
        xhr.onload = async () => {
          let answer = null;
          try { answer = JSON.parse(xhr.responseText); } catch (e) { answer = null; }
          if (xhr.status === 401 && !retried && await Login.ask("Uploading needs the write token.")) {
            attempt(true);
            return;
          }
          if (xhr.status >= 200 && xhr.status < 300) resolve({status: xhr.status, answer,
            location: xhr.getResponseHeader("Location")});
          else reject(new Error(explain(xhr.status, answer)));
        };
        xhr.onerror = () => reject(Object.assign(new Error("network"), {network: true}));
        xhr.onabort = () => reject(new Error("cancelled"));
        xhr.send(body);
      };
      attempt(false);
    }).then((result) => result.answer && result.answer.files ? result.answer : result);
  }
  async resumable() {
    const created = await this.send("PUT", targetUrl(this.options, this.path),
      Object.assign({"Upload-Complete": "?0", "Upload-Length": String(this.file.size)},
                    this.options.headers), null, 0);
    this.location = created.location;
    let offset = 0, failures = 0;
    for (;;) {
      const end = Math.min(offset + PIECE, this.file.size);
      const last = end === this.file.size;
      try {
        const answer = await this.send("PATCH", this.location, {
          "Content-Type": "application/partial-upload", "Upload-Offset": String(offset),
          "Upload-Complete": last ? "?1" : "?0"}, this.file.slice(offset, end), offset);
        if (last) { this.location = null; return answer; }
        offset = end;
        failures = 0;
      } catch (failure) {
        if (!failure.network || this.cancelled || ++failures > 5) throw failure;
        this.status.textContent = "connection lost: resuming...";
        await new Promise((wake) => setTimeout(wake, 1000 * failures));
        const head = await fetch(this.location, {method: "HEAD", headers: authHeaders()});
        if (!head.ok) throw new Error("the upload could not be resumed: " + explain(head.status));
        offset = parseInt(head.headers.get("Upload-Offset"), 10);
      }
    }
  }
}

function showResult(cell, receipt) {
  cell.textContent = "";
  cell.className = "status result";
  for (const file of receipt.files) {
    const line = el("div");
    const href = file.url_name || (file.url + "?name=" + encodeURIComponent(file.name));
    line.appendChild(el("a", file.name, {href, download: file.name}));
    line.appendChild(document.createTextNode(" " + (file.stored === "new" ? "stored" :
      "already stored") + (file.deployed ? " (deployed)" : "")));
    cell.appendChild(line);
    if (file.extracted) {
      const tree = el("div");
      tree.appendChild(document.createTextNode("expanded: "));
      tree.appendChild(el("a", file.extracted.count + " members", {href: file.tree}));
      cell.appendChild(tree);
      if (file.extracted.skipped.length) {
        const details = el("details");
        details.appendChild(el("summary", file.extracted.skipped.length + " skipped"));
        const list = el("ul");
        for (const skip of file.extracted.skipped) list.appendChild(el("li", skip.path + ": " + skip.reason));
        details.appendChild(list);
        cell.appendChild(details);
      }
    }
    if (file.decompressed) cell.appendChild(el("div", "decompressed: " + file.decompressed.name));
    if (file.expansion_error) cell.appendChild(el("div", "not expanded: " + file.expansion_error,
      {class: "warn"}));
  }
}

async function droppedFiles(transfer) {
  // Files and whole folders (directory entries walked).
  const entries = Array.from(transfer.items || []).map((item) =>
    item.webkitGetAsEntry ? item.webkitGetAsEntry() : null);
  if (!entries.some(Boolean)) return Array.from(transfer.files).map((file) => ({file, path: file.name}));
  const found = [];
  const walk = async (entry, prefix) => {
    if (!entry) return;
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      found.push({file, path: prefix + file.name});
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
        if (!batch.length) break;
        for (const child of batch) await walk(child, prefix + entry.name + "/");
      }
    }
  };
  for (const entry of entries) await walk(entry, "");
  return found;
}

function addMetaRow() {
  const row = el("div", null, {class: "meta-row"});
  const key = el("input", null, {type: "text", class: "meta-key", placeholder: "key (e.g. job)",
    "aria-label": "metadata key"});
  const value = el("input", null, {type: "text", class: "meta-value", placeholder: "value",
    "aria-label": "metadata value"});
  const remove = el("button", "Remove", {type: "button", class: "quiet"});
  remove.addEventListener("click", () => row.remove());
  row.append(key, value, remove);
  $("#meta-rows").appendChild(row);
  key.focus();
}

// -- picking a folder under files/ ------------------------------------------------
const Picker = {
  async open(path) {
    path = path === undefined ? $("#folder").value.trim().replace(/^\/+|\/+$/g, "") : path;
    const dialog = $("#picker");
    const list = $("#picker-list");
    $("#picker-path").textContent = "files/" + (path ? path + "/" : "");
    list.textContent = "";
    const url = "/files/" + (path ? path.split("/").map(encodeURIComponent).join("/") + "/" : "") +
      "?format=json";
    const response = await authorized(url, {}, "Browsing needs the read token.");
    const body = await json(response);
    if (path) {
      const up = el("button", "..", {type: "button", class: "quiet"});
      up.addEventListener("click", () => this.open(path.split("/").slice(0, -1).join("/")));
      const item = el("li"); item.appendChild(up); list.appendChild(item);
    }
    for (const entry of (body && body.entries) || []) {
      if (entry.type !== "dir") continue;
      const item = el("li");
      const go = el("button", entry.name + "/", {type: "button", class: "quiet"});
      go.addEventListener("click", () => this.open((path ? path + "/" : "") + entry.name));
      item.appendChild(go);
      list.appendChild(item);
    }
    $("#picker-use").onclick = () => { $("#folder").value = path; dialog.close(); };
    if (!dialog.open) dialog.showModal();
  },
};

// -- look up: digests, or md5sum/sha256sum lines ------------------------------------
const DIGEST = /^[0-9a-fA-F]{32}$|^[0-9a-fA-F]{40}$|^[0-9a-fA-F]{64}$|^[0-9a-fA-F]{128}$/;
function digestsIn(text) {
  const found = [];
  for (const line of text.split(/\r?\n/)) {
    const words = line.trim().replace(/^\\/, "").split(/[\s=()*]+/).filter(Boolean);
    const digest = words.find((word) => DIGEST.test(word));
    if (digest) found.push({digest: digest.toLowerCase(), line: line.trim()});
  }
  return found;
}
async function lookUp(event) {
  event.preventDefault();
  const out = $("#lookup-result");
  out.textContent = "";
  const wanted = digestsIn($("#lookup-text").value);
  if (!wanted.length) {
    say(out, "No checksum found: paste an md5, sha1, sha256 or sha512 (hex), or lines of " +
        "md5sum / sha256sum output.", "bad");
    return;
  }
  const response = await authorized("/checksum", {method: "POST",
    body: JSON.stringify({digests: wanted.map((item) => item.digest)})},
    "Looking up needs the read token.");
  const answer = await json(response);
  if (!response.ok) { say(out, explain(response.status, answer), "bad"); return; }
  const list = el("ul");
  for (const item of wanted) {
    const present = answer.present[item.digest];
    const line = el("li", null, {class: present ? "ok" : "bad"});
    line.appendChild(el("code", item.digest.slice(0, 16) + "…", {title: item.digest}));
    if (!present) {
      line.appendChild(document.createTextNode(" not stored"));
    } else {
      line.appendChild(document.createTextNode(" stored, "));
      line.appendChild(sizeNode(present.size));
      await describeStored(line, present.sha256);
    }
    list.appendChild(line);
  }
  out.appendChild(list);
}
async function describeStored(line, sha256) {
  const response = await authorized("/uploads?format=json&limit=3&sha256=" + sha256, {});
  const body = await json(response);
  const records = (body && body.uploads) || [];
  const download = records.length ? records[0].urls.download : "/checksum/" + sha256;
  line.appendChild(document.createTextNode(" — "));
  line.appendChild(el("a", "download" + (records.length ? " " + records[0].name : ""),
    {href: download}));
  for (const record of records) {
    for (const [index, name] of record.names.concat(record.replicas).entries()) {
      const urls = record.urls.names.concat(record.urls.replicas);
      line.appendChild(document.createTextNode(", "));
      line.appendChild(el("a", name, {href: urls[index]}));
    }
    if (record.urls.tree) {
      line.appendChild(document.createTextNode(", "));
      line.appendChild(el("a", "expanded tree", {href: record.urls.tree}));
    }
  }
}

// -- the uploads list and the storage, refreshed after uploads ----------------------
async function refreshUploads() {
  const holder = $("#uploads-table");
  if (!holder) return;
  const response = await fetch("/uploads?fragment=1&" + (holder.dataset.query || ""),
    {headers: authHeaders({"Accept": "text/html"})});
  if (response.ok) holder.innerHTML = await response.text();  // rendered (escaped) by the server
}
async function refreshStorage() {
  const holder = $("#storage-text");
  if (!holder) return;
  const health = await (await fetch("/healthz")).json();
  renderStorage(health);
}
function renderStorage(health) {
  const holder = $("#storage-text");
  holder.textContent = "";
  holder.appendChild(document.createTextNode("Stored: "));
  holder.appendChild(sizeNode(health.stored_bytes));
  holder.appendChild(document.createTextNode(" in " + health.blobs + " blobs" +
    (health.max_size ? " of a " : ".")));
  if (health.max_size) {
    holder.appendChild(sizeNode(health.max_size));
    holder.appendChild(document.createTextNode(" cap (least recently used content is evicted)."));
  }
  holder.appendChild(el("br"));
  holder.appendChild(document.createTextNode("Free on the disk: "));
  holder.appendChild(sizeNode(health.free_bytes));
  holder.appendChild(document.createTextNode(", kept free: "));
  holder.appendChild(sizeNode(health.min_free_bytes));
  if (health.status === "degraded") holder.appendChild(el("strong",
    " Under the floor: uploads are refused until there is room.", {class: "bad"}));
  const meter = $("#storage-meter");
  if (meter && health.max_size) { meter.max = health.max_size; meter.value = health.stored_bytes;
    meter.high = health.max_size * 0.9; meter.hidden = false; }
}

// -- start ----------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  wireDeletes();
  Uploader.init();
  const lookup = $("#lookup");
  if (lookup) lookup.addEventListener("submit", lookUp);
  const loginPage = $("#login-page");
  if (loginPage) {
    loginPage.addEventListener("submit", async (event) => {
      event.preventDefault();
      const candidate = $("#page-token").value.trim();
      const access = await checkToken(candidate);
      if (!access.read) { say($("#page-token-error"), "That token does not allow reading.", "bad");
        return; }
      sessionStorage.setItem(TOKEN_KEY, candidate);
      await rememberForNavigation(candidate);
      location.reload();
    });
  }
  const tokenButton = $("#token-button");
  if (tokenButton) tokenButton.addEventListener("click", async () => {
    if (await Login.ask("Enter the token for this tab.")) location.reload();
  });
  showWho();
});
"""

FAVICON_SVG = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 64 64">'
               '<path d="M12 20h40l-5 36H17z" fill="#0b5cad"/>'
               '<path d="M8 14h48v8H8z" fill="#6cb0ff"/>'
               '<path d="M26 30h12v4H26z" fill="#fff"/></svg>')
ASSET_VERSION = hashlib.sha256((PAGE_CSS + PAGE_JS).encode()).hexdigest()[:12]
ASSET_MAX_AGE = 31536000            # seconds: assets are named by their hash
LISTING_SORTS = ("name", "size", "made")

_NAV = (("/", "Uploads"), ("/files/", "Files"), ("/replica/", "Replicas"),
        ("/explode/", "Expanded"), ("/upload", "Simple form"), ("/config", "Config"))


def escape(value):
    return html.escape(str(value), quote=True)


def size_html(size):
    """A size for people; the exact bytes on hover."""
    return "<span title='%d bytes'>%s</span>" % (size, escape(human_bytes(size)))


def time_html(epoch):
    if not epoch:
        return ""
    return "<time datetime='%s'>%s</time>" % (
        iso_time(epoch), time.strftime("%Y-%m-%d %H:%M", time.gmtime(epoch)))


LOGIN_DIALOG = (
    "<dialog id='login' aria-labelledby='login-title'><form id='login-form' method='dialog'>"
    "<h2 id='login-title'>Token</h2><p id='login-reason'></p>"
    "<input type='text' autocomplete='username' value='bucket' hidden>"
    "<p><label>Token <input type='password' id='login-token' autocomplete='current-password' "
    "required></label></p><p id='login-error' class='bad' aria-live='polite'></p>"
    "<p class='muted'>Kept for this tab only (sessionStorage); never sent elsewhere.</p>"
    "<div class='row'><button type='submit'>Use it</button>"
    "<button type='button' class='quiet' id='login-cancel'>Cancel</button></div></form></dialog>")


def page_top(title, crumbs="", who=True):
    """The start of a page, down to its heading: head (viewport, the cached
    stylesheet and script, the icon), the header and its links, ``crumbs``."""
    nav = "".join("<a href='%s'>%s</a>" % (href, text) for href, text in _NAV)
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<title>%s - http_bucket</title>"
        "<link rel='icon' href='/favicon.ico' type='image/svg+xml'>"
        "<link rel='stylesheet' href='/static/style.css?v=%s'>"
        "<script src='/static/app.js?v=%s' defer></script></head><body>"
        "<header class='top'><a class='brand' href='/'>http_bucket</a>"
        "<nav aria-label='sections'>%s</nav>%s</header><main>%s<h1>%s</h1>" % (
            escape(title), ASSET_VERSION, ASSET_VERSION, nav,
            "<span class='who'><span id='who' aria-live='polite'></span> "
            "<button type='button' class='quiet' id='token-button' hidden>Token</button>"
            "</span>" if who else "", crumbs, escape(title)))


def page_bottom():
    return "</main>%s</body></html>\n" % LOGIN_DIALOG


def page_html(title, body, crumbs="", who=True):
    """A whole page: page_top, ``body`` (HTML), page_bottom."""
    return page_top(title, crumbs, who) + body + page_bottom()


def crumbs_html(relpath, labels=None):
    """``bucket / files / team / build-42``, each a link; ``labels`` gives
    some segments (by position) a name for people."""
    parts = [part for part in relpath.strip("/").split("/") if part]
    links = ["<a href='/'>bucket</a>"]
    for depth in range(len(parts)):
        href = "/" + "/".join(urllib.parse.quote(part) for part in parts[:depth + 1]) + "/"
        label = (labels or {}).get(depth, parts[depth])
        links.append("<a href='%s'>%s</a>" % (escape(href), escape(label)))
    return "<nav class='crumbs' aria-label='where'>%s</nav>" % " / ".join(links)


# -- listings ------------------------------------------------------------------

def listing_title(relpath, archive_name):
    """(heading, crumb labels) of a listing: an expanded tree is named after
    its archive (``logs.zip``), not by its 64-digit key."""
    parts = relpath.split("/")
    if parts[0] != "explode" or len(parts) < 4 or not archive_name:
        return relpath.rstrip("/") + "/", {}
    label = archive_name + " (expanded)"
    return "/".join([label] + parts[4:]) + "/", {3: label}


def listing_html_head(relpath, sort, order, can_delete, title, labels):
    """The top of a directory listing, down to its first row."""
    def column(key, text):
        flip = "desc" if sort == key and order == "asc" else "asc"
        mark = (" \u25b2" if order == "asc" else " \u25bc") if sort == key else ""
        state = " aria-sort='%s'" % ("ascending" if order == "asc" else "descending") \
            if sort == key else ""
        return "<th scope='col'%s><a href='?sort=%s&amp;order=%s'>%s%s</a></th>" % (
            state, key, flip, text, mark)
    return (page_top(title, crumbs_html(relpath, labels))
            + "<p class='row'><span>Download this folder as</span>"
            "<a class='button quiet' href='?download=zip'>zip</a>"
            "<a class='button quiet' href='?download=tar.gz'>tar.gz</a></p>"
            "<p id='status' aria-live='polite'></p><div class='table-wrap'><table><thead><tr>"
            + column("name", "name") + column("size", "size") + column("made", "made (UTC)")
            + "<th scope='col'>expires</th><th scope='col'>sha256</th>"
            + ("<th scope='col'><span class='muted'>delete</span></th>" if can_delete else "")
            + "</tr></thead><tbody>")


def listing_html_row(entry, relpath, can_delete):
    is_dir = entry.get("type") == "dir"
    name = entry["name"] + ("/" if is_dir else "")
    shown = entry.get("label", name)
    link = urllib.parse.quote(entry["name"]) + ("/" if is_dir else "")
    extra = (" <span class='muted'>&rarr; %s</span>" % escape(entry["target"])
             if entry.get("type") == "symlink" else "")
    sha256 = entry.get("sha256") or ""
    delete = ""
    if can_delete:
        delete = ("<td><button type='button' class='danger' data-needs-write "
                  "data-delete='%s' aria-label='delete %s'>Delete</button></td>"
                  % (escape(relpath.strip("/") + "/" + name), escape(name)))
    return ("<tr><td class='name'><a href='%s' title='%s'>%s</a>%s</td><td class='num'>%s</td>"
            "<td class='when'>%s</td><td class='when'>%s</td><td><span class='hash' title='%s'>"
            "%s</span></td>%s</tr>\n" % (
                escape(link), escape(name), escape(shown), extra,
                size_html(entry["size"]) if "size" in entry else "",
                time_html(entry.get("made")), time_html(entry.get("expires")), escape(sha256),
                escape(sha256[:12]), delete))


def listing_html_tail(next_marker, sort, order):
    more = ""
    if next_marker:
        more = ("<p><a href='?%s'>next page</a></p>"
                % escape(urllib.parse.urlencode({"after": next_marker, "limit": LISTING_PAGE,
                                                 "sort": sort, "order": order})))
    return "</tbody></table></div>%s%s" % (more, page_bottom())


# -- the uploads log and the home page ---------------------------------------------

def uploads_table_html(entries, query, cursor):
    """The uploads as a table (the home page's list, /uploads, and the
    fragment the page fetches after uploading)."""
    rows = []
    for entry in entries:
        urls = entry["urls"]
        made = []
        for name, link in zip(entry["names"] + entry["replicas"], urls["names"] + urls["replicas"]):
            made.append("<s>%s</s>" % escape(name) if name in entry["names_gone"]
                        else "<a href='%s'>%s</a>" % (escape(link), escape(name)))
        if urls["tree"]:
            made.append("<a href='%s'>expanded tree</a>" % escape(urls["tree"]))
        name = ("<span class='gone'><s>%s</s> (%s)</span>" % (escape(entry["name"]),
                                                             escape(entry["gone"]))
                if entry["gone"] else "<a href='%s'>%s</a>" % (escape(urls["download"]),
                                                              escape(entry["name"])))
        meta = " ".join("<code>%s=%s</code>" % (escape(key), escape(value))
                        for key, value in sorted(entry["meta"].items()))
        rows.append("<tr><td class='when' data-label='when'>%s</td><td class='name' "
                    "data-label='file'>%s</td><td class='num' data-label='size'>%s</td>"
                    "<td class='name' data-label='names'>%s</td><td data-label='metadata'>%s</td>"
                    "<td data-label='sha256'><span class='hash' title='%s'>%s</span></td></tr>" % (
                        time_html(parse_time(entry["time"], "time")), name,
                        size_html(entry["size"]), ", ".join(made), meta,
                        escape(entry["sha256"]), escape(entry["sha256"][:12])))
    more = ""
    if cursor:
        pairs = [(key, value) for key, value in (("name", query.name), ("sha256", query.sha256))
                 if value] + [("meta." + key, value) for key, value in sorted(query.meta.items())]
        if query.since is not None:
            pairs.append(("since", repr(query.since)))
        if query.until is not None:
            pairs.append(("until", repr(query.until)))
        more = "<p><a href='/uploads?%s'>older uploads</a></p>" % escape(
            urllib.parse.urlencode(pairs + [("limit", query.limit), ("before", cursor)]))
    if not rows:
        filtered = query.name or query.sha256 or query.meta or query.since or query.until
        return "<p class='muted'>%s</p>" % ("No uploads match." if filtered else
                                            "Nothing uploaded yet.")
    return ("<div class='table-wrap'><table class='stack'><thead><tr>"
            "<th scope='col'>when (UTC)</th><th scope='col'>file</th><th scope='col'>size</th>"
            "<th scope='col'>names</th><th scope='col'>metadata</th><th scope='col'>sha256</th>"
            "</tr></thead><tbody>%s"
            "</tbody></table></div>%s" % ("\n".join(rows), more))


def uploads_filter_html(query, action):
    meta = " ".join("%s=%s" % item for item in sorted(query.meta.items()))

    def day(epoch):
        return time.strftime("%Y-%m-%dT%H:%M", time.gmtime(epoch)) if epoch is not None else ""
    return (
        "<form method='get' action='%s' class='filters' aria-label='filter uploads'>"
        "<label>Name <input type='search' name='name' value='%s' placeholder='*.xml'></label>"
        "<label>Checksum <input type='search' name='sha256' value='%s' "
        "placeholder='md5, sha1, sha256 or sha512'></label>"
        "<label>Metadata <input type='search' name='meta' value='%s' placeholder='job=4812'></label>"
        "<label>Since <input type='text' name='since' value='%s' placeholder='2026-11-30'></label>"
        "<label>Until <input type='text' name='until' value='%s' placeholder='2026-11-30T12:00'>"
        "</label><span class='actions'><button type='submit'>Find</button> "
        "<a href='%s'>show all</a></span></form>"
        % (escape(action), escape(query.name or ""), escape(query.sha256 or ""), escape(meta),
           day(query.since), day(query.until), escape(action)))


def uploads_page_html(entries, query, cursor, query_text):
    return page_html("Uploads", uploads_filter_html(query, "/uploads")
                     + "<div id='uploads-table' data-query='%s'>%s</div>"
                     % (escape(query_text), uploads_table_html(entries, query, cursor)),
                     crumbs=crumbs_html("uploads"))


def storage_html(space, health):
    stored, max_size = health["stored_bytes"], health["max_size"]
    meter = ("<meter id='storage-meter' min='0' max='%d' value='%d' high='%d'></meter>"
             % (max_size, stored, int(max_size * LOW_WATERMARK)) if max_size
             else "<meter id='storage-meter' hidden></meter>")
    text = "Stored: %s in %d blobs%s<br>Free on the disk: %s, kept free: %s%s" % (
        size_html(stored), health["blobs"],
        " of a %s cap (least recently used content is evicted)." % size_html(max_size)
        if max_size else ".", size_html(space[0]), size_html(space[1]),
        " <strong class='bad'>Under the floor: uploads are refused until there is room."
        "</strong>" if space[0] < space[1] else "")
    return ("<section class='panel' aria-labelledby='storage-title'><h2 id='storage-title'>"
            "Storage</h2>%s<p id='storage-text'>%s</p></section>" % (meter, text))


UPLOAD_PANEL = """
<section class="panel" aria-labelledby="upload-title"><h2 id="upload-title">Upload</h2>
<button type="button" class="drop" id="drop"><strong>Choose files</strong> or drop files and
 folders here<br><span class="muted">archives are expanded; large files resume after a cut</span>
</button>
<input type="file" id="pick-files" multiple hidden>
<input type="file" id="pick-folder" webkitdirectory multiple hidden>
<div class="row"><button type="button" class="quiet" id="choose-folder">Choose a folder</button></div>
<fieldset class="row"><legend>Send to</legend>
<label><input type="radio" name="target" value="bucket" checked> the bucket (/upload)</label>
<label><input type="radio" name="target" value="files"> a folder under files/</label>
<label>Folder <input type="text" id="folder" placeholder="team/build-42" disabled
 aria-label="folder under files/"></label>
<button type="button" class="quiet" id="pick-target" disabled>Pick…</button></fieldset>
<details><summary>Metadata, retention, keep</summary>
<div id="meta-rows"></div>
<div class="row"><button type="button" class="quiet" id="add-meta">Add metadata</button></div>
<div class="row"><label>Retain days <input type="number" id="retain" min="0" step="any"
 placeholder="server default"></label>
<label><input type="checkbox" id="keep"> Keep: never evict</label></div></details>
<p id="upload-status" aria-live="polite"></p>
<div id="queue-wrap" hidden>
<div class="row"><progress id="overall" value="0" max="1" aria-label="all files"></progress>
<span id="overall-text" aria-live="polite"></span>
<button type="button" class="quiet" id="cancel-all">Cancel all</button></div>
<div class="table-wrap"><table id="queue" class="queue"><thead><tr><th scope="col">file</th>
<th scope="col">size</th><th scope="col">progress</th><th scope="col">status</th>
<th scope="col"><span class="muted">cancel</span></th></tr></thead><tbody></tbody></table></div>
</div>
<dialog id="picker" aria-labelledby="picker-title"><h2 id="picker-title">Pick a folder</h2>
<p><code id="picker-path"></code></p><ul class="picker-list" id="picker-list"></ul>
<div class="row"><button type="button" id="picker-use">Use this folder</button>
<button type="button" class="quiet" onclick="this.closest('dialog').close()">Close</button></div>
</dialog></section>
<section class="panel" aria-labelledby="lookup-title"><h2 id="lookup-title">Is it stored?</h2>
<form id="lookup"><label for="lookup-text">Paste checksums, or lines of md5sum / sha256sum
 output</label><textarea id="lookup-text" spellcheck="false"
 placeholder="d41d8cd98f00b204e9800998ecf8427e  results.xml"></textarea>
<div class="row"><button type="submit">Look up</button></div></form>
<div id="lookup-result" aria-live="polite"></div></section>
"""


def home_html(entries, query, cursor, query_text, space, health):
    return page_html("Upload and find", UPLOAD_PANEL + storage_html(space, health)
                     + "<section class='panel' aria-labelledby='uploads-title'>"
                     "<h2 id='uploads-title'>Latest uploads</h2>%s"
                     "<div id='uploads-table' data-query='%s'>%s</div></section>" % (
                         uploads_filter_html(query, "/"), escape(query_text),
                         uploads_table_html(entries, query, cursor)))


UPLOAD_FORM_BODY = """<p>A plain form: it works without JavaScript. The
<a href="/">start page</a> shows progress, takes folders and resumes large files.</p>
<form method="post" action="/upload" enctype="multipart/form-data" class="panel">
<p><label>Files (archives are expanded)
<input type="file" name="file" multiple required></label></p>
<p><label>Retain days (empty: the server's default)
<input name="retain_days" inputmode="decimal" size="6"></label></p>
<p><button type="submit">Upload</button></p>
</form>"""


def receipt_html(receipt):
    """A stored-files page for a browser's plain form post (no JavaScript)."""
    rows = []
    for entry in receipt["files"]:
        link = entry.get("url_name") or entry["url"] + "?name=" + urllib.parse.quote(entry["name"])
        tree = entry.get("extracted")
        rows.append("<tr><td class='name'><a href='%s'>%s</a></td><td class='num'>%s</td>"
                    "<td>%s</td><td>%s</td></tr>" % (
                        escape(link), escape(entry["name"]), size_html(entry["size"]),
                        escape(entry["stored"]),
                        "<a href='%s'>%d members</a>" % (escape(entry["tree"]), tree["count"])
                        if tree else ""))
    return page_html("Stored", "<div class='table-wrap'><table><thead><tr><th>file</th>"
                     "<th>size</th><th>stored</th><th>expanded</th></tr></thead><tbody>%s"
                     "</tbody></table></div><p><a href='/upload'>Upload more</a></p>"
                     % "".join(rows))


def login_html(write):
    """The page a browser gets instead of a 401: a form for the token."""
    return page_html("Token needed", (
        "<div class='notice'>This server needs a token to %s. Enter it once: it is kept "
        "for this tab, and this page loads again.</div>"
        "<form id='login-page' class='panel'><input type='text' autocomplete='username' "
        "value='bucket' hidden><p><label>Token <input type='password' "
        "id='page-token' autocomplete='current-password' required></label></p>"
        "<p id='page-token-error' aria-live='polite'></p>"
        "<p><button type='submit'>Continue</button></p></form>"
        "<noscript><p class='bad'>Without JavaScript, use curl with "
        "<code>-H 'Authorization: Bearer TOKEN'</code>, or a browser's Basic login "
        "(any user name, the token as password).</p></noscript>")
        % ("write" if write else "read"), who=False)


# ===========================================================================
# HTTP handler: request line and headers, the one dispatcher, routes
# ===========================================================================


class Handler(BaseHTTPRequestHandler):
    """One connection: reads requests, routes them, answers in JSON or files.

    Every refusal is raised as a BucketError and answered in ``dispatch``,
    the only place that turns exceptions into responses.
    """

    protocol_version = "HTTP/1.1"
    server_version = "http_bucket/" + __version__
    sys_version = ""

    # -- connection and request line -----------------------------------------

    def setup(self):
        self.timeout = self.server.config.timeout or None
        self.handshake_error = None
        self.linger = False  # an answer went out before its body was read
        if self.server.ssl_context is not None:
            self.start_tls()
        super().setup()
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (tests on a socketpair)

    def start_tls(self):
        """TLS on this connection, in its own thread (a slow handshake holds
        no other client), bounded by the reaper.  A plain HTTP request gets
        a plain-text 400 saying the port speaks HTTPS, as nginx answers;
        a failure is kept in ``handshake_error`` for ``handle`` to log."""
        reaper = self.server.reaper
        self.request.settimeout(self.timeout)
        try:
            reaper.watch(self.request)
            first = self.request.recv(1, socket.MSG_PEEK)
            if first and first != b"\x16":  # not a TLS handshake record
                self.refuse_plain_http()
                self.handshake_error = "plain HTTP sent to the HTTPS port"
                return
            reaper.release(self.request)
            self.request = self.server.ssl_context.wrap_socket(
                self.request, server_side=True, do_handshake_on_connect=False)
            reaper.watch(self.request)
            self.request.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            self.handshake_error = exc  # a scanner, a client that gave up
        finally:
            reaper.release(self.request)

    def refuse_plain_http(self):
        raw = self.request
        body = ("400 Bad Request: this port speaks HTTPS; use https://%s/\n"
                % self.local_address()).encode()
        try:
            raw.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; "
                        b"charset=utf-8\r\nConnection: close\r\nContent-Length: "
                        + str(len(body)).encode() + b"\r\n\r\n" + body)
            raw.shutdown(socket.SHUT_WR)
            raw.settimeout(0.5)
            while raw.recv(65536):  # let the client read it (no RST)
                pass
        except OSError:
            pass

    def local_address(self):
        """host:port of this end of the connection, as a URL writes it."""
        try:
            host, port = self.request.getsockname()[:2]
        except OSError:
            return "this-host:port"
        return "%s:%d" % ("[%s]" % host if ":" in host else host, port)

    def finish(self):
        try:
            super().finish()
            if self.linger and not isinstance(self.connection, ssl.SSLSocket):
                self.linger_close()
        finally:
            if isinstance(self.connection, ssl.SSLSocket):
                self.connection.close()  # wrapped here: shutdown_request has the raw one

    def linger_close(self):
        """The answer went out before the body was read (a 413, a 507
        mid-body): end the sending side, then read and drop what the client
        still sends, for LINGER_SECONDS or LINGER_BYTES at most.  Closing
        with unread bytes would send a reset, and a client still sending
        would see "connection reset" instead of the answer."""
        sock = self.connection
        deadline = time.monotonic() + LINGER_SECONDS
        dropped = 0
        try:
            sock.shutdown(socket.SHUT_WR)
            while dropped < LINGER_BYTES:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(min(left, 0.5))
                data = sock.recv(CHUNK_SIZE)
                if not data:
                    break
                dropped += len(data)
        except OSError:
            pass  # gone, or silent for 0.5 s

    def handle(self):
        if self.handshake_error is not None:
            self.server.log_event("message", text="TLS handshake with %s failed: %s" % (
                self.client_address[0], self.handshake_error))
            return
        try:
            super().handle()
        except (ConnectionError, socket.timeout, ssl.SSLError, OSError):
            pass  # the client went away or stalled: nothing to answer

    def handle_one_request(self):
        self.close_connection = True
        self.started = time.monotonic()
        self.body = None
        self.response_status = 0
        self.response_bytes = 0
        self.command = self.path = ""
        reaper = self.server.reaper
        reaper.watch(self.connection)  # request line and headers in time
        try:
            line = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if not line:
                return
            self.raw_requestline = line
            self.parse_request_fast(line)
        except (socket.timeout, OSError, ClientGone):
            return
        except BucketError as exc:
            self.request_version = "HTTP/1.1"
            if not self.command:  # the request line itself was refused
                self.command, self.path = "-", line[:200].decode("latin-1").strip()
            self.send_error_json(exc)
            self.log_access()
            return
        finally:
            reaper.release(self.connection)
        self.dispatch()
        self.log_access()

    def parse_request_fast(self, line):
        """Request line and headers; raises BadRequest (sets close)."""
        if len(line) > MAX_REQUEST_LINE:
            raise URITooLong("request line over %d bytes" % MAX_REQUEST_LINE)
        words = line.decode("latin-1").rstrip("\r\n").split(" ")
        if len(words) != 3 or not words[2].startswith("HTTP/1."):
            raise BadRequest("malformed request line %r" % line[:80].decode("latin-1"))
        self.command, self.path, self.request_version = words
        self.requestline = "%s %s %s" % tuple(words)
        self.headers = self.read_headers()
        connection = self.headers.get("connection", "").lower()
        if self.request_version == "HTTP/1.1":
            self.close_connection = "close" in connection
        else:
            self.close_connection = "keep-alive" not in connection

    def read_headers(self):
        headers = Headers()
        for _ in range(MAX_HEADERS + 1):
            line = self.rfile.readline(MAX_HEADER_LINE + 1)
            if len(line) > MAX_HEADER_LINE:
                raise HeaderFieldsTooLarge("header line over %d bytes" % MAX_HEADER_LINE)
            if line in (b"\r\n", b"\n"):
                return headers
            if not line:
                raise ClientGone("connection closed inside the headers")
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep or not name or name != name.strip():
                raise BadRequest("malformed header line %r" % line[:60].decode("latin-1"))
            name = name.lower()
            value = value.strip()
            headers[name] = headers[name] + ", " + value if name in headers else value
        raise HeaderFieldsTooLarge("more than %d header lines" % MAX_HEADERS)

    # -- the dispatcher ------------------------------------------------------

    ROUTES = {
        "GET": {"": "page", "upload": "upload_form", "checksum": "get_checksum",
                "uploads": "get_uploads", "static": "static", "favicon.ico": "favicon",
                "access": "access",
                "files": "get_path", "explode": "get_path", "replica": "get_path",
                "config": "get_config", "healthz": "get_health", "metrics": "get_metrics"},
        "POST": {"upload": "post_upload", "files": "post_files", "checksum": "post_checksum"},
        "PUT": {"upload": "put_upload", "files": "put_files"},
        "PATCH": {"resumable": "patch_resumable"},
        "DELETE": {"files": "delete_path", "replica": "delete_path",
                   "checksum": "delete_checksum", "resumable": "delete_resumable"},
    }
    ROUTES["GET"]["resumable"] = "get_resumable"
    ROUTES["HEAD"] = ROUTES["GET"]
    ROUTES["OPTIONS"] = {top: "options" for table in list(ROUTES.values()) for top in table}
    ROUTES["OPTIONS"]["*"] = "options"
    OPEN_ROUTES = ("get_health", "options", "static", "favicon", "access")  # no read token
    READ_ROUTES = ("post_checksum",)  # POSTs that only read: the read token will do
    WRITE_ROUTES = ("get_resumable",)  # reads that need the write token

    def dispatch(self):
        self.server.busy_change(+1)
        try:
            url = urllib.parse.urlsplit(self.path)
            self.url_path = url.path
            self.query_pairs = urllib.parse.parse_qsl(url.query, keep_blank_values=True)
            self.query = dict(self.query_pairs)
            top, _, self.rest = url.path.lstrip("/").partition("/")
            if url.path == "*" and self.command != "OPTIONS":
                raise BadRequest("the request target * is for OPTIONS only")
            name = self.ROUTES.get(self.command, {}).get(top)
            if name is None:
                allowed = [method for method, table in self.ROUTES.items() if top in table]
                if allowed:
                    raise MethodNotAllowed("%s not allowed on /%s" % (self.command, top),
                                           headers={"Allow": ", ".join(sorted(allowed))})
                raise NotFound("no such endpoint: /%s" % top)
            self.authorize(name)
            getattr(self, "route_" + name)()
        except BucketError as exc:
            self.send_error_json(exc)
        except ClientGone:
            self.close_connection = True
        except (ConnectionError, socket.timeout, ssl.SSLError):
            self.close_connection = True
        except Exception:
            self.log_message("internal error on %s %s\n%s", self.command, self.path,
                             traceback.format_exc())
            self.send_error_json(BucketError("internal error; see the server log"))
        finally:
            self.server.busy_change(-1)
            if self.body_unread():
                self.close_connection = True

    def body_unread(self):
        if self.body is not None:
            return not self.body.finished
        length = self.headers.get("content-length", "0") if hasattr(self, "headers") else "0"
        chunked = "chunked" in (self.headers.get("transfer-encoding", "") if hasattr(self, "headers") else "")
        return chunked or length not in ("", "0")

    # -- access control ------------------------------------------------------

    def authorize(self, route):
        server = self.server
        write = (self.command in ("POST", "PUT", "PATCH", "DELETE")
                 and route not in self.READ_ROUTES) or route in self.WRITE_ROUTES
        tokens = [server.token] if write else [server.read_token, server.token]
        if not (server.token if write else server.read_token) or route in self.OPEN_ROUTES:
            return
        offered = self.offered_token()
        if offered is not None:
            for token in tokens:
                if token and hmac.compare_digest(offered.encode(), token.encode()):
                    return
        # A script's request (X-Requested-With) gets no Basic challenge: a
        # browser would answer it with its own login box, not the page.
        scripted = "x-requested-with" in self.headers
        raise Unauthorized(
            "a valid token is needed to %s" % ("write" if write else "read"),
            headers={"WWW-Authenticate": AUTH_CHALLENGES[0] if scripted else AUTH_CHALLENGES})

    def offered_token(self):
        value = self.headers.get("authorization", "")
        scheme, _, credentials = value.partition(" ")
        if scheme.lower() == "bearer":
            return credentials.strip()
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None
            return decoded.partition(":")[2]
        return None

    # -- responses -----------------------------------------------------------

    def send_head_lines(self, status, headers):
        if self.body_unread():
            self.close_connection = self.linger = True
        lines = ["HTTP/1.1 %d %s" % (status, _STATUS_PHRASES.get(status, "Unknown")),
                 "Server: " + self.server_version, "Date: " + cached_http_date()]
        for name, value in headers.items():
            if isinstance(value, (list, tuple)):  # a field sent as several lines
                lines.extend("%s: %s" % (name, item) for item in value)
            else:
                lines.append("%s: %s" % (name, value))
        if self.close_connection:
            lines.append("Connection: close")
        self.response_status = status
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")

    def send(self, status, body=b"", content_type="application/json", headers=None):
        """One whole response, written with one send (no delayed-ACK stall)."""
        all_headers = {"Content-Type": content_type, "Content-Length": str(len(body))}
        all_headers.update(headers or {})
        head = self.send_head_lines(status, all_headers)
        payload = head if self.command == "HEAD" else head + body
        self.response_bytes += len(body)
        self.wfile.write(payload)

    def send_json(self, status, obj, headers=None):
        self.send(status, json_bytes(obj), "application/json", headers)

    def send_error_json(self, exc):
        if self.response_status:
            self.close_connection = True  # a response already began
            return
        if exc.status == 401 and self.is_navigation() and exc.headers.get(
                "WWW-Authenticate") == AUTH_CHALLENGES:
            # A browser's page load: the token form, and no Basic challenge
            # (it would open the browser's own login box instead).
            self.send_page(401, login_html("write" in exc.message),
                           {"WWW-Authenticate": AUTH_CHALLENGES[0]})
            return
        body = {"code": exc.status, "status": "error", "error": exc.message}
        body.update(exc.extra)
        headers = dict(exc.headers)
        if self.command == "HEAD":
            headers["Content-Length"] = "0"  # curl -X HEAD waits for it
        try:
            self.send_json(exc.status, body, headers)
        except (ConnectionError, socket.timeout, ssl.SSLError, OSError):
            self.close_connection = True

    def send_continue(self):
        if self.headers.get("expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    # -- logging -------------------------------------------------------------

    def log_access(self):
        if not self.command:
            return
        self.server.count_request(self.response_status)
        self.server.log_event(
            "access", client=self.client_address[0] if self.client_address else "-",
            method=self.command, path=self.path[:300], status=self.response_status,
            bytes=self.response_bytes,
            ms=round((time.monotonic() - self.started) * 1000, 1))

    def log_message(self, format, *args):
        self.server.log_event("message", text=format % args)

    # -- request bodies ------------------------------------------------------

    def open_body(self, required=True, limit=None, upload=True):
        """The request's BodyReader; refuses bad framing and oversize bodies
        (over ``limit``, default MAX_CONTENT_LENGTH), and for an ``upload``
        of a known length one the store has no room for (Store.check_room),
        all before the body is read."""
        if self.body is not None:
            return self.body
        expect = self.headers.get("expect")
        if expect is not None and expect.lower() != "100-continue":
            raise ExpectationFailed("unsupported Expect: %s" % expect)
        encoding = self.headers.get("transfer-encoding", "").strip().lower()
        length_text = self.headers.get("content-length")
        if limit is None:
            limit = self.server.config.max_content_length
        if encoding and length_text is not None:
            raise BadRequest("both Transfer-Encoding and Content-Length sent")
        if encoding and encoding != "chunked":
            raise BadRequest("unsupported Transfer-Encoding %r (only chunked)" % encoding)
        length = None
        if length_text is not None:
            if not length_text.isdigit():
                raise BadRequest("bad Content-Length %r" % length_text[:40])
            length = int(length_text)
            if limit and length > limit:
                raise TooLarge("request body of %d bytes is over %s (%d bytes)" % (
                    length, "MAX_CONTENT_LENGTH" if upload else "the limit", limit))
            if upload:
                self.server.store.check_room(length)
        elif not encoding and required:
            raise LengthRequired("send Content-Length or Transfer-Encoding: chunked")
        self.body = BodyReader(self.rfile, length, chunked=bool(encoding), limit=limit,
                               before_first_read=self.send_continue,
                               guard=(self.server.reaper, self.connection))
        return self.body

    # -- simple routes -------------------------------------------------------

    def route_page(self):
        """The start page: upload, look up, storage, and the uploads log."""
        if self.rest:
            raise NotFound("no such endpoint: %s" % self.url_path)
        query = self.uploads_query()
        records, cursor = self.server.uploads_log.query(query)
        entries = [upload_entry(record, self.server.store, self.server.url)
                   for record in records]
        store = self.server.store
        self.send_page(200, home_html(entries, query, cursor, self.query_text(),
                                      store.space(fresh=True), self.health()))

    def route_upload_form(self):
        self.send_page(200, page_html("Upload", UPLOAD_FORM_BODY))

    def send_page(self, status, text, headers=None):
        all_headers = {"Cache-Control": "no-cache"}
        all_headers.update(headers or {})
        self.send(status, text.encode("utf-8"), "text/html; charset=utf-8", all_headers)

    def query_text(self):
        return urllib.parse.urlsplit(self.path).query

    def route_static(self):
        """The stylesheet and the script, named by their hash: cached for good."""
        assets = {"style.css": (PAGE_CSS, "text/css; charset=utf-8"),
                  "app.js": (PAGE_JS, "text/javascript; charset=utf-8")}
        if self.rest not in assets:
            raise NotFound("no such asset: %s" % self.url_path)
        text, kind = assets[self.rest]
        etag = '"%s"' % ASSET_VERSION
        headers = {"ETag": etag, "Cache-Control": "public, max-age=%d, immutable"
                   % ASSET_MAX_AGE, "X-Content-Type-Options": "nosniff"}
        if etag in self.headers.get("if-none-match", ""):
            self.wfile.write(self.send_head_lines(304, headers))
            return
        self.send(200, text.encode("utf-8"), kind, headers)

    def route_favicon(self):
        self.send(200, FAVICON_SVG.encode(), "image/svg+xml",
                  {"Cache-Control": "public, max-age=%d" % ASSET_MAX_AGE})

    def route_access(self):
        """What the credentials of this request may do (the page asks);
        ``?login=1`` without valid ones is a 401 with a Basic challenge, so a
        browser keeps them for navigations (the page's XMLHttpRequest)."""
        server = self.server
        offered = self.offered_token()

        def matches(token):
            return bool(token) and offered is not None and hmac.compare_digest(
                offered.encode(), token.encode())
        write = not server.token or matches(server.token)
        read = not server.read_token or matches(server.read_token) or matches(server.token)
        if self.query.get("login") and not (matches(server.token) or matches(server.read_token)):
            raise Unauthorized("a valid token is needed",
                               headers={"WWW-Authenticate": AUTH_CHALLENGES[1]})
        self.send_json(200, {"read": read, "write": write,
                             "read_token_required": bool(server.read_token),
                             "write_token_required": bool(server.token)})

    def is_navigation(self):
        """A browser loading a page (GET of text/html), not a script's fetch."""
        return self.command == "GET" and self.headers.get("accept", "").startswith("text/html")

    def wants_html(self):
        """A browser asked (Accept: text/html) and ?format=json did not."""
        return ("text/html" in self.headers.get("accept", "")
                and self.query.get("format") != "json")

    def route_get_config(self):
        self.send_json(200, self.server.config.public())

    def route_get_health(self):
        self.send_json(200, self.health())

    def health(self):
        store = self.server.store
        if store.reconciled.is_set():
            store.refresh_journals()  # count what other processes stored too
        free, floor = store.space(fresh=True)
        counters = self.server.counters  # with workers: all of them
        return {"status": "degraded" if free < floor else "ok",
                "index_ready": store.ready.is_set() and counters.all_set("ready"),
                "reconciled": store.reconciled.is_set() and counters.all_set("reconciled"),
                "blobs": store.blobs.count, "stored_bytes": store.blobs.bytes,
                "max_size": store.config.max_size, "free_bytes": free, "min_free_bytes": floor}

    def route_get_metrics(self):
        self.send(200, self.server.metrics().encode(), "text/plain; version=0.0.4")

    # -- checksums -----------------------------------------------------------

    def blob_for_digest(self):
        hexdigest = self.rest.strip("/").lower()
        sha256 = self.server.store.lookup(hexdigest)
        if sha256 is None:
            raise NotFound("no stored content has checksum %s" % hexdigest)
        return sha256

    def route_get_checksum(self):
        sha256 = self.blob_for_digest()
        self.server.store.touch(sha256)
        path = self.server.store.blob_path(sha256)
        if self.command == "HEAD":
            # Content-Length 0: the original `curl -X HEAD` reads that many bytes.
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                raise NotFound("no stored content has checksum %s" % sha256)  # just deleted
            headers = {"Content-Length": "0", "ETag": '"%s"' % sha256,
                       "X-Blob-Size": str(size), "X-Checksum-Sha256": sha256}
            expires = self.server.store.blobs.pins_until.get(sha256)
            if expires:
                headers["X-Bucket-Expires"] = http_date(expires)
            self.send(200, b"", "application/octet-stream", headers)
            return
        store = self.server.store
        name = self.query.get("name") or store.blob_name(sha256) or sha256
        self.send_file(path, sha256, name, store.blobs.pins_until.get(sha256))

    def route_post_checksum(self):
        """The batch lookup: {"digests": [hex, ...]} -> which are stored."""
        if self.rest.strip("/"):
            raise NotFound("POST /checksum takes no path: the digests go in the body")
        body = self.open_body(limit=MAX_BATCH_BODY, upload=False)
        data = b"".join(iter(lambda: body.read(CHUNK_SIZE), b""))
        try:
            digests = json.loads(data.decode("utf-8")).get("digests")
        except (ValueError, AttributeError):
            raise BadRequest('POST /checksum needs a JSON object {"digests": ["<hex>", ...]}')
        if not isinstance(digests, list) or not all(isinstance(d, str) for d in digests):
            raise BadRequest('"digests" must be a list of hex strings')
        if len(digests) > MAX_BATCH_DIGESTS:
            raise BadRequest("%d digests: at most %d in one request"
                             % (len(digests), MAX_BATCH_DIGESTS))
        store = self.server.store
        store.ready.wait(INDEX_WAIT)
        store.refresh_journals()  # once for the batch, not once per "no"
        present, missing = {}, []
        for position, hexdigest in enumerate(digests):
            try:
                sha256 = store.lookup(hexdigest.strip(), refresh=False)
            except BadRequest as exc:
                raise BadRequest("digests[%d]: %s" % (position, exc.message))
            try:
                size = sha256 and os.stat(store.blob_path(sha256)).st_size
            except FileNotFoundError:
                sha256 = None  # removed meanwhile
            if sha256:
                present[hexdigest] = {"sha256": sha256, "size": size}
                store.touch(sha256)
            else:
                missing.append(hexdigest)
        self.send_json(200, {"missing": missing, "present": present})

    # -- the uploads log -------------------------------------------------------

    def route_get_uploads(self):
        if self.rest.strip("/"):
            raise NotFound("no such endpoint: %s" % self.url_path)
        query = self.uploads_query()
        records, cursor = self.server.uploads_log.query(query)
        store, url = self.server.store, self.server.url
        entries = [upload_entry(record, store, url) for record in records]
        if self.wants_json():
            self.send_json(200, {"uploads": entries, "count": len(entries), "next": cursor})
        elif self.query.get("fragment"):  # the page's list, refreshed after uploading
            self.send_page(200, uploads_table_html(entries, query, cursor))
        else:
            self.send_page(200, uploads_page_html(entries, query, cursor, self.query_text()))

    def wants_json(self):
        return (self.query.get("format") == "json"
                or "application/json" in self.headers.get("accept", ""))

    def uploads_query(self):
        """The UploadQuery of ``GET /uploads?...``; BadRequest naming a bad
        parameter."""
        meta = {}
        for key, value in self.query_pairs:
            if key.startswith("meta."):
                meta[key[5:].lower()] = value
            elif key == "meta" and value.strip():  # the page's form: key=value ...
                for pair in value.split():
                    name, sep, wanted = pair.partition("=")
                    if not sep:
                        raise BadRequest("meta must be key=value, got %r" % pair[:60])
                    meta[name.lower()] = wanted
        limit_text = self.query.get("limit", str(UPLOADS_PAGE))
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_UPLOADS_PAGE:
            raise BadRequest("limit must be 1 to %d" % MAX_UPLOADS_PAGE)
        before = self.query.get("before") or None
        if before and not re.match(r"^\d{16}-[0-9a-f]{1,16}$", before):
            raise BadRequest("before must be the 'next' cursor of a previous page")
        since, until = (parse_time(self.query[key], key) if self.query.get(key) else None
                        for key in ("since", "until"))
        return UploadQuery(self.query.get("name") or None, self.digest_filter(), meta,
                           since, until, before, int(limit_text))

    def digest_filter(self):
        """?sha256= as the sha256 (or its 32-hex prefix) records carry; any
        digest the server computes works; "-" (matches nothing) when the
        index does not know it."""
        text = self.query.get("sha256", "").strip().lower()
        if not text:
            return None
        algorithm = LOOKUP_LENGTHS.get(len(text))
        if algorithm is None or not _HEX.match(text):
            raise BadRequest("sha256 must be a checksum: 32 (md5), 40 (sha1), 64 (sha256) "
                             "or 128 (sha512) hex digits")
        if algorithm == "sha256":
            return text
        store = self.server.store
        found = store.lookup(text, refresh=False) or store.blobs.candidates(algorithm, text)
        return found if isinstance(found, str) else found[0] if len(found) == 1 else "-"

    def route_delete_checksum(self):
        sha256 = self.blob_for_digest()
        self.server.store.delete_blob(sha256)
        self.send_json(200, {"code": 200, "status": "Success", "deleted": sha256})

    # -- uploads -------------------------------------------------------------

    def route_post_upload(self):
        if self.rest.strip("/") and self.resumable_creation():
            return self.route_put_upload()  # tus-js-client creates with POST
        if self.rest.strip("/"):
            raise NotFound("POST /upload takes no path; use PUT /upload/<name>")
        self.commit_upload(self.receive_multipart(None))

    def route_put_upload(self):
        segments = split_url_path(self.rest, "upload name")
        name = client_filename(segments[-1], "upload name") if segments else "upload"
        if self.resumable_creation():
            return self.create_resumable(name, None)
        self.commit_upload(self.receive_raw(name, None))

    def route_put_files(self):
        segments = self.new_name_segments("file path")
        if not segments or self.rest.endswith("/"):
            raise BadRequest("PUT /files/<path> needs a file name (POST a form to a directory)")
        store = self.server.store
        dest = os.path.join(store.root, "files", *segments)
        if self.exclusive() and os.path.lexists(dest):  # refused before the body is read
            raise PreconditionFailed("files/%s exists (If-None-Match: *)" % "/".join(segments))
        store.check_name_target(dest)
        if self.resumable_creation():
            return self.create_resumable(segments[-1], dest)
        self.commit_upload(self.receive_raw(segments[-1], dest))

    def route_post_files(self):
        if not self.rest.endswith("/") and self.resumable_creation():
            return self.route_put_files()  # a resumable upload created with POST
        segments = self.new_name_segments("directory path")
        store = self.server.store
        directory = os.path.join(store.root, "files", *segments)
        store.check_name_target(os.path.join(directory, "_"))  # before the body
        self.commit_upload(self.receive_multipart(directory))

    def new_name_segments(self, what):
        return [check_new_name(segment, what) for segment in split_url_path(self.rest, what)]

    def exclusive(self):
        return self.headers.get("if-none-match", "").strip() == "*"

    def receive_multipart(self, directory):
        """Read a multipart body into staged files: a Received.

        Each file part is named ``directory/<filename>`` (None: /upload).
        """
        boundary = multipart_boundary(self.headers.get("content-type"))
        self.upload_options({})  # bad headers or query refused before the body
        staged_files, fields = self.read_parts(self.open_body(), boundary)
        try:
            if not staged_files:
                raise BadRequest("multipart body has no file part (a part with a filename)")
            options = self.upload_options(fields)
        except BaseException:
            for staged in staged_files:
                staged.discard()
            raise
        files = [Incoming(staged.filename, staged, None,
                          os.path.join(directory, staged.filename) if directory else None)
                 for staged in staged_files]
        return Received(files, self.exclusive(), *options)

    def upload_options(self, fields):
        """(retain_until, headers, meta, keep, client) of an upload, from
        its headers, query and form ``fields``; BadRequest for a bad one."""
        config = self.server.config
        return (upload_retention(self.headers, self.query, fields, config.retain_days),
                self.headers, parse_metadata(self.headers, fields),
                upload_keep(self.headers, self.query, fields), self.client_address[0])

    def read_parts(self, body, boundary):
        """Stage the file parts of a multipart body as they stream in.

        Returns ([finished StagedBlob], {field name: text}); the staged
        files are the caller's to discard.  On any error (a bad part, the
        client gone, a full disk) every staged file is discarded here.
        """
        parser = MultipartParser(boundary)
        store = self.server.store
        staged_files, fields = [], {}
        part = staged = None
        value = bytearray()
        field_count = 0
        try:
            while True:
                data = body.read(CHUNK_SIZE)
                for kind, payload in (parser.feed(data) if data else ()):
                    if kind == "part":
                        part, staged, value = payload, None, bytearray()
                        if part.filename:  # "": a browser's empty file input
                            staged = store.stage(client_filename(part.filename))
                            staged_files.append(staged)
                        elif part.filename is None:
                            field_count += 1
                            if field_count > MAX_FIELDS:
                                raise BadRequest("more than %d form fields" % MAX_FIELDS)
                    elif kind == "data":
                        if staged is not None:
                            staged.write(payload)
                        elif part.filename is None:
                            value += payload
                            if len(value) > MAX_FIELD_SIZE:
                                raise BadRequest("form field %r over %d bytes"
                                                 % (part.name, MAX_FIELD_SIZE))
                    elif staged is not None:
                        staged.finish()
                    elif part.filename is None:
                        fields[part.name] = value.decode("utf-8", "replace")
                if not data:
                    parser.close()
                    return staged_files, fields
        except BaseException:
            for staged in staged_files:
                staged.discard()
            raise

    def receive_raw(self, name, dest):
        """Read a raw PUT body into one staged file, verifying the digests
        the client stated: a Received (or the deploy of a stored blob)."""
        expected = stated_digests(self.headers)
        options = self.upload_options({})
        if self.headers.get("x-checksum-deploy", "").lower() == "true":
            sha256 = self.deploy_source(expected)
            self.close_connection = self.close_connection or self.body_unread()
            return Received([Incoming(name, None, sha256, dest)], self.exclusive(), *options)
        body = self.open_body()
        store = self.server.store
        staged = store.stage(name)
        try:
            extra = [algorithm for algorithm in expected if algorithm not in store.algorithms]
            if extra:
                staged.digester = Digester(tuple(store.algorithms) + tuple(extra))
            while True:
                data = body.read(CHUNK_SIZE)
                if not data:
                    break
                staged.write(data)
            check_stated_digests(expected, staged.finish())
        except BaseException:
            staged.discard()
            raise
        return Received([Incoming(name, staged, None, dest)], self.exclusive(), *options)

    def deploy_source(self, expected):
        """X-Checksum-Deploy: the sha256 of the stored blob that has every
        stated digest; NotFound when none has, body unread."""
        store = self.server.store
        if not expected:
            raise BadRequest("X-Checksum-Deploy needs a digest header (X-Checksum-Sha256, ...)")
        found = [store.lookup(value) for algorithm, (_, value) in expected.items()
                 if algorithm in LOOKUP_LENGTHS.values()]
        sha256 = next((value for value in found if value), None)
        if sha256 is None:
            raise NotFound("X-Checksum-Deploy: no stored content has the stated checksum")
        digests = store.digests_of(store.blob_path(sha256))
        for algorithm, (header, value) in expected.items():
            if digests.get(algorithm, value) != value:
                raise BadRequest("X-Checksum-Deploy: %s does not match the stored content "
                                 "(it has %s)" % (header, digests[algorithm]))
        return sha256

    def commit_upload(self, received, headers=None, before_answer=None):
        """Store what the request delivered (one transaction); answer JSON
        (with ``headers`` added; ``before_answer(receipt)`` runs first)."""
        server = self.server
        stored = UploadTransaction(server.store, server.config.replicate,
                                   server.uploads_log).commit(received)
        for item in stored:
            server.log_event("stored", name=item.filename, sha256=item.blob.sha256,
                             size=item.blob.size, stored="new" if item.blob.new else "existing")
        status = 201 if any(stored_anything(item) for item in stored) else 200
        headers = dict(headers or {})
        if stored[0].name:
            headers.setdefault("Location", server.url(stored[0].name))
        receipt = upload_receipt(status, stored, server.url, server.config.checksum_type)
        if before_answer is not None:
            before_answer(receipt)
        if self.wants_html():
            self.send(status, receipt_html(receipt).encode("utf-8"), "text/html; charset=utf-8",
                      headers)
        else:
            self.send_json(status, receipt, headers)

    # -- resumable uploads (the IETF draft "Resumable Uploads for HTTP") -----

    def resumable_version(self):
        """The request's Upload-Draft-Interop-Version: an int, or None when
        it sends none (the final RFC's form).  BadRequest for one this
        server does not speak."""
        text = self.headers.get("upload-draft-interop-version")
        if text is None:
            return None
        if not text.strip().isdigit() or int(text) not in RESUMABLE_VERSIONS:
            raise BadRequest(
                "Upload-Draft-Interop-Version %s is not supported: this server speaks %d to %d "
                "(drafts -03 to -13 of draft-ietf-httpbis-resumable-upload)"
                % (text.strip()[:20], RESUMABLE_VERSIONS[0], RESUMABLE_VERSIONS[-1]))
        return int(text)

    def resumable_creation(self):
        """True when an upload request asks to be resumable."""
        return ("upload-complete" in self.headers
                or "upload-draft-interop-version" in self.headers)

    def upload_limit(self, version, upload=None):
        """The Upload-Limit value: max-size (MAX_CONTENT_LENGTH) and max-age
        (the time left to ``upload``, or a new one's), ``expires`` too for
        drafts up to -05 (interop 6), which named it so."""
        resumables = self.server.resumables
        age = int(resumables.expires(upload) - utc_now()) if upload else resumables.max_age
        items = ["max-age=%d" % max(age, 0)]
        if self.server.config.max_content_length:
            items.insert(0, "max-size=%d" % self.server.config.max_content_length)
        if version is not None and version <= 6:
            items.append("expires=%d" % max(age, 0))
        return ", ".join(items)

    def resumable_headers(self, version, upload, offset, complete, length=None):
        headers = {"Upload-Offset": str(offset), "Upload-Complete": "?1" if complete else "?0",
                   "Upload-Limit": self.upload_limit(version, upload),
                   "Cache-Control": "no-store"}
        if length is not None:
            headers["Upload-Length"] = str(length)
        if version is not None:
            headers["Upload-Draft-Interop-Version"] = str(version)
        return headers

    def send_no_content(self, headers):
        """204, no body and no Content-Length (RFC 9110 8.6)."""
        self.wfile.write(self.send_head_lines(204, headers))

    def create_resumable(self, name, dest):
        """Upload creation: a new upload resource for this request's body,
        announced by 104 (when the client speaks a draft version) and by
        Location on the answer; the body is appended as it comes."""
        version = self.resumable_version()
        complete = sf_boolean(self.headers.get("upload-complete"))
        if complete is None:
            raise BadRequest("a resumable upload needs Upload-Complete: ?1 (this request ends "
                             "the file) or ?0 (more follows)")
        expected = stated_digests(self.headers)
        retain_until, _, meta, keep, client = self.upload_options({})
        length = sf_integer(self.headers.get("upload-length"), "Upload-Length")
        content_length = self.headers.get("content-length")
        if complete and content_length is not None and content_length.isdigit():
            if length is not None and length != int(content_length):
                raise inconsistent_length("Upload-Length says %d but this request, which "
                                          "completes the upload, holds %s bytes"
                                          % (length, content_length))
            length = int(content_length)
        self.check_resumable_length(length, version)
        self.server.store.check_room(length or 0)
        store = self.server.store
        extra = [algorithm for algorithm in expected if algorithm not in store.algorithms]
        info = {"name": name, "dest": dest and store.relpath(dest),
                "exclusive": self.exclusive(), "retain_until": retain_until, "meta": meta,
                "keep": keep, "client": client, "length": length,
                "expected": {algorithm: list(pair) for algorithm, pair in expected.items()},
                "algorithms": list(store.algorithms) + extra, "created": utc_now(),
                "headers": {key: value for key, value in self.headers.items()
                            if key not in RESUMABLE_KEPT_HEADERS}}
        resumables = self.server.resumables
        upload = PartialUpload.create(resumables.root, info)
        location = self.server.url("resumable/" + upload.token)
        self.server.log_event("message", text="resumable upload %s created for %s"
                              % (upload.token[:8], dest and store.relpath(dest) or name))
        if version is not None and self.request_version == "HTTP/1.1" and \
                self.server.config.send_104:
            self.wfile.write(("HTTP/1.1 104 Upload Resumption Supported\r\nLocation: %s\r\n"
                              "Upload-Draft-Interop-Version: %d\r\nUpload-Limit: %s\r\n\r\n"
                              % (location, version, self.upload_limit(version))).encode())
        resumables.begin(upload, self.connection)
        try:
            self.append_to(upload, info, complete, version, location)
        finally:
            resumables.end(upload, self.connection)

    def check_resumable_length(self, length, version):
        limit = self.server.config.max_content_length
        if length is not None and limit and length > limit:
            raise TooLarge("an upload of %d bytes is over MAX_CONTENT_LENGTH (%d bytes)"
                           % (length, limit),
                           headers={"Upload-Limit": self.upload_limit(version)})

    def append_to(self, upload, info, complete, version, location, creation=True):
        """Read this request's body onto the end of ``upload`` (the caller
        holds it: Resumables.begin); complete it (the JSON receipt) or
        answer how far it is.  A cut connection keeps what arrived
        (fsynced), and the digests' state for the rest."""
        resumables = self.server.resumables
        if upload.offset() is None:  # completed meanwhile
            raise upload_completed(version)
        staged = StagedBlob(self.server.store, info["name"], path=upload.data_path,
                            digester=resumables.digester(upload, info["algorithms"]))
        try:
            self.append_body(staged, info, version)
        except BaseException:
            resumables.keep_state(upload, staged.suspend())
            raise
        finally:
            self.server.store.partial_changed()
        if info.get("length") is not None and staged.size == info["length"]:
            complete = True  # every byte is here: the server completes it (draft -12 allows
            # it; tus-js-client never sends ?1 when it read the file as a stream)
        if not complete:
            resumables.keep_state(upload, staged.suspend())
            headers = self.resumable_headers(version, upload, staged.size, False,
                                             info.get("length"))
            if creation or (version is not None and version <= 6):
                headers["Location"] = location
                self.send_json(201, {"code": 201, "status": "Incomplete",
                                     "offset": staged.size, "location": location}, headers)
            else:
                self.send_no_content(headers)
            return
        self.complete_resumable(upload, info, staged, version, location)

    def append_body(self, staged, info, version):
        """Copy the request body to ``staged``, within the known length and
        MAX_CONTENT_LENGTH (the bytes that fit are kept; then 400 or 413)."""
        length = info.get("length")
        limit = self.server.config.max_content_length
        body = self.open_body(required=False, limit=0)
        check = None
        if self.command == "PATCH" and self.headers.get("content-digest"):
            check = Digester(("sha256", "sha512"))  # Content-Digest: this request only
        while True:
            data = body.read(CHUNK_SIZE)
            if not data:
                break
            room = min(length if length is not None else float("inf"),
                       limit or float("inf")) - staged.size
            if len(data) > room:
                if room > 0:
                    staged.write(memoryview(data)[:int(room)])
                if length is not None and staged.size >= length:
                    raise inconsistent_length("the upload's length is %d bytes; this request "
                                              "goes past it" % length)
                raise TooLarge("the upload would be over MAX_CONTENT_LENGTH (%d bytes)" % limit,
                               headers={"Upload-Limit": self.upload_limit(version)})
            staged.write(data)
            if check is not None:
                check.update(data)
        if check is not None:
            check_stated_digests({key: value for key, value in stated_digests(self.headers).items()
                                  if value[0].startswith("Content-Digest")}, check.hexdigests())

    def complete_resumable(self, upload, info, staged, version, location):
        """The upload is whole: check the creating request's digests and
        commit it like a one-shot upload (same receipt)."""
        length = info.get("length")
        if length is not None and staged.size != length:
            self.server.resumables.keep_state(upload, staged.suspend())
            raise inconsistent_length("Upload-Complete: ?1 at %d bytes, but the upload's "
                                      "length is %d" % (staged.size, length))
        digests = staged.finish()
        expected = {algorithm: tuple(pair) for algorithm, pair in info["expected"].items()}
        try:
            check_stated_digests(expected, digests)
        except BadRequest:
            upload.remove()  # wrong content: resuming cannot mend it
            raise
        twin = os.path.join(self.server.store.staging_dir, "up-" + secrets.token_hex(8))
        os.link(upload.data_path, twin)  # committed from staging; the data stays if it fails
        staged.path = twin
        store = self.server.store
        dest = info["dest"] and store.path_of(info["dest"])
        received = Received([Incoming(info["name"], staged, None, dest)], info["exclusive"],
                            info["retain_until"], Headers(info["headers"]), info["meta"],
                            info["keep"], info["client"])
        headers = self.resumable_headers(version, upload, staged.size, True, staged.size)
        headers["Location"] = location

        def remember(receipt):
            replace_atomically(upload.done_path, lambda path: _write_json(path, receipt))
            _unlink_quietly(upload.data_path)
            self.server.resumables.forget(upload)
            store.partial_changed()
        try:
            self.commit_upload(received, headers, remember)
        except BaseException:
            if os.path.exists(upload.data_path):
                os.chmod(upload.data_path, 0o600)  # still resumable: complete it again
            raise

    def route_get_resumable(self):
        """Offset retrieval (HEAD; GET is the same, and once complete its
        body is the receipt)."""
        version = self.resumable_version()
        resumables = self.server.resumables
        upload = resumables.find(self.rest.strip("/"))
        resumables.begin(upload, self.connection)
        try:
            receipt = upload.done()
            info = upload.info()
            if receipt is not None:
                size = receipt["files"][0]["size"]
                headers = self.resumable_headers(version, upload, size, True, size)
                self.send_json(200, receipt, headers) if self.command == "GET"                     else self.send_no_content(headers)
                return
            headers = self.resumable_headers(version, upload, upload.offset(), False,
                                             info.get("length"))
            self.send_no_content(headers)
        finally:
            resumables.end(upload, self.connection)

    def route_patch_resumable(self):
        """Upload append: more bytes at the offset the client states."""
        version = self.resumable_version()
        resumables = self.server.resumables
        upload = resumables.find(self.rest.strip("/"))
        kind = self.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != PARTIAL_UPLOAD and (version is None or version >= 6):
            raise UnsupportedMediaType("an append needs Content-Type: %s" % PARTIAL_UPLOAD)
        provided = sf_integer(self.headers.get("upload-offset"), "Upload-Offset")
        if provided is None:
            raise BadRequest("an append needs Upload-Offset: the offset it starts at")
        complete = sf_boolean(self.headers.get("upload-complete"))
        if complete is None:
            if version is None or version >= 7:
                raise BadRequest("an append needs Upload-Complete: ?1 (it ends the file) or ?0")
            complete = True  # drafts up to -05: no header means the last append
        resumables.begin(upload, self.connection)
        try:
            if upload.done() is not None:
                raise upload_completed(version, self.headers.get("content-length", "0") != "0"
                                       or "transfer-encoding" in self.headers)
            current = upload.offset()
            if provided != current:
                raise Conflict("Upload-Offset %d does not match the upload's offset %d: append "
                               "from %d" % (provided, current, current),
                               headers={"Upload-Offset": str(current)},
                               extra={"type": PROBLEM + "mismatching-upload-offset",
                                      "title": "offset from request does not match offset "
                                               "of resource",
                                      "expected-offset": current, "provided-offset": provided})
            info = upload.info()
            length = sf_integer(self.headers.get("upload-length"), "Upload-Length")
            if length is not None and info.get("length") not in (None, length):
                raise inconsistent_length("Upload-Length %d differs from the %d bytes stated "
                                          "before" % (length, info["length"]))
            if length is not None and info.get("length") is None:
                if length < current:
                    raise inconsistent_length("Upload-Length %d is less than the %d bytes "
                                              "received" % (length, current))
                self.check_resumable_length(length, version)
                info["length"] = length
                upload.write_info(info)
            self.append_to(upload, info, complete, version,
                           self.server.url("resumable/" + upload.token), creation=False)
        finally:
            resumables.end(upload, self.connection)

    def route_delete_resumable(self):
        """Upload cancellation: the partial data goes."""
        resumables = self.server.resumables
        upload = resumables.find(self.rest.strip("/"))
        resumables.begin(upload, self.connection)
        try:
            upload.remove()
            resumables.forget(upload)
            self.server.store.partial_changed()
        finally:
            resumables.end(upload, self.connection)
        self.send_no_content({})

    def route_options(self):
        """What may be done here; Accept-Patch and Upload-Limit say that
        resumable uploads are offered (the draft's limits discovery)."""
        top = self.url_path.lstrip("/").split("/", 1)[0]
        allowed = sorted({method for method, table in self.ROUTES.items()
                          if top in table} | {"OPTIONS"}) if top != "*" else \
            ["DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"]
        headers = {"Allow": ", ".join(allowed)}
        if top in ("upload", "files", "resumable", "*"):
            version = self.resumable_version()
            headers["Accept-Patch"] = PARTIAL_UPLOAD
            headers["Upload-Limit"] = self.upload_limit(version)
            if version is not None:
                headers["Upload-Draft-Interop-Version"] = str(version)
        self.send_no_content(headers)

    # -- reading names and trees ---------------------------------------------

    def resolve(self, follow=True):
        """(top, segments, path) of a /files, /explode or /replica URL.

        With ``follow`` the path is resolved through symlinks and must stay
        inside ARCHIVE_DIR (NotFound otherwise).
        """
        top = self.url_path.lstrip("/").split("/", 1)[0]
        segments = split_url_path(self.rest, "path")
        if any(segment.startswith(RESERVED_PREFIX) for segment in segments):
            raise NotFound("%s not found" % "/".join([top] + segments))  # the store's own
        store = self.server.store
        if follow:
            path = contained(store.root, top, *segments)
        else:
            contained(store.root, top, *segments[:-1])
            path = os.path.join(store.root, top, *segments)
        return top, segments, path

    def route_get_path(self):
        top, segments, path = self.resolve()
        try:
            mode = retry_stale(os.stat, path).st_mode
        except OSError:
            raise NotFound("%s not found" % "/".join([top] + segments))
        if stat.S_ISDIR(mode):
            download = self.query.get("download")
            if download:
                self.send_tree_archive(path, segments[-1] if segments else top, download)
            else:
                self.send_listing(path, "/".join([top] + segments))
            return
        name = segments[-1] if segments else top
        store = self.server.store
        sha256 = store.name_sha256(path)
        store.touch(sha256)
        self.send_file(path, sha256, name, store.expiries.get("/".join([top] + segments)))

    def send_file(self, path, sha256, name, expires=None):
        """A file with ETag, Last-Modified, conditional requests and Range;
        ``expires`` (epoch) is sent as X-Bucket-Expires."""
        try:
            handle = retry_stale(open, path, "rb")
        except OSError:
            raise NotFound("%s vanished" % name)
        try:
            st = os.fstat(handle.fileno())
            head = handle.read(StagedBlob.SNIFF_BYTES)
            etag = '"%s"' % sha256
            headers = {"ETag": etag, "Last-Modified": http_date(st.st_mtime),
                       "Accept-Ranges": "bytes", "Content-Type": guess_mime(head, name),
                       "Content-Disposition": content_disposition(name),
                       "X-Content-Type-Options": "nosniff",
                       "Content-Security-Policy": "sandbox"}
            if expires:
                headers["X-Bucket-Expires"] = http_date(expires)
            if self.not_modified(etag, st.st_mtime):
                self.wfile.write(self.send_head_lines(304, {
                    key: headers[key] for key in ("ETag", "Last-Modified")}))
                return
            start, end, status = self.byte_range(st.st_size, etag, st.st_mtime)
            headers["Content-Length"] = str(end - start)
            if status == 206:
                headers["Content-Range"] = "bytes %d-%d/%d" % (start, end - 1, st.st_size)
            self.wfile.write(self.send_head_lines(status, headers))
            if self.command != "HEAD" and end > start:
                handle.seek(start)  # TLS falls back to send(), which reads from here
                self.connection.sendfile(handle, start, end - start)
                self.response_bytes += end - start
        finally:
            handle.close()

    def not_modified(self, etag, mtime):
        match = self.headers.get("if-none-match")
        if match is not None:
            tags = [tag.strip().replace("W/", "", 1) for tag in match.split(",")]
            return etag in tags or "*" in tags
        since = parse_http_date(self.headers.get("if-modified-since", ""))
        return since is not None and int(mtime) <= since

    def byte_range(self, size, etag, mtime):
        """(start, end, status) for the request's Range (RFC 9110 14.2).

        Several ranges, or an If-Range that no longer matches, get the whole
        file (200).  Raises RangeNotSatisfiable (416) with Content-Range.
        """
        spec = self.headers.get("range")
        if not spec or self.command not in ("GET", "HEAD"):
            return 0, size, 200
        if_range = self.headers.get("if-range")
        if if_range and if_range.strip() != etag and parse_http_date(if_range) != int(mtime):
            return 0, size, 200
        unit, _, ranges = spec.partition("=")
        if unit.strip().lower() != "bytes" or "," in ranges:
            return 0, size, 200
        first, dash, last = ranges.strip().partition("-")
        unsatisfiable = RangeNotSatisfiable("range %r not satisfiable for %d bytes" % (spec, size),
                                            headers={"Content-Range": "bytes */%d" % size})
        if not dash or not (first.isdigit() or last.isdigit()) or \
                (first and not first.isdigit()) or (last and not last.isdigit()):
            return 0, size, 200  # not a valid range: ignored, as RFC 9110 allows
        if not first:
            length = int(last)
            if length == 0 or size == 0:
                raise unsatisfiable
            return max(0, size - length), size, 206
        start = int(first)
        end = min(int(last) + 1, size) if last else size
        if start >= size or (last and int(last) < start):
            raise unsatisfiable
        return start, end, 206

    def send_listing(self, path, relpath):
        """A directory as JSON or HTML, streamed (or paged).  JSON is sorted
        by name; HTML by ``?sort=name|size|made`` and ``?order=asc|desc``
        (size and made need every entry read first)."""
        store = self.server.store
        names = sorted(entry.name for entry in os.scandir(path)
                       if not entry.name.startswith(RESERVED_PREFIX))
        made = store.made_times(path)
        wants_json = self.wants_json()
        sort = self.query.get("sort", "name")
        order = self.query.get("order", "asc")
        if sort not in LISTING_SORTS or order not in ("asc", "desc"):
            raise BadRequest("sort must be one of %s and order asc or desc"
                             % ", ".join(LISTING_SORTS))
        entries = None
        if not wants_json and (sort != "name" or order != "asc"):
            entries = [listing_entry(store, path, name, made) for name in names]
            entries.sort(key=lambda entry: (entry.get(sort if sort != "name" else "name", 0),
                                            entry["name"]), reverse=order == "desc")
            names = [entry["name"] for entry in entries]
        after = self.query.get("after")
        if after:
            names = names[names.index(after) + 1:] if after in names else \
                names[bisect.bisect_right(names, after):]
        limit_text = self.query.get("limit", "" if wants_json else str(LISTING_PAGE))
        next_marker = None
        if limit_text:
            if not limit_text.isdigit() or int(limit_text) == 0:
                raise BadRequest("limit must be a positive integer")
            limit = int(limit_text)
            if len(names) > limit:
                next_marker = names[limit - 1]
            names = names[:limit]
        if not wants_json and not self.url_path.endswith("/"):
            location = self.url_path + "/" + ("?" + self.query_text() if "?" in self.path else "")
            self.send(301, b"", "text/plain", {"Location": location})
            return
        writer = self.start_stream(200, "application/json" if wants_json
                                   else "text/html; charset=utf-8")
        if writer is None:
            return
        by_name = {entry["name"]: entry for entry in entries or ()}

        trees = relpath.count("/") == 2 and relpath.startswith("explode/")

        def entry_of(name):
            entry = by_name.get(name) or listing_entry(store, path, name, made)
            if trees and not wants_json and len(name) == 64:
                archive = store.blob_name(name)  # an expanded tree: named after its archive
                if archive:
                    entry["label"] = archive + " (expanded)"
            return entry
        if wants_json:
            writer.write(('{"path": %s, "entries": [' % json.dumps(relpath + "/")).encode())
            for number, name in enumerate(names):
                writer.write(((",\n" if number else "\n") + json.dumps(entry_of(name)))
                             .encode("utf-8"))
            writer.write(('\n], "count": %d, "next": %s}\n'
                          % (len(names), json.dumps(next_marker))).encode())
        else:
            can_delete = relpath.split("/", 1)[0] in ("files", "replica")
            parts = relpath.split("/")
            archive = store.blob_name(parts[3]) if parts[0] == "explode" and len(parts) > 3 \
                and len(parts[3]) == 64 else None
            title, labels = listing_title(relpath, archive)
            writer.write(listing_html_head(relpath, sort, order, can_delete, title, labels)
                         .encode("utf-8"))
            for name in names:
                writer.write(listing_html_row(entry_of(name), relpath, can_delete)
                             .encode("utf-8"))
            writer.write(listing_html_tail(next_marker, sort, order).encode("utf-8"))
        writer.close()
        self.response_bytes += writer.sent

    def start_stream(self, status, content_type, headers=None):
        """Send the head of a streamed response; a writer, or None for HEAD."""
        chunked = self.request_version == "HTTP/1.1"
        all_headers = {"Content-Type": content_type}
        all_headers.update(headers or {})
        if chunked:
            all_headers["Transfer-Encoding"] = "chunked"
        else:
            self.close_connection = True
        if self.command == "HEAD":
            all_headers.pop("Transfer-Encoding", None)
            all_headers["Content-Length"] = "0"
            self.wfile.write(self.send_head_lines(status, all_headers))
            return None
        self.wfile.write(self.send_head_lines(status, all_headers))
        return ChunkedWriter(self.wfile, chunked)

    def send_tree_archive(self, path, name, kind):
        """?download=zip|tar.gz: the tree streamed as an archive, not on disk."""
        if kind not in ("zip", "tar.gz", "tgz", "tar"):
            raise BadRequest("download must be zip, tar.gz or tar, got %r" % kind)
        suffix = {"tgz": "tar.gz"}.get(kind, kind)
        mime = {"zip": "application/zip", "tar": "application/x-tar"}.get(suffix, "application/gzip")
        writer = self.start_stream(200, mime, {
            "Content-Disposition": content_disposition(name + "." + suffix, "attachment")})
        if writer is None:
            return
        if suffix == "zip":
            write_tree_zip(writer, path)
        else:
            write_tree_tar(writer, path, "w|gz" if suffix == "tar.gz" else "w|")
        writer.close()
        self.response_bytes += writer.sent

    def route_delete_path(self):
        top, segments, path = self.resolve(follow=False)
        if not segments:
            raise BadRequest("DELETE needs a path under /%s/" % top)
        store = self.server.store
        relpath = "/".join([top] + segments)
        if os.path.islink(path):
            os.unlink(path)
            counts = (1, 0)
        elif os.path.isdir(path):
            counts = store.remove_tree(path)
        elif os.path.isfile(path):
            counts = store.remove_name(path)
        else:
            raise NotFound("%s not found" % relpath)
        self.send_json(200, {"code": 200, "status": "Success", "deleted": relpath,
                             "names": counts[0], "reclaimed": counts[1]})


# ===========================================================================
# Client: push and pull -- this file as the command CI jobs run
# ===========================================================================
#
#     python3 http_bucket.py push [options] PATH... --to URL
#     python3 http_bucket.py pull [options] URL DIR
#
# The client speaks HTTP only (to this server, or through a proxy before
# it) and shares with the sections above just the name rules and a few
# helpers.  Every request goes through http.client, one keep-alive
# connection per worker thread.  Large files are uploaded resumably with
# the draft's "careful" creation: an empty request with Upload-Complete: ?0
# gets the Location at once, then one PATCH sends the bytes.  That needs
# no interim responses, which http.client cannot read (it takes a 104 for
# the final answer), and a cut can never come before the Location is
# known; it costs one round trip per large file.
#
# The path of a push: collect_sources walks the arguments into PushItems,
# hash_items hashes them in threads, skip_unchanged lists the target folders
# (a name already holding the content is skipped), missing_digests asks the
# batch lookup once per 10,000 digests, and push_item deploys present
# content (no body) or uploads the rest, retried by RetryPolicy.

CLIENT_JOBS = 4                     # parallel transfers (-j, BUCKET_JOBS)
CLIENT_RETRIES = 5                  # retries after the first attempt
                                    # (--retries, BUCKET_RETRIES)
RETRY_FIRST = 0.5                   # seconds before the first retry, doubled
RETRY_LONGEST = 30.0                # ... each time up to this; the wait is
                                    # jittered to 50-100 % so that many jobs
                                    # retrying one server spread out
RETRY_AFTER_LONGEST = 300.0         # a server's Retry-After is waited up to this
RETRIED_STATUSES = frozenset((408, 423, 429, 500, 502, 503, 504, 507))
                                    # 507 only with Retry-After: without it
                                    # the upload never fits
RESUMABLE_FROM = 16 * 1024 * 1024   # bytes: files this large are uploaded
                                    # resumably (one more round trip each)
CLIENT_TIMEOUT = 300.0              # seconds one socket read may wait: the
                                    # answer to a large archive comes after
                                    # it is expanded
HASH_THREADS = min(8, os.cpu_count() or 2)  # hashlib releases the GIL
LISTING_BATCH = 1000                # entries per listing request (?limit=)
PROGRESS_REDRAW = 0.25              # seconds between redraws of the live line
PROGRESS_LOG_EVERY = 10.0           # seconds between progress lines in logs
PART_PREFIX = ".bucket-part-"       # pull's unfinished downloads, beside
                                    # their file: resumed by the next run
CLIENT_COMMANDS = ("push", "pull")


class TransferError(Exception):
    """A request that failed.  ``status`` is the HTTP status (None: no
    answer, the connection failed), ``message`` says why (the server's
    ``error`` text when it sent one), ``retry_after`` is the server's
    Retry-After in seconds or None.  ``fatal``: no other request of the
    run can succeed either (a refused token, an unreachable server);
    ``unreachable``: no connection could be made; ``final``: trying
    again cannot help."""

    def __init__(self, message, status=None, retry_after=None, fatal=False,
                 unreachable=False, final=False):
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.fatal = fatal
        self.unreachable = unreachable
        self.final = final  # trying again cannot help (a file that changed)

    def retryable(self):
        if self.fatal or self.final:
            return False
        if self.status is None:
            return True
        if self.status == 507:
            return self.retry_after is not None
        return self.status in RETRIED_STATUSES

    def __str__(self):
        return self.message if self.status is None else "%d %s" % (self.status, self.message)


class UsageError(Exception):
    """A command line that cannot run (exit status 2)."""


# -- addresses -----------------------------------------------------------------


class BucketURL(collections.namedtuple("BucketURL", "root top segments slash")):
    """A URL of a bucket split where the server's own paths begin:
    ``root`` (scheme, host and any prefix, ending with "/"), ``top``
    (``files``, ``upload``, ...), ``segments`` (decoded) and ``slash``
    (whether the URL ended with one)."""

    @classmethod
    def parse(cls, text, tops):
        """Raises UsageError unless ``text`` is an http(s) URL with one of
        ``tops`` as a path segment (the first one is taken)."""
        parts = urllib.parse.urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError("%s is not an http:// or https:// URL" % text)
        if parts.query or parts.fragment:
            raise UsageError("%s: a bucket URL takes no ?query or #fragment" % text)
        pieces = parts.path.split("/")
        for index, piece in enumerate(pieces):
            if piece in tops:
                root = urllib.parse.urlunsplit(
                    (parts.scheme, parts.netloc, "/".join(pieces[:index]) + "/", "", ""))
                segments = [urllib.parse.unquote(p) for p in pieces[index + 1:] if p]
                return cls(root, piece, segments, parts.path.endswith("/"))
        raise UsageError("%s names no path under %s" % (
            text, " or ".join("/%s/" % top for top in tops)))


def url_path(top, segments, folder=False):
    """``/top/seg/...`` percent-encoded (UTF-8), a trailing slash for a
    ``folder``; relative to a Remote's root."""
    path = "/".join([top] + [urllib.parse.quote(s, safe="") for s in segments])
    return path + "/" if folder else path


def proxy_for(scheme, host):
    """(host, port, Proxy-Authorization value or None) of the proxy that
    HTTP_PROXY / HTTPS_PROXY name for ``scheme``, unless NO_PROXY covers
    ``host``; None for a direct connection."""
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(scheme)
    if not proxy or urllib.request.proxy_bypass_environment(host, proxies):
        return None
    if "://" not in proxy:
        proxy = "http://" + proxy
    parts = urllib.parse.urlsplit(proxy)
    auth = None
    if parts.username is not None:
        pair = "%s:%s" % (urllib.parse.unquote(parts.username),
                          urllib.parse.unquote(parts.password or ""))
        auth = "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")
    return parts.hostname, parts.port or 80, auth


# -- requests ------------------------------------------------------------------


class Answer:
    """A response: ``status``, ``headers`` (http.client's message),
    ``body`` (bytes, read whole) or ``response`` (streamed: the caller
    reads it to the end, or calls Remote.discard)."""

    def __init__(self, status, headers, body=b"", response=None):
        self.status = status
        self.headers = headers
        self.body = body
        self.response = response

    def json(self):
        try:
            return json.loads(self.body.decode("utf-8"))
        except ValueError:
            raise TransferError("the answer is not JSON: %r" % self.body[:120], self.status)


class FileBody:
    """``length`` bytes of the file at ``path`` from ``offset``, as a
    request body; ``sent(n)`` is called as they go.  The file is opened
    for each attempt and closed after it."""

    def __init__(self, path, offset, length, sent=None):
        self.path = path
        self.offset = offset
        self.length = length
        self.sent = sent or (lambda count: None)

    def send_to(self, connection):
        """Send the bytes on ``connection`` (an http.client connection whose
        head was sent), a CHUNK_SIZE at a time through one buffer.  (Plain
        sockets' sendfile was slower here: 1 GiB took 7.4 s against 4.4 s,
        its non-blocking sends with a timeout waking for every few KiB.)"""
        buffer = bytearray(CHUNK_SIZE)
        view = memoryview(buffer)
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            left = self.length
            while left:
                count = handle.readinto(view[:min(CHUNK_SIZE, left)])
                if not count:
                    raise TransferError("it shrank while it was sent", final=True)
                connection.sock.sendall(view[:count])
                left -= count
                self.sent(count)


def error_of(status, reason, headers, body):
    """The TransferError of an error answer: the server's JSON ``error``
    text when there is one, else the reason phrase and the body's start."""
    message = None
    try:
        message = json.loads(body.decode("utf-8")).get("error")
    except (ValueError, AttributeError):
        pass
    if not message:
        text = body[:200].decode("utf-8", "replace").strip()
        message = reason + (": " + text if text else "")
    retry_after = None
    value = (headers.get("Retry-After") or "").strip()
    if value.isdigit():
        retry_after = float(value)
    elif value:
        moment = parse_http_date(value)
        retry_after = None if moment is None else max(0.0, moment - time.time())
    return TransferError(message, status, retry_after, fatal=status in (401, 403))


def connection_error(exc, where):
    """The TransferError of a failed connection: ``unreachable`` when no
    connection could be made at all (refused, unknown host)."""
    unreachable = isinstance(exc, (ConnectionRefusedError, socket.gaierror))
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TransferError("TLS: %s (--cacert names a CA file)" % exc.verify_message,
                             fatal=True)
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    if isinstance(exc, socket.gaierror):
        text = "cannot resolve the host name (%s)" % text
    return TransferError("%s: %s" % (where, text), unreachable=unreachable)


class Remote:
    """A server as the client sees it: its root URL, token, TLS context
    and proxy, with one keep-alive connection per thread.

    ``request`` sends one request and returns an Answer, raising
    TransferError for an error status (unless in ``accept``) and for a
    failed connection.  The token goes in every request and in nothing
    else: no message of the client contains it.
    """

    def __init__(self, root, token=None, cacert=None, timeout=CLIENT_TIMEOUT):
        parts = urllib.parse.urlsplit(root)
        self.root = root
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.netloc = parts.netloc.rpartition("@")[2]
        self.base = parts.path if parts.path.endswith("/") else parts.path + "/"
        self.token = token
        self.timeout = timeout
        self.context = None
        if self.scheme == "https":
            self.context = ssl.create_default_context(cafile=cacert)
        self.proxy = proxy_for(self.scheme, self.netloc)
        self.local = threading.local()
        self.lock = threading.Lock()
        self.opened = []

    def url(self, path):
        """The absolute URL of ``path`` (relative to the root), for messages."""
        return "%s://%s%s%s" % (self.scheme, self.netloc, self.base, path)

    def target(self, path):
        """The request target: an origin path, or the absolute URL that a
        plain-HTTP proxy needs."""
        origin = self.base + path
        if self.proxy and self.scheme == "http":
            return "http://%s%s" % (self.netloc, origin)
        return origin

    def connection(self):
        """This thread's connection; a new one when the server closed the
        last (a readable idle socket is the server's close)."""
        conn = getattr(self.local, "conn", None)
        if conn is not None and conn.sock is not None:
            try:
                readable = select.select([conn.sock], [], [], 0)[0]
            except (OSError, ValueError):
                readable = True
            if readable:
                conn.close()
        if conn is None:
            conn = self.new_connection()
            self.local.conn = conn
        return conn

    def new_connection(self):
        if self.proxy:
            host, port, auth = self.proxy
        else:
            host, port, auth = self.host, self.port, None
        if self.scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=self.timeout,
                                               context=self.context)
            if self.proxy:
                conn.set_tunnel(self.host, self.port,
                                {"Proxy-Authorization": auth} if auth else None)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        with self.lock:
            self.opened.append(conn)
        return conn

    def relative(self, location, path):
        """A Location header (absolute, or relative to ``path``) as a
        path relative to the root; TransferError when it lies elsewhere."""
        absolute = urllib.parse.urljoin(self.base + path, location)
        found = urllib.parse.urlsplit(absolute).path
        if not found.startswith(self.base):
            raise TransferError("the server's Location %s is outside %s" % (location, self.root),
                                final=True)
        return found[len(self.base):]

    def drop(self):
        """Close this thread's connection (after a failure mid-request)."""
        conn = getattr(self.local, "conn", None)
        if conn is not None:
            conn.close()

    def close_all(self):
        """Close every connection, also those other threads are blocked on
        (shutdown wakes a blocked recv or send; close alone does not)."""
        with self.lock:
            for conn in self.opened:
                if conn.sock is not None:
                    try:
                        conn.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                conn.close()
            self.opened = []

    def request(self, method, path, headers=None, body=b"", accept=(), stream=False):
        """Send one request; an Answer for a 2xx/3xx status or one in
        ``accept``.  ``body``: bytes or a FileBody.  ``stream``: the
        answer's body is left to read from ``answer.response``."""
        conn = self.connection()
        all_headers = {"User-Agent": "http_bucket/%s" % __version__}
        if self.token:
            all_headers["Authorization"] = "Bearer " + self.token
        if self.proxy and self.proxy[2] and self.scheme == "http":
            all_headers["Proxy-Authorization"] = self.proxy[2]
        all_headers.update(headers or {})
        length = body.length if isinstance(body, FileBody) else len(body)
        if length or method in ("PUT", "POST", "PATCH"):
            all_headers["Content-Length"] = str(length)
        try:
            response = self.exchange(conn, method, path, all_headers, body)
        except TransferError:
            conn.close()
            raise
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise connection_error(exc, self.url(path))
        if response.status >= 400 and response.status not in accept:
            data = self.read_body(response, path)
            raise error_of(response.status, response.reason, response.headers, data)
        if stream:
            return Answer(response.status, response.headers, response=response)
        return Answer(response.status, response.headers, self.read_body(response, path))

    def exchange(self, conn, method, path, headers, body):
        """Write the request, read the head of its answer.  A connection
        broken while the body goes may still hold the server's early answer
        (a 507 or 413 before the body is read): that answer is returned."""
        conn.putrequest(method, self.target(path), skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        try:
            if isinstance(body, FileBody):
                body.send_to(conn)
            elif body:
                conn.send(body)
        except (BrokenPipeError, ConnectionResetError) as exc:
            try:
                return conn.getresponse()
            except (OSError, http.client.HTTPException):
                raise exc  # no early answer: the broken send is what happened
        return conn.getresponse()

    def read_body(self, response, path):
        """The whole body of ``response`` (to ``path``); TransferError when
        the connection fails first."""
        try:
            return response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.drop()
            raise connection_error(exc, self.url(path))

    def discard(self, answer):
        """Give up a streamed answer: its connection cannot be reused."""
        answer.response.close()
        self.drop()


class RetryPolicy:
    """Retries with exponential backoff and jitter: after failure ``n``
    (1, 2, ...) it waits RETRY_FIRST * 2**(n-1), at most RETRY_LONGEST,
    times 0.5-1.0 at random -- or the server's Retry-After when it sent
    one (up to RETRY_AFTER_LONGEST).  ``retries`` failures in a row are
    retried; the next one is raised.  ``stop`` (an Event) ends the waits."""

    def __init__(self, retries, say, stop):
        self.retries = retries
        self.say = say
        self.stop = stop

    def delay(self, failures, retry_after):
        if retry_after is not None:
            return min(retry_after, RETRY_AFTER_LONGEST)
        return min(RETRY_FIRST * 2 ** (failures - 1), RETRY_LONGEST) * random.uniform(0.5, 1.0)

    def wait(self, failures, exc, what):
        """After ``failures`` failures in a row (the last one ``exc``):
        raise it when it is not retried, else wait before the next try."""
        if not exc.retryable() or failures > self.retries or self.stop.is_set():
            if exc.unreachable:
                exc.fatal = True  # every retry found no server: no other request will
            raise exc
        pause = self.delay(failures, exc.retry_after)
        self.say("retry %d/%d of %s in %.1f s: %s" % (failures, self.retries, what, pause, exc))
        if self.stop.wait(pause):
            raise exc

    def run(self, attempt, what):
        """``attempt()``'s value, retrying the TransferErrors worth it."""
        failures = 0
        while True:
            try:
                return attempt()
            except TransferError as exc:
                failures += 1
                self.wait(failures, exc, what)


# -- progress and the summary --------------------------------------------------


class Progress:
    """What a run has done, shown as it goes: one live line redrawn on a
    terminal, a line at most every PROGRESS_LOG_EVERY s otherwise (CI
    logs), nothing but failures when ``quiet``.  Thread-safe.

    ``phase`` starts counting toward a number of files and bytes;
    ``advance`` adds bytes done (``rewind`` takes back those a resumed
    transfer sends again); ``finish`` counts a file under an outcome;
    ``say`` prints a line above the live one.
    """

    def __init__(self, command, stream, live, quiet):
        self.command = command
        self.stream = stream
        self.live = live
        self.quiet = quiet
        self.lock = threading.Lock()
        self.outcomes = collections.Counter()
        self.failures = []
        self.wire_bytes = 0
        self.started = time.monotonic()
        self.phase("", 0, 0)
        self.shown = ""
        self.stopping = threading.Event()
        self.ticker = None

    def phase(self, label, files, size):
        with self.lock:
            self.label, self.files, self.size = label, files, size
            self.files_done = self.bytes_done = 0
            self.phase_started = time.monotonic()
            self.last_logged = self.phase_started

    def advance(self, count, wire=True):
        with self.lock:
            self.bytes_done += count
            if wire:
                self.wire_bytes += count

    def rewind(self, count):
        with self.lock:
            self.bytes_done -= count

    def count_file(self):
        with self.lock:
            self.files_done += 1

    def finish(self, outcome, name=None, detail=None, always=False):
        with self.lock:
            self.outcomes[outcome] += 1
            self.files_done += 1
        if detail and name:
            self.say("%s %s%s" % (outcome, name, detail), always)

    def fail(self, name, error):
        with self.lock:
            self.outcomes["failed"] += 1
            self.files_done += 1
            self.failures.append({"file": name, "error": str(error)})
        self.say("failed: %s: %s" % (name, error), always=True)

    def line(self):
        elapsed = max(time.monotonic() - self.phase_started, 1e-6)
        rate = self.bytes_done / elapsed
        text = "%s: %s %d/%d files, %s/%s" % (
            self.command, self.label, self.files_done, self.files,
            human_bytes(self.bytes_done), human_bytes(self.size))
        if self.bytes_done and elapsed > 0.5:
            eta = (self.size - self.bytes_done) / rate if rate else 0
            text += ", %s/s, ETA %s" % (human_bytes(rate), _duration(max(eta, 0)))
        return text

    def say(self, text, always=False):
        if self.quiet and not always:
            return
        with self.lock:
            if self.live and self.shown:
                self.stream.write("\r\x1b[K")
            self.stream.write(text + "\n")
            if self.live and self.shown:
                self.stream.write(self.shown)
            self.stream.flush()

    def tick(self):
        with self.lock:
            now = time.monotonic()
            if self.live:
                self.shown = self.line()[:_terminal_width() - 1]
                self.stream.write("\r\x1b[K" + self.shown)
            elif now - self.last_logged >= PROGRESS_LOG_EVERY and self.files:
                self.last_logged = now
                self.stream.write(self.line() + "\n")
            else:
                return
            self.stream.flush()

    def start(self):
        if self.quiet:
            return self
        self.ticker = threading.Thread(target=self._run, name="progress", daemon=True)
        self.ticker.start()
        return self

    def _run(self):
        while True:
            self.tick()
            if self.stopping.wait(PROGRESS_REDRAW if self.live else 1.0):
                return

    def stop(self):
        self.stopping.set()
        if self.ticker is not None:
            self.ticker.join()
        with self.lock:
            if self.live and self.shown:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
            self.shown = ""

    def seconds(self):
        return time.monotonic() - self.started


class Tally:
    """The bytes of one file counted in a Progress so far: ``add`` counts
    sent bytes, ``settle(n)`` leaves exactly ``n`` of them counted as done
    (what the server kept after a cut) without touching the bytes sent."""

    def __init__(self, progress):
        self.progress = progress
        self.count = 0

    def add(self, count):
        self.count += count
        self.progress.advance(count)

    def settle(self, count):
        self.progress.rewind(self.count - count)
        self.count = count


def _duration(seconds):
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return "%d s" % seconds
    return "%d:%02d" % divmod(seconds, 60) if seconds < 3600 else \
        "%d:%02d:%02d" % (seconds // 3600, seconds % 3600 // 60, seconds % 60)


def _terminal_width():
    return shutil.get_terminal_size((100, 24)).columns


# -- push: what to send ----------------------------------------------------------


class PushItem:
    """A local file and where it goes: ``path`` (local), ``segments``
    (the remote name under the destination, as a list), ``size``,
    ``stamp`` (size and mtime when walked), ``sha256`` once hashed,
    ``action`` ("send", "deploy", "skip"), ``error`` when it cannot go."""

    __slots__ = ("path", "segments", "size", "stamp", "sha256", "action", "error")

    def __init__(self, path, segments, st):
        self.path = path
        self.segments = segments
        self.size = st.st_size
        self.stamp = file_stamp(st)
        self.sha256 = None
        self.action = None
        self.error = None

    @property
    def name(self):
        return "/".join(self.segments)


def file_stamp(st):
    """What tells a file changed without reading it: size and mtime."""
    return (st.st_size, st.st_mtime_ns)


class Destination(collections.namedtuple("Destination", "root top segments exact")):
    """Where push puts files: the server ``root``, ``top`` ("files" or
    "upload"), the folder ``segments`` under files/ (or the one name
    under upload/) and ``exact``: the URL names the one file pushed."""

    def remote_segments(self, item_segments):
        """The path under ``top`` for a file whose relative name is
        ``item_segments``."""
        if self.exact:
            return list(self.segments)
        if self.top == "upload":
            return [item_segments[-1]]  # /upload has no folders
        return list(self.segments) + list(item_segments)


def push_destination(url, sources):
    """The Destination of ``--to url`` for ``sources``: a URL ending in
    "/" (or given several sources, or a folder) is a folder; a URL without
    it, given one file, is that file's name.  Raises UsageError."""
    parsed = BucketURL.parse(url, ("files", "upload"))
    one_file = len(sources) == 1 and os.path.isfile(sources[0])
    exact = bool(parsed.segments) and not parsed.slash and one_file
    if parsed.top == "upload" and parsed.segments and not exact:
        raise UsageError("--to %s: /upload/<name> takes one file; /upload/ takes many" % url)
    for segment in parsed.segments:
        try:
            check_new_name(segment, "--to path")
        except BucketError as exc:
            raise UsageError("--to %s: %s" % (url, exc.message))
    return Destination(parsed.root, parsed.top, parsed.segments, exact)


def excluded(relative, patterns):
    """Whether a path relative to its pushed folder (with "/") or its last
    segment matches one of the --exclude globs."""
    name = relative.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(relative, p) or fnmatch.fnmatchcase(name, p)
               for p in patterns)


def collect_sources(sources, patterns):
    """PushItems of every file under ``sources``, in order.

    A file is pushed as its base name; a folder as itself (``build`` ->
    ``build/...``), or its contents when the argument ends with "/" or is
    "." (``build/`` -> ``...``), as rsync does.  Symlinks to files are
    followed, symlinks to folders and special files are not pushed.
    Raises UsageError for a source that does not exist.
    """
    items = []
    for source in sources:
        try:
            st = os.stat(source)
        except OSError as exc:
            raise UsageError("%s: %s" % (source, exc.strerror or exc))
        if stat.S_ISREG(st.st_mode):
            items.append(PushItem(source, [os.path.basename(source)], st))
        elif stat.S_ISDIR(st.st_mode):
            contents = source.endswith(("/", os.sep)) or os.path.basename(source) in (".", "")
            top = [] if contents else [os.path.basename(os.path.abspath(source))]
            items.extend(walk_folder(source, top, patterns))
        else:
            raise UsageError("%s: not a file or folder" % source)
    return items


def walk_folder(folder, top, patterns):
    """PushItems of the regular files under ``folder``, sorted, named
    ``top + relative segments``; excluded names are pruned."""
    for parent, dirs, names in os.walk(folder):
        relative = os.path.relpath(parent, folder)
        prefix = [] if relative == "." else relative.split(os.sep)
        dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(parent, d))
                         and not excluded("/".join(prefix + [d]), patterns))
        for name in sorted(names):
            if excluded("/".join(prefix + [name]), patterns):
                continue
            path = os.path.join(parent, name)
            try:
                st = os.stat(path)
            except OSError:
                continue  # a dangling link, or gone since the listing
            if stat.S_ISREG(st.st_mode):
                yield PushItem(path, top + prefix + [name], st)


def check_remote_name(item):
    """Refuse, as the server would, a name it cannot hold: sets
    ``item.error`` and returns False."""
    try:
        for segment in item.segments:
            segment.encode("utf-8")
            check_new_name(segment, "name")
    except UnicodeEncodeError:
        item.error = "the name is not UTF-8, which URLs need"
    except BucketError as exc:
        item.error = "the server would refuse the name: " + exc.message
    return item.error is None


def check_one_source_per_name(destination, items):
    """Under /files two files pushed to one name would race (the last
    one's content would win): every one after the first fails, named."""
    if destination.top != "files":
        return
    first = {}
    for item in items:
        name = "/".join(destination.remote_segments(item.segments))
        if name in first and item.error is None:
            item.error = "files/%s is where %s goes already" % (name, first[name])
        first.setdefault(name, item.path)


def hash_file(path, stamp):
    """The sha256 of the file at ``path``; TransferError when it changed
    since ``stamp`` was taken, or while it was read."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    with open(path, "rb") as handle:
        if file_stamp(os.fstat(handle.fileno())) != stamp:
            raise TransferError("changed since it was listed; nothing was sent")
        while True:
            count = handle.readinto(buffer)
            if not count:
                break
            digest.update(view[:count])
        if file_stamp(os.fstat(handle.fileno())) != stamp:
            raise TransferError("changed while it was hashed; nothing was sent")
    return digest.hexdigest()


def hash_items(items, progress, stop):
    """Set ``sha256`` of every item, HASH_THREADS at a time; an item that
    cannot be read gets its ``error``."""
    def one(item):
        if stop.is_set():
            return
        try:
            item.sha256 = hash_file(item.path, item.stamp)
        except TransferError as exc:
            item.error = exc.message
        except OSError as exc:
            item.error = "cannot read it: %s" % (exc.strerror or exc)
        progress.advance(item.size, wire=False)
        progress.count_file()

    progress.phase("hashing", len(items), sum(item.size for item in items))
    with concurrent.futures.ThreadPoolExecutor(HASH_THREADS) as pool:
        list(pool.map(one, items))


# -- push: what the server has -------------------------------------------------


def missing_digests(run, digests):
    """The set of ``digests`` (sha256 hex) the server does not store: one
    POST /checksum per MAX_BATCH_DIGESTS."""
    missing = set()
    digests = sorted(set(digests))
    for start in range(0, len(digests), MAX_BATCH_DIGESTS):
        batch = digests[start:start + MAX_BATCH_DIGESTS]
        body = json.dumps({"digests": batch}).encode()
        answer = run.policy.run(lambda: run.remote.request(
            "POST", "checksum", {"Content-Type": "application/json"}, body), "the batch lookup")
        found = answer.json()
        if not isinstance(found.get("missing"), list):
            raise TransferError("the batch lookup's answer has no \"missing\" list "
                                "(is this an http_bucket server?)")
        missing.update(found["missing"])
    return missing


def list_folder(run, top, segments):
    """{name: entry} of a remote folder's JSON listing, every page of it;
    {} when there is no such folder (404, or a file: its body is not read)."""
    entries, after = {}, None
    while True:
        query = "?format=json&limit=%d" % LISTING_BATCH
        if after:
            query += "&after=" + urllib.parse.quote(after, safe="")
        path = url_path(top, segments, folder=True) + query
        answer = run.policy.run(lambda: run.remote.request(
            "GET", path, {"Accept": "application/json"}, accept=(404,), stream=True),
            "the listing of %s/" % "/".join([top] + segments))
        if answer.status == 404 or "json" not in answer.headers.get("Content-Type", ""):
            run.remote.discard(answer)
            return entries
        answer.body = run.remote.read_body(answer.response, path)
        page = answer.json()
        for entry in page.get("entries", []):
            entries[entry.get("name")] = entry
        after = page.get("next")
        if not after:
            return entries


def skip_unchanged(run, items):
    """Mark ``skip`` the items whose remote name already holds their
    content with no expiry, when the push asks nothing new of them (no
    --meta, --retain-days, --keep; not --force).  One listing per folder."""
    if run.destination.top != "files" or run.options.force or run.upload_headers:
        return
    folders = {}
    for item in items:
        remote = run.destination.remote_segments(item.segments)
        folders.setdefault(tuple(remote[:-1]), []).append((remote[-1], item))
    def check(folder):
        listing = list_folder(run, "files", list(folder))
        for name, item in folders[folder]:
            entry = listing.get(name) or {}
            if (entry.get("type") == "file" and entry.get("sha256") == item.sha256
                    and not entry.get("expires")):
                item.action = "skip"
    with concurrent.futures.ThreadPoolExecutor(run.options.jobs) as pool:
        list(pool.map(check, folders))


# -- push: one file --------------------------------------------------------------


def repr_digest(sha256_hex):
    """The RFC 9530 Repr-Digest value of a sha256 given in hex."""
    return "sha-256=:%s:" % base64.b64encode(bytes.fromhex(sha256_hex)).decode("ascii")


def check_receipt(answer, item):
    """The server's receipt must name the content that was hashed."""
    try:
        stored = answer.json()["files"][0]["checksums"]["sha256"]
    except (KeyError, IndexError, TypeError):
        raise TransferError("the answer (%d) is not an upload receipt" % answer.status)
    if stored != item.sha256:
        raise TransferError("the server stored sha256 %s, the file hashed to %s"
                            % (stored, item.sha256))


def deploy_item(run, item, path):
    """Make the name from stored content, sending no body; False when the
    server no longer has it (404), so it must be uploaded."""
    headers = dict(run.upload_headers, **{"X-Checksum-Deploy": "true",
                                          "X-Checksum-Sha256": item.sha256})
    answer = run.policy.run(lambda: run.remote.request("PUT", path, headers, accept=(404,)),
                            item.name)
    if answer.status == 404:
        return False
    check_receipt(answer, item)
    return True


def upload_whole(run, item, path):
    """One PUT of the whole file with its Repr-Digest (the server checks
    it); retried from the start."""
    headers = dict(run.upload_headers, **{"Repr-Digest": repr_digest(item.sha256),
                                          "Content-Type": "application/octet-stream"})
    def attempt():
        sent = Tally(run.progress)
        try:
            return run.remote.request("PUT", path, headers,
                                      FileBody(item.path, 0, item.size, sent.add))
        except TransferError:
            sent.settle(0)  # the bytes of a failed attempt are not done
            raise
    check_receipt(run.policy.run(attempt, item.name), item)


class ResumableUpload:
    """A large file's upload that survives cut connections (the IETF
    resumable-upload draft in its final form: no interop version, so the
    server sends no 104).

    ``create`` makes the upload resource with an empty request (the
    "careful" creation: the Location is known before any byte is at
    risk); ``send`` PATCHes from the server's offset until the receipt,
    and after a cut asks the offset (HEAD) and goes on from there.  A
    failure after which the server holds more bytes than before does not
    count against the retries.
    """

    def __init__(self, run, item, path):
        self.run = run
        self.item = item
        self.path = path
        self.location = None

    def create(self):
        headers = dict(self.run.upload_headers, **{
            "Upload-Complete": "?0", "Upload-Length": str(self.item.size),
            "Repr-Digest": repr_digest(self.item.sha256)})
        answer = self.run.policy.run(
            lambda: self.run.remote.request("PUT", self.path, headers), self.item.name)
        location = answer.headers.get("Location")
        if answer.status != 201 or not location:
            raise TransferError("the server made no resumable upload (%d without Location): "
                                "is it an http_bucket with resumable uploads?" % answer.status,
                                final=True)
        self.location = self.run.remote.relative(location, self.path)

    def state(self):
        """(offset, complete) of the upload on the server; None when it
        is gone (expired, or removed after a digest mismatch)."""
        answer = self.run.remote.request("HEAD", self.location, accept=(404,))
        if answer.status == 404:
            return None
        text = answer.headers.get("Upload-Offset", "")
        if not text.isdigit():
            raise TransferError("HEAD of the upload answered no Upload-Offset", answer.status)
        return int(text), answer.headers.get("Upload-Complete") == "?1"

    def append(self, offset, tally):
        """PATCH the rest of the file from ``offset``: the Answer (the
        receipt, or 409 when the server holds another offset)."""
        headers = {"Upload-Offset": str(offset), "Upload-Complete": "?1",
                   "Content-Type": PARTIAL_UPLOAD}
        body = FileBody(self.item.path, offset, self.item.size - offset, tally.add)
        return self.run.remote.request("PATCH", self.location, headers, body, accept=(409,))

    def send(self):
        """Every byte sent: the receipt's Answer.  Raises TransferError."""
        self.create()
        tally = Tally(self.run.progress)
        failures = offset = 0
        while True:
            failure = None
            try:
                answer = self.append(offset, tally)
                if answer.status != 409:
                    return answer
            except TransferError as exc:
                if exc.status is not None and not exc.retryable():
                    raise
                failure = exc
            state = self.run.policy.run(self.state, "asking the offset of " + self.item.name)
            if state is None:
                tally.settle(0)
                failures += 1
                self.run.policy.wait(failures, TransferError(
                    "the unfinished upload is gone from the server"), self.item.name)
                self.create()
                offset = 0
                continue
            tally.settle(state[0])
            if state[1]:  # complete: the cut took only the answer
                return self.run.remote.request("GET", self.location)
            if failure is not None:
                failures = 1 if state[0] > offset else failures + 1
                self.run.policy.wait(failures, failure, self.item.name)
            offset = state[0]


def push_item(run, item):
    """Deploy, upload or skip one item; its outcome ("sent", "deployed").
    Raises TransferError, also when the file changed while it was pushed
    (what the server then holds is the content that was hashed)."""
    path = url_path(run.destination.top, run.destination.remote_segments(item.segments))
    outcome = "deployed"
    if item.action != "deploy" or not deploy_item(run, item, path):
        outcome = "sent"
        if item.size >= run.options.resumable_from:
            check_receipt(ResumableUpload(run, item, path).send(), item)
        else:
            upload_whole(run, item, path)
    try:
        changed = file_stamp(os.stat(item.path)) != item.stamp
    except OSError:
        changed = True
    if changed:
        raise TransferError("changed while it was pushed: the bucket holds the content it "
                            "had when hashed (sha256 %s); push again" % item.sha256, final=True)
    return outcome


def read_token(options):
    """The token: the first line of --token-file, else BUCKET_TOKEN, else
    None.  Raises UsageError for a file that cannot be read or is empty."""
    if options.token_file:
        try:
            with open(options.token_file, encoding="utf-8") as handle:
                token = handle.readline().strip()
        except OSError as exc:
            raise UsageError("--token-file %s: %s" % (options.token_file, exc.strerror or exc))
        if not token:
            raise UsageError("--token-file %s holds no token" % options.token_file)
        return token
    return os.environ.get("BUCKET_TOKEN") or None


class ClientRun:
    """What one push or pull shares across its threads: ``options``, the
    ``remote``, the retry ``policy``, ``progress``, the ``stop`` event
    (set by a fatal error or Ctrl-C), and for push the ``destination``
    and the ``upload_headers`` every write sends (metadata, retention,
    keep)."""

    def __init__(self, command, options, root, stream):
        self.command = command
        self.options = options
        self.stop = threading.Event()
        live = stream.isatty() and not options.json and not options.quiet
        self.progress = Progress(command, stream, live, options.quiet)
        self.remote = Remote(root, read_token(options), options.cacert, options.timeout)
        self.policy = RetryPolicy(options.retries, self.progress.say, self.stop)
        self.fatal = None
        self.interrupted = False
        self.destination = None
        self.upload_headers = {}

    def each(self, items, work):
        """``work(item)`` for every item on ``options.jobs`` threads;
        returns [(item, outcome or TransferError)] in the order they end.
        A fatal error stops what has not started."""
        def guarded(item):
            if self.stop.is_set():
                return item, None
            try:
                return item, work(item)
            except TransferError as exc:
                if exc.fatal and self.fatal is None:
                    self.fatal = exc
                    self.stop.set()
                return item, exc
            except OSError as exc:
                return item, TransferError(exc.strerror or str(exc), final=True)
        pool = concurrent.futures.ThreadPoolExecutor(self.options.jobs)
        try:
            futures = [pool.submit(guarded, item) for item in items]
            for future in concurrent.futures.as_completed(futures):
                yield future.result()
        except BaseException:  # Ctrl-C: end the transfers running now
            self.stop.set()
            self.remote.close_all()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def close(self):
        self.progress.stop()
        self.remote.close_all()


def upload_headers(options):
    """The headers every write of a push carries: X-Bucket-Meta-<key>,
    X-Retain-Days, X-Bucket-Keep.  Raises UsageError for a bad --meta."""
    headers = {}
    for pair in options.meta:
        key, equals, value = pair.partition("=")
        if not equals or not re.match(r"^[A-Za-z0-9_.-]+$", key):
            raise UsageError("--meta %r: give KEY=VALUE, KEY of A-Z a-z 0-9 _ . -" % pair)
        # Header values travel as ISO-8859-1 in http.client: UTF-8 bytes
        # pass through that way, and the server reads them back as UTF-8.
        headers["X-Bucket-Meta-" + key] = value.encode("utf-8").decode("latin-1")
    if options.retain_days is not None:
        headers["X-Retain-Days"] = "%g" % options.retain_days
    if options.keep:
        headers["X-Bucket-Keep"] = "true"
    return headers


def run_push(options, stream):
    """The push command; the exit status."""
    sources = options.paths
    destination = push_destination(options.to, sources)
    items = collect_sources(sources, options.exclude)
    if destination.exact and len(items) != 1:
        raise UsageError("--to %s names one file; give one file, or end the URL with /"
                         % options.to)
    run = ClientRun("push", options, destination.root, stream)
    run.destination, run.upload_headers = destination, upload_headers(options)
    run.progress.start()
    try:
        return push_all(run, items)
    except TransferError as exc:  # the lookup or a listing failed: nothing was pushed
        run.fatal = exc
        return finish(run, items)
    except KeyboardInterrupt:
        run.interrupted = True
        return finish(run, items)
    finally:
        run.close()


def push_all(run, items):
    """Hash, look up, then deploy or send every item; the exit status."""
    for item in items:
        check_remote_name(item)
    check_one_source_per_name(run.destination, items)
    hash_items([item for item in items if item.error is None], run.progress, run.stop)
    ready = [item for item in items if item.error is None and item.sha256 is not None]
    skip_unchanged(run, ready)
    wanted = [item for item in ready if item.action != "skip"]
    missing = missing_digests(run, [item.sha256 for item in wanted]) if wanted else set()
    for item in wanted:
        item.action = "send" if item.sha256 in missing else "deploy"
    for item in items:
        if item.error is not None:
            run.progress.fail(item.path, item.error)
        elif item.action == "skip":
            run.progress.finish("skipped", item.name, " (unchanged)" if run.options.verbose
                                else None)
    if run.options.dry_run:
        for item in wanted:
            run.progress.finish("would " + item.action, item.name,
                                " (%s)" % human_bytes(item.size), always=True)
        return finish(run, items)
    # Deploys first (no bodies), then the largest files first: the pool's
    # last file is then a small one, not a lone 1 GiB upload.
    wanted.sort(key=lambda item: (item.action == "send", -item.size))
    run.progress.phase("sending", len(wanted), sum(item.size for item in wanted
                                                 if item.action == "send"))
    for item, outcome in run.each(wanted, lambda item: push_item(run, item)):
        if isinstance(outcome, TransferError):
            if not outcome.fatal:
                run.progress.fail(item.path, outcome)
        elif outcome is not None:
            run.progress.finish(outcome, item.name, " (%s)" % human_bytes(item.size)
                                if run.options.verbose else None)
    return finish(run, items)


def finish(run, items, received=False):
    """Print the run's end: its error line, if any, on stderr; the
    summary line (or with --json the report) on stdout.  The exit status:
    0 when every file landed, 1 otherwise."""
    run.progress.stop()
    if run.fatal is not None:
        hint = " (check --token-file or BUCKET_TOKEN)" if run.fatal.status in (401, 403) else ""
        sys.stderr.write("http_bucket %s: error: %s%s\n" % (run.command, run.fatal, hint))
    if run.interrupted:
        sys.stderr.write("http_bucket %s: interrupted\n" % run.command)
    report = run_report(run, items, received)
    if run.options.json:
        sys.stdout.write(json.dumps(report, ensure_ascii=False) + "\n")
    else:
        counts = ", ".join("%d %s" % (run.progress.outcomes[kind], kind)
                           for kind in outcome_kinds(run))
        sys.stdout.write("%s: %d file%s (%s): %s, %d failed; %s %s in %.1f s\n" % (
            run.command, len(items), "" if len(items) == 1 else "s", human_bytes(report["bytes"]),
            counts, report["failed"], human_bytes(run.progress.wire_bytes),
            "received" if received else "sent", report["seconds"]))
    sys.stdout.flush()
    landed = report["failed"] == 0 and run.fatal is None and not run.interrupted
    return 0 if landed else 1


def outcome_kinds(run):
    """The outcomes a summary counts, besides ``failed``."""
    if getattr(run.options, "dry_run", False):
        return ("would send", "would deploy", "skipped")
    return ("sent", "deployed", "skipped") if run.command == "push" else ("fetched", "skipped")


def run_report(run, items, received):
    """The --json object: counts, bytes, seconds, failures, the error."""
    outcomes = run.progress.outcomes
    report = {"command": run.command, "files": len(items),
              "bytes": sum(item.size for item in items)}
    for kind in outcome_kinds(run):
        report[kind.replace(" ", "_")] = outcomes[kind]
    if getattr(run.options, "dry_run", False):
        report.update(sent=0, deployed=0)
    report.update({"failed": outcomes["failed"],
                   "bytes_received" if received else "bytes_sent": run.progress.wire_bytes,
                   "seconds": round(run.progress.seconds(), 3),
                   "failures": run.progress.failures,
                   "error": str(run.fatal) if run.fatal is not None else None})
    return report


# -- pull ------------------------------------------------------------------------


class PullItem:
    """A remote file (or symlink) to fetch: ``segments`` (relative to the
    pulled folder), ``kind`` ("file" or "symlink"), ``size``, ``sha256``
    (from the listing; None when it did not say), ``target`` (a link's)."""

    __slots__ = ("segments", "kind", "size", "sha256", "target")

    def __init__(self, segments, kind, size=0, sha256=None, target=None):
        self.segments = segments
        self.kind = kind
        self.size = size or 0
        self.sha256 = sha256
        self.target = target

    @property
    def name(self):
        return "/".join(self.segments)


def etag_sha256(headers):
    """The sha256 an ETag names (this server's ETag is the quoted sha256)."""
    tag = (headers.get("ETag") or "").strip().replace("W/", "", 1).strip('"').lower()
    return tag if re.match(r"^[0-9a-f]{64}$", tag) else None


def pull_items(run, source):
    """PullItems of everything under the BucketURL ``source`` (a folder,
    walked through its JSON listings, or one file); TransferError when
    it is not there."""
    answer = run.policy.run(lambda: run.remote.request(
        "HEAD", url_path(source.top, source.segments) + "?format=json",
        {"Accept": "application/json"}), "the first look at " + source.top)
    if "json" not in answer.headers.get("Content-Type", ""):
        if not source.segments:
            raise TransferError("%s is not a folder" % source.top, final=True)
        length = answer.headers.get("Content-Length", "0")
        return [PullItem([source.segments[-1]], "file", int(length) if length.isdigit() else 0,
                         etag_sha256(answer.headers))], True
    items, folders = [], [[]]
    while folders:
        relative = folders.pop(0)
        for name, entry in sorted(list_folder(run, source.top,
                                              source.segments + relative).items()):
            kind = entry.get("type")
            if kind == "dir":
                folders.append(relative + [name])
            elif kind in ("file", "symlink"):
                items.append(PullItem(relative + [name], kind, entry.get("size"),
                                      entry.get("sha256"), entry.get("target")))
    return items, False


def local_path(root, segments):
    """The local path of ``segments`` under ``root``, its folders made.

    Raises TransferError (final) for a name that is not one plain path
    segment, or a path that would leave ``root`` through a link already
    there: a listing is data from the network, never trusted with paths.
    """
    for segment in segments:
        try:
            check_segment(segment, "name")
        except BucketError as exc:
            raise TransferError("refused: it would escape %s (%s)" % (root, exc.message),
                                final=True)
    real_root = os.path.realpath(root)
    current = root
    for segment in segments[:-1]:
        current = os.path.join(current, segment)
        try:
            os.mkdir(current)
        except FileExistsError:
            if not os.path.isdir(current):
                raise TransferError("refused: %s is in the way (not a folder)" % current,
                                    final=True)
        real = os.path.realpath(current)
        if real != real_root and not real.startswith(real_root + os.sep):
            raise TransferError("refused: %s leads out of %s" % (current, root), final=True)
    return os.path.join(current, segments[-1])


def same_file(path, item):
    """Whether a regular file at ``path`` already has the item's content."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != item.size or not item.sha256:
        return False
    try:
        return hash_file(path, file_stamp(st)) == item.sha256
    except (OSError, TransferError):
        return False


def part_path(path, item):
    """Where an unfinished download of ``item`` to ``path`` is kept:
    beside it, hidden, named for the name and the content (a name whose
    content changed starts afresh), short enough for any name."""
    key = "%s\0%s" % (os.path.basename(path), item.sha256 or "")
    name = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return os.path.join(os.path.dirname(path), PART_PREFIX + name)


class Download:
    """One file fetched into its part file, resumed with Range (and
    If-Range on the sha256, so a changed file starts again) after a cut,
    in this run or from an earlier one; verified, then renamed into place.
    A failure after which more bytes are here does not count against the
    retries."""

    def __init__(self, run, item, remote_path, path):
        self.run = run
        self.item = item
        self.remote_path = remote_path
        self.path = path
        self.part = part_path(path, item)
        self.digest = None
        self.have = 0
        self.tally = Tally(run.progress)

    def restart(self):
        self.digest, self.have = hashlib.sha256(), 0
        with open(self.part, "wb"):
            pass
        self.tally.settle(0)

    def load_part(self):
        """Hash what an earlier attempt or run left in the part file."""
        self.digest, self.have = hashlib.sha256(), 0
        try:
            with open(self.part, "rb") as handle:
                for data in iter(lambda: handle.read(CHUNK_SIZE), b""):
                    self.digest.update(data)
                    self.have += len(data)
        except FileNotFoundError:
            pass
        if self.have > self.item.size and self.item.size:
            self.restart()
        self.run.progress.advance(self.have, wire=False)
        self.tally.count += self.have

    def attempt(self):
        """One GET from ``have`` on; the sha256 the server's ETag names."""
        headers = {"Accept-Encoding": "identity"}
        if self.have:
            headers["Range"] = "bytes=%d-" % self.have
            if self.item.sha256:
                headers["If-Range"] = '"%s"' % self.item.sha256
        answer = self.run.remote.request("GET", self.remote_path, headers, accept=(416,),
                                         stream=True)
        if answer.status == 416:  # the part is longer than the file now is
            self.run.remote.discard(answer)
            self.restart()
            raise TransferError("the file on the server is shorter than the part fetched")
        start = content_range_start(answer) if answer.status == 206 else 0
        if start != self.have:
            self.restart()
        length = int(answer.headers.get("Content-Length") or -1)
        self.receive(answer.response, length)
        return etag_sha256(answer.headers)

    def receive(self, response, length):
        """Append the body to the part file, hashing it; TransferError
        when the connection ends before ``length`` bytes (-1: unknown)."""
        buffer = bytearray(CHUNK_SIZE)
        view = memoryview(buffer)
        got = 0
        with open(self.part, "ab") as sink:
            while got != length:
                try:
                    count = response.readinto(buffer)
                except (OSError, http.client.HTTPException) as exc:
                    self.run.remote.drop()
                    raise connection_error(exc, self.run.remote.url(self.remote_path))
                if not count:
                    break
                sink.write(view[:count])
                self.digest.update(view[:count])
                self.have += count
                got += count
                self.tally.add(count)
        if length >= 0 and got != length:
            self.run.remote.drop()
            raise TransferError("the connection ended after %d of %d bytes" % (got, length))

    def fetch(self):
        """Fetch, verify and rename into place; raises TransferError."""
        self.load_part()
        failures = 0
        while True:
            before = self.have
            try:
                etag = self.attempt()
                break
            except TransferError as exc:
                if exc.status is not None and not exc.retryable():
                    raise
                failures = 1 if self.have > before else failures + 1
                self.run.policy.wait(failures, exc, self.item.name)
        expected = etag or self.item.sha256
        if expected and self.digest.hexdigest() != expected:
            os.unlink(self.part)
            raise TransferError("sha256 mismatch: the bytes hash to %s, the server says %s"
                                % (self.digest.hexdigest(), expected), final=True)
        os.replace(self.part, self.path)


def content_range_start(answer):
    match = re.match(r"^\s*bytes\s+(\d+)-", answer.headers.get("Content-Range") or "")
    return int(match.group(1)) if match else -1


def pull_link(item, path, root):
    """Make a symlink like the server's, when its target stays under
    ``root``; its outcome, or TransferError (final)."""
    target = item.target or ""
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(item.name), target))
    if not target or target.startswith("/") or joined == ".." or joined.startswith("../"):
        raise TransferError("refused: a link to %r would point out of %s" % (target, root),
                            final=True)
    if os.path.islink(path) and os.readlink(path) == target:
        return "skipped"
    temporary = part_path(path, item)
    _unlink_quietly(temporary)
    os.symlink(target, temporary)
    os.replace(temporary, path)
    return "fetched"


def pull_item(run, root, source, item, single):
    """Fetch one item into ``root`` unless it is already there; its
    outcome ("fetched", "skipped").  Raises TransferError."""
    path = local_path(root, item.segments)
    if item.kind == "symlink":
        return pull_link(item, path, root)
    if os.path.isdir(path) and not os.path.islink(path):
        raise TransferError("refused: %s is a folder here" % path, final=True)
    if same_file(path, item):
        run.progress.advance(item.size, wire=False)
        return "skipped"
    segments = source.segments if single else source.segments + item.segments
    Download(run, item, url_path(source.top, segments), path).fetch()
    return "fetched"


def run_pull(options, stream):
    """The pull command; the exit status."""
    source = BucketURL.parse(options.url, ("files", "explode", "replica"))
    root = options.dir
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as exc:
        raise UsageError("%s: %s" % (root, exc.strerror or exc))
    run = ClientRun("pull", options, source.root, stream)
    run.progress.start()
    items = []
    try:
        items, single = pull_items(run, source)
        items.sort(key=lambda item: -item.size)
        run.progress.phase("fetching", len(items), sum(item.size for item in items))
        for item, outcome in run.each(items, lambda item: pull_item(run, root, source, item,
                                                                    single)):
            if isinstance(outcome, TransferError):
                if not outcome.fatal:
                    run.progress.fail(item.name, outcome)
            elif outcome is not None:
                run.progress.finish(outcome, item.name, " (%s)" % human_bytes(item.size)
                                    if options.verbose else None)
    except TransferError as exc:
        run.fatal = exc
    except KeyboardInterrupt:
        run.interrupted = True
    finally:
        run.close()
    return finish(run, items, received=True)


# -- the command line --------------------------------------------------------------


def _env_int(name, default):
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    if not text.strip().isdigit():
        raise UsageError("%s=%r: expected a whole number" % (name, text))
    return int(text)


def _jobs(text):
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _retries(text):
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


CLIENT_EPILOG = """\
The token comes from --token-file or BUCKET_TOKEN (never give it on the
command line: it would show in process lists and CI logs). HTTPS uses the
system's CAs, or --cacert. HTTP_PROXY, HTTPS_PROXY and NO_PROXY are honored.
Retried with backoff and jitter: connection errors, 408, 423, 429, 5xx, and
507 with Retry-After (whose wait is honored). Progress goes to stderr: a
live line on a terminal, a line every 10 s otherwise; the summary (or the
--json object) to stdout. Exit status: 0 every file landed, 1 anything
failed (each failure named), 2 a usage error."""


def add_common_options(parser, jobs, retries):
    parser.add_argument("-j", "--jobs", type=_jobs, default=jobs, metavar="N",
                        help="parallel transfers [BUCKET_JOBS] (default: %(default)s)")
    parser.add_argument("--retries", type=_retries, default=retries, metavar="N",
                        help="retries of a failed request [BUCKET_RETRIES] "
                             "(default: %(default)s)")
    parser.add_argument("--token-file", metavar="FILE",
                        help="read the token from FILE's first line [else BUCKET_TOKEN]")
    parser.add_argument("--cacert", metavar="FILE",
                        help="trust the CA certificates in FILE (PEM) for https")
    parser.add_argument("--timeout", type=float, default=CLIENT_TIMEOUT, metavar="SECONDS",
                        help="socket timeout of one read or write (default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="end with one JSON object (counts, bytes, seconds, failures) "
                             "instead of the summary line")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress, no retry lines; failures and the summary only")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="one line per file")


def build_push_parser(prog):
    parser = argparse.ArgumentParser(
        prog=prog + " push", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [options] PATH... --to URL",
        description="Upload files and folders, sending only the content the bucket lacks:\n"
                    "files are hashed (sha256), one batch lookup asks which content is\n"
                    "stored, names of stored content are made without sending it, the rest\n"
                    "is uploaded with Repr-Digest (the server verifies it), large files\n"
                    "resumably. A name that already holds the same content (and has no\n"
                    "expiry) is skipped, unless --meta, --retain-days, --keep or --force\n"
                    "ask for it to be made again (no body is sent for it either).",
        epilog=CLIENT_EPILOG)
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="files and folders. A file goes to URL/<its name>; a folder "
                             "as itself (build -> URL/build/...), its contents when the "
                             "argument ends with / or is . (build/ -> URL/...)")
    parser.add_argument("--to", required=True, metavar="URL",
                        help="http(s)://HOST/files/DIR/ (a folder; paths kept), "
                             "http(s)://HOST/files/DIR/NAME (one file, that name) or "
                             "http(s)://HOST/upload/ (each file by its name; archives "
                             "expanded); a prefix before /files or /upload is kept")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                        help="leave out paths (relative to their folder) or names "
                             "matching GLOB; repeatable")
    parser.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                        help="metadata of every upload (X-Bucket-Meta-KEY); repeatable")
    parser.add_argument("--retain-days", type=float, metavar="DAYS",
                        help="remove what is pushed after DAYS (0: never)")
    parser.add_argument("--keep", action="store_true",
                        help="never evict what is pushed (X-Bucket-Keep)")
    parser.add_argument("--force", action="store_true",
                        help="also push names that already hold the same content")
    parser.add_argument("--dry-run", action="store_true",
                        help="hash and look up, say what would be sent, deployed or skipped; "
                             "change nothing")
    parser.add_argument("--resumable-from", type=parse_size, default=RESUMABLE_FROM,
                        metavar="BYTES",
                        help="upload files this large resumably (<int>[kb|mb|gb]) "
                             "(default: 16mb)")
    add_common_options(parser, _env_int("BUCKET_JOBS", CLIENT_JOBS),
                       _env_int("BUCKET_RETRIES", CLIENT_RETRIES))
    return parser


def build_pull_parser(prog):
    parser = argparse.ArgumentParser(
        prog=prog + " pull", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [options] URL DIR",
        description="Download a folder (or one file) into DIR: in parallel, each file's\n"
                    "sha256 verified, files already identical in DIR skipped, cut downloads\n"
                    "resumed (also by the next run: unfinished ones wait in DIR as\n"
                    ".bucket-part-* files), each file written under a temporary name and\n"
                    "renamed into place. Names that would leave DIR are refused. Nothing\n"
                    "in DIR is deleted.",
        epilog=CLIENT_EPILOG)
    parser.add_argument("url", metavar="URL",
                        help="http(s)://HOST/files/DIR/ (also /explode/... and /replica/...) "
                             "or one file's URL")
    parser.add_argument("dir", metavar="DIR", help="where to put it (made when missing)")
    add_common_options(parser, _env_int("BUCKET_JOBS", CLIENT_JOBS),
                       _env_int("BUCKET_RETRIES", CLIENT_RETRIES))
    return parser


def client_main(command, argv):
    """Run ``push`` or ``pull`` with ``argv``; the exit status (0 every
    file landed, 1 anything failed, 2 a usage error)."""
    prog = os.path.basename(sys.argv[0] or "http_bucket.py")
    try:
        builder = build_push_parser if command == "push" else build_pull_parser
        options = builder(prog).parse_args(argv)
        if command == "push":
            return run_push(options, sys.stderr)
        return run_pull(options, sys.stderr)
    except UsageError as exc:
        sys.stderr.write("http_bucket %s: error: %s\n" % (command, exc))
        return 2


# ===========================================================================
# Server and command line
# ===========================================================================


class SharedCounters:
    """Counters of every worker process in memory they share: an anonymous
    shared mmap made before they fork, a slot of FIELDS 64-bit integers per
    worker.  Each process writes its own slot (under a lock: its threads);
    anyone reads the sums (torn reads are impossible for aligned 8-byte
    words on the platforms CPython runs this on; a sum may be a moment old).
    """

    FIELDS = ("connections", "refused", "requests_1xx", "requests_2xx", "requests_3xx",
              "requests_4xx", "requests_5xx", "evictions", "evicted_bytes", "ready",
              "reconciled")

    def all_set(self, field):
        """True when every worker has set ``field`` (ready, reconciled)."""
        return all(struct.unpack_from("q", self.memory, self._offset(slot, field))[0]
                   for slot in range(self.slots))

    def __init__(self, slots):
        self.slots = slots
        self.memory = mmap.mmap(-1, 8 * len(self.FIELDS) * slots)
        self.slot = 0
        self.lock = threading.Lock()

    def _offset(self, slot, field):
        return 8 * (slot * len(self.FIELDS) + self.FIELDS.index(field))

    def add(self, field, delta=1):
        offset = self._offset(self.slot, field)
        with self.lock:
            value = struct.unpack_from("q", self.memory, offset)[0]
            struct.pack_into("q", self.memory, offset, value + delta)

    def total(self, field):
        return sum(struct.unpack_from("q", self.memory, self._offset(slot, field))[0]
                   for slot in range(self.slots))

    def clear(self, slot):
        """A worker that starts (again) begins from zero."""
        for field in self.FIELDS:
            struct.pack_into("q", self.memory, self._offset(slot, field), 0)


class Reaper(threading.Thread):
    """Closes connections whose request line and headers are late.

    A socket timeout bounds each read, not a whole line: a client sending
    one byte every few seconds (slowloris) would hold its thread for hours.
    Handlers ``watch`` their connection while reading a request's head, and
    BodyReader while it reads each piece of a body (MIN_BODY_RATE), and
    ``release`` it after; the reaper shuts down any connection past its
    deadline (idle keep-alive wait included), which ends the blocked read.
    """

    def __init__(self, timeout, interval=0.25):
        super().__init__(name="reaper", daemon=True)
        self.timeout = timeout
        self.interval = interval
        self.deadlines = {}

    def watch(self, connection, extra=0.0):
        """Shut ``connection`` down unless released within timeout + extra s."""
        if self.timeout:
            self.deadlines[connection] = time.monotonic() + self.timeout + extra

    def release(self, connection):
        self.deadlines.pop(connection, None)

    def run(self):
        while True:
            time.sleep(self.interval)
            now = time.monotonic()
            for connection, deadline in list(self.deadlines.items()):
                if deadline < now and self.deadlines.pop(connection, None) is not None:
                    try:
                        connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass


class BucketServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a connection cap, TLS, logs and metrics."""

    daemon_threads = True
    request_queue_size = 1024  # the default 5 drops connections in bursts
    allow_reuse_address = True

    def __init__(self, config, store, ssl_context=None, listener=None, counters=None):
        """Bind ``config.bind``:``config.port``, or serve ``listener``, a
        listening socket a parent process bound for its workers.
        ``counters`` (SharedCounters) are the workers' shared counters."""
        self.config = config
        self.store = store
        self.ssl_context = ssl_context
        self.log_fd = sys.stderr.fileno()
        self.token, self.read_token = config.token, config.read_token
        self.requests_in_flight = 0
        self.active_lock = threading.Lock()
        self.counters = counters or SharedCounters(1)
        store.counters = self.counters
        self.uploads_log = UploadsLog(os.path.join(store.root, "uploads"), store.process_id,
                                      store.tag)
        self.resumables = Resumables(store, config.resumable_max_age)
        self.reaper = Reaper(config.timeout)
        self.reaper.start()
        if listener is not None:
            self.address_family = listener.family
            super().__init__(listener.getsockname()[:2], Handler, bind_and_activate=False)
            self.socket.close()
            self.socket = listener
            self.server_address = listener.getsockname()
            return
        host = config.bind or ("::" if socket.has_ipv6 and _dual_stack() else "0.0.0.0")
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, config.port), Handler)

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            try:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except (OSError, AttributeError):
                pass
        super().server_bind()

    def process_request(self, request, client_address):
        # The cap counts the connections of all workers (SharedCounters).
        if self.counters.total("connections") >= self.config.max_connections:
            self.counters.add("refused")
            self.refuse(request)
            return
        self.counters.add("connections")
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.counters.add("connections", -1)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.counters.add("connections", -1)

    def handle_error(self, request, client_address):
        """A failure outside a request (dispatch catches those): one log line."""
        self.log_event("message", text="connection from %s failed: %s" % (
            client_address[0] if client_address else "-", sys.exc_info()[1]))

    def busy_change(self, delta):
        with self.active_lock:
            self.requests_in_flight += delta

    def busy(self):
        return self.requests_in_flight > 0

    def refuse(self, request):
        """503 with Retry-After for a connection over the cap, then close."""
        body = json_bytes({"code": 503, "status": "error",
                           "error": "too many connections (BUCKET_MAX_CONNECTIONS=%d)"
                           % self.config.max_connections})
        head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                "Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n" % len(body))
        try:
            if self.ssl_context is None:  # a TLS client cannot read plain text
                request.settimeout(0.5)
                request.sendall(head.encode() + body)
        except OSError:
            pass
        self.shutdown_request(request)

    def url(self, relpath):
        path = "/" + urllib.parse.quote(relpath)
        base = self.config.uri.rstrip("/")
        return base + path if base else path

    def log_event(self, kind, **fields):
        if self.config.log_format == "json":
            fields = dict({"time": round(time.time(), 3), "event": kind}, **fields)
            line = json.dumps(fields, ensure_ascii=False)
        elif kind == "access":
            line = '%s - - [%s] "%s %s" %s %s %sms' % (
                fields["client"], time.strftime("%d/%b/%Y %H:%M:%S"), fields["method"],
                fields["path"], fields["status"], fields["bytes"], fields["ms"])
        elif kind == "message":
            line = fields["text"]
        else:
            line = "%s %s" % (kind, " ".join("%s=%s" % item for item in fields.items()))
        try:  # one write a line: atomic, and no lock shared by every request
            os.write(self.log_fd, (line + "\n").encode("utf-8", "replace"))
        except OSError:
            pass

    def count_request(self, status):
        if status:
            self.counters.add("requests_%dxx" % (status // 100))

    def metrics(self):
        """Prometheus text: the counters are the sums over all workers; the
        store's figures are this worker's view of the shared store."""
        counters = self.counters
        lines = ["# TYPE http_bucket_requests_total counter"]
        for klass in ("2xx", "3xx", "4xx", "5xx"):
            lines.append('http_bucket_requests_total{class="%s"} %d'
                         % (klass, counters.total("requests_" + klass)))
        lines += ["# TYPE http_bucket_refused_connections_total counter",
                  "http_bucket_refused_connections_total %d" % counters.total("refused"),
                  "# TYPE http_bucket_connections gauge",
                  "http_bucket_connections %d" % counters.total("connections"),
                  "# TYPE http_bucket_workers gauge",
                  "http_bucket_workers %d" % counters.slots,
                  "# TYPE http_bucket_blobs gauge",
                  "http_bucket_blobs %d" % self.store.blobs.count,
                  "# TYPE http_bucket_index_ready gauge",
                  "http_bucket_index_ready %d" % self.store.ready.is_set()]
        store = self.store
        free, floor = store.space()
        for name, kind, value, text in (
                ("stored_bytes", "gauge", store.blobs.bytes, "bytes of all blobs"),
                ("max_size_bytes", "gauge", store.config.max_size,
                 "BUCKET_MAX_SIZE (0: no cap)"),
                ("free_bytes", "gauge", free, "free bytes of ARCHIVE_DIR's filesystem"),
                ("min_free_bytes", "gauge", floor, "the free-space floor (BUCKET_MIN_FREE)"),
                ("evictions_total", "counter", counters.total("evictions"),
                 "blobs evicted"),
                ("evicted_bytes_total", "counter", counters.total("evicted_bytes"),
                 "bytes evicted"),
                ("partial_uploads", "gauge", store.partial[0],
                 "unfinished resumable uploads"),
                ("partial_bytes", "gauge", store.partial[1], "bytes they hold"),
                ("partial_expired_total", "counter", store.resumables.expired,
                 "unfinished resumable uploads removed after max-age by this process")):
            lines += ["# HELP http_bucket_%s %s" % (name, text),
                      "# TYPE http_bucket_%s %s" % (name, kind),
                      "http_bucket_%s %d" % (name, value)]
        return "\n".join(lines) + "\n"


def _dual_stack():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def build_parser():
    parser = argparse.ArgumentParser(
        prog="http_bucket.py",
        description="Keep files that ephemeral processes upload by HTTP. Every "
                    "setting also reads the environment variable named in its help; "
                    "flags win.",
        epilog="Replicas: REPLICATE_0 .. REPLICATE_9 hold templates such as "
               "'user/${Username}/${Topic}', filled from request headers. "
               "HTTP_BUCKET_NO_MAGIC=1 ignores python-magic.")
    for setting in SETTINGS:
        help_text = ("%s [%s] (default: %s)" % (setting.help, setting.env,
                                               setting.default or "none")).replace("%", "%%")
        if setting.flags == ("port",):
            parser.add_argument("port", nargs="?", metavar="PORT", help=help_text)
        else:
            parser.add_argument(*setting.flags, dest=setting.dest, metavar=setting.metavar,
                                help=help_text)
    parser.add_argument("--verify", action="store_true",
                        help="re-hash every blob, report mismatches and exit "
                             "(changes nothing; exit status 1 on a mismatch)")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    return parser


def load_config(argv=None, environ=None):
    """Parse flags and environment into a Config; raises ConfigError."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    values = {}
    for setting in SETTINGS:
        given = getattr(args, setting.dest)
        source = setting.flags[-1] if given is not None else setting.env
        text = given if given is not None else environ.get(setting.env, setting.default)
        try:
            values[setting.dest] = setting.parse(text)
        except (ValueError, TypeError) as exc:
            raise ConfigError("%s=%r: %s" % (source, text, exc))
    for dest, file_dest in (("token", "token_file"), ("read_token", "read_token_file")):
        if values[file_dest]:
            try:
                with open(values[file_dest], encoding="utf-8") as handle:
                    values[dest] = handle.readline().strip()
            except OSError as exc:
                raise ConfigError("%s: cannot read %s: %s" % (file_dest, values[file_dest], exc))
            if not values[dest]:
                raise ConfigError("%s: %s holds no token" % (file_dest, values[file_dest]))
    if bool(values["certfile"]) != bool(values["keyfile"]):
        raise ConfigError("--certfile and --keyfile go together")
    if values["checksum_type"] not in values["digests"]:  # the original 'checksum' key needs it
        values["digests"] = values["digests"] + (values["checksum_type"],)
    values["replicate"] = load_replicate_templates(environ)
    config = Config(**values)
    config.verify = args.verify
    return config


def verify_store(config, out):
    """Re-hash every blob; print mismatches; return how many there were."""
    root = os.path.join(config.directory, "blob")
    checked = bad = 0
    for level1 in _scandirs(root):
        for level2 in _scandirs(level1.path):
            for entry in sorted(os.scandir(level2.path), key=lambda e: e.name):
                if not entry.is_file(follow_symlinks=False):
                    continue
                digest = hashlib.sha256()
                with open(entry.path, "rb") as handle:
                    for data in iter(lambda: handle.read(CHUNK_SIZE), b""):
                        digest.update(data)
                checked += 1
                if digest.hexdigest() != entry.name:
                    bad += 1
                    out.write("MISMATCH blob/%s/%s/%s holds sha256 %s\n" % (
                        level1.name, level2.name, entry.name, digest.hexdigest()))
    out.write("verified %d blobs, %d mismatched\n" % (checked, bad))
    return bad


def make_ssl_context(config):
    if not config.certfile:
        return None
    for flag, path in (("--certfile", config.certfile), ("--keyfile", config.keyfile)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError("%s %s: %s" % (flag, path, exc.strerror or exc))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.certfile, config.keyfile)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise ConfigError("--keyfile %s is not the key of --certfile %s"
                              % (config.keyfile, config.certfile))
        raise ConfigError("--certfile %s / --keyfile %s: not a PEM certificate chain and "
                          "its private key (%s)" % (config.certfile, config.keyfile,
                                                    exc.reason or exc))
    return context


def bind_error(config, exc):
    """A one-line reason why the server could not listen."""
    where = "%s:%d" % (config.bind or "*", config.port)
    reasons = {errno.EADDRINUSE: "address already in use (another server on that port?)",
               errno.EACCES: "permission denied (ports below 1024 need root or "
                             "CAP_NET_BIND_SERVICE)",
               errno.EADDRNOTAVAIL: "no such address on this machine (--bind)"}
    reason = reasons.get(getattr(exc, "errno", None)) or getattr(exc, "strerror", None) or exc
    if isinstance(exc, socket.gaierror):
        reason = "cannot resolve --bind %r" % config.bind
    return "cannot listen on %s: %s" % (where, reason)


def make_log(config, prefix=""):
    """The startup and status log: one line, one write (atomic across the
    workers that share stderr), text or JSON as --log-format says."""
    def log(message):
        if config.log_format == "json":
            line = json.dumps({"time": round(time.time(), 3), "event": "message",
                               "text": prefix + message}, ensure_ascii=False)
        else:
            line = "http_bucket: " + prefix + message
        try:
            os.write(sys.stderr.fileno(), (line + "\n").encode("utf-8", "replace"))
        except OSError:
            pass
    return log


def main(argv=None):
    """Run the server until SIGTERM or SIGINT (``[serve] [PORT] ...``), or
    the client (``push ...``, ``pull ...``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in CLIENT_COMMANDS:
        return client_main(argv[0], argv[1:])
    if argv and argv[0] == "serve":
        argv = argv[1:]
    elif argv[:1] in (["-h"], ["--help"]):
        prog = os.path.basename(sys.argv[0] or "http_bucket.py")
        sys.stdout.write("The server: %s [serve] [PORT] [options]; the client: %s push|pull "
                         "(push --help, pull --help).\n\n" % (prog, prog))
    try:
        config = load_config(argv)
        if config.verify:
            return 1 if verify_store(config, sys.stdout) else 0
        ssl_context = make_ssl_context(config)
    except ConfigError as exc:
        sys.stderr.write("http_bucket: error: %s\n" % exc)
        return 2
    if config.workers > 1:
        return serve_workers(config, ssl_context)
    return serve(config, ssl_context, make_log(config))


def announce(config, ssl_context, address, log):
    host, port = address[:2]
    shown = "[%s]" % host if ":" in host else host
    log("storing in %s" % config.directory)
    log("serving on %s://%s:%d/ (python-magic: %s%s)" % (
        "https" if ssl_context else "http",
        shown if host not in ("0.0.0.0", "::") else "0.0.0.0", port,
        "yes" if HAVE_MAGIC else "no",
        "; %d workers" % config.workers if config.workers > 1 else ""))
    if not config.token and host not in ("127.0.0.1", "::1", "localhost"):
        log("warning: listening beyond loopback without BUCKET_TOKEN: anyone who "
            "reaches this port can write and delete")


def serve(config, ssl_context, log, listener=None, counters=None, parent=None):
    """One server process until SIGTERM or SIGINT (or, for a worker, until
    its ``parent`` is gone): its Store (journal, staging), index, threads.
    Returns the exit status."""
    try:
        store = Store(config, log)
    except OSError as exc:
        sys.stderr.write("http_bucket: error: cannot use ARCHIVE_DIR %s: %s\n"
                         % (config.directory, exc.strerror or exc))
        return 2
    try:
        server = BucketServer(config, store, ssl_context, listener, counters)
    except OSError as exc:
        sys.stderr.write("http_bucket: error: %s\n" % bind_error(config, exc))
        store.journal.close()
        return 2
    if listener is None:
        announce(config, ssl_context, server.server_address, log)
        log_space(config, log)
    threading.Thread(target=store.journals.load, name="index-load", daemon=True).start()
    sweeper = Sweeper(store, config.sweep_interval)
    sweeper.start()
    evictor = Evictor(store)
    evictor.start()
    stopping = threading.Event()

    def stop(*_):
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if parent is not None:
        threading.Thread(target=watch_parent, args=(parent, stop), name="parent-watch",
                         daemon=True).start()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        deadline = time.monotonic() + SHUTDOWN_GRACE
        while server.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        sweeper.stopping.set()
        evictor.stop()
        try:
            store.flush_uses()  # the eviction order survives the restart
        except BucketError as exc:
            log("could not journal the last uses: %s" % exc.message)
        try:
            store.journals.close()  # the next start maps it
        except Exception:
            log("could not write the index snapshot:\n" + traceback.format_exc())
        store.journal.close()
        log("stopped")
    return 0


def watch_parent(parent, stop):
    """A worker stops when the process that started it is gone (kill -9)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    stop()


def listen(config):
    """The listening socket workers share: bound here, before they fork."""
    host = config.bind or ("::" if socket.has_ipv6 and _dual_stack() else "0.0.0.0")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except (OSError, AttributeError):
                pass
        sock.bind((host, config.port))
        sock.listen(BucketServer.request_queue_size)
        # Every worker waits on it; one wins each connection, and the others'
        # accept() must not block (they would not see a SIGTERM then).
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Workers:
    """The parent of ``--workers N``: binds the port, forks N workers that
    each serve it with their own ThreadingHTTPServer, journal, staging and
    index (the several-processes-on-one-directory design), restarts a worker
    that dies (waiting longer each time it keeps dying, up to
    WORKER_RESTART_MAX), and on SIGTERM or SIGINT passes it on and waits for
    their grace.  The workers share a connection cap and /metrics counters
    through SharedCounters.  The parent starts no thread: it forks."""

    def __init__(self, config, ssl_context, listener):
        self.config = config
        self.ssl_context = ssl_context
        self.listener = listener
        self.counters = SharedCounters(config.workers)
        self.log = make_log(config)
        self.children = {}   # pid -> slot
        self.started = {}    # slot -> (monotonic start, consecutive failures)
        self.stopping = False

    def start(self, slot):
        failures = self.started.get(slot, (0, 0))[1]
        self.counters.clear(slot)
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                self.counters.slot = slot
                pin_to_core(slot)
                status = serve(self.config, self.ssl_context,
                               make_log(self.config, "worker %d (pid %d): "
                                        % (slot, os.getpid())),
                               self.listener, self.counters, parent=os.getppid())
            finally:
                os._exit(status)
        self.children[pid] = slot
        self.started[slot] = (time.monotonic(), failures)

    def run(self):
        def stop(*_):
            self.stopping = True
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        for slot in range(self.config.workers):
            self.start(slot)
        restart_at = {}
        while not self.stopping:
            self.reap(restart_at)
            for slot, when in list(restart_at.items()):
                if time.monotonic() >= when and not self.stopping:
                    del restart_at[slot]
                    self.start(slot)
            time.sleep(0.1)
        return self.shutdown()

    def reap(self, restart_at):
        """Collect workers that ended; schedule their restarts."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = self.children.pop(pid)
            began, failures = self.started[slot]
            failures = 0 if time.monotonic() - began > 60 else failures + 1
            self.started[slot] = (began, failures)
            delay = min(WORKER_RESTART_MAX, 2 ** failures - 1)
            self.log("worker %d (pid %d) ended (%s); starting it again in %g s"
                     % (slot, pid, describe_status(status), delay))
            restart_at[slot] = time.monotonic() + delay

    def shutdown(self):
        """SIGTERM to every worker; their grace, then SIGKILL."""
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + SHUTDOWN_GRACE + 5
        while self.children and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                self.children.pop(pid, None)
            else:
                time.sleep(0.05)
        for pid in self.children:
            os.kill(pid, signal.SIGKILL)
        self.listener.close()
        self.log("stopped")
        return 0


def describe_status(status):
    if os.WIFSIGNALED(status):
        return "killed by signal %d" % os.WTERMSIG(status)
    return "exit status %d" % os.WEXITSTATUS(status)


def serve_workers(config, ssl_context):
    """``--workers N`` (N > 1): the parent of N worker processes."""
    log = make_log(config)
    try:
        listener = listen(config)
    except OSError as exc:
        sys.stderr.write("http_bucket: error: %s\n" % bind_error(config, exc))
        return 2
    announce(config, ssl_context, listener.getsockname(), log)
    try:
        log_space(config, log)
    except OSError as exc:
        sys.stderr.write("http_bucket: error: cannot use ARCHIVE_DIR %s: %s\n"
                         % (config.directory, exc.strerror or exc))
        return 2
    return Workers(config, ssl_context, listener).run()


def log_space(config, log):
    """The startup lines about space: limits, free space and inodes."""
    makedirs(config.directory)
    free, floor, st = free_space(config.directory, config.min_free)
    log("filesystem of %s: %s free of %s, %d of %d inodes free; keeping %s free (BUCKET_MIN_FREE)%s"
        % (config.directory, human_bytes(free), human_bytes(st.f_blocks * st.f_frsize),
           st.f_favail, st.f_files, human_bytes(floor),
           "; blobs capped at %s (BUCKET_MAX_SIZE)" % human_bytes(config.max_size)
           if config.max_size else ""))
    if free < floor:
        log("warning: the filesystem is under its free-space floor: uploads are refused "
            "(507) until there is room%s" % (" or eviction makes some" if config.max_size else ""))


if __name__ == "__main__":
    sys.exit(main())
