"""The bank store: banks on disk, one folder per bank id, safe to share between replicas.

    <root>/<bank>/CURRENT                      name of the live version folder (replaced atomically)
    <root>/<bank>/v-<build id>/manifest.json   ``BankManifest`` (postprocess/bank.py): encoder fingerprint, config,
                                               counts, thresholds, image hashes
    <root>/<bank>/v-<build id>/manifest.sha256 SHA-256 of manifest.json as written (format 6: a flipped bit in a
                                               threshold is damage like one in the tensors)
    <root>/<bank>/v-<build id>/bank.safetensors
    <root>/<bank>/lot/part-<n>-<d>.safetensors images added but not yet built (the shared pending lot); <d> is the
                                               part's SHA-256 as written, checked when a build reads it
    <root>/<bank>/lot-<session>/part-...       a client's own pending lot (``add``/``build``/``update`` with option
                                               ``lot``): what one client adds, resets and consumes, no other's
    <root>/<bank>/.build-lock                  held by the one build of this bank id in progress

A version folder is complete before ``CURRENT`` names it, so a crash mid-build leaves the previous bank live. No
pickle: tensors are safetensors, the rest JSON. What a bank holds and how it scores is ``postprocess.bank``; this
module only stores it (it imports ``postprocess.bank``, never the other way round).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import kernels as K
from . import strict_json
from .atomic import HOST, fsync_dir, is_dead_leftover, owner_gone, temp_name, write_atomic
from .bank import (DIGESTED_FROM, DTYPES, FORMAT_VERSION, Bank, BankDamaged, BankError, BankFormatError,
                   BankManifest, check_encoder, check_manifest, check_tensors, damaged, tensor_record)
from .contract import IMAGES, VISION_OUTPUTS, Features
from .drift import grown_from
from .errors import ServerBusy

# used with fullmatch only: "$" would let a trailing newline through (a folder "banks/x\n")
BANK_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# what CURRENT may name: a version folder of its own bank (no separator, so nothing outside it)
VERSION_PATTERN = re.compile(r"v-[A-Za-z0-9][A-Za-z0-9._-]{0,200}")
# a client's lot session (option "lot"): the folder lot-<session> of its bank; no dot, so never a part's name
LOT_SESSION_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
GIVEN_BACK = ".given-back-lots"  # <bank>/<session>: lot sessions their clients gave back (BankStore.discard_lot)
ALL_LOTS = "*"  # what a delete's build lock names as its lot: every add to the bank waits for it
DATA_FILES = ("bank.safetensors",)  # a version's files whose digests its manifest records
MANIFEST_DIGEST = "manifest.sha256"  # beside manifest.json: the manifest's own digest (from format 6)
MANIFEST_DIGESTED_FROM = 6
MANIFEST_LIMIT = 64 << 20  # bytes: a lot of 100,000 images keeps its keys and scores in a few MB
HASH_CHUNK = 1 << 20
# a pending lot's part: its index, then the SHA-256 of the file as written (a flipped bit would build another bank)
LOT_PART_PATTERN = re.compile(r"part-(\d{6,})-([0-9a-f]{64})\.safetensors")
# flocked by the one build running on this host (any store, any bank; per user, so that no one else can hold it)
BUILD_SLOT = Path(tempfile.gettempdir()) / f"pa-clip-build-slot-{os.getuid()}"


def check_lot_session(session: str | None) -> str | None:
    """``session`` if it is None (the shared lot) or a valid lot session id, else a ``BankError`` that says why."""
    if session is not None and (not isinstance(session, str) or not LOT_SESSION_PATTERN.fullmatch(session)):
        raise BankError(f"invalid lot session {session!r}: use 1-64 letters, digits, '_' or '-'")
    return session


def _is_lot_folder(name: str) -> bool:
    """The shared pending lot's folder or a session's (lot-<session>)."""
    return name == "lot" or (name.startswith("lot-") and bool(LOT_SESSION_PATTERN.fullmatch(name[4:])))


def check_bank_id(bank_id: str) -> str:
    """``bank_id`` if it is a valid bank id (it names a folder of the store), else a ``BankError`` that says why."""
    if not isinstance(bank_id, str) or not BANK_ID_PATTERN.fullmatch(bank_id):
        raise BankError(f"invalid bank id {bank_id!r}: use 1-128 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit")
    return bank_id


class StoreFull(BankError):
    """The bank store's volume is full: the message says where and what to free."""


def _is_disk_full(err: BaseException) -> bool:
    # OSError from Python's own writes; safetensors' Rust writer reports "StorageFull" / "No space left" in text
    return (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        any(words in str(err) for words in ("No space left", "StorageFull", "Disk quota exceeded"))


@contextmanager
def disk_full_is_clear(folder: Path):
    """Turn a full volume into a ``StoreFull`` that says what to free, instead of an internal error."""
    try:
        yield
    except Exception as err:
        if not _is_disk_full(err):
            raise
        raise StoreFull(f"no space left on the volume of the bank store ({folder}): free space there (delete banks "
                        "you no longer need with the 'delete' action, or pending lots you will not build), or move "
                        "the store to a larger volume (PA_CLIP_BANKS / python -m serve --banks); nothing was "
                        "changed") from err


def _save_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.numpy import save_file

    with disk_full_is_clear(path.parent):
        write_atomic(path, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
                                                 metadata=metadata))


def _place_exclusive(source: Path, target: Path) -> None:
    """Move the complete file ``source`` to ``target``, unless ``target`` exists (``FileExistsError``): a hard link
    (the name appears with the whole file behind it), or, on a file system without hard links, the name taken
    empty first and the file renamed over it (a reader may meet it empty for that moment)."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        os.replace(source, target)
        return
    source.unlink()


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in chunks (a bank may not fit in memory twice)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _regular_file(path: Path) -> bool:
    """A plain file, not a link (to /dev/zero, to another bank) nor anything else."""
    return path.is_file() and not path.is_symlink()


def _load_tensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _described_holder(holder: dict) -> str:
    """A build lock's holder as the refusals name it."""
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started_at', '?')}"


