"""Score a lot of images with PA-CLIP on a Triton server: an anomaly score and a heat map per image.

  python client/infer.py --category bottle --images 'photos/*.png' --build --out results/

--build first sends the images to the server as a lot and builds the bank (zero-shot: no labels, no reference
images; the lot itself is the reference). Without --build the images are scored against an existing bank, e.g. the
next lot of the same product, or single images online.

Every image gets its raw score, a calibrated score (0-1, 0.5 at the bank's automatic threshold) and a decision,
normal or anomalous: the bank derives the threshold from its own lot for a false-alarm budget (--false-alarm-rate,
default 1%: the expected fraction of new good parts called defective), so no labels and no guessing of a threshold
are needed. A lot too small to measure the threshold for the budget makes its decisions provisional (said in the
summary, results.csv and the report, with how many images would measure it).

Writes OUT/results.csv (rank,path,score,calibrated,decision,provisional,width,height,overlay,note: worst first, then the
images skipped or failed with the reason; overlay is relative to OUT, so the folder can be moved; a name or note that
starts like a spreadsheet formula, = + - @, gets a leading apostrophe), OUT/results.json (everything, names as they
are, plus the bank's summary) and OUT/overlays/*.png (file name, score and decision above [image | heat map]:
blue = like the lot, red = anomalous, on the bank's colour scale with its top at least the threshold, with a colour
bar marking the threshold and, on images decided anomalous only, a white outline where the map reaches the level
that made the decision); prints the counts and the ten worst images, and writes OUT/report.html: the score
histogram with the threshold and the images worst first as thumbnails linking to their overlays, in one
self-contained page.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import functools
import glob
import json
import math
import os
import re
import stat
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from client.heatmap import DEFAULT_OVERLAY_SIZE, Caption, one_line, save_panel
from client.report import write_report
from client import lot_checks
from client.images import IMAGE_SUFFIXES, decode, display_copy, image_size_of, model_input
from client import exits
from client.triton_client import ClientError, PAClipClient, ServerRefused, ServerUnreachable
from postprocess import contract as C
from postprocess import decision as D, strict_json
from postprocess.atomic import cannot_write, try_writing_in, write_atomic
from postprocess.bank_store import BANK_ID_PATTERN
from postprocess.config import MODES
from postprocess.errors import RequestError
from postprocess.ood import named_in
from postprocess import flags as F

def folder_files(spec: str) -> tuple[Path, ...] | None:
    """The files under the folder ``spec`` (None: not a folder), walked once for a run: its images
    (``find_images``) and the note on what else it holds (``unread_note``) read the same walk."""
    path = Path(spec)
    return tuple(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else None


def find_images(spec: str, files: tuple | None = None) -> list[Path]:
    """A folder (searched recursively) or a glob pattern -> sorted image files; ``files``: the folder's walk
    (``folder_files``) where the caller has it."""
    path = Path(spec)
    if path.is_dir():
        found = [p for p in files or folder_files(spec) if p.suffix.lower() in IMAGE_SUFFIXES]
    elif path.is_file():  # a file named with glob's characters ('part[1].png') is that file, not a pattern
        found = [path] if path.suffix.lower() in IMAGE_SUFFIXES else []
    else:
        found = [Path(p) for p in glob.glob(spec, recursive=True)  # files only: a FIFO held the run for ever
                 if Path(p).suffix.lower() in IMAGE_SUFFIXES and Path(p).is_file()]
    return sorted(found)


RUN_FOLDERS = ("overlays", "maps")  # what a scoring run writes pictures into, in --out


@functools.lru_cache(maxsize=64)
def run_folders(out: Path) -> tuple[str, ...]:
    """The folders of ``RUN_FOLDERS`` a scoring run wrote into ``out``, as the results.json it left there records
    them (``outputs``; one written before it recorded them: both); none without a results.json of ours (a folder
    named 'maps' in a user's image folder is the user's)."""
    try:
        report = strict_json.loads((out / "results.json").read_bytes())
    except (OSError, ValueError):
        return ()
    if not isinstance(report, dict) or "images" not in report:
        return ()
    outputs = report.get("outputs", list(RUN_FOLDERS))
    return tuple(name for name in RUN_FOLDERS if isinstance(outputs, list) and name in outputs)


def is_run_output(path: Path) -> bool:
    """Whether ``path`` is a picture a scoring run wrote (under the ``overlays`` or ``maps`` folder of a run's
    output that its results.json names, ``run_folders``): a heat map, never a part."""
    for folder in Path(path).resolve().parents:
        if folder.name in RUN_FOLDERS and folder.name in run_folders(folder.parent):
            return True
    return False


def part_images(spec: str, files: tuple | None = None) -> list[Path]:
    """The parts at ``spec`` (``find_images``) but the heat maps a scoring run left there (``is_run_output``)."""
    run_folders.cache_clear()  # read the runs' results.json now: one may have been written since
    return [p for p in find_images(spec, files) if not is_run_output(p)]


def unread_note(spec: str, files: tuple | None = None) -> str | None:
    """What a folder holds besides images, said once (None: nothing): a file type not read was left out of a lot
    without a word (GIFs were, until they were read)."""
    path = Path(spec)
    if not path.is_dir():
        return None
    others = Counter(p.suffix.lower() or "(no suffix)" for p in files or folder_files(spec)
                     if p.suffix.lower() not in IMAGE_SUFFIXES and p.name not in RUN_OUTPUTS
                     and not p.name.startswith("."))
    if not others:
        return None
    kinds = ", ".join(f"{suffix} x{n}" for suffix, n in others.most_common(5)) + (", ..." if len(others) > 5 else "")
    return (f"{sum(others.values())} other file(s) in {path_text(spec)!r} are not read ({kinds}): images end in "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}")


def no_images_message(spec: str) -> str:
    """Why ``find_images`` found nothing: no such path, a folder without images, a file or pattern of none."""
    path = Path(spec)
    kinds = ", ".join(sorted(IMAGE_SUFFIXES))
    if path.is_dir():
        others = sum(1 for p in path.rglob("*") if p.is_file())
        return (f"the folder {spec!r} holds no images ({others} other file(s); images end in {kinds})" if others
                else f"the folder {spec!r} is empty")
    if path.is_file():
        return f"{spec!r} is not an image file (images end in {kinds})"
    if glob.has_magic(spec):
        matched = glob.glob(spec, recursive=True)
        return (f"the pattern {spec!r} matches {len(matched)} file(s), none of them an image ({kinds})" if matched
                else f"the pattern {spec!r} matches nothing")
    return f"no such folder or file: {spec!r}"


def load_image(path: Path, size, bit_depth: int | None = None, turn: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(the image for the overlay, what is sent: resized to size = (height, width)) uint8; ``turn``: sent turned a
    quarter counter-clockwise (``--orientation majority``). ValueError naming the file when it cannot be read."""
    return load_lot_image(path, size, bit_depth, turn)[:2]


