"""Pretrained weights from a URL: cached once, shared by the processes of a node, and a clear
error within seconds on an offline machine. A local HTTP server on 127.0.0.1 plays the hub."""
import datetime
import functools
import http.server
import os
import socket
import threading
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file

import formats
from davit_mm import fileio
from davit_mm.checkpoint import load_pretrained
from davit_mm.models import DaViT
from davit_mm.models.reference import ReferenceDaViT


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        self.server.requests.append(self.path)
        time.sleep(self.server.delay_s)
        if self.path.startswith('/cut/'):  # announces the whole file, sends half, hangs up
            data = (self.server.served / self.path[len('/cut/'):]).read_bytes()
            self.send_response(200)
            self.send_header('Content-Length', str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(tmp_path):
    """(base URL, served folder, list of requested paths); the server stops after the test."""
    served = tmp_path / 'served'
    served.mkdir()
    server = http.server.ThreadingHTTPServer(
        ('127.0.0.1', 0), functools.partial(_CountingHandler, directory=str(served)))
    server.requests, server.delay_s, server.served = [], 0.0, served
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{server.server_address[1]}', served, server
    server.shutdown()
    server.server_close()
    thread.join()


def _publish(served, name, arch):
    ref = ReferenceDaViT(arch).eval()
    (served / name).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in formats.timm(ref.state_dict()).items()}, str(served / name))
    return ref


def _outputs_equal(model, ref):
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        return all(torch.allclose(a, b, atol=1e-5) for a, b in zip(model.eval()(x), ref(x)))


def test_urls_are_downloaded_once_into_distinct_cache_files(tiny_arch, tmp_path, hub, monkeypatch):
    """Hub files share names (.../model.safetensors): each URL gets its own cache entry."""
    base, served, server = hub
    monkeypatch.setenv(fileio.CACHE_ENV, str(tmp_path / 'cache'))
    wide_arch = dict(tiny_arch, embed_dims=32, num_heads=(1, 2, 4, 4))
    tiny = _publish(served, 'tiny/resolve/main/model.safetensors', tiny_arch)
    wide = _publish(served, 'wide/resolve/main/model.safetensors', wide_arch)
    for arch, ref, name in ((tiny_arch, tiny, 'tiny'), (wide_arch, wide, 'wide'), (tiny_arch, tiny, 'tiny')):
        model = DaViT(arch)
        load_pretrained(model, f'{base}/{name}/resolve/main/model.safetensors')
        assert _outputs_equal(model, ref)
    assert server.requests == ['/tiny/resolve/main/model.safetensors', '/wide/resolve/main/model.safetensors']
    cached = sorted(os.listdir(tmp_path / 'cache'))
    assert len(cached) == 2 and all(name.endswith('-model.safetensors') for name in cached)


def test_cache_defaults_to_torch_hub_and_a_cached_file_needs_no_network(tmp_path, monkeypatch):
    monkeypatch.delenv(fileio.CACHE_ENV, raising=False)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    url = 'http://127.0.0.1:9/offline/model.safetensors'  # nothing listens on the discard port
    dst = fileio.cached_path(url)
    assert dst.startswith(str(tmp_path / 'hub' / 'checkpoints') + os.sep)
    os.makedirs(os.path.dirname(dst))
    open(dst, 'wb').close()
    assert fileio.resolve_checkpoint(url) == dst
    assert fileio.resolve_checkpoint(str(tmp_path / 'local.pth')) == str(tmp_path / 'local.pth')


def test_a_cache_folder_under_home_is_expanded_as_torch_home_is(tmp_path, monkeypatch):
    """A value the shell did not expand (quoted, or set by a job scheduler or a .env file)."""
    monkeypatch.setenv('HOME', str(tmp_path))
    monkeypatch.setenv(fileio.CACHE_ENV, '~/shared_cache')
    assert fileio.cached_path('http://127.0.0.1:9/w.pth').startswith(str(tmp_path / 'shared_cache') + os.sep)


def test_downloaded_file_gets_the_umask_mode(tmp_path, hub, monkeypatch):
    base, served, _ = hub
    torch.save({'w': torch.ones(3)}, served / 'w.pth')
    monkeypatch.setenv(fileio.CACHE_ENV, str(tmp_path / 'cache'))
    old = os.umask(0o002)
    try:
        path = fileio.resolve_checkpoint(f'{base}/w.pth')
    finally:
        os.umask(old)
    assert open(path, 'rb').read() == (served / 'w.pth').read_bytes()
    assert os.stat(path).st_mode & 0o777 == 0o664