@contextmanager
def build_slot(bank_id: str):
    """The one build at a time of this host, or ``ServerBusy`` naming the build that has it.

    A build takes every core it can get; two at once would also take the bank model's last free instance, and
    then ``info`` (which every scoring run asks first) would wait behind them. A flock on a file of the host's
    temporary folder (``BUILD_SLOT``), so a killed build releases it with its process, and the store holds
    nothing of it: replicas on other hosts build side by side."""
    fd = os.open(BUILD_SLOT, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:  # being written by the holder right now
                holder = {}
            # the holder writes its name just after it takes the slot: read before that, none is known yet
            which = (f"bank {holder['bank']!r} (started {holder.get('started_at', '?')})"
                     if isinstance(holder, dict) and "bank" in holder else "a bank (its build has just started)")
            raise ServerBusy(f"this host is building {which}; builds run one at a time so that scoring and "
                             "bank actions stay answered: send the build again when it finishes (pa-clip score "
                             "waits by itself)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"bank": bank_id, "pid": os.getpid(),
                                  "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


class BankStore:
    """Banks on disk under ``root`` (see the module docstring for the layout).

    Several servers may share ``root`` (a shared volume): version names carry the host, temporary names their owner
    (host and pid), ``clean`` removes only leftovers whose owner is provably gone, and a build holds
    ``<bank>/.build-lock`` so that one bank id is built by one replica at a time.
    """

    STALE_AFTER_S = 6 * 3600  # a leftover or a lock of another host counts as abandoned after this long

    PRUNE_AFTER_S = 600  # an older version younger than this may still be being loaded by a replica: prune keeps it

    def __init__(self, root: str | Path, pending_ttl_s: float = 24 * 3600, max_bytes: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.pending_ttl_s = pending_ttl_s  # a lot added but never built is removed after this long
        self.max_bytes = max_bytes  # what the whole store may hold (python -m serve --max-store-gb); None: no limit

    # -- committed banks --------------------------------------------------------------------------------------
    def _dir(self, bank_id: str) -> Path:
        return self.root / check_bank_id(bank_id)

    def _own_dir(self, bank_id: str) -> Path:
        """The bank's folder for writing: never through a link out of the store."""
        folder = self._dir(bank_id)
        if folder.is_symlink():
            raise BankError(f"bank {bank_id!r} is a symbolic link in the store, not a folder of its own: delete it "
                            "(python -m client.banks delete) and build the bank again")
        return folder

    def current_version(self, bank_id: str) -> str | None:
        """The live version's folder name, or None when the bank has none. CURRENT must name a version folder of
        this bank (no separator, no link): anything else is damage, refused with what to do."""
        folder = self._dir(bank_id)
        current = folder / "CURRENT"
        if folder.is_symlink() or current.is_symlink():
            raise damaged(bank_id, None, f"{'its folder' if folder.is_symlink() else 'CURRENT'} is a symbolic link: "
                          "a bank lives in the store's own folders")
        try:
            name = current.read_text().strip()
        except FileNotFoundError:
            if self._lost_current(folder):
                # a commit writes CURRENT under the build lock, so versions with no CURRENT and no build are a
                # CURRENT that went missing (or a first build that died before committing): never "no bank", which
                # would let prune remove the versions
                raise damaged(bank_id, None, "CURRENT is missing while version folders are on disk (a first build "
                              "that stopped before its commit, or CURRENT removed): write the name of the version "
                              "to restore into CURRENT") from None
            return None
        except (OSError, UnicodeDecodeError) as err:
            raise damaged(bank_id, None, f"CURRENT cannot be read: {err}") from None
        if not name:  # CURRENT is replaced whole (atomic.write_atomic): empty, it was damaged
            raise damaged(bank_id, None, "CURRENT is empty")
        if not VERSION_PATTERN.fullmatch(name):
            raise damaged(bank_id, None, f"CURRENT names {name[:80]!r}, not a version folder of this bank")
        version = folder / name
        if not version.exists() and not version.is_symlink() and self._current_now(current) != name:
            return self.current_version(bank_id)  # replaced and removed while it was read: the live one now
        if version.is_symlink() or not version.is_dir():
            raise damaged(bank_id, name, "CURRENT names a version that is not on disk" if not version.exists()
                          else "its version folder is a symbolic link or not a folder")
        return name

    def _lost_current(self, folder: Path) -> bool:
        """Version folders but no CURRENT, and no build in progress to write it: damage (``current_version``), a
        bank to list."""
        return _has_versions(folder) and self.build_holder(folder.name) is None

    @staticmethod
    def _current_now(current: Path) -> str | None:
        try:
            return current.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None

    def exists(self, bank_id: str) -> bool:
        return self.current_version(bank_id) is not None

    # -- what the scoring services saw (postprocess/drift.py) -------------------------------------------------------
    MONITOR_FRESH_S = 24 * 3600  # a scoring process's window older than this is no longer shown

    def write_monitor(self, bank_id: str, summary: dict) -> None:
        """One scoring process's window of a bank (``<bank>/monitor/<host>-<pid>.json``, replaced atomically): what
        ``info`` shows of the images scored lately. Nothing is written for a bank that is not in the store."""
        folder = self._own_dir(bank_id)
        if not folder.is_dir():
            return
        monitor = folder / "monitor"
        if monitor.is_symlink():  # a report is never written through a link out of the store
            return
        monitor.mkdir(exist_ok=True)
        write_atomic(monitor / f"{HOST}-{os.getpid()}.json", json.dumps(summary))

    def monitors(self, bank_id: str) -> list[dict]:
        """The fresh windows of every scoring process that scored with the bank's live version, newest first (a
        window that cannot be read is left out: it is a report, not the bank). A window of the version an update grew
        the live one from is the live version's (``drift.grown_from``): its process carries it on with its next
        part, and until then ``info`` showed no window (an alarm that was up was hidden by the update)."""
        current = self.current_version(bank_id)
        live = None  # the live manifest, read once and only where a window of another version needs it
        out = []
        if (self._dir(bank_id) / "monitor").is_symlink():  # never read through a link out of the store
            return out
        for path in sorted((self._dir(bank_id) / "monitor").glob("*.json")):
            try:
                if path.is_symlink() or time.time() - path.stat().st_mtime > self.MONITOR_FRESH_S or \
                        _monitor_owner_gone(path, self.MONITOR_FRESH_S):
                    continue
                summary = strict_json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(summary, dict):
                continue
            if summary.get("version") != current:
                try:
                    live = live or self.manifest(bank_id)
                except (BankError, OSError):
                    continue
                if current is None or not grown_from(live, summary.get("lot")):
                    continue
            out.append({**summary, "version": current, "process": path.stem})
        return sorted(out, key=lambda m: -float(m.get("updated", 0)))

    def bank_ids(self) -> list[str]:
        """The banks of the store, by folder name (a folder that is a link is listed, to be refused by name)."""
        return sorted(p.name for p in self.root.iterdir()
                      if BANK_ID_PATTERN.fullmatch(p.name) and (p.is_symlink() or (p / "CURRENT").exists() or
                                                                 self._lost_current(p)))

    def missing(self, bank_id: str) -> BankError:
        known = self.bank_ids()
        return BankError(f"unknown bank {bank_id!r}; " + (f"banks on this server: {', '.join(known)}" if known else
                         "this server has no banks yet") + ". Build one with pa-clip score --build --category PRODUCT "
                         "--images LOT_FOLDER --bank NAME")

    def _live(self, bank_id: str) -> tuple[str, Path]:
        version = self.current_version(bank_id)
        if version is None:
            raise self.missing(bank_id)
        return version, self._dir(bank_id) / version

    def _read_manifest(self, bank_id: str, version: str, folder: Path) -> BankManifest:
        """The version's manifest, checked against its digest (format 6) and by its fields (``bank.check_manifest``):
        damage of any kind is a ``BankDamaged``, never an internal error."""
        path = folder / "manifest.json"
        if not _regular_file(path):
            raise damaged(bank_id, version, "manifest.json is missing" if not path.exists() and not path.is_symlink()
                          else "manifest.json is a link or not a file")
        try:
            if (size := path.stat().st_size) > MANIFEST_LIMIT:
                raise damaged(bank_id, version, f"manifest.json is {size} bytes, more than any bank's "
                              f"({MANIFEST_LIMIT >> 20} MB)")
            text = path.read_bytes()
            digested = self._check_manifest_digest(bank_id, version, folder, text)
            values = BankManifest.json_values(text)  # read once: the format it was written as, then the fields
            written = values.get("format_version") if isinstance(values, dict) else None
            # a newer format is refused as such when it is read (it may keep its digest elsewhere)
            if not digested and type(written) is int and MANIFEST_DIGESTED_FROM <= written <= FORMAT_VERSION:
                raise damaged(bank_id, version, f"{MANIFEST_DIGEST} is missing")
            manifest = BankManifest.from_dict(values)  # migrations make new dicts: ``values`` stays as written
            if type(written) is int and written >= DIGESTED_FROM and (manifest.files is None or
                                                                      manifest.tensors is None):
                # without them nothing is checked against a digest: a manifest of a digested format that lacks
                # them was cut, not written so (read as format 1, only its tensors would be checked)
                raise damaged(bank_id, version, f"its manifest is of format {written} but lacks the files' "
                              "digests or the tensors' record")
            if not digested and (data_format := self._data_format(folder)) >= MANIFEST_DIGESTED_FROM:
                # the manifest's own word on its format is what damage changed: the data file's is checked
                raise damaged(bank_id, version, f"{MANIFEST_DIGEST} is missing (bank.safetensors was written as "
                              f"format {data_format}; its manifest says {written})")
        except BankFormatError:  # written by a server of another format: not damage
            raise
        except BankDamaged:
            raise
        except BankError as err:
            raise damaged(bank_id, version, f"manifest.json: {err}") from None
        except Exception as err:  # whatever its values make of the reading (a number past float, nesting too deep)
            raise damaged(bank_id, version, f"manifest.json: {type(err).__name__}: {err}") from None
        if manifest.version not in (None, version):
            raise damaged(bank_id, version, f"its manifest is of version {manifest.version}")
        try:
            check_manifest(manifest.replace(version=version), bank_id)
        except BankDamaged:
            raise
        except Exception as err:
            raise damaged(bank_id, version, f"manifest.json: {type(err).__name__}: {err}") from None
        return manifest

    @staticmethod
    def _data_format(folder: Path) -> int:
        """The format bank.safetensors records it was written as (0: not recorded, in banks written before it was, or
        unreadable, which the digest check reports)."""
        path = folder / "bank.safetensors"
        try:
            return int(_load_tensors_meta(path)[1].get("format_version", 0)) if _regular_file(path) else 0
        except Exception:
            return 0

    @staticmethod
    def _check_manifest_digest(bank_id: str, version: str, folder: Path, text: bytes) -> bool:
        """``manifest.sha256``, where there is one, must be the digest of ``text``; whether there is one (a manifest
        written as format 6 or later must have one, an earlier one was written without)."""
        import hashlib

        path = folder / MANIFEST_DIGEST
        if not path.exists() and not path.is_symlink():
            return False
        if not _regular_file(path) or path.stat().st_size > 1024:
            raise damaged(bank_id, version, f"{MANIFEST_DIGEST} is a link, not a file, or not a digest")
        if path.read_text(errors="replace").strip() != hashlib.sha256(text).hexdigest():
            raise damaged(bank_id, version, "manifest.json digest differs")
        return True

    def _read_live(self, bank_id: str, read):
        """``read(version, folder)`` of the live version. A version that a new one replaced, and a prune or the next
        save removed, while it was being read is not damage: the version CURRENT names now is read instead."""
        for attempt in range(3):
            version, folder = self._live(bank_id)
            try:
                return read(version, folder)
            except (BankDamaged, FileNotFoundError):
                if attempt == 2 or self.current_version(bank_id) == version:
                    raise

    def manifest(self, bank_id: str) -> BankManifest:
        return self._read_live(bank_id, lambda version, folder: self._read_manifest(bank_id, version, folder))

    def _check_files(self, manifest: BankManifest, bank_id: str, version: str, folder: Path) -> None:
        """Each data file a plain file whose size and SHA-256 are those the manifest recorded when it was written."""
        for name in DATA_FILES:
            path = folder / name
            if not _regular_file(path):
                raise damaged(bank_id, version, f"{name} is missing" if not path.exists() and not path.is_symlink()
                              else f"{name} is a link or not a file")
            if manifest.files is None:  # format 1: no digests; the tensors are checked against the manifest
                continue
            want = manifest.files.get(name)
            if not isinstance(want, dict):
                raise damaged(bank_id, version, f"its manifest records no digest of {name}")
            if path.stat().st_size != want.get("bytes"):
                raise damaged(bank_id, version, f"{name} is {path.stat().st_size} bytes, its manifest records "
                              f"{want.get('bytes')}")
            if file_digest(path) != want.get("sha256"):
                raise damaged(bank_id, version, f"{name} digest differs")

    def sizes(self, bank_id: str) -> dict:
        """Bytes of the live version on disk, and of its arrays once loaded (on the GPU or in host memory), read
        from the safetensors header without loading the tensors."""
        return self._read_live(bank_id, lambda version, folder: self._sizes(bank_id, version, folder))

    @staticmethod
    def _sizes(bank_id: str, version: str, folder: Path) -> dict:
        if not _regular_file(folder / "bank.safetensors"):
            raise damaged(bank_id, version, "bank.safetensors is missing, a link or not a file")
        try:
            tensors, _ = _load_tensors_meta(folder / "bank.safetensors")
        except Exception as err:  # safetensors' own error types: a header that does not parse
            raise damaged(bank_id, version, f"bank.safetensors: {err}") from None
        if unknown := sorted({t["dtype"] for t in tensors.values()} - set(DTYPES)):
            raise damaged(bank_id, version, f"bank.safetensors holds tensors of type {unknown}, no bank's")
        resident = sum(int(np.prod(t["shape"])) * np.dtype(DTYPES[t["dtype"]]).itemsize for t in tensors.values())
        return {"bytes_on_disk": sum(p.stat().st_size for p in folder.iterdir()), "bytes_in_memory": resident}

    def versions(self, bank_id: str) -> list[dict]:
        """The versions on disk, newest first, each with its bytes and whether it is the live one."""
        current = self.current_version(bank_id)
        found = []
        for path in self._dir(bank_id).glob("v-*"):  # a version removed meanwhile (a commit, a prune) is left out
            try:
                found.append((path.stat().st_mtime, path))
            except FileNotFoundError:
                continue
        out = []
        for _, path in sorted(found, reverse=True):
            size = _bytes_under(path)
            if path.is_dir():
                out.append({"version": path.name, "live": path.name == current, "bytes": size})
        return out

    def total_bytes(self) -> int:
        return _bytes_under(self.root)

    def check_room(self, adding: int = 0) -> None:
        """Refuse, with what to do, a write that would take the store over ``max_bytes``."""
        if self.max_bytes is None:
            return
        held = self.total_bytes()
        if held + adding > self.max_bytes:
            raise StoreFull(f"the bank store ({self.root}) holds {_human(held)} and this would add "
                            f"{_human(adding)}; this server keeps at most {_human(self.max_bytes)} "
                            "(python -m serve --max-store-gb): delete banks you no longer need (python -m "
                            "client.banks delete ID) or prune old versions (python -m client.banks prune)")

    def prune(self) -> dict:
        """Remove what no one needs: versions other than the live one (older than ``PRUNE_AFTER_S``), bank folders
        a failed build left empty, and ``clean``'s leftovers. Returns what went, the bytes freed and the versions kept
        for their age (``kept_recent``, with ``kept_after_s``: a prune that removes nothing says why)."""
        before = self.total_bytes()
        removed = self.clean()
        kept_recent = []
        for folder in sorted(p for p in self.root.iterdir()
                             if p.is_dir() and not p.is_symlink() and BANK_ID_PATTERN.fullmatch(p.name)):
            try:
                current = self.current_version(folder.name)
            except BankError:  # a damaged bank keeps its versions: one of them may be the one to restore
                continue
            for version in folder.glob("v-*"):
                if version.name == current:
                    continue
                if time.time() - version.stat().st_mtime > self.PRUNE_AFTER_S:
                    shutil.rmtree(version, ignore_errors=True)
                    removed.append(str(version))
                else:
                    kept_recent.append(str(version))
            if _holds_nothing(folder) and _remove_emptied(folder):
                removed.append(str(folder))
        return {"removed": removed, "freed_bytes": max(0, before - self.total_bytes()),
                "kept_recent": sorted(kept_recent), "kept_after_s": self.PRUNE_AFTER_S}

    def load(self, bank_id: str, encoder: dict | None = None) -> Bank:
        """The live version, verified: manifest fields, file digests, every tensor against the manifest. Damage is a
        ``BankDamaged`` naming the bank, the version and what is wrong; nothing damaged is ever scored with (a
        version replaced and removed while it was read is read again from the new one: ``_read_live``)."""
        return self._read_live(bank_id, lambda version, folder: self._load_version(bank_id, version, folder, encoder))

    def _load_version(self, bank_id: str, version: str, folder: Path, encoder: dict | None) -> Bank:
        manifest = self._read_manifest(bank_id, version, folder)  # refuses formats it cannot read
        check_encoder(manifest, encoder)
        self._check_files(manifest, bank_id, version, folder)
        try:
            tensors, _ = _load_tensors(folder / "bank.safetensors")
        except Exception as err:  # a header or data that safetensors cannot read
            raise damaged(bank_id, version, f"bank.safetensors: {err}") from None
        try:
            check_tensors(manifest.replace(version=version), tensors, bank_id)
        except BankDamaged:
            raise
        except Exception as err:  # a tensor record of the wrong type (an old format's manifest has no digest)
            raise damaged(bank_id, version, f"its tensors against its manifest: {type(err).__name__}: {err}") from None
        return Bank.from_tensors(manifest, tensors)

    def verify(self, bank_id: str) -> dict:
        """Everything ``load`` checks, for one bank: ``{"bank", "version", "ok", "seconds"}`` and ``error`` when not."""
        started = time.perf_counter()
        try:
            bank = self.load(bank_id)
            digested = (self._dir(bank_id) / bank.manifest.version / MANIFEST_DIGEST).exists()
            out = {"bank": bank_id, "version": bank.manifest.version, "ok": True,
                   "verified": ("manifest, digests and tensors" if digested else
                                "digests and tensors (written before format 6: the manifest has no digest)")
                   if bank.manifest.files is not None else "tensors (format 1: no digests recorded)"}
        except BankError as err:
            out = {"bank": bank_id, "ok": False, "error": str(err)}
        except Exception as err:  # one bank's reading never ends the verification of the others
            out = {"bank": bank_id, "ok": False, "error": f"{type(err).__name__}: {err}"}
        return {**out, "seconds": round(time.perf_counter() - started, 3)}

    def save(self, bank: Bank) -> str:
        """Commit a bank: write a new version folder completely, then point CURRENT at it."""
        bank_id = check_bank_id(bank.manifest.bank)
        self.check_room(bank.nbytes)  # the arrays are stored as they are held: their bytes are the file's
        folder = self._own_dir(bank_id)
        folder.mkdir(exist_ok=True)
        fsync_dir(self.root)  # a new bank's folder survives a power loss with what is written in it
        # unique across replicas on a shared volume: the host's name, then 48 random bits
        version = f"v-{time.strftime('%Y%m%dT%H%M%S')}-{HOST}-{uuid.uuid4().hex[:12]}"
        staging = folder / temp_name(version)
        staging.mkdir()
        try:
            tensors = bank.tensors()
            # the format in the data file too: a manifest whose digest went missing cannot pass for an older one
            _save_tensors(staging / "bank.safetensors", tensors, {"format_version": str(FORMAT_VERSION)})
            # the digest of what was written, read back from the disk it will be read from
            files = {name: {"sha256": file_digest(staging / name), "bytes": (staging / name).stat().st_size}
                     for name in DATA_FILES}
            manifest = bank.manifest.replace(version=version, built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                             files=files, tensors=tensor_record(tensors))
            with disk_full_is_clear(folder):
                write_atomic(staging / "manifest.json", manifest.to_json())
                # the digest of the manifest as read back, like the data files'
                write_atomic(staging / MANIFEST_DIGEST, file_digest(staging / "manifest.json") + "\n")
            os.replace(staging, folder / version)
            fsync_dir(folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            previous = self.current_version(bank_id)
        except BankError:  # a damaged CURRENT: rebuilding is what its error says to do; its versions are kept
            previous = None
            keep_all = True
        else:
            keep_all = False
        write_atomic(folder / "CURRENT", version)  # the commit: readers see the old version or the new one
        # keep the version a reader may still be loading; older ones go (all stay when which one was live is not
        # known: one of them may be the one to restore, and prune removes them once they are old)
        for old in folder.glob("v-*"):
            if not keep_all and old.name not in (version, previous):
                shutil.rmtree(old, ignore_errors=True)
        bank.manifest = manifest
        return version

    def delete(self, bank_id: str) -> None:
        folder = self._dir(bank_id)
        if folder.is_symlink():  # a link in the store: the link goes, what it points at is not ours to remove
            folder.unlink()
            return
        if not folder.exists():
            raise self.missing(bank_id)
        if (holder := self.build_holder(bank_id)) is not None:  # the build would write the bank back when done
            raise BankError(f"bank {bank_id!r} is being built right now ({_described_holder(holder)}): delete it "
                            "after the build finishes")
        trash = self.root / f".trash-{bank_id}-{uuid.uuid4().hex[:8]}"
        # held while it goes: a build starting meanwhile is refused, not written back, and an add that looks is
        # refused (one that looked just before may still write its part: a pending lot of the id, which expires)
        with self.building(bank_id, lot=ALL_LOTS):
            os.replace(folder, trash)  # gone for readers at once
        shutil.rmtree(trash, ignore_errors=True)

    def clean(self) -> list[str]:
        """Remove what interrupted writes left behind and lots that were never built: only what provably has no
        live writer (another replica's build in progress stays). Returns what it removed."""
        # renamed away already (deleted banks, taken-over build locks): nobody reads or writes them
        # only in the store's own folders: a bank folder or a lot that is a link leads out of the store
        leftovers = [*self.root.glob(".trash-*")]
        temporary = []
        for folder in self.root.iterdir():
            if folder.name.startswith(".") or folder.is_symlink() or not folder.is_dir():
                continue
            leftovers += [*folder.glob(".trash-lock-*"), *folder.glob(".trash-lot-*")]
            temporary += folder.glob(".tmp-*")
            for lot in folder.glob("lot*"):
                if _is_lot_folder(lot.name) and lot.is_dir() and not lot.is_symlink():
                    temporary += lot.glob(".tmp-*")
            if (monitor := folder / "monitor").is_dir() and not monitor.is_symlink():  # windows of processes gone
                leftovers += [p for p in monitor.glob("*.json") if _monitor_owner_gone(p, self.MONITOR_FRESH_S)]
        leftovers += [p for p in temporary if is_dead_leftover(p, self.STALE_AFTER_S)]
        leftovers += [p for p in (self.root / GIVEN_BACK).glob("*/*") if _older_than(p, self.pending_ttl_s)]
        for path in leftovers:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return [str(p) for p in leftovers] + self.expire_pending()

    # -- one build per bank id, across replicas ---------------------------------------------------------------
    @contextmanager
    def building(self, bank_id: str, lot: str | None = None):
        """Hold the build lock of ``bank_id``; a second build gets a clear "in progress" error. ``lot``: the lot
        session the build consumes (None: the shared lot), written in the lock: an add to another lot goes on."""
        folder = self._own_dir(bank_id)
        folder.mkdir(exist_ok=True)
        lock = folder / ".build-lock"
        # the lock appears with its holder written in it (a complete file linked into place, which fails if a lock
        # exists): a crash can never leave an empty lock that reads as a live build forever
        holder_file = folder / temp_name(f"build-lock-{uuid.uuid4().hex[:8]}")
        holder_file.write_text(json.dumps({"host": HOST, "pid": os.getpid(), "started": time.time(),
                                           "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "lot": lot}))
        for attempt in range(2):
            try:
                _place_exclusive(holder_file, lock)
                break
            except FileExistsError:
                holder, identity = self._read_lock(lock)
                if attempt == 0 and self._holder_gone(holder):
                    if self._take_over(lock, identity):
                        continue
                    holder = self._lock_holder(lock)
                holder_file.unlink(missing_ok=True)
                raise BankError(f"a build of bank {bank_id!r} is in progress ({_described_holder(holder)}): wait "
                                "for it to finish, or build under another bank id") from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
            if _holds_nothing(folder):  # a build that failed before anything was written leaves no folder behind
                _remove_emptied(folder)

    def build_holder(self, bank_id: str) -> dict | None:
        """Who holds the build lock of ``bank_id`` (host, pid, started), or None when no live build does."""
        lock = self._dir(bank_id) / ".build-lock"
        if not lock.exists():
            return None
        holder = self._lock_holder(lock)
        return None if self._holder_gone(holder) else holder

    def _holder_gone(self, holder: dict) -> bool:
        """Whether a build lock's holder provably no longer builds (a dead pid here, or stale from elsewhere)."""
        return owner_gone(holder.get("host", ""), int(holder.get("pid", 0)), float(holder.get("started", 0)),
                          self.STALE_AFTER_S)

    LOCK_UNREADABLE_GRACE_S = 60.0  # an unreadable lock this old is damage, not a holder still writing it

    @staticmethod
    def _take_over(lock: Path, identity: tuple | None) -> bool:
        """Move away the dead build's lock that was read as ``identity`` (device, inode); False when the lock moved
        was another one: a replica that judged the same dead lock took it over first and placed its own, which is
        then put back (without this check both replicas built, each having removed the other's lock)."""
        trash = lock.with_name(f".trash-lock-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(lock, trash)
        except FileNotFoundError:  # removed meanwhile: the name is free to try
            return True
        moved = trash.stat()
        if identity is not None and (moved.st_dev, moved.st_ino) == identity:
            trash.unlink()
            return True
        try:
            _place_exclusive(trash, lock)
        except FileExistsError:  # a third replica took the name meanwhile: its lock stands, this one is spent
            trash.unlink(missing_ok=True)
        return False

    @staticmethod
    def _lock_holder(lock: Path) -> dict:
        return BankStore._read_lock(lock)[0]

    @staticmethod
    def _read_lock(lock: Path) -> tuple[dict, tuple | None]:
        """(holder, (device, inode) of the lock file read, None when it was gone)."""
        try:
            with open(lock, "rb") as f:
                stat = os.fstat(f.fileno())
                text = f.read()
        except OSError:  # gone meanwhile
            return {"host": HOST, "pid": -1, "started": 0.0, "unreadable": True}, None
        identity = (stat.st_dev, stat.st_ino)
        try:
            holder = json.loads(text)
            if isinstance(holder, dict):
                return holder, identity
        except ValueError:
            pass
        # a lock is written whole before it appears; an empty or garbled one was left by a crash (or a server
        # that wrote locks in two steps, for the moment it took): live only while it is that new
        if time.time() - stat.st_mtime > BankStore.LOCK_UNREADABLE_GRACE_S:
            return {"host": HOST, "pid": -1, "started": 0.0, "unreadable": True}, identity
        return {"host": HOST, "pid": os.getpid(), "started": time.time()}, identity

    # -- the pending lot --------------------------------------------------------------------------------------
    def _lot(self, bank_id: str, session: str | None = None) -> Path:
        """The shared pending lot's folder, or (``session``) one client's own."""
        lot = self._own_dir(bank_id) / ("lot" if check_lot_session(session) is None else f"lot-{session}")
        if lot.is_symlink():  # written, read and removed through: never out of the store
            raise BankError(f"the pending lot of bank {bank_id!r} is a symbolic link in the store, not a folder of "
                            f"its own: remove {lot} and add the lot again")
        return lot

    def add_to_lot(self, bank_id: str, category: str, images: np.ndarray, features: Features,
                   reset: bool = False, session: str | None = None) -> int:
        """Append encoded images to the bank's pending lot (``session``: a client's own lot, None: the shared one);
        returns that lot's size. Refused while a build of this bank reads that lot: the build reads the lot it
        started with, and images added meanwhile would belong to neither. A reset starts only that lot over."""
        lot = self._lot(bank_id, session)
        self._check_not_given_back(bank_id, session, lot)  # before anything is made for it (and again once written)
        if (holder := self._lot_reader(bank_id, session)) is not None:
            raise BankError(f"bank {bank_id!r} is being built right now ({_described_holder(holder)}): add these "
                            "images after the build finishes, or to another bank id")
        adding = images.nbytes + sum(int(a.nbytes) for a in features.outputs().values())
        # a lot started over frees what it replaces
        self.check_room(adding - (_bytes_under(lot) if reset and lot.is_dir() and not lot.is_symlink() else 0))
        if reset and lot.exists():
            self._remove_lot(lot)
        lot.mkdir(parents=True, exist_ok=True)
        fsync_dir(lot.parent)
        fsync_dir(self.root)
        parts = sorted(lot.glob("part-*.safetensors"))
        if parts:
            _, lot_category, lot_grid = self._part_header(bank_id, parts[0])
            if lot_category != category:
                raise BankError(f"the pending lot of bank {bank_id!r} is for category {lot_category!r}, "
                                f"not {category!r}: start a new lot (reset) or use another bank id")
            if lot_grid != list(features.grid):
                raise BankError(f"the pending lot of bank {bank_id!r} holds images of another size (patch grid "
                                f"{tuple(lot_grid)}, these give {tuple(features.grid)}): a lot is "
                                "encoded at one size; resize them like the first part, or start over with reset")
        # written whole under a temporary name, then linked in under a name no other part has had (its index,
        # then its digest): two adds at once never overwrite each other's part, and a build that clears the
        # parts it read never removes one added after it by a name reused
        staged = lot / temp_name(f"part-{uuid.uuid4().hex[:8]}.safetensors")
        try:
            _save_tensors(staged, {
                IMAGES: images, **{name: K.to_numpy(array) for name, array in features.outputs().items()},
            }, metadata={"category": category, "grid": json.dumps(list(features.grid))})
            try:
                digest = file_digest(staged)
                index = 1 + max([int(p.stem.split("-")[1]) for p in parts], default=-1)
                while True:
                    try:
                        _place_exclusive(staged, lot / f"part-{index:06d}-{digest}.safetensors")
                        break
                    except FileExistsError:
                        index += 1
            finally:
                staged.unlink(missing_ok=True)
            fsync_dir(lot)
        except FileNotFoundError:  # the lot went while this part was written: given back, says why
            self._check_not_given_back(bank_id, session, lot)
            raise
        self._check_not_given_back(bank_id, session, lot)  # given back while this part was written: it goes too
        return self.lot_size(bank_id, session)

    def _given_back(self, bank_id: str, session: str) -> Path:
        """The mark of a lot session its client gave back (``discard_lot``), kept ``pending_ttl_s``."""
        marks = self.root / GIVEN_BACK
        if marks.is_symlink():  # written through: never out of the store
            raise BankError(f"{marks} is a symbolic link in the store, not a folder of its own: remove it")
        return marks / bank_id / session

    def _check_not_given_back(self, bank_id: str, session: str | None, lot: Path) -> None:
        """Refuse an add to a lot session its client has given back, removing the lot: an add still on its way
        when the client was interrupted landed after the discard and left its images for a day. Checked before the
        part is written and after it: a discard's mark is written before it removes the lot, so a part placed
        before the mark is removed by the discard and one placed after it by this."""
        if session is None or not self._given_back(bank_id, session).exists():
            return
        self._remove_lot(lot)
        raise BankError(f"lot session {session!r} of bank {bank_id!r} was given back by its client (its run was "
                        "interrupted or its build failed): add the lot again with a new session")

    @staticmethod
    def _remove_lot(lot: Path) -> None:
        """Gone at once for readers (renamed away, then removed): a crash midway never leaves part of it to be
        built as if it were the whole."""
        trash = lot.parent / f".trash-lot-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(lot, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def lot_size(self, bank_id: str, session: str | None = None) -> int:
        """Images in the pending lot, read off the parts' headers (a build checks their digests)."""
        return sum(self._part_header(bank_id, part)[0]
                   for part in sorted(self._lot(bank_id, session).glob("part-*.safetensors")))

    @staticmethod
    def _part_header(bank_id: str, part: Path) -> tuple[int, str, list]:
        """(images, category, patch grid) of a pending lot's part, read off its header (``_read_pending_part``: its
        digest is the build's to check)."""
        def header():
            tensors, meta = _load_tensors_meta(part)
            return int(tensors[IMAGES]["shape"][0]), str(meta["category"]), json.loads(meta["grid"])

        return _read_pending_part(bank_id, part, lambda _: header())

    def load_lot(self, bank_id: str, session: str | None = None) -> tuple[str, np.ndarray, Features, list[Path]]:
        """The pending lot (``session``: a client's own): (category, images, features, the part files it was read
        from)."""
        parts = sorted(self._lot(bank_id, session).glob("part-*.safetensors"))
        if not parts:
            raise BankError(f"bank {bank_id!r} has no images to build from"
                            + (f" in lot {session!r}" if session is not None else "")
                            + ": add a lot first (pa-clip score --build --images DIR)")
        try:
            loaded = [self._read_part(bank_id, p) for p in parts]
        except FileNotFoundError:  # an add with reset started this lot over while it was read
            raise BankError(f"the pending lot of bank {bank_id!r} was started over while this build read it: add "
                            "the lot again and send the build again") from None
        meta = loaded[0][1]
        # two adds to an empty lot at once each find no part to match: the lot is read as one only if it is one
        kinds = {(m.get("category"), m.get("grid")) for _, m in loaded}
        if len(kinds) > 1:
            raise BankError(f"the pending lot of bank {bank_id!r} mixes categories or image sizes "
                            f"({', '.join(sorted(f'{c} at grid {g}' for c, g in kinds))}): start it again with "
                            "reset, one category and one size")
        cat = lambda key: np.concatenate([t[key] for t, _ in loaded])  # noqa: E731
        grid = tuple(json.loads(meta["grid"]))
        return (meta["category"], cat(IMAGES), Features.from_outputs({k: cat(k) for k in VISION_OUTPUTS}, grid),
                parts)

    @staticmethod
    def _read_part(bank_id: str, part: Path) -> tuple[dict, dict]:
        """A part of a pending lot, as it was written (the digest in its name): a build never reads a changed part
        into a bank."""
        def checked(digest: str):
            if file_digest(part) != digest:
                raise ValueError("its bytes are not those it was written with")
            return _load_tensors(part)

        return _read_pending_part(bank_id, part, checked)

    def clear_lot(self, bank_id: str, parts: list[Path] | None = None, session: str | None = None) -> None:
        """Remove the pending lot (``session``: a client's own), or only ``parts`` of it (what a build read: a part
        added since stays)."""
        lot = self._lot(bank_id, session)
        if parts is None:
            self._remove_lot(lot)
            return
        for part in parts:
            part.unlink(missing_ok=True)
        try:
            lot.rmdir()  # only when nothing is left: a part written meanwhile keeps it
        except OSError:
            pass

    def _lot_reader(self, bank_id: str, session: str | None) -> dict | None:
        """The build (or delete) holding the bank's lock while it reads this lot (``build_holder``), or None."""
        holder = self.build_holder(bank_id)
        return holder if holder is not None and holder.get("lot") in (session, ALL_LOTS) else None

    def discard_lot(self, bank_id: str, session: str) -> None:
        """Remove a client's own pending lot (``session``), unless a build is reading it."""
        if (holder := self._lot_reader(bank_id, session)) is not None:
            raise BankError(f"bank {bank_id!r} is being built from that lot right now ({_described_holder(holder)})")
        write_atomic(self._given_back(bank_id, check_lot_session(session)), "")  # before the lot goes (see the add)
        self.clear_lot(bank_id, session=session)
        if _holds_nothing(folder := self._own_dir(bank_id)):  # a first build's lot given back: no empty bank folder
            _remove_emptied(folder)

    def pending_lots(self) -> list[dict]:
        """Lots added but not (successfully) built: visible, with when they expire."""
        out = []
        for lot in sorted(self.root.glob("*/lot*")):
            if lot.is_symlink() or lot.parent.is_symlink() or not BANK_ID_PATTERN.fullmatch(lot.parent.name) or \
                    not _is_lot_folder(lot.name):
                continue
            session = None if lot.name == "lot" else lot.name[4:]
            parts = sorted(lot.glob("part-*.safetensors"))
            if not parts:
                continue
            try:
                updated = max(p.stat().st_mtime for p in parts)
            except FileNotFoundError:  # built or cleared meanwhile
                continue
            entry = {"bank": lot.parent.name, "lot": session,
                     "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(updated)),
                     "expires_in_s": max(0, int(updated + self.pending_ttl_s - time.time()))}
            try:
                entry.update(category=self._part_header(lot.parent.name, parts[0])[1],
                             images=self.lot_size(lot.parent.name, session))
            except Exception as err:  # one damaged part: that lot says so, the others are listed
                entry["error"] = (f"a part of this lot cannot be read ({type(err).__name__}: {err}): add the lot "
                                  "again with reset")
            out.append(entry)
        return out

    def expire_pending(self) -> list[str]:
        """Remove pending lots untouched for ``pending_ttl_s``; returns their bank ids."""
        expired = [(p["bank"], p["lot"]) for p in self.pending_lots() if p["expires_in_s"] == 0]
        for bank_id, session in expired:
            self.clear_lot(bank_id, session=session)
        return [bank_id for bank_id, _ in expired]


def _older_than(path: Path, age_s: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > age_s
    except FileNotFoundError:
        return False


def _monitor_owner_gone(path: Path, stale_after_s: float) -> bool:
    """Whether the scoring process that wrote a drift window (``<host>-<pid>.json``) is provably gone: every
    restart left one behind, which ``info`` listed as a scoring process for a day and nothing removed."""
    host, _, pid = path.stem.rpartition("-")
    try:
        return owner_gone(host, int(pid), path.stat().st_mtime, stale_after_s)
    except (ValueError, OSError):  # not a window this store wrote, or gone meanwhile
        return False


def _human(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**29 else f"{n / 2**20:.1f} MB"


def _bytes_under(path: Path) -> int:
    total = 0
    try:
        for item in path.rglob("*"):
            try:
                if item.is_file() and not item.is_symlink():
                    total += item.stat().st_size
            except OSError:  # removed meanwhile
                continue
    except OSError:  # a folder removed while it was walked: what was counted
        pass
    return total


def _has_versions(folder: Path) -> bool:
    """Whether a bank folder holds a version folder."""
    try:
        return folder.is_dir() and not folder.is_symlink() and any(p.name.startswith("v-") for p in folder.iterdir())
    except OSError:
        return False


def _read_pending_part(bank_id: str, part: Path, read):
    """``read(digest)`` of a pending lot's part that is a plain file named with its digest; anything else, or what
    ``read`` cannot make of it, is a ``BankError`` naming the part, never an internal error of the add, the listing
    or the build (``FileNotFoundError`` passes: a reset or a build removed the part meanwhile)."""
    try:
        if part.is_symlink() or (part.exists() and not part.is_file()):  # a link leads out of the store
            raise ValueError("a link or not a file")
        named = LOT_PART_PATTERN.fullmatch(part.name)
        if named is None:  # said at the add and the listing, not the build only
            raise ValueError("its name carries no digest (written by an earlier server, or not by a server)")
        return read(named.group(2))
    except FileNotFoundError:
        raise
    except Exception as err:
        raise BankError(f"part {part.name} of the pending lot of bank {bank_id!r} is damaged "
                        f"({type(err).__name__}: {err}): add the lot again with reset (pa-clip score --build adds "
                        "it anew)") from None


def _remove_emptied(folder: Path) -> bool:
    """Remove a bank folder ``_holds_nothing`` found empty of work: its drift windows, then the folder only if
    nothing else is there (never a tree: an add's lot that arrived since the check stays, where it was removed)."""
    monitor = folder / "monitor"
    if monitor.is_dir() and not monitor.is_symlink():
        shutil.rmtree(monitor, ignore_errors=True)
    try:
        folder.rmdir()
    except OSError:
        return False
    return True


def _holds_nothing(folder: Path) -> bool:
    """A bank folder without a live version, a pending lot, a version or a build in progress."""
    try:
        return folder.is_dir() and not any(p.name in ("CURRENT", ".build-lock") or _is_lot_folder(p.name) or
                                           p.name.startswith("v-")
                                           for p in folder.iterdir())
    except OSError:
        return False


def _load_tensors_meta(path: Path) -> tuple[dict, dict]:
    """The tensors' ``{"shape", "dtype"}`` and the metadata of a safetensors file, without reading the tensors
    (safetensors reads the header; the data stays on disk)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        slices = {name: f.get_slice(name) for name in f.keys()}
        return ({name: {"shape": list(t.get_shape()), "dtype": t.get_dtype()} for name, t in slices.items()},
                dict(f.metadata() or {}))


__all__ = ["BankStore", "StoreFull", "disk_full_is_clear", "check_bank_id", "file_digest", "BANK_ID_PATTERN",
           "VERSION_PATTERN"]