def load_lot_image(path: Path, size, bit_depth: int | None = None, turn: bool = False):
    decoded = decode(path, bit_depth, min_size=size)
    rgb = decoded.rgb.transpose(Image.Transpose.ROTATE_90) if turn else decoded.rgb
    # the original's upright (width, height) from its header: the pixels kept may be fewer (a JPEG decoded at a
    # reduced scale, the display copy's cap)
    info = {"bits": decoded.bits, "turned": turn, "orientation": decoded.orientation, "size": image_size_of(path)}
    return display_copy(decoded.rgb), model_input(rgb, size), info


def lot_size(encoder: dict, sizes: list[tuple[int, int]], aspect: str, image_size: list[int] | None) -> tuple[int, int]:
    """The (height, width) a new lot is sent at (``contract.choose_input_size``): --image-size HEIGHT WIDTH, else
    the encoder's one size when it was exported for one, else the long side (--image-size SIZE or the encoder's)
    with the lot's median aspect ratio (``sizes``: upright (width, height) of each image), or a square."""
    pair, long = C.size_argument(image_size)
    return C.choose_input_size(encoder, sizes if pair is None else [], aspect, pair, long)


def load_images(paths: list[Path], size, progress: bool, bit_depth: int | None = None,
                turn: set = frozenset()) -> tuple[list, list]:
    """[(path, overlay image, model input, info)] and [skipped]: an unreadable image is skipped with a warning."""
    loaded, skipped = [], []
    for path in tqdm(paths, desc="read images", unit="img", disable=not progress, leave=False):
        try:
            loaded.append((path, *load_lot_image(path, size, bit_depth, path in turn)))
        except ValueError as err:  # a line of its own (a Python warning named the source line and showed each once)
            print(f"warning: skipping: {err}", file=sys.stderr)
            skipped.append({"path": path_text(path), "error": str(err)})
    return loaded, skipped


def bit_depth_warning(loaded: list) -> str | None:
    """Images of one lot read at different bit depths (the bit-depth rule looks at each image's largest value):
    a dark image of a 12-bit camera may read as 10-bit, brighter than its neighbours."""
    depths = Counter(item[3]["bits"] for item in loaded)
    if len(depths) > 1 and max(depths) > 8:
        seen = ", ".join(f"{n} at {bits if bits else 'float 0-1'} bits" for bits, n in sorted(depths.items()))
        return (f"the images were read at different bit depths ({seen}): give the camera's depth with --bit-depth "
                "so that every image is scaled alike (client/images.py, the bit-depth rule)")
    return None