def test_a_transfer_cut_short_is_not_cached_and_the_next_run_downloads_again(tiny_arch, tmp_path, hub,
                                                                              monkeypatch):
    base, served, server = hub
    monkeypatch.setenv(fileio.CACHE_ENV, str(tmp_path / 'cache'))
    ref = _publish(served, 'model.safetensors', tiny_arch)
    url = f'{base}/cut/model.safetensors'
    for attempt in (1, 2):
        with pytest.raises(fileio.DownloadError, match=rf'could not download {url}: the transfer ended '
                                                       rf'after \d+ of \d+ bytes; nothing was cached'):
            load_pretrained(DaViT(tiny_arch), url)
        assert len(server.requests) == attempt and os.listdir(tmp_path / 'cache') == []
    model = DaViT(tiny_arch)
    load_pretrained(model, f'{base}/model.safetensors')  # the whole file
    assert _outputs_equal(model, ref)


def test_a_web_page_instead_of_the_file_is_not_cached(tiny_arch, tmp_path, hub, monkeypatch):
    """What a share link of a cloud drive gives: 200 OK and an HTML page."""
    base, served, _ = hub
    (served / 'share.pth').write_bytes(b'<!DOCTYPE html><html><body>Sign in to download</body></html>')
    monkeypatch.setenv(fileio.CACHE_ENV, str(tmp_path / 'cache'))
    with pytest.raises(fileio.DownloadError, match=r"what came is not a checkpoint \(60 bytes starting with "
                                                   r"b'<!DOCTYPE'; a web page\?"):
        load_pretrained(DaViT(tiny_arch), f'{base}/share.pth')
    assert os.listdir(tmp_path / 'cache') == []


def test_a_broken_cached_download_names_the_url_and_how_to_fetch_it_again(tiny_arch, tmp_path, monkeypatch):
    monkeypatch.setenv(fileio.CACHE_ENV, str(tmp_path / 'cache'))
    url = 'http://127.0.0.1:9/davit_tiny.pth'
    os.makedirs(tmp_path / 'cache')
    with open(fileio.cached_path(url), 'wb') as f:
        f.write(b'PK\x03\x04 left by an old version')
    with pytest.raises(ValueError, match=rf'corrupt or truncated.* \(the cached download of {url}: delete '
                                         rf'the file to download it again\)'):
        load_pretrained(DaViT(tiny_arch), url)


def test_unreachable_url_fails_within_seconds_naming_url_cache_and_the_config_option(tmp_path, monkeypatch):
    silent = socket.socket()  # accepts connections, never answers: an unreachable proxy/hub
    silent.bind(('127.0.0.1', 0))
    silent.listen(4)
    monkeypatch.setenv(fileio.CACHE_ENV, str(tmp_path / 'cache'))
    monkeypatch.setenv(fileio.TIMEOUT_ENV, '1')
    url = f'http://127.0.0.1:{silent.getsockname()[1]}/davit_tiny/model.safetensors'
    start = time.monotonic()
    try:
        with pytest.raises(fileio.DownloadError) as error:
            load_pretrained(DaViT(dict(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))), url)
    finally:
        silent.close()
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert message.startswith(f'could not download {url} (')
    assert f'looked for a cached copy at {fileio.cached_path(url)}' in message
    assert '--cfg-options model.backbone.init_cfg.checkpoint=/path/to/file' in message
    assert os.listdir(tmp_path / 'cache') == []  # no partial file left behind


# inf and 1e10 overflowed in the socket layer (OverflowError: timestamp out of range)
@pytest.mark.parametrize('value', ['inf', '1e10', 'nan', '0', '-1', 'abc', ''])
def test_a_bad_timeout_setting_is_refused(monkeypatch, value):
    monkeypatch.setenv(fileio.TIMEOUT_ENV, value)
    with pytest.raises(ValueError, match=rf"^DAVIT_MM_DOWNLOAD_TIMEOUT='{value}': accepted a number of "
                                         r'seconds > 0 and <= 1000000000 \(unset: 10\)$'):
        fileio.resolve_checkpoint('http://127.0.0.1:9/x.pth')


@pytest.mark.parametrize('value', ['0.5', '1e9'])
def test_timeouts_up_to_the_largest_accepted_reach_the_network(tmp_path, monkeypatch, value):
    closed = socket.socket()  # a port nothing listens on: the connection is refused at once
    closed.bind(('127.0.0.1', 0))
    port = closed.getsockname()[1]
    closed.close()
    monkeypatch.setenv(fileio.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(fileio.TIMEOUT_ENV, value)
    with pytest.raises(fileio.DownloadError, match=f'^could not download http://127.0.0.1:{port}/x.pth'):
        fileio.resolve_checkpoint(f'http://127.0.0.1:{port}/x.pth')


def _resolve_in_process(rank, world_size, port, url, cache, rank1_delay_s, results, local_rank=None):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port),
                      LOCAL_RANK=str(rank if local_rank is None else local_rank),
                      **{fileio.CACHE_ENV: cache})
    torch.distributed.init_process_group('gloo', rank=rank, world_size=world_size,
                                         timeout=datetime.timedelta(seconds=20))
    try:
        if rank == 1:
            time.sleep(rank1_delay_s)
        path = fileio.resolve_checkpoint(url)
        results[rank] = (path, open(path, 'rb').read())
        torch.distributed.barrier()  # fails if the ranks' barriers in resolve_checkpoint did not pair up
    finally:
        torch.distributed.destroy_process_group()


