"""The frozen-feature cache: each image's two CLIP embeddings and each prompt's token states, computed once.

The towers are frozen and preprocessing is deterministic, so training reads their outputs from disk, and every later
run, split, head and target reuses them. The cache folder (`default_cache_dir`) holds one namespace per way of
computing a feature, ``image-<hash>/`` (one image tower's image_embeds) or ``text-<hash>/`` (the text tower's
last_hidden_state, unpadded), named by a hash of all it depends on, written out in its ``spec.json``: the checkpoint
by content (`checkpoint_content`), the preprocessing, draft decoding, truncation and compute dtype. A change selects
another namespace, so a stale feature is never read and only what changed is encoded again.

A namespace is a `Shelf` of shards written atomically and verified when read. Processes sharing the folder divide
the encoding through `Claims`, and the ranks of one run through `TableFeatures.prepare`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import socket
import threading
import time
import uuid
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import datasets
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm
from transformers.utils import cached_file

from mst_clipiqa.data.checks import image_problem
from mst_clipiqa.data.preprocess import ClipPreprocess, ImageRows
from mst_clipiqa.data.schema import target_column
from mst_clipiqa.errors import write_error
from mst_clipiqa.model import CPU_BATCH, MSTCLIPIQA, prefers_bf16

CACHE_ENV = "MST_CLIPIQA_FEATURES"
SHARD_SIZE = 512
"""Items per shard: a crash mid-way loses at most this many encoded items."""
FORMAT_VERSION = 2
"""Version of the shard layout; part of every namespace's hash, so a new layout never reads an old one."""
CHECKSUMS = "checksums.json"
"""In each shard: {file name: [size, CRC-32]} of its other files."""
CLAIMS = "claims"
CLAIM_STALE_SECONDS = 120.0
"""A claim not renewed for this long is taken over: its process died on another machine (or hangs)."""
CLAIM_RENEW_SECONDS = 10.0
CLAIM_POLL_SECONDS = 0.5

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.index.json")
DIGESTS = "digests.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

_SCHEMA = datasets.Features(
    {
        "key": datasets.Value("string"),
        # Rows of the stored matrix: 1 for an image embedding, the token count for prompt states.
        "length": datasets.Value("int32"),
        "value": datasets.List(datasets.Value("float32")),  # (length * D,), row-major
    }
)

T = TypeVar("T")


def default_cache_dir() -> Path:
    """``$MST_CLIPIQA_FEATURES``, else ``$XDG_CACHE_HOME/mst_clipiqa/features`` (``~/.cache`` by default)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mst_clipiqa" / "features"


# ---- what a feature depends on ---------------------------------------------------------------------------------------


def _digest(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=20).hexdigest()


def checkpoint_content(
    name: str, revision: str | None, files: Sequence[str] = WEIGHT_FILES, root: Path | None = None
) -> dict[str, Any]:
    """What a checkpoint's features depend on, by content wherever it lies (a local encoder, an exported model's
    copy, a hub id): the SHA-256 of its config.json and of each file matching the glob patterns `files`, by name.

    A Hugging Face cache blob is named by its SHA-256 already; any other file's digest is remembered in `root`'s
    digests.json by resolved path, size and modification time, so each file is hashed once.
    """
    folder = Path(name)
    if not folder.is_dir():
        folder = Path(cached_file(name, "config.json", revision=revision)).parent
    record = Path(root) / DIGESTS if root is not None else None
    known: dict[str, list] = {}
    if record is not None:
        try:
            known = json.loads(record.read_text())
        except (OSError, ValueError):  # none yet, or damaged: hash again
            pass
    hashed = []

    def sha256(path: Path) -> str:
        file = path.resolve()
        if file.parent.name == "blobs" and len(file.name) == 64:  # Hugging Face's cache: LFS blobs by their SHA-256
            return file.name
        stat = file.stat()
        size_and_time = [stat.st_size, stat.st_mtime_ns]
        if known.get(str(file), [])[:2] != size_and_time:
            with file.open("rb") as stream:
                known[str(file)] = [*size_and_time, hashlib.file_digest(stream, "sha256").hexdigest()]
            hashed.append(file)
        return known[str(file)][2]

    paths = sorted({path for pattern in files for path in folder.glob(pattern)})
    content = {"config": sha256(folder / "config.json"), "files": [(path.name, sha256(path)) for path in paths]}
    if hashed and record is not None:
        _replace_text(record, json.dumps(known, indent=0, sort_keys=True))
    return content


def _replace_text(path: Path, text: str) -> None:
    """Write `path` through a temporary file beside it: another process reads the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{uuid.uuid4().hex}")
    temporary.write_text(text)
    os.replace(temporary, path)


