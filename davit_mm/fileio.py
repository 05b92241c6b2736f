"""Finding pretrained weights: a local path, a cache directory, or a download with a timeout.

A URL is looked up in the cache first: ``$DAVIT_MM_CACHE`` when set, else torch hub's
``checkpoints`` folder (``$TORCH_HOME/hub/checkpoints``). Cached names carry a hash of the URL,
since hub files share names (every timm model is ``.../resolve/main/model.safetensors``). In a
distributed run only the local rank 0 of each node downloads; the other processes wait for it and
read the same file. Files are written under a temporary name and renamed into place, with the
permissions a plain ``open()`` gives under the process umask; a download is renamed into place
only when complete and a checkpoint, so that a cut transfer or a web page is never cached.
"""
import contextlib
import hashlib
import http.client
import os
import os.path as osp
import shutil
import struct
import tempfile
import urllib.error
import urllib.request
from typing import BinaryIO, Dict, Iterator, Optional

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, concurrent downloads stay possible
    fcntl = None

import torch
import torch.distributed as dist
from mmengine.logging import print_log

CACHE_ENV = 'DAVIT_MM_CACHE'
TIMEOUT_ENV = 'DAVIT_MM_DOWNLOAD_TIMEOUT'
DEFAULT_TIMEOUT_S = 10.0  # per connection attempt and per read, not for the whole file
# Python's socket timeouts overflow past 2**63 ns (~9.2e9 s), and 2**31 s where time_t is 32-bit.
MAX_TIMEOUT_S = 1e9
CONFIG_KEY = 'model.backbone.init_cfg.checkpoint'  # where davit_mm's configs name the weights


def default_file_mode() -> int:
    """The mode a plain ``open(path, 'w')`` gives a new file under the process umask."""
    try:  # Linux >= 4.7 tells it without changing it
        with open('/proc/self/status') as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith('Umask:'))
    except (OSError, StopIteration, ValueError, IndexError):
        # Setting it is the only other way to read it; meanwhile another thread of this process
        # creating a file would get the mode 0666.
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_file(path: str, suffix: str = '.tmp') -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s content into: a temporary file in ``path``'s folder
    (created if missing), with the mode a plain ``open()`` would give, flushed to disk and renamed
    to ``path`` when the block ends (``os.replace`` is atomic). If the block raises, or the process
    dies in it, ``path`` keeps what it held before and the temporary file is removed (after a kill:
    left under a hidden name, never under ``path``). Where ``path`` is a symbolic link, its target
    is written, as a plain ``open()`` writes through the link (the link stays a link)."""
    if osp.islink(path):
        path = osp.realpath(path)
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(path)}.', suffix=suffix, dir=folder)
    try:
        os.chmod(tmp, default_file_mode())  # mkstemp's 0600 would survive the rename
        with os.fdopen(fd, 'w+b') as f:  # readable too: a download is checked before renaming
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


class DownloadError(ValueError):
    """Weights that are neither cached nor downloadable (e.g. on an offline node)."""


def is_url(path: str) -> bool:
    """Whether ``path`` is an http(s) URL (downloaded and cached by :func:`resolve_checkpoint`)."""
    return str(path).startswith(('http://', 'https://'))


def cache_dir() -> str:
    """``$DAVIT_MM_CACHE`` (``~`` expanded, as torch hub expands ``$TORCH_HOME``), else torch hub's
    checkpoint folder."""
    folder = os.environ.get(CACHE_ENV)
    return osp.expanduser(folder) if folder else osp.join(torch.hub.get_dir(), 'checkpoints')


# cached file (absolute path) -> the URL it was resolved for in this process
_SOURCE_URLS: Dict[str, str] = {}


def source_url(path: str) -> Optional[str]:
    """The URL whose cached download ``path`` is, when :func:`resolve_checkpoint` gave it in this
    process (the tools hand mmengine the cached file in place of a ``load_from`` URL)."""
    return _SOURCE_URLS.get(osp.abspath(os.fspath(path)))


def cached_path(url: str) -> str:
    """Where the download of ``url`` is (or will be) cached."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return osp.join(cache_dir(), f'{digest}-{osp.basename(url.split("?")[0])}')


def _timeout() -> float:
    """``$DAVIT_MM_DOWNLOAD_TIMEOUT``, else the default; NaN, 0 and below, and values the socket
    layer cannot hold (inf, 1e10: ``OverflowError: timestamp out of range``) are refused."""
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return DEFAULT_TIMEOUT_S
    try:
        timeout = float(value)
    except ValueError:
        timeout = -1.0
    if not 0 < timeout <= MAX_TIMEOUT_S:
        raise ValueError(f'{TIMEOUT_ENV}={value!r}: accepted a number of seconds > 0 and '
                         f'<= {MAX_TIMEOUT_S:.0f} (unset: {DEFAULT_TIMEOUT_S:g})')
    return timeout


def _offline_help(url: str, dst: str, reason: str) -> str:
    return (f'could not download {url} ({reason}). davit_mm looked for a cached copy at {dst} '
            f'(cache folder: ${CACHE_ENV}, else torch hub\'s {osp.join("$TORCH_HOME", "hub", "checkpoints")}). '
            f'On a machine without internet access, download the file elsewhere and either put it '
            f'at {dst}, or give its local path instead of the URL (for backbone weights: '
            f'--cfg-options {CONFIG_KEY}=/path/to/file)')