# rank 1 asks while rank 0 downloads (it must wait), or only once the file is cached (it must
# still meet rank 0 at its barrier); both ranks with LOCAL_RANK 0 (a launcher that exports no
# local rank, each defaulting to 0): both would download, they take turns through the lock
@pytest.mark.parametrize('rank1_delay_s,local_rank', [(0.0, None), (2.5, None), (0.0, 0)])
def test_one_download_per_node_the_other_processes_wait_and_read_the_same_file(tmp_path, hub, rank1_delay_s,
                                                                               local_rank):
    base, served, server = hub
    server.delay_s = 1.0  # a slow download: rank 1 must wait for it, not race or re-download
    data = b'PK' + b'x' * 100000  # a zip's magic: what a download must start with to be cached
    (served / 'w.pth').write_bytes(data)
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_resolve_in_process, nprocs=2, join=True,
             args=(2, port, f'{base}/w.pth', str(tmp_path / 'cache'), rank1_delay_s, results, local_rank))
    assert server.requests == ['/w.pth']
    assert results[0] == results[1] and results[0][1] == data


def test_a_cached_download_that_cannot_be_read_names_the_url_and_how_to_fetch_it_again(
        tiny_arch, tmp_path, monkeypatch):
    """A teammate's download under umask 077 in a shared cache: a CheckpointError naming the URL,
    not a bare PermissionError."""
    from davit_mm import checkpoint
    monkeypatch.setenv(fileio.CACHE_ENV, str(tmp_path / 'cache'))
    url = 'http://127.0.0.1:9/davit_tiny.pth'  # nothing listens: the cached copy must serve
    os.makedirs(tmp_path / 'cache')
    cached = fileio.cached_path(url)
    torch.save({'state_dict': DaViT(tiny_arch).state_dict()}, cached)
    os.chmod(cached, 0)
    if os.geteuid() == 0:  # root reads any file: refuse this one as the kernel refuses others
        def refusing_open(path, *args, **kwargs):
            if os.fspath(path) == cached:
                raise PermissionError(13, 'Permission denied', cached)
            return open(path, *args, **kwargs)
        monkeypatch.setattr(checkpoint, 'open', refusing_open, raising=False)
    with pytest.raises(ValueError, match=rf'cannot be read: Permission denied \(the cached download of '
                                         rf'{url}: delete the file to download it again\)'):
        load_pretrained(DaViT(tiny_arch), url)


def test_a_broken_cached_download_read_by_its_path_still_names_its_url(tmp_path, monkeypatch):
    """The tools hand mmengine (and their own checks) the cached file in place of a load_from
    URL; an error about that file still says which URL it came from."""
    from davit_mm.checkpoint import read_training_checkpoint
    monkeypatch.setenv(fileio.CACHE_ENV, str(tmp_path / 'cache'))
    url = 'http://127.0.0.1:9/epoch_12.pth'
    os.makedirs(tmp_path / 'cache')
    with open(fileio.cached_path(url), 'wb') as f:
        f.write(b'PK\x03\x04 cut short')
    path = fileio.resolve_checkpoint(url)  # what cli.build_runner does with load_from
    with pytest.raises(ValueError, match=rf'corrupt or truncated.* \(the cached download of {url}: '
                                         rf'delete the file to download it again\)'):
        read_training_checkpoint(path)


def test_the_umask_is_read_without_being_changed(monkeypatch):
    """os.umask(0) to read it would let another thread create a world-writable file meanwhile."""
    if not os.path.exists('/proc/self/status'):
        pytest.skip('no /proc: the umask can only be read by setting it')
    old = os.umask(0o027)
    try:
        def no_umask(*args):
            raise AssertionError('the umask was changed')
        monkeypatch.setattr(os, 'umask', no_umask)
        assert fileio.default_file_mode() == 0o640
    finally:
        monkeypatch.undo()
        os.umask(old)


def _resolve_without_process_group(index, url, cache, barrier, results):
    os.environ[fileio.CACHE_ENV] = cache
    barrier.wait()  # both ask at once
    path = fileio.resolve_checkpoint(url)
    results[index] = (path, open(path, 'rb').read())


def test_processes_without_a_process_group_download_a_url_once(tmp_path, hub):
    """tools/train.py --resume URL reads the file before the process group is up: the ranks (or
    jobs sharing a cache) asking at once get one download, the others wait for it."""
    base, served, server = hub
    server.delay_s = 1.0
    data = b'PK' + b'x' * 100000
    (served / 'w.pth').write_bytes(data)
    manager = mp.Manager()
    results, barrier = manager.dict(), manager.Barrier(2)
    mp.spawn(_resolve_without_process_group, nprocs=2, join=True,
             args=(f'{base}/w.pth', str(tmp_path / 'cache'), barrier, results))
    assert server.requests == ['/w.pth']
    assert results[0] == results[1] and results[0][1] == data