def tower_compute(device: torch.device, precision: str | None = None) -> tuple[str, AbstractContextManager]:
    """How the towers run on `device` in a Lightning `precision` (a scoring job's), or for None (a fit's) in bf16
    autocast where `prefers_bf16`, else float32: the name the cache's namespaces give it, and the context to run them
    in."""
    if precision is None:
        precision = "bf16-mixed" if prefers_bf16(device) else "32-true"
    if precision == "32-true":
        return "float32", nullcontext()
    if precision == "bf16-mixed" and device.type == "cuda":
        return "bfloat16-autocast", torch.autocast("cuda", dtype=torch.bfloat16)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    context = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    return f"{precision}-{device.type}", context


def image_keys(images: datasets.Dataset, *, content_hash: bool = False) -> list[str | None]:
    """One key per row of an `image` column (a `datasets.Image(decode=False)` feature), as the cache stores them.

    Embedded bytes, and with `content_hash` files too, are keyed by a hash of their bytes; otherwise a file is keyed
    by its absolute path, size and modification time, which changes whenever the file is rewritten. A row without an
    image, or whose file cannot be read, has no key (None).
    """
    keys: list[str | None] = []
    for batch in images.select_columns(["image"]).with_format("arrow").iter(batch_size=256):
        column = batch.column("image").combine_chunks()  # StructArray {bytes, path}
        paths, blobs = column.field("path"), column.field("bytes")
        for path, blob in zip(paths, blobs):
            if blob.is_valid:
                keys.append("bytes:" + _digest(blob.as_buffer()))
            elif not path.is_valid:
                keys.append(None)
            else:
                keys.append(file_key(Path(path.as_py()), content_hash))
    return keys


def file_key(path: Path, content_hash: bool = False) -> str | None:
    """The cache key of an image file (see `image_keys`); None where it cannot be read."""
    try:
        if content_hash:
            return "bytes:" + _digest(path.read_bytes())
        file = path.resolve()
        stat = file.stat()
    except OSError:  # missing or unreadable: the encoding pass names the problem
        return None
    return "file:" + _digest(f"{file}\n{stat.st_size}\n{stat.st_mtime_ns}".encode())


def prompt_key(prompt: str) -> str:
    return "text:" + _digest(prompt.encode())