HEAD_BYTES = 9  # what :func:`file_kind` needs to see


def file_kind(head: bytes, size: int) -> Optional[str]:
    """What a checkpoint file is, from its first :data:`HEAD_BYTES` bytes and its size:
    ``'zip'`` (torch.save), ``'pickle'`` (torch < 1.6, or pickle.dump), ``'safetensors'`` (an
    8-byte little-endian header length, then the JSON header), or None (anything else, e.g. a
    web page)."""
    if len(head) >= 9 and head[8:9] == b'{' and 2 <= struct.unpack('<Q', head[:8])[0] <= size - 8:
        return 'safetensors'  # first: its length may start with the bytes of the others' magic
    if head[:2] == b'PK':
        return 'zip'
    if head[:1] == b'\x80':
        return 'pickle'
    return None


class _IncompleteDownload(Exception):
    pass


def download(url: str, dst: str, timeout: float) -> None:
    """Stream ``url`` to ``dst`` through a temporary file in the same folder; only a complete
    file (as many bytes as the server announced) that is a checkpoint (:func:`file_kind`) is
    renamed to ``dst``.

    Raises:
        DownloadError: the URL cannot be reached or read within ``timeout`` seconds per attempt,
            the transfer ended early, or what came is not a checkpoint (e.g. the web page of a
            share link).
    """
    print_log(f'Downloading {url} to {dst}', logger='current')
    try:
        with atomic_file(dst, suffix='.part') as out:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                shutil.copyfileobj(response, out, length=1 << 20)
                expected = response.headers.get('Content-Length')
            size = out.tell()
            if expected is not None and expected.isdigit() and int(expected) != size:
                raise _IncompleteDownload(f'the transfer ended after {size} of {expected} bytes')
            out.seek(0)
            head = out.read(HEAD_BYTES)
            if file_kind(head, size) is None:
                raise _IncompleteDownload(
                    f'what came is not a checkpoint ({size} bytes starting with {head[:9]!r}; '
                    f'a web page? the URL must give the file itself)')
    except _IncompleteDownload as exc:
        raise DownloadError(f'could not download {url}: {exc}; nothing was cached') from None
    # socket.timeout is an OSError; a chunked transfer cut short raises http.client.IncompleteRead
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        reason = getattr(exc, 'reason', None) or exc
        raise DownloadError(_offline_help(url, dst, f'{type(exc).__name__}: {reason}')) from exc


@contextlib.contextmanager
def _download_lock(dst: str) -> Iterator[None]:
    """Held while this process downloads ``dst``: another process asking for the same URL at the
    same time (the ranks of a run before its process group is up, ``--launcher mpi`` ranks that all
    read ``LOCAL_RANK=0``, independent jobs on a shared cache) waits for it, then finds the file.
    An advisory lock on a hidden file beside ``dst``, removed by its holder when done; where none
    can be taken (a read-only cache folder, a file system without locks) nothing waits."""
    lock, fd = osp.join(osp.dirname(dst), f'.{osp.basename(dst)}.lock'), None
    if fcntl is not None:
        try:
            os.makedirs(osp.dirname(dst), exist_ok=True)
            while True:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:  # the holder before us removed the file we waited on: lock the new one
                    if osp.samestat(os.fstat(fd), os.stat(lock)):
                        break
                except FileNotFoundError:
                    pass
                os.close(fd)
                fd = None
        except OSError:
            if fd is not None:
                os.close(fd)
                fd = None
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.remove(lock)
            os.close(fd)  # releases the lock


def _download_once(url: str, dst: str, timeout: float) -> None:
    """:func:`download` unless ``dst`` is cached, or becomes so while waiting for another process
    downloading it (:func:`_download_lock`)."""
    if osp.isfile(dst):
        return
    with _download_lock(dst):
        if not osp.isfile(dst):
            download(url, dst, timeout)


def _local_rank() -> int:
    # torchrun and mmengine's slurm launcher export LOCAL_RANK; without it, one downloader in all
    return int(os.environ.get('LOCAL_RANK', dist.get_rank()))


def resolve_checkpoint(path: str) -> str:
    """The local file for ``path``: itself when it is not a URL, else the cached download.

    Raises:
        DownloadError: a URL that is not cached and cannot be downloaded; the message names the
            URL, the cache path and the ``--cfg-options`` line that points the config at a file.
    """
    path = os.fspath(path)
    if not is_url(path):
        return path
    dst = cached_path(path)
    _SOURCE_URLS[osp.abspath(dst)] = path
    timeout = _timeout()
    if not (dist.is_available() and dist.is_initialized()):
        _download_once(path, dst, timeout)
        return dst
    error = None
    if _local_rank() == 0:
        try:
            _download_once(path, dst, timeout)
        except DownloadError as exc:
            error = exc
    # Every process reaches the barrier, cached file or not: one that skipped it because the
    # file appeared meanwhile would leave the others waiting.
    dist.barrier()
    if error is not None:
        raise error
    if not osp.isfile(dst):
        raise DownloadError(_offline_help(path, dst, 'the local rank 0 process of this node failed '
                                                     'to download it; see its log'))
    return dst