def path_text(path) -> str:
    """A path as the results, captions and report write it: a name whose bytes are not UTF-8 (from another system's
    share) shows those bytes as \\xNN escapes; kept as Python decodes it, it ended the run when results.csv was
    written, after every image had been scored."""
    return os.fspath(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def relative_name(path: Path, root: Path | None) -> str:
    """``path`` relative to ``root``, as it was found: links are not followed (two links to files of one name in
    two folders keep their folders)."""
    try:
        return path_text(Path(os.path.abspath(path)).relative_to(root)) if root else path_text(path.name)
    except ValueError:
        return path_text(path.name)


def images_root(spec: str, paths: list[Path]) -> Path | None:
    """What names are relative to: the --images folder, or the deepest folder holding every file a glob found (two
    files of one name in two folders keep their folders)."""
    if Path(spec).is_dir():
        return Path(os.path.abspath(spec))
    return Path(os.path.commonpath([os.path.abspath(p.parent) for p in paths])) if paths else None


def output_stems(paths: list[Path], root: Path | None) -> dict:
    """path -> the name its overlay and map are written under (without a suffix), one per image: its name relative
    to ``root`` without its suffix, or with it where two images would share one (x.png and x.jpg: x.png.png,
    x.jpg.png), and a number added where even that is taken (x.png.png beside x.png: x.png~2.png). Compared without
    case, as a case-blind file system would."""
    names = {p: relative_name(p, root) for p in paths}
    stems = {p: str(Path(n).with_suffix("")) for p, n in names.items()}
    taken = Counter(stem.casefold() for stem in stems.values())
    wanted = {p: stems[p] if taken[stems[p].casefold()] == 1 else names[p] for p in paths}
    out, used = {}, set()
    for p in sorted(paths, key=lambda q: (wanted[q] != stems[q], str(q))):  # plain stems keep their names first
        name, n = wanted[p], 1
        while name.casefold() in used:
            n += 1
            name = f"{wanted[p]}~{n}"
        used.add(name.casefold())
        out[p] = name
    return out


def add_reading_flags(p: argparse.ArgumentParser) -> None:
    """How images are read (--orientation, --bit-depth): the scoring command's and the main job's, whose lot
    checks' warnings ask for them."""
    p.add_argument("--orientation", choices=lot_checks.ORIENTATIONS, default="keep",
                   help="images that lie the other way from the lot (portrait in a landscape lot, or from the bank's "
                   "shape): keep them as they are (a warning names them) or turn them a quarter to the majority "
                   "orientation; their maps are turned back")
    p.add_argument("--bit-depth", type=F.integer(1, 16), default=None, metavar="BITS",
                   help="significant bits of images stored with more than 8 (e.g. 12 for a 12-bit camera writing "
                   "16-bit PNGs); default: the smallest of 8/10/12/14/16 that holds each image's largest value")


def build_parser(prog: str = "client/infer.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=exits.HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder (searched recursively) or glob pattern of images")
    p.add_argument("--category", default=None,
                   help="product name used in the text prompts, e.g. 'bottle' (needed with --build)")
    p.add_argument("--bank", default=None, help="bank id (default: the category, spaces as underscores)")
    p.add_argument("--build", action="store_true", help="build the bank from these images first (replaces it)")
    # choices: an unknown mode was refused by the server only after the whole lot was sent
    p.add_argument("--mode", default="pad_mpam", choices=MODES, help="PA-CLIP variant for --build: pad_mpam (full, "
                   "default), pad_pam, pad, mutual, baseline")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a PA-CLIP setting for --build, e.g. --set alpha=0.3 (JSON values)")
    p.add_argument("--image-size", type=F.IMAGE_SIDE, nargs="+", default=None, metavar="SIZE",
                   help="with --build: the long side the lot is resized to (default: the encoder's), or HEIGHT "
                   "WIDTH. Without --build images are resized to the size the bank was built at")
    p.add_argument("--aspect", choices=C.ASPECTS, default=C.DEFAULT_ASPECT,
                   help="with --build: keep the lot's median aspect ratio (native) or stretch to a square")
    add_reading_flags(p)
    p.add_argument("--out", default="out/infer", help="output folder; one holding another run's results is refused "
                   "unless --overwrite, and one another run is writing into is refused")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results a previous run left in --out (its results, overlays, maps, report; "
                   "other files stay)")
    p.add_argument("--fail-on", choices=FAIL_ON, default=None,
                   help="exit with status 1 when any image is decided so (for scripts on a line): anomalous, "
                   "out_of_distribution; drift: when the bank's drift alarm is up after this run's parts; any: "
                   "all three. An image that could not be read or scored fails it too, and a bank without a "
                   "calibration is refused (nothing could be decided)")
    p.add_argument("--threshold", default="auto",
                   help="'auto' (default): the bank's automatic threshold for the false-alarm budget; or a "
                   "calibrated score strictly between 0 and 1 above which an image is anomalous (0.5 = auto; "
                   "higher calls fewer parts defective)")
    p.add_argument("--false-alarm-rate", type=F.FALSE_ALARM_RATE, default=None, metavar="RATE",
                   help="the fraction of good parts you accept being called defective, e.g. 0.01 (default: the "
                   f"bank's; a bank keeps the one given at its --build, else {D.DEFAULT_FALSE_ALARM_RATE}); the "
                   "threshold follows from it")
    p.add_argument("--url", default=None, help="server address (default 127.0.0.1:8000 for http, :8001 for grpc)")
    p.add_argument("--protocol", choices=["http", "grpc"], default="http")
    p.add_argument("--key", default=None, help="the server's access key (default: $PA_CLIP_KEY; needed when the "
                   "server was started off loopback)")
    p.add_argument("--concurrency", type=F.integer(1, MAX_CONCURRENCY), default=4, help="requests in flight")
    # at most what the ensemble takes: 9 to 64 passed here and every request was refused, every image "failed"
    p.add_argument("--batch-size", type=F.integer(1, C.ENSEMBLE_MAX_BATCH), default=1,
                   help=f"images per scoring request (at most {C.ENSEMBLE_MAX_BATCH}, the server's limit)")
    p.add_argument("--shared-memory", action="store_true",
                   help="send pixels and receive maps through system shared memory (client on the server's host)")
    p.add_argument("--no-overlays", action="store_true", help="write scores only")
    p.add_argument("--overlay-size", type=F.integer(0, 8192), default=DEFAULT_OVERLAY_SIZE, metavar="PIXELS",
                   help=f"longest side of each panel of an overlay (default {DEFAULT_OVERLAY_SIZE}; 0: the image as "
                   "read for pictures, at most 1600 pixels long); results.csv keeps the original's width and height")
    p.add_argument("--save-maps", action="store_true", help="also write each map as float16 .npy")
    p.add_argument("--timeout", type=F.SECONDS, default=3600.0, help="seconds to wait for one request (builds are long)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, and no summary of counts and worst images "
                   "(results.csv, results.json and report.html hold them; the one-line status stays)")
    return p


FAIL_ON = ("anomalous", D.OUT_OF_DISTRIBUTION, "drift", "any")
MAX_CONCURRENCY = 64  # requests in flight, each a connection: under the guards' per-address cap (request_checks)
# what a run writes into --out: replaced as a whole by --overwrite, never mixed with another run's
RUN_OUTPUTS = ("results.csv", "results.json", "report.html", "overlays", "maps")


def folders_written(args) -> tuple[str, ...]:
    """The folders of ``RUN_FOLDERS`` this run writes into --out (what its results.json names as ``outputs``)."""
    return tuple(name for name, wanted in (("overlays", not args.no_overlays), ("maps", args.save_maps)) if wanted)


def check_out(out: Path, overwrite: bool, writes: tuple = RUN_FOLDERS) -> list[str]:
    """--out for a new run: refused while it holds another run's results unless ``overwrite``; returns what a run
    wrote there (``RUN_OUTPUTS``), for ``clear_out`` once the server has answered (a refused run loses nothing).
    A folder ``overlays`` or ``maps`` that no run's results.json there names (``run_folders``) is the user's: never
    counted or removed, and refused where this run would write into it (``writes``). The caller has made the folder
    and seen it writable (``check_writable``, before it locks it)."""
    run_folders.cache_clear()  # what a run wrote there is read now, not remembered from before
    wrote = run_folders(out.resolve())
    present = [name for name in RUN_OUTPUTS if (out / name).exists() or (out / name).is_symlink()]
    found = [name for name in present if name in wrote or name not in RUN_FOLDERS]
    if found and not overwrite:
        raise UsageError(f"--out {str(out)!r} holds another run's results ({', '.join(found)}): pass --overwrite to "
                         "replace them, or another --out")
    foreign = [name for name in RUN_FOLDERS if name in present and name in writes and name not in wrote]
    if foreign:
        raise UsageError(f"--out {str(out)!r} holds a folder {foreign[0]!r} that no scoring run wrote (no results.json "
                         f"beside it): this run writes its {foreign[0]} there; pass another --out")
    return found


def check_writable(out: Path) -> bool:
    """--out made, and refused (``UsageError``) when it is a file or cannot be written: before any work is sent.
    Whether this call made it (``holding_out`` removes a folder it made that a refused run left empty)."""
    made = not out.exists()
    if not made and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file, not a folder: pass another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        try_writing_in(out)
    except OSError as err:
        raise UsageError(cannot_write("--out", out, err)) from None
    return made


OUT_LOCK = ".pa-clip-run.lock"
_HELD_OUT: set = set()  # the --out folders this process holds (the main job holds its own and runs infer in it)


@contextlib.contextmanager
def holding_out(out: Path, made: bool = False):
    """The --out folder held by this run (a lock that the system lets go when the process ends, however it ends):
    two runs into one folder mixed their overlays and the last to finish wrote its results.csv over the other's.
    ``made``: the run made the folder; one it leaves holding nothing but the lock (a refused run) is removed."""
    key = out.resolve()
    if key in _HELD_OUT:
        yield
        return
    try:  # never through a link: the holder's pid is written over what the lock file is
        fd = os.open(out / OUT_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as err:
        raise UsageError(f"--out {str(out)!r}: its lock file {OUT_LOCK} cannot be opened ({err.strerror or err}; a "
                         "link or a folder by that name is not one): remove it, or pass another --out") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO by that name: fdopen's seek raised a traceback
        os.close(fd)
        raise UsageError(f"--out {str(out)!r}: its lock file {OUT_LOCK} is not a plain file: remove it, or pass "
                         "another --out")
    with os.fdopen(fd, "r+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            unlockable = None
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read(64).strip()
            raise UsageError(f"another scoring run{f' (process {holder})' if holder.isdigit() else ''} is writing "
                             f"into --out {str(out)!r}: wait for it to finish, or pass another --out") from None
        except OSError as err:  # no locks there (NFS mounted nolock, some FUSE and SMB shares: ENOLCK, EOPNOTSUPP)
            unlockable = err.strerror or str(err)
        if unlockable is not None:  # the run goes on, as it did before there was a lock
            print(f"warning: --out {str(out)!r} cannot be locked ({unlockable}): nothing stops another run from "
                  "writing into it at the same time", file=sys.stderr)
            yield
            return
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        _HELD_OUT.add(key)
        try:
            yield
        finally:
            _HELD_OUT.discard(key)
            with contextlib.suppress(OSError):  # a refused run left an empty folder with a lock file in it
                if made and [p.name for p in out.iterdir()] == [OUT_LOCK]:
                    (out / OUT_LOCK).unlink()
                    out.rmdir()


def clear_out(out: Path, found: list[str]) -> None:
    """Remove the previous run's results (only what a run writes), so that old overlays never sit beside new ones."""
    import shutil

    for name in found:
        target = out / name
        shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def safe_bank_id(category: str, fallback: str | None = "lot") -> str | None:
    """A valid bank id made from a category name: spaces and other characters as underscores, accents dropped;
    ``fallback`` when nothing of the name is left (a name in another script)."""
    import unicodedata

    ascii_name = unicodedata.normalize("NFKD", category).encode("ascii", "ignore").decode()
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_name).strip("._-")[:128]
    return cleaned or fallback


class UsageError(ValueError):
    """The command line or its inputs are wrong (exit status 2)."""


def product_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pa-clip-triton")
    except PackageNotFoundError:
        return "unknown"


def parse_overrides(items, separator: str = "=", flag: str = "--set") -> dict:
    """KEY=VALUE items (or KEY:VALUE with ``separator``) -> settings, values read as JSON where they parse."""
    options = {}
    for item in items:
        key, sep, value = item.partition(separator)
        if not sep:
            raise ValueError(f"{flag} wants KEY{separator}VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def build(client: PAClipClient, bank: str, category: str, images: np.ndarray, options: dict, chunk: int,
          progress: bool) -> dict:
    bar = tqdm(total=len(images), desc=f"add lot to bank {bank}", unit="img", disable=not progress, leave=False)
    # this run's own lot: another client's adds to the bank neither join nor remove it; given back if the build fails
    with client.lot_session(bank) as lot:
        for start in range(0, len(images), chunk):
            client.add_images(bank, category, images[start:start + chunk], reset=start == 0, lot=lot)
            bar.update(min(chunk, len(images) - start))
        bar.close()
        print(f"building bank {bank!r} from {len(images)} images (the server encodes augmentations and builds "
              "the memory banks; this is the slow part) ...", file=sys.stderr, flush=True)
        return client.build_bank(bank, options, on_wait=lambda message: print(
            f"waiting: {message.split(': ', 1)[-1]}", file=sys.stderr, flush=True), lot=lot)


class ScoringInterrupted(KeyboardInterrupt):
    """Ctrl-C while a run scored, with the rows and failures it had by then."""

    def __init__(self, rows: list, failed: list):
        super().__init__()
        self.rows, self.failed = rows, failed


def score_all(args, loaded: list, bank: str, value_range: tuple[float, float], out: Path, root: Path | None,
              progress: bool, decider: D.Decider | None = None, on_first_answer=None) -> tuple[list, list]:
    """Score in batches with ``args.concurrency`` requests in flight; each result gets its decision
    (``add_decisions``) and its overlay as it arrives. ``on_first_answer()`` runs once, when the server first
    scores a batch and before any picture is written (a run the server refuses as a whole leaves --out as it was).
    A failed request's reason is said once, however many batches it failed."""
    local = threading.local()
    clients = []
    lock = threading.Lock()
    answered = []  # set once on_first_answer has run

    def client() -> PAClipClient:
        if not hasattr(local, "client"):
            local.client = PAClipClient(args.url, args.protocol, args.timeout, args.shared_memory, args.key)
            with lock:
                clients.append(local.client)
        return local.client

    stems = output_stems([item[0] for item in loaded], root)

    def work(batch):
        images = np.stack([item[2] for item in batch])
        maps, scores = client().score(images, bank)
        with lock:
            if not answered:
                if on_first_answer is not None:
                    on_first_answer()
                answered.append(True)
        rows = []
        for (path, original, sent, info), amap, score in zip(batch, maps, scores):
            name = relative_name(path, root)
            width, height = info.get("size") or (original.shape[1], original.shape[0])
            row = {"path": path_text(path), "score": float(score), "width": width, "height": height}
            level = add_decisions([row], decider, [amap], [sent])[0]
            if info["turned"]:  # sent turned a quarter counter-clockwise: the map is turned back onto the image
                amap = np.rot90(amap, -1)
                row["turned"] = True
            try:  # a picture that cannot be written (a full disk, a name too long) is this image's note only
                if not args.no_overlays:
                    target = out / "overlays" / f"{stems[path]}.png"
                    cut = None if decider is None else decider.threshold_calibrated
                    save_panel(target, original, amap, *value_range, caption=caption_for(name, row, level, cut),
                               max_side=args.overlay_size or None)
                    row["overlay"] = path_text(target.relative_to(out))  # beside results.csv: movable with it
                if args.save_maps:
                    target = out / "maps" / f"{stems[path]}.npy"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    np.save(target, amap.astype(np.float16))
            except OSError as err:
                row["write_error"] = f"{target.name} not written: {err.strerror or err}"
            rows.append(row)
        return rows

    batches = [loaded[i:i + args.batch_size] for i in range(0, len(loaded), args.batch_size)]
    results, failed, reasons, refusals = [], [], Counter(), []
    bar = tqdm(total=len(loaded), desc=f"score against {bank}", unit="img", disable=not progress)
    pool = ThreadPoolExecutor(max_workers=max(1, args.concurrency))
    try:
        futures = {pool.submit(work, batch): batch for batch in batches}
        for future in as_completed(futures):
            try:
                results.extend(future.result())
            except ClientError as err:
                for path, *_ in futures[future]:
                    failed.append({"path": path_text(path), "error": str(err),
                                   **({"unreachable": True} if isinstance(err, ServerUnreachable) else {})})
                refusals.append(err if isinstance(err, ServerRefused) else None)
                if not reasons[str(err)]:  # once per reason: a damaged bank's refusal came as many warnings
                    print(f"warning: request failed: {err}", file=sys.stderr)
                reasons[str(err)] += len(futures[future])
            bar.update(len(futures[future]))
    except BaseException as err:  # Ctrl-C: the batches not sent yet are dropped (a pool's own exit sent every one)
        pool.shutdown(wait=True, cancel_futures=True)
        if isinstance(err, KeyboardInterrupt) and results:  # what was scored is kept (it was lost, its overlays not)
            raise ScoringInterrupted(rank_rows(results), failed) from None
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()
        for c in clients:
            c.close()
    if not results and refusals and all(refusals):  # the bank (damaged, deleted) or the request refused as a whole
        raise refusals[0]
    return rank_rows(results), failed


def rank_rows(rows: list[dict]) -> list[dict]:
    """Worst first (``rank`` 1); an image whose score could not be computed (NaN) last: a NaN in the sort key would
    leave the others out of order."""
    rows.sort(key=lambda row: (math.isnan(row["score"]), 0.0 if math.isnan(row["score"]) else -row["score"],
                               row["path"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def decisions_line(rows: list[dict], calibration, threshold: float | None) -> str:
    """The summary line's decisions: counted from each row's decision (an image with no score is neither normal
    nor anomalous), the threshold they were made at and how sure it is (provisional with a user's threshold too:
    that level sits on the lot's calibration all the same)."""
    counts = Counter(r.get("decision") for r in rows)
    how = (f"automatic threshold {calibration.threshold:.4g} (false-alarm budget "
           f"{D.percent(calibration.false_alarm_rate)})" if threshold is None else f"calibrated threshold {threshold}")
    line = (f"; {counts['anomalous']} anomalous, {counts['normal']} normal at the {how}"
            + (f", {counts[D.OUT_OF_DISTRIBUTION]} out of distribution" if counts[D.OUT_OF_DISTRIBUTION] else "")
            + (f" ({over} of them above the threshold too)" if (over := sum(bool(r.get("over_threshold"))
                                                                          for r in rows)) else "")
            + (f", {counts['invalid']} invalid (no score)" if counts["invalid"] else ""))
    confidence = calibration.confidence()
    if threshold is None:
        return line + f"; {confidence['text']}"
    return line + (f"; the calibration is provisional: {confidence['text']}" if confidence["provisional"] else "")


def caption_for(name: str, row: dict, level: float | None, cut: float | None = None) -> Caption:
    """What an overlay says: the row's decision and scores; ``level`` (the map value that belongs to the decision,
    ``Decider.decide``) is marked on the colour bar and outlined only on an image decided anomalous; ``cut``: the
    user's --threshold on the calibrated scale (None: the automatic 0.5)."""
    return Caption(name, row["score"], row.get("calibrated"), row.get("decision", "unknown"), level,
                   bool(row.get("provisional")), cut, row.get("ood_reason"), bool(row.get("over_threshold")))


def parse_threshold(text: str) -> float | None:
    """--threshold: None for 'auto', else a calibrated score strictly between 0 and 1 (DecisionError otherwise)."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise D.DecisionError(f"--threshold is 'auto' or a calibrated score strictly between 0 and 1, got {text!r}")
    return D.check_calibrated_threshold(value)


def colour_range(map_range, decider: D.Decider | None) -> tuple[float, float]:
    """The run's heat-map colour scale: the bank's (its lot's typical maps, ``bank.colour_scale``), its top raised to
    the threshold where that lies above it, so that only a map at the decision's level is drawn in the hottest colour
    (a lot's good maps reach its top: without this every good part showed red spots)."""
    low, high = (float(v) for v in map_range)
    if decider is not None and math.isfinite(decider.raw_threshold):
        high = max(high, decider.raw_threshold)
    return low, high


def add_decisions(rows: list, decider: D.Decider | None, maps=None, images=None) -> list:
    """Each row gets its calibrated score, decision (0.5 on the calibrated scale = the automatic threshold; with
    ``maps`` and the ``images`` sent, ``out_of_distribution`` and its reason for an image unlike the bank's lot) and
    whether that threshold is provisional; returns each row's outline level (None without ``maps`` or a decider)."""
    levels = []
    provisional = decider is not None and decider.calibration.confidence()["provisional"]
    for i, row in enumerate(rows):
        if decider is None:
            row["calibrated"], row["decision"] = None, "unknown"
            levels.append(None)
            continue
        decided = decider.decide(row["score"], None if maps is None else maps[i], None if images is None else images[i])
        row["calibrated"], row["decision"] = decided["calibrated"], decided["decision"]
        if "ood_reason" in decided:
            row["ood_reason"] = decided["ood_reason"]
            row["over_threshold"] = decided["over_threshold"]
        if provisional and row["decision"] != "invalid":
            row["provisional"] = True
        levels.append(decided.get("level"))
    return levels


CSV_COLUMNS = ["rank", "path", "score", "calibrated", "decision", "provisional", "width", "height", "overlay",
               "note"]


def flagged_anomalous(row: dict) -> bool:
    """Whether the score calls the image anomalous: decided so, or out of distribution with a score above the
    threshold (unlike the lot as a whole, it is not passed as normal: ``--fail-on anomalous`` counts it)."""
    return row.get("decision") == "anomalous" or bool(row.get("over_threshold"))


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet reads as the start of a formula


def csv_text(value) -> str:
    """A text cell of results.csv (a file name, a note) that no spreadsheet runs: one starting like a formula gets a
    leading apostrophe (results.json keeps the text as it is)."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


KEY_FLAGS = ("--k", "--ke", "--key")  # the access key's flag and the abbreviations argparse takes for it


def recorded_command(prog: str, argv: list) -> list:
    """The command line as results.json records it, the access key's value hidden (``--key K``, ``--key=K``, an
    abbreviation): results.json is shared with the report page."""
    recorded, hide_next = [prog], False
    for arg in argv:
        flag, equals, _ = arg.partition("=")
        recorded.append("***" if hide_next else f"{flag}=***" if equals and flag in KEY_FLAGS else arg)
        hide_next = arg in KEY_FLAGS
    return recorded


def write_results(out: Path, rows: list, skipped: list = (), failed: list = ()) -> Path:
    """results.csv: the scored images worst first (rank 1 = highest score), then those skipped or failed, each with
    its reason in 'note'. provisional: "yes" when the bank's threshold is extrapolated from too few lot images for
    the budget (``Calibration.confidence``). width x height: the original's, as it lies (the overlay may be
    smaller)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            for row in rows:
                calibrated = row.get("calibrated")
                writer.writerow([row.get("rank", ""), csv_text(row["path"]), f"{row['score']:.6f}",
                                 "" if calibrated is None or not np.isfinite(calibrated) else f"{calibrated:.4f}",
                                 row.get("decision", "unknown"), "yes" if row.get("provisional") else "",
                                 row.get("width", ""), row.get("height", ""), csv_text(row.get("overlay")),
                                 csv_text("; ".join(n for n in (row.get("ood_reason"), D.OVER_THRESHOLD_NOTE if
                                                       row.get("over_threshold") else None,
                                                       "turned a quarter to score" if row.get("turned") else None,
                                                       row.get("write_error"))
                                           if n))])
            for kind, items in (("skipped", skipped), ("failed", failed)):
                for item in items:
                    writer.writerow(["", csv_text(item["path"]), "", "", kind, "", "", "", "",
                                     csv_text(item.get("error"))])

    return write_atomic(out / "results.csv", write)


def print_summary(rows: list, skipped: list, failed: list, worst: int = 10) -> None:
    """Counts, then the worst images with their scores and decisions."""
    flagged = sum(r.get("decision") == "anomalous" for r in rows)
    foreign = sum(r.get("decision") == D.OUT_OF_DISTRIBUTION for r in rows)
    foreign_over = sum(bool(r.get("over_threshold")) for r in rows)
    provisional = " (provisional decisions)" if any(r.get("provisional") for r in rows) else ""
    print(f"{len(rows)} scored, {len(skipped)} skipped, {len(failed)} failed; {flagged} flagged anomalous"
          + (f", {foreign} out of distribution (unlike the bank's lot: wrong product, camera moved, or lighting "
             "changed" + (f"; {foreign_over} of them score above the threshold too" if foreign_over else "") + ")"
             if foreign else "") + provisional, file=sys.stderr)
    if rows:
        print(f"worst {min(worst, len(rows))} (rank, score, calibrated, decision, image):", file=sys.stderr)
    for row in rows[:worst]:
        calibrated = "-" if row.get("calibrated") is None else f"{row['calibrated']:.3f}"
        why = f"  ({named_in(row['ood_reason'])})" if row.get("ood_reason") else ""
        print(f"  {row['rank']:>4}  {row['score']:.4f}  {calibrated:>5}  {row.get('decision', 'unknown'):<19}  "
              f"{one_line(row['path'])}{why}", file=sys.stderr)


def main(argv=None, prog: str = "client/infer.py", recorded_as: list | None = None) -> int:
    """``recorded_as``: the command results.json records, where a job runs this one for the user (``pa-clip main``
    recorded its own call to a server gone at its end)."""
    args = build_parser(prog).parse_args(argv)
    command = recorded_as or recorded_command(prog, sys.argv[1:] if argv is None else list(argv))
    with contextlib.ExitStack() as held:  # the --out folder's lock, held to the end of the run
        return run_scoring(args, command, held)


def run_scoring(args, command: list, held: contextlib.ExitStack) -> int:
    progress = not args.quiet
    out = Path(args.out)
    bank = args.bank or (args.category or "").strip().replace(" ", "_")
    if not bank:
        print("error: give --bank (or --category, which names the bank by default)", file=sys.stderr)
        return 2
    if not args.bank and not BANK_ID_PATTERN.fullmatch(bank):
        print(f"error: the category {args.category!r} does not make a bank id (1-128 letters, digits, '.', '_' or '-',"
              f" starting with a letter or digit): name the bank with --bank, e.g. --bank {safe_bank_id(bank)}",
              file=sys.stderr)
        return 2
    if args.build and not args.category:
        print("error: --build needs --category (the product name the text prompts use)", file=sys.stderr)
        return 2
    try:
        options = {"mode": args.mode, **parse_overrides(args.set)} if args.build else {}
        if args.build and args.false_alarm_rate is not None:  # the bank keeps it for the runs that score against it
            options["false_alarm_rate"] = args.false_alarm_rate
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        threshold = parse_threshold(args.threshold)
        if args.false_alarm_rate is not None:
            D.check_false_alarm_rate(args.false_alarm_rate)
        if args.bit_depth is not None and not 1 <= args.bit_depth <= 16:
            raise ValueError(f"--bit-depth is the significant bits of 16-bit images, 1 to 16, got {args.bit_depth}")
        C.size_argument(args.image_size)  # before the server is asked (it was read only once it had answered)
    except (ValueError, RequestError) as err:  # DecisionError included
        print(f"error: {err}", file=sys.stderr)
        return 2
    # a run's own pictures (an --out inside --images, run again) are its results, never parts to score
    files = folder_files(args.images)  # one walk of a folder for its parts and the note on its other files
    paths = part_images(args.images, files)
    if not paths:
        print(f"error: {no_images_message(args.images)} (--images is a folder or a glob like 'photos/*.png')",
              file=sys.stderr)
        return 2
    if unread := unread_note(args.images, files):
        print(f"note: {unread}", file=sys.stderr)
    try:
        held.enter_context(holding_out(out, made=check_writable(out)))
        previous = check_out(out, args.overwrite, writes=folders_written(args))
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    root = images_root(args.images, paths)
    found_warnings: list[str] = []

    def warn(message: str) -> None:
        found_warnings.append(message)
        print(f"warning: {message}", file=sys.stderr)

    upright = {p: s for p in paths if (s := image_size_of(p))}  # (width, height) after the EXIF orientation
    # before the server is asked anything: too few images, or too few different files (copies count once; each
    # file is read once, sha256_of keeps its digest for the duplicates' check below)
    if args.build and (refusal := lot_checks.check_lot_size(
            len(upright), len({lot_checks.sha256_of(p) for p in upright})).refusal):
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    try:
        client = PAClipClient(args.url, args.protocol, args.timeout, key=args.key)
        held.callback(client.close)  # also when the server is not there, or refuses
        client.check_ready()
        encoder = client.encoder()
        if args.build:
            turning = lot_checks.check_orientation(upright, args.orientation)
            sizes = [(h, w) if p in turning.turn else (w, h) for p, (w, h) in upright.items()]
            size = lot_size(encoder["encoder"], sizes, args.aspect, args.image_size)
        else:  # the bank was built at one size: its images' size, which is also its maps' size
            size = tuple(client.bank_info(bank)["image_size"])
            if args.image_size is not None:
                print(f"note: --image-size applies to --build; bank {bank!r} scores {size[0]}x{size[1]} images",
                      file=sys.stderr)
            turning = lot_checks.check_orientation(upright, args.orientation,
                                                   lot_checks.orientation_of(size[1], size[0]))
        for message in turning.warnings + lot_checks.check_aspect(upright, turning.turn):
            warn(message)
        print(f"server {client.url} ({args.protocol}): encoder {encoder['encoder']['backbone']}, images sent at "
              f"{size[0]}x{size[1]} (height x width)"
              + ("" if encoder["has_text"] else " (no text encoder: normal images are chosen visually)"),
              file=sys.stderr)
        loaded, skipped = load_images(paths, size, progress, args.bit_depth, turning.turn)
        if skipped:
            print(f"skipped {len(skipped)} unreadable image(s): " + ", ".join(s["path"] for s in skipped),
                  file=sys.stderr)
        if not loaded:
            print("error: none of the images could be read", file=sys.stderr)
            return 2
        if args.build:
            # counted as the server counts them: copies of one image (its pixels as sent) are one image
            checked = lot_checks.check_lot_size(len(loaded), len({C.image_key(item[2]) for item in loaded}))
            if checked.refusal:
                print(f"error: {checked.refusal}", file=sys.stderr)
                return 2
            for message in checked.warnings:
                warn(message)
        for message in lot_checks.check_duplicates({item[0]: lot_checks.sha256_of(item[0]) for item in loaded}):
            warn(message)
        if message := bit_depth_warning(loaded):
            warn(message)
        t0 = time.perf_counter()
        if args.build:
            built = build(client, bank, args.category, np.stack([item[2] for item in loaded]), options, 8, progress)
            print(f"bank {bank!r} built in {time.perf_counter() - t0:.1f} s: {built['n_images']} images, normal "
                  f"images chosen by {built['normal_selection']} ({len(built['normal_indices'])}), "
                  f"mode {options['mode']}", file=sys.stderr)
        info = client.bank_info(bank)
        client.close()
        print(f"bank {bank!r}: {info['n_images']} lot images, {info['bytes_on_disk'] / 2**20:.1f} MB on disk, "
              f"{info['bytes_in_memory'] / 2**20:.1f} MB once loaded for scoring", file=sys.stderr)
    except (ClientError, RequestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return exits.for_error(err)
    try:
        decider = D.Decider.for_bank(info, args.false_alarm_rate, threshold)
    except D.DecisionError as err:
        print(f"error: bank {bank!r} holds a calibration this client cannot use ({err}): build it again (--build)",
              file=sys.stderr)
        return 2
    if decider is None:
        if args.fail_on:  # nothing would be decided, so nothing could fail: a line script would read that as good
            print(f"error: --fail-on {args.fail_on}: bank {bank!r} was built before banks kept a calibration, so no "
                  "image can be decided; build it again (--build)", file=sys.stderr)
            return exits.USAGE
        warn(f"bank {bank!r} was built before banks kept a calibration: no decisions; build it again (--build)")
    elif args.build and (note := D.mostly_defective_note(decider.calibration, decider.calibration.threshold)):
        warn(note)  # a benchmark's test set scored as a lot: 2 of 63 defective bottles were called anomalous

    def start_writing() -> None:  # once the server has scored a batch: a run it refuses loses nothing
        clear_out(out, previous)
        # the folders this run writes are a run's from its first picture: an interrupted run's overlays are replaced
        # by --overwrite and never read as parts (results.json came only at the end, so they stood as the user's)
        write_atomic(out / "results.json", strict_json.dumps(
            {"complete": False, "outputs": list(folders_written(args)), "images": []}, indent=1))

    def results_report(rows: list, failed: list, elapsed: float, complete: bool) -> dict:
        return {
            "product": {"name": "pa-clip-triton", "version": product_version()},
            "command": command,
            "complete": complete,
            "bank": summary_of(info), "bank_version": info.get("version"), "protocol": args.protocol,
            "decision": None if decider is None else {
                **decider.calibration.to_dict(), "threshold_calibrated": 0.5 if threshold is None else threshold,
                "threshold_source": "auto" if threshold is None else "--threshold"},
            "outputs": list(folders_written(args)), "colour_range": list(scale),
            "scored": len(rows), "skipped": skipped, "failed": failed, "warnings": found_warnings,
            "seconds": round(elapsed, 3),
            "images_per_second": round(len(rows) / elapsed, 3) if elapsed > 0 else None,
            "images": rows,
        }

    t1 = time.perf_counter()
    scale = colour_range(info["map_range"], decider)
    try:
        rows, failed = score_all(args, loaded, bank, scale, out, root, progress, decider, start_writing)
    except ServerRefused as err:  # every request refused (a damaged bank): nothing scored, --out as it was
        print(f"error: the server refused to score against bank {bank!r}: {err}", file=sys.stderr)
        return exits.for_error(err)
    except ScoringInterrupted as stop:  # the parts scored before Ctrl-C keep their results, marked incomplete
        seen = {row["path"] for row in stop.rows} | {item["path"] for item in stop.failed}
        failed = stop.failed + [{"path": path_text(item[0]), "error": "not scored: the run was interrupted"}
                                for item in loaded if path_text(item[0]) not in seen]
        csv_path = write_results(out, stop.rows, skipped, failed)
        write_atomic(out / "results.json", strict_json.dumps(
            {**results_report(stop.rows, failed, time.perf_counter() - t1, False), "interrupted": True}, indent=1))
        print(f"interrupted: {len(stop.rows)} of {len(loaded)} images were scored; their results are in {csv_path} "
              "and results.json (marked incomplete)", file=sys.stderr)
        raise KeyboardInterrupt from None
    if not rows:  # every request failed otherwise (the server lost): the results say which, in place of the old
        start_writing()
    elapsed = time.perf_counter() - t1
    if alarm := (drift_note(args, bank, info.get("version")) if rows else None):
        warn(alarm)
    csv_path = write_results(out, rows, skipped, failed)
    report = results_report(rows, failed, elapsed, True)
    write_atomic(out / "results.json", strict_json.dumps(report, indent=1))  # a NaN score is written null
    line = f"scored {len(rows)} images in {elapsed:.1f} s ({report['images_per_second']} img/s)"
    if decider is not None:
        line += decisions_line(rows, decider.calibration, threshold)
    drawn = not args.no_overlays and any("overlay" in row for row in rows)
    print(f"{line}. Wrote {csv_path}" + (f" and {out / 'overlays'}/" if drawn else ""), file=sys.stderr)
    page = write_report(out, f"PA-CLIP: {len(rows)} images against bank {bank!r}", rows, skipped, failed,
                        None if decider is None else decider.raw_threshold, line, tuple(found_warnings))
    print(f"report page: {page}", file=sys.stderr)
    if not args.quiet:
        print_summary(rows, skipped, failed)
    if failed:
        print(f"error: {len(failed)} image(s) failed: {failed[0]['error']}", file=sys.stderr)
        # the server lost mid-run: a line script retries on 3 (README), as when it was not there at the start
        lost = any(item.get("unreachable") for item in failed)
        return exits.UNREACHABLE if lost else exits.FLAGGED
    if args.fail_on:
        wanted = ("anomalous", D.OUT_OF_DISTRIBUTION) if args.fail_on == "any" else (args.fail_on,)
        decided = Counter(r.get("decision") for r in rows if r.get("decision") in wanted)
        # out of distribution with a score above the threshold: it fails --fail-on anomalous too, said as what it is
        over = sum("anomalous" in wanted and r.get("decision") not in wanted and flagged_anomalous(r) for r in rows)
        hits = sum(decided.values()) + over
        # a part whose image could not be read, or got no score, was not shown to be good: it fails the run too
        undecided = len(skipped) + sum(r.get("decision") == "invalid" for r in rows)
        drifted = alarm is not None and args.fail_on in ("drift", "any")
        if hits or undecided or drifted:
            said = [f"{n} image(s) decided {kind}" for kind, n in sorted(decided.items())] + (
                [f"{over} image(s) out of distribution with a score above the threshold"] if over else []) + (
                [f"{undecided} image(s) not decided (unreadable, or no score)"] if undecided else []) + (
                ["the bank's drift alarm is up"] if drifted else [])
            print(f"--fail-on {args.fail_on}: {', '.join(said)} (exit status {exits.FLAGGED})", file=sys.stderr)
            return exits.FLAGGED
    return exits.OK


def drift_note(args, bank: str, version: str | None) -> str | None:
    """The bank's drift alarm, read from the server once this run's parts are scored (a window's alarm is written
    the moment it turns): a line that scores batch after batch sees it where it looks, on the console, in
    results.json and on the report page; it was on /metrics and in ``banks info`` only. None when no window of the
    bank's version alarms, or when the server cannot say now (a report: the run's results stand without it)."""
    try:
        client = PAClipClient(args.url, args.protocol, min(args.timeout, 30.0), key=args.key)
        try:
            monitors = client.bank_info(bank).get("monitors", [])
        finally:
            client.close()
    except (ClientError, RequestError):
        return None
    raised = [m for m in monitors if m.get("alarm") and m.get("version") == version]
    if not raised:
        return None
    worst = max(raised, key=lambda m: float(m.get("drift", 0.0)))
    statistic = str(worst.get("statistic") or "")
    seen_in = statistic if statistic in ("brightness", "contrast") else (
        f"how much of each image differs from it ({statistic}, a statistic of the heat map)" if statistic
        else "their statistics")
    return (f"the bank's drift alarm is up: the last {worst['window']} new parts it scored are unlike its lot in "
            f"{seen_in} (Kolmogorov-Smirnov distance {worst['drift']:.2f}, "
            f"p {worst['drift_p']:.2g}; {worst['ood_rate']:.0%} of them out of distribution): a moved camera, "
            f"changed lighting or another product looks like this. Check the line; pa-clip banks info {bank} shows "
            "the window, and a bank built again on today's good parts starts a new one")


def summary_of(info: dict) -> dict:
    keep = ("bank", "category", "version", "built_at", "n_images", "normal_selection", "normal_indices", "encoder",
            "map_range", "lot_scores", "decision", "cada", "bytes_on_disk", "bytes_in_memory", "image_size")
    return {k: info[k] for k in keep if k in info}


if __name__ == "__main__":
    sys.exit(main())