# ---- storage ---------------------------------------------------------------------------------------------------------


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No "Saving the dataset" bar per shard."""
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


class Shelf:
    """One namespace of the cache folder `root`: float32 matrices by key, in append-only ``shard-*`` folders, each a
    `datasets` table of (key, length, value) rows, memory-mapped. The folder is named `kind` and a hash of `spec`,
    everything the values depend on."""

    def __init__(self, root: Path, spec: dict[str, Any], kind: str):
        text = json.dumps({"format": FORMAT_VERSION, **spec}, sort_keys=True, indent=1, default=str)
        self.folder = Path(root) / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / "spec.json").exists():
            _replace_text(self.folder / "spec.json", text)
        self.index: dict[str, tuple[int, int]] = {}  # key → (shard, row)
        self._read: set[str] = set()
        self._values: list[Any] = []  # per shard: the "value" column, memory-mapped
        self._lengths: list[np.ndarray] = []  # per shard: the "length" column
        self.refresh()

    def refresh(self) -> None:
        """Read the shards written since the last look, by this or any other process; a damaged one is set aside
        (`set_aside`) and its keys stay missing."""
        for path in sorted(self.folder.glob("shard-*")):
            if path.name in self._read:
                continue
            try:
                verify_shard(path)
                table = datasets.load_from_disk(str(path)).data
            except (DamagedShard, OSError, ValueError) as err:
                set_aside(path, str(err))
                continue
            shard = len(self._values)
            self._values.append(table.column("value"))
            self._lengths.append(table.column("length").to_numpy())
            self._read.add(path.name)
            for row, key in enumerate(table.column("key").to_pylist()):
                self.index.setdefault(key, (shard, row))

    def missing(self, keys: Sequence[str]) -> list[str]:
        """The distinct keys not stored yet, in first-seen order."""
        return [key for key in dict.fromkeys(keys) if key not in self.index]

    def get(self, key: str) -> np.ndarray:
        """The (length, D) matrix stored under `key`: read-only, mapped from disk."""
        shard, row = self.index[key]
        flat = self._values[shard][row].values.to_numpy(zero_copy_only=True)
        return flat.reshape(int(self._lengths[shard][row]), -1)

    def write(self, keys: list[str], values: list[np.ndarray]) -> None:
        """Store (length, D) matrices under `keys` as one new shard, written with its checksums to a ``.tmp-*``
        folder first (which a crash may leave behind, never read) and renamed into place."""
        rows = {
            "key": keys,
            "length": [len(v) for v in values],
            "value": [np.ascontiguousarray(v, dtype=np.float32).ravel() for v in values],
        }
        temporary = self.folder / f".tmp-{uuid.uuid4().hex}"
        try:
            with _quiet_datasets():
                datasets.Dataset.from_dict(rows, features=_SCHEMA).save_to_disk(str(temporary))
            record = {path.name: [path.stat().st_size, _crc(path)] for path in sorted(temporary.iterdir())}
            (temporary / CHECKSUMS).write_text(json.dumps(record))
            # A rename within one folder is atomic: readers see the whole shard or nothing.
            os.rename(temporary, self.folder / f"shard-{uuid.uuid4().hex}")
        except OSError as err:  # full disk, read-only cache, quota: the cache folder is named
            shutil.rmtree(temporary, ignore_errors=True)
            raise write_error(self.folder, err) from err


class DamagedShard(Exception):
    """A shard's files differ from what was recorded when it was written."""


def _crc(path: Path) -> int:
    crc = 0
    with path.open("rb") as file:
        while chunk := file.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def verify_shard(path: Path) -> None:
    """Raise `DamagedShard` where a shard's files differ from the sizes and CRC-32 recorded when it was written
    (or the record is unreadable)."""
    try:
        record = json.loads((path / CHECKSUMS).read_text())
    except (OSError, ValueError) as err:
        raise DamagedShard(f"no readable {CHECKSUMS}: {err}") from err
    present = sorted(file.name for file in path.iterdir() if file.name != CHECKSUMS)
    if not isinstance(record, dict) or present != sorted(record):
        raise DamagedShard(f"it holds {', '.join(present) or 'nothing'}, not the files recorded")
    for name, (size, crc) in record.items():
        file = path / name
        if file.stat().st_size != size:
            raise DamagedShard(f"{name} is {file.stat().st_size} bytes, not {size}")
        if _crc(file) != crc:
            raise DamagedShard(f"{name} does not match its checksum")


def set_aside(path: Path, why: str) -> None:
    """Never read the damaged shard `path` again: rename it ``damaged-*`` (where the cache is writable) and say so."""
    aside = path.with_name("damaged-" + path.name.removeprefix("shard-"))
    try:
        os.rename(path, aside)
        done = f"renamed {aside.name}"
    except FileNotFoundError:
        return  # another process set it aside first, and said so
    except OSError as err:
        done = f"not read ({err.strerror.lower()} renaming it)"
    warnings.warn(
        f"feature cache shard {path} is damaged ({why}): {done}; its features are encoded again", stacklevel=3
    )


class Claims:
    """Exclusive claims of work on the cache folder `root`, shared by processes, maybe on several machines: a claim
    is a file under ``claims/`` created with O_CREAT | O_EXCL (atomic on local and NFS v3+ file systems), holding its
    owner's host and pid, and renewed (its mtime) while the owner works. One whose owner is gone (on this machine)
    or that has not been renewed for `CLAIM_STALE_SECONDS` is taken over."""

    def __init__(self, root: Path):
        self.folder = Path(root) / CLAIMS
        self.host, self.pid = socket.gethostname(), os.getpid()

    def take(self, name: str) -> _Claim | None:
        """The claim `name`, now held by this process, or None while another process holds it (a stale claim is
        taken over)."""
        path = self.folder / name
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._break_if_stale(path):
                    return None
                continue
            with os.fdopen(fd, "w") as file:
                file.write(json.dumps({"host": self.host, "pid": self.pid, "token": uuid.uuid4().hex}))
            return _Claim(path)
        return None

    def held(self, name: str) -> bool:
        """Whether another process holds the claim `name`, alive (a stale claim is removed)."""
        path = self.folder / name
        return path.exists() and not self._break_if_stale(path)

    def _break_if_stale(self, path: Path) -> bool:
        """Remove the claim at `path` if its owner is gone; whether it is gone (or was already)."""
        try:
            owner, age = path.read_text(), time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        try:
            about = json.loads(owner)
        except ValueError:
            about = {}  # being written this instant, or torn by a crash: let age decide
        dead = about.get("host") == self.host and not _alive(about.get("pid", -1))
        if not dead and age < CLAIM_STALE_SECONDS:
            return False
        # Moved aside first, so that of two processes that find it stale only one removes it; a fresh claim moved
        # aside by mistake (created between the read above and the rename) is put back.
        aside = path.with_name(f".stale-{uuid.uuid4().hex}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return True
        if aside.read_text() != owner:
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
        aside.unlink()
        return True


class _Claim(AbstractContextManager):
    """A claim held by this process: renewed in the background until released."""

    def __init__(self, path: Path):
        self.path, self._done = path, threading.Event()
        threading.Thread(target=self._renew, daemon=True).start()

    def _renew(self) -> None:
        while not self._done.wait(CLAIM_RENEW_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                return

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Whether a process `pid` runs on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


class ShardWriter:
    """Collects encoded items and writes them to a shelf every `SHARD_SIZE` items, and the rest at `close`."""

    def __init__(self, shelf: Shelf):
        self.shelf, self.keys, self.values = shelf, [], []

    def add(self, keys: Sequence[str], values: Sequence[np.ndarray]) -> None:
        self.keys += keys
        self.values += values
        if len(self.keys) >= SHARD_SIZE:
            self.close()

    def close(self) -> None:
        if self.keys:
            self.shelf.write(self.keys, self.values)
        self.keys, self.values = [], []


# ---- encoding what is missing ----------------------------------------------------------------------------------------


@dataclass
class FeatureStats:
    """Distinct images and prompts read from the cache or encoded (over all ranks), summed over
    `TableFeatures.prepare` calls; the decoded images and the seconds are this process's own."""

    images_cached: int = 0
    images_encoded: int = 0
    """Images that went through at least one tower."""
    prompts_cached: int = 0
    prompts_encoded: int = 0
    images_decoded: int = 0
    """Images decoded to encode them, or to say why one failed on another rank."""
    images_bad: int = 0
    decode_seconds: float = 0.0
    """Time the encoding waited for decoded images: the decoding the towers did not hide."""
    tower_seconds: float = 0.0


def _same(obj: T) -> T:
    return obj


def _nothing() -> None:
    return None


class TableFeatures:
    """The cached features of one table's rows for one network, prompt states mapped from the cache.

    A fit holds every prepared row's image embeddings in memory (`in_memory`); a scoring job reads each batch's from
    the memory-mapped shards, so its memory does not grow with the table. `num_workers` loader processes decode the
    images the cache lacks while the towers, `batch_size` items a call, run in `precision` (`tower_compute`).
    """

    def __init__(
        self,
        table: datasets.Dataset,
        preprocess: ClipPreprocess,
        *,
        draft_decode: bool = False,
        cache_dir: str | os.PathLike | None = None,
        content_hash: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        precision: str | None = None,
        in_memory: bool = True,
    ):
        self.table, self.preprocess, self.draft, self.precision = table, preprocess, draft_decode, precision
        self.root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.content_hash, self.batch_size, self.num_workers = content_hash, batch_size, num_workers
        self.in_memory = in_memory
        self.prompts = [prompt or "" for prompt in table["prompt"][:]]
        self.keys: list[str | None] = [None] * len(table)
        self.loaded = torch.zeros(len(table), dtype=torch.bool)
        self.coarse_embeds = self.fine_embeds = torch.zeros(len(table), 0)  # (N, D) of every row, valid where `loaded`
        self.stats = FeatureStats()
        self._net: MSTCLIPIQA | None = None

    # ---- namespaces of one network -----------------------------------------------------------------------------------

    def _open_shelves(self, net: MSTCLIPIQA) -> None:
        if net is self._net:
            return
        config = net.config
        compute, _ = tower_compute(next(net.encoder.parameters()).device, self.precision)

        def shelf(kind: str, tower: torch.nn.Module, checkpoint: str, files: Sequence[str], **spec: Any) -> Shelf:
            spec["checkpoint"] = checkpoint_content(checkpoint, config.revision, files, self.root)
            spec["weights_dtype"] = str(next(tower.parameters()).dtype)
            return Shelf(self.root, {**spec, "compute": compute}, kind)

        preprocess = {f.name: getattr(self.preprocess, f.name) for f in fields(self.preprocess) if f.init}
        image = {"feature": "image_embeds", "preprocess": preprocess, "draft_decode": self.draft}
        self.shelves = {
            "coarse": shelf("image", net.encoder.coarse, config.coarse_encoder, WEIGHT_FILES, **image),
            "fine": shelf("image", net.encoder.fine, config.fine_encoder, WEIGHT_FILES, **image),
        }
        self.prompt_shelf = None
        if net.needs_prompt:
            text = {"feature": "last_hidden_state", "max_tokens": net.prompt_encoder.max_tokens}
            files = WEIGHT_FILES + TOKENIZER_FILES
            self.prompt_shelf = shelf("text", net.prompt_encoder, config.coarse_encoder, files, **text)
        self.loaded[:] = False  # rows read for another network
        rows = len(self.table) if self.in_memory else 0
        self.coarse_embeds, self.fine_embeds = torch.zeros(rows, net.encoder.dim), torch.zeros(rows, net.encoder.dim)
        self._net = net

    def _image_keys(self, rows: list[int]) -> list[str | None]:
        todo = [row for row in rows if self.keys[row] is None]
        if todo:
            for row, key in zip(todo, image_keys(self.table.select(todo), content_hash=self.content_hash)):
                self.keys[row] = key
        return [self.keys[row] for row in rows]

    def select(self, table: datasets.Dataset, rows: Sequence[int]) -> TableFeatures:
        """These features for `table`, whose row i is row ``rows[i]`` of this one's table (the rows kept when bad
        ones are dropped): the keys and embeddings read so far carry over; the cache, namespaces and stats are
        shared."""
        index = torch.tensor(list(rows), dtype=torch.long)
        other = copy.copy(self)
        other.table = table
        other.prompts = [self.prompts[row] for row in index.tolist()]
        other.keys = [self.keys[row] for row in index.tolist()]
        other.loaded = self.loaded[index]
        if self.in_memory:
            other.coarse_embeds, other.fine_embeds = self.coarse_embeds[index], self.fine_embeds[index]
        return other

    # ---- the one entry point -----------------------------------------------------------------------------------------

    def prepare(
        self,
        rows: Sequence[int],
        net: MSTCLIPIQA,
        *,
        rank: int = 0,
        world_size: int = 1,
        broadcast: Callable[[Any], Any] = _same,
        barrier: Callable[[], None] = _nothing,
        progress: bool = False,
    ) -> dict[int, str]:
        """Make the features of `rows` available, encoding what the cache lacks with `net`'s frozen towers; returns
        {row: why} of the rows whose image has no file or does not decode (the same on every rank).

        Every rank of a distributed run calls it with the same rows: rank 0's list of what is missing is sent to all
        (`broadcast`, as `Strategy.broadcast`), each rank encodes every `world_size`-th item from its `rank` into
        its own shards, and after the `barrier` every rank reads them all; a RuntimeError says when features are
        still missing then, because the ranks do not share the cache folder.

        Each image the cache lacks is decoded once, so this pass doubles as the check of those images; an image the
        cache holds was checked when it was encoded from the same file (the same key) and is not decoded again.
        """
        self._open_shelves(net)
        rows = sorted({int(row) for row in rows if not self.loaded[row]})
        if not rows:
            return {}
        keys = self._image_keys(rows)
        known = [key for key in keys if key is not None]
        prompts = list(dict.fromkeys(self.prompts[row] for row in rows)) if self.prompt_shelf is not None else []
        prompt_keys = [prompt_key(prompt) for prompt in prompts]
        plan = broadcast(
            {
                "coarse": self.shelves["coarse"].missing(known),
                "fine": self.shelves["fine"].missing(known),
                "prompts": self.prompt_shelf.missing(prompt_keys) if self.prompt_shelf is not None else [],
            }
        )
        images = list(dict.fromkeys(plan["coarse"] + plan["fine"]))  # need at least one tower
        first_row = dict(zip(reversed(keys), reversed(rows)))
        failed = self._encode_claimed(
            net, [(key, first_row[key]) for key in images[rank::world_size]], plan["coarse"], plan["fine"], progress
        )
        missing = set(plan["prompts"])
        todo = [prompt for prompt, key in zip(prompts, prompt_keys) if key in missing]
        self._encode_prompts(net, todo[rank::world_size], progress)
        barrier()

        for shelf in (self.shelves["coarse"], self.shelves["fine"], self.prompt_shelf):
            if shelf is not None:
                shelf.refresh()
        bad, lost = self._bad_images(rows, keys, failed)
        lost += len(self.prompt_shelf.missing(prompt_keys)) if self.prompt_shelf is not None else 0
        if lost:
            raise RuntimeError(
                f"{lost} features are missing from {self.root} after encoding; under DDP every rank must see the "
                "same cache folder (set cache_dir to a shared file system)"
            )
        good = [(row, key) for row, key in zip(rows, keys) if row not in bad]
        self._fill([row for row, _ in good], [key for _, key in good])

        distinct = len(set(known))
        self.stats.images_cached += distinct - len(images)
        self.stats.images_encoded += len(set(images) - {key for row, key in zip(rows, keys) if row in bad})
        self.stats.images_bad += len(bad)
        self.stats.prompts_cached += len(prompts) - len(todo)
        self.stats.prompts_encoded += len(todo)
        of_prompts = f", {len(prompts)} prompts ({len(prompts) - len(todo)} from the cache, {len(todo)} encoded)"
        rank_zero_info(
            f"Features of {distinct} images ({distinct - len(images)} from the cache, {len(images)} encoded"
            f"{f', {len(bad)} unreadable' if bad else ''}){of_prompts if self.prompt_shelf is not None else ''}; "
            f"cache: {self.root}"
        )
        return bad

    def _bad_images(
        self, rows: list[int], keys: list[str | None], failed: dict[str, str]
    ) -> tuple[dict[int, str], int]:
        """({row: why} of the images without features after the encoding pass, the count of the others).

        Why comes from this process's pass, else (an image another rank failed on, or a file without a key) from
        decoding it here; an image that decodes is not bad but lost: the ranks do not share the cache.
        """
        bad, lost = {}, 0
        for row, key in zip(rows, keys):
            if key is not None and key in self.shelves["coarse"].index and key in self.shelves["fine"].index:
                continue
            why = failed.get(key) if key is not None else None
            if why is None:
                self.stats.images_decoded += 1
                why = image_problem(self.table[row]["image"])
                if why is None:
                    lost += 1
                    continue
            bad[row] = why
        return bad, lost

    def _encode_claimed(
        self, net: MSTCLIPIQA, items: list[tuple[str, int]], coarse: list[str], fine: list[str], progress: bool
    ) -> dict[str, str]:
        """`_encode_images` of `items` under claims (`Claims`), one per `SHARD_SIZE` run of them: this process
        encodes the runs it could claim, in one pass (one loader), then waits for those another process holds and
        encodes only what that process did not store (an image that does not decode, or everything if it died)."""
        claims, failed = Claims(self.root), {}
        shelves, coarse, fine = (self.shelves["coarse"], self.shelves["fine"]), set(coarse), set(fine)
        spaces = f"{shelves[0].folder.name}\n{shelves[1].folder.name}\n"
        runs = [items[start : start + SHARD_SIZE] for start in range(0, len(items), SHARD_SIZE)]
        names = ["images-" + _digest((spaces + "\n".join(key for key, _ in run)).encode()) for run in runs]
        pending = list(zip(names, runs))
        with tqdm(total=len(items), desc="Encoding images", unit="img", disable=not progress) as bar:
            while pending:
                mine, later = [], []
                with ExitStack() as held:
                    for name, run in pending:
                        claim = claims.take(name)
                        if claim is None:
                            later.append(name)
                        else:
                            held.enter_context(claim)
                            mine += run
                    # Under the claims, what is still missing: their last holder may have stored it just before.
                    for shelf in shelves:
                        shelf.refresh()
                    todo_coarse = {key for key, _ in mine if key in coarse and key not in shelves[0].index}
                    todo_fine = {key for key, _ in mine if key in fine and key not in shelves[1].index}
                    left = (todo_coarse | todo_fine) - failed.keys()
                    todo = [item for item in mine if item[0] in left]
                    failed.update(self._encode_images(net, todo, todo_coarse, todo_fine, bar))
                    bar.update(len(mine) - len(todo))
                while later and all(claims.held(name) for name in later):
                    time.sleep(CLAIM_POLL_SECONDS)
                pending = [(name, run) for name, run in pending if name in later]
        return failed

    def _encode_images(
        self, net: MSTCLIPIQA, items: list[tuple[str, int]], coarse: set[str], fine: set[str], bar: tqdm
    ) -> dict[str, str]:
        """Decode each (key, row) image once and run the towers whose embedding of it is missing (its key in `coarse`,
        `fine`); returns {key: why} of the images that do not decode."""
        failed: dict[str, str] = {}
        if not items:
            return failed
        device = next(net.encoder.parameters()).device
        _, compute = tower_compute(device, self.precision)
        towers = [
            (net.encoder.coarse, coarse, ShardWriter(self.shelves["coarse"])),
            (net.encoder.fine, fine, ShardWriter(self.shelves["fine"])),
        ]
        key_of = {row: key for key, row in items}
        images = ImageRows(self.table, list(key_of), None, self.preprocess, self.draft, keep_errors=True)
        loader = DataLoader(
            images,
            batch_size=min(self.batch_size, CPU_BATCH) if device.type == "cpu" else self.batch_size,
            num_workers=self.num_workers,
            pin_memory=device.type == "cuda",
        )
        waiting = time.perf_counter()
        for rows in loader:
            self.stats.decode_seconds += time.perf_counter() - waiting
            keys = [key_of[row] for row in rows["index"].tolist()]
            failed.update((key, why) for key, why in zip(keys, rows["error"]) if why)
            decoded = [i for i, why in enumerate(rows["error"]) if not why]
            pixels = rows["pixel_values"] if len(decoded) == len(keys) else rows["pixel_values"][decoded]
            pixels = pixels.to(device, non_blocking=True)  # (B, 3, 224, 224)
            for tower, todo, writer in towers:
                chosen = [i for i, k in enumerate(decoded) if keys[k] in todo]
                if not chosen:
                    continue
                began = time.perf_counter()
                with torch.inference_mode(), compute:
                    embeds = tower(pixel_values=pixels if len(chosen) == len(decoded) else pixels[chosen])
                values = embeds.image_embeds.float().cpu().numpy()  # (b, D)
                self.stats.tower_seconds += time.perf_counter() - began
                writer.add([keys[decoded[i]] for i in chosen], [row[None] for row in values])
            self.stats.images_decoded += len(keys)
            bar.update(len(keys))
            waiting = time.perf_counter()
        for _, _, writer in towers:
            writer.close()
        return failed

    def _encode_prompts(self, net: MSTCLIPIQA, prompts: list[str], progress: bool) -> None:
        """Token states of each prompt, stored without padding."""
        if not prompts:
            return
        _, compute = tower_compute(next(net.prompt_encoder.parameters()).device, self.precision)
        writer = ShardWriter(self.prompt_shelf)
        with tqdm(total=len(prompts), desc="Encoding prompts", unit="prompt", disable=not progress) as bar:
            for start in range(0, len(prompts), self.batch_size):
                batch = prompts[start : start + self.batch_size]
                began = time.perf_counter()
                with torch.inference_mode(), compute:
                    states, mask = net.prompt_encoder(batch)  # (B, L, Dt), (B, L), padding on the right
                states = states.float().cpu().numpy()
                self.stats.tower_seconds += time.perf_counter() - began
                lengths = mask.sum(dim=1).tolist()
                writer.add([prompt_key(p) for p in batch], [s[:n] for s, n in zip(states, lengths)])
                bar.update(len(batch))
        writer.close()

    def _fill(self, rows: list[int], keys: list[str]) -> None:
        index = torch.tensor(rows, dtype=torch.long)
        if rows and self.in_memory:
            self.coarse_embeds[index], self.fine_embeds[index] = self._read(keys)
        self.loaded[index] = True

    def _read(self, keys: Sequence[str | None]) -> tuple[Tensor, Tensor]:
        """The (n, D) coarse and fine embeddings stored under `keys` (zeros for None)."""
        dim = self._net.encoder.dim
        zero = np.zeros(dim, dtype=np.float32)
        return tuple(
            torch.from_numpy(np.stack([self.shelves[stream].get(key)[0] if key is not None else zero for key in keys]))
            if keys
            else torch.zeros(0, dim)
            for stream in ("coarse", "fine")
        )

    def image_embeds(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """The (B, D) coarse and fine embeddings of prepared `rows` (zeros for a row whose image cannot be read)."""
        if self.in_memory:
            return self.coarse_embeds[rows], self.fine_embeds[rows]
        loaded = self.loaded[rows].tolist()
        return self._read([self.keys[row] if ok else None for row, ok in zip(rows.tolist(), loaded)])

    def prompt_states(self, row: int) -> Tensor:
        """Token states (L, Dt) of a row's prompt, without padding."""
        return torch.tensor(self.prompt_shelf.get(prompt_key(self.prompts[row])))


# ---- loading ---------------------------------------------------------------------------------------------------------


class FeatureRows(Dataset):
    """Rows of the table → {"coarse_embeds", "fine_embeds", "mos", "index"} (and "prompt_states" for the prompt
    head) from prepared `TableFeatures`; batch them with `collate_features`. No ``mos`` where `target` is None.

    With `errors` ({row: why} of the images `TableFeatures.prepare` could not read) those rows stay, with zero
    embeddings, and every item gets an ``error`` ("" where the image was read), as `ImageRows` gives them with
    ``keep_errors``; without, every row must have its features.
    """

    def __init__(
        self, features: TableFeatures, rows: Sequence[int], target: str | None, errors: dict[int, str] | None = None
    ):
        self.features, self.rows, self.errors = features, [int(row) for row in rows], errors
        needed = [row for row in self.rows if row not in (errors or {})]
        if not bool(features.loaded[needed].all()):
            raise RuntimeError("features of some rows were not prepared: call TableFeatures.prepare first")
        self.mos = None
        if target is not None:
            mos = features.table.select(self.rows)[target_column(target)][:]
            self.mos = torch.tensor([math.nan if value is None else value for value in mos], dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        batch = self.__getitems__([i])
        item = {key: value[0] for key, value in batch.items() if key not in ("prompt_states", "prompt_mask")}
        if "prompt_states" in batch:
            item["prompt_states"] = batch["prompt_states"][0, : int(batch["prompt_mask"][0].sum())]  # (L, Dt)
        return item

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        """The batch of items `indices`, read by indexing the tensors in memory at once: a data loader calls this
        instead of one `__getitem__` per item, then passes the batch through `collate_features` unchanged."""
        rows = torch.tensor([self.rows[i] for i in indices], dtype=torch.long)
        coarse_embeds, fine_embeds = self.features.image_embeds(rows)  # (B, D) each
        batch: dict[str, Any] = {"coarse_embeds": coarse_embeds, "fine_embeds": fine_embeds, "index": rows}
        if self.mos is not None:
            batch["mos"] = self.mos[torch.tensor(indices, dtype=torch.long)]  # (B,)
        if self.errors is not None:
            batch["error"] = [self.errors.get(row, "") for row in rows.tolist()]
        if self.features.prompt_shelf is not None:
            batch.update(_pad_prompts([self.features.prompt_states(row) for row in rows.tolist()]))
        return batch


def collate_features(items: list[dict[str, Any]] | dict[str, Any]) -> dict[str, Any]:
    """`default_collate`, with each batch's prompt states padded to its longest prompt; a batch that
    `FeatureRows.__getitems__` read whole passes as it is.

    Returns prompt_states (B, L, Dt), zero on padding, and prompt_mask (B, L), True on real tokens, as the prompt
    head reads them.
    """
    if isinstance(items, dict):
        return items
    states = [item.pop("prompt_states") for item in items] if "prompt_states" in items[0] else None
    batch = default_collate(items)
    if states is not None:
        batch.update(_pad_prompts(states))
    return batch


def _pad_prompts(states: list[Tensor]) -> dict[str, Tensor]:
    lengths = torch.tensor([len(s) for s in states])  # (B,)
    return {
        "prompt_states": pad_sequence(states, batch_first=True),  # (B, L, Dt)
        "prompt_mask": torch.arange(int(lengths.max()))[None] < lengths[:, None],  # (B, L)
    }
