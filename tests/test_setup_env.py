"""tools/setup_env.sh never replaces a torch it finds: it refuses one older than 2.1 and constrains
pip to numpy < 2 for torch < 2.3. Run against a throwaway venv without pip and a stand-in torch
module, or with --check (which never calls pip) in the environment running the tests, so nothing
can be installed anywhere."""
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO


@pytest.fixture(scope='module')
def bare_python(tmp_path_factory):
    venv = tmp_path_factory.mktemp('venv')
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
    return str(venv / 'bin' / 'python')


def run_setup(bare_python, tmp_path, torch_version, *args, distribution=None):
    """setup_env.sh with a stand-in torch reporting ``torch_version``, installed (a dist-info)
    as version ``distribution`` if given."""
    fake = tmp_path / 'fake'
    (fake / 'torch').mkdir(parents=True)
    (fake / 'torch' / '__init__.py').write_text(f'__version__ = {torch_version!r}\n')
    if distribution:
        (fake / f'torch-{distribution}.dist-info').mkdir()
        (fake / f'torch-{distribution}.dist-info' / 'METADATA').write_text(
            f'Name: torch\nVersion: {distribution}\n')
    env = dict(os.environ, PYTHON=bare_python, PYTHONPATH=str(fake))
    env.pop('DAVIT_MM_WHEELHOUSE', None)
    return subprocess.run(['bash', os.path.join(REPO, 'tools', 'setup_env.sh'), *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_torch_older_than_2_1_is_refused_not_replaced(bare_python, tmp_path):
    result = run_setup(bare_python, tmp_path, '1.13.1+cu117')
    assert result.returncode == 1
    assert 'torch 1.13.1+cu117 is installed; davit_mm needs torch >= 2.1' in result.stderr
    assert 'No module named pip' not in result.stderr  # stopped before any pip call


def test_torch_before_2_3_gets_the_numpy_1_constraints(bare_python, tmp_path):
    result = run_setup(bare_python, tmp_path, '2.1.2+cu121')
    assert 'torch 2.1.2+cu121 < 2.3: adding the constraints of requirements/torch_before_2.3.txt' \
        in result.stdout
    assert 'No module named pip' in result.stderr  # then pip runs, and is missing here: no install


def test_a_current_torch_gets_no_numpy_constraint(bare_python, tmp_path):
    result = run_setup(bare_python, tmp_path, '2.13.0+cpu')
    assert 'torch_before_2.3' not in result.stdout and 'needs torch >= 2.1' not in result.stderr
    assert 'No module named pip' in result.stderr


def test_pip_keeps_the_installed_torch_distributions_version(bare_python, tmp_path):
    """PyPI's CUDA builds report torch.__version__ 2.11.0+cu130 but are torch 2.11.0 to pip: a
    pin on the former matches nothing installed, and pip could not install davit_mm."""
    result = run_setup(bare_python, tmp_path, '2.11.0+cu130', distribution='2.11.0')
    assert 'every pip call below keeps torch==2.11.0\n' in result.stdout


# Stands in for pip (``python -m pip``): records each call; ``download`` writes an sdist whose
# setup.py asks for C++17 as mmcv 2.1.0's does, ``install --only-binary`` finds no wheel, and an
# install of a folder keeps a copy of its setup.py; every other call succeeds without installing.
FAKE_PIP = r"""
import io, json, os, shutil, sys, tarfile
log = os.environ['FAKE_PIP_LOG']
args = sys.argv[1:]
with open(log, 'a') as f:
    f.write(json.dumps(args) + '\n')
if args[0] == 'download':
    folder = args[args.index('-d') + 1]
    setup = (b"extra_compile_args['cxx'] = ['-std=c++17']\n"
             b"extra_compile_args['nvcc'] += ['-std=c++17']\n")
    with tarfile.open(os.path.join(folder, 'mmcv-2.1.0.tar.gz'), 'w:gz') as tar:
        info = tarfile.TarInfo('mmcv-2.1.0/setup.py')
        info.size = len(setup)
        tar.addfile(info, io.BytesIO(setup))
elif args[0] == 'install' and '--only-binary' in args:
    sys.exit(1)
elif args[0] == 'install' and os.path.isdir(args[-1]):
    shutil.copy(os.path.join(args[-1], 'setup.py'), log + '.setup.py')
"""


@pytest.mark.parametrize('header', ['C++20', 'C++17'])
def test_mmcv_is_built_with_cxx20_where_torchs_headers_need_it(bare_python, tmp_path, header):
    """torch >= 2.14's headers need C++20; mmcv 2.1.0's setup.py asks for C++17. Where the headers
    say C++20 and no mmcv wheel is found, the sdist is built with -std=c++20; elsewhere pip
    installs mmcv from the requirements as before."""
    fake = tmp_path / 'fake'
    (fake / 'torch' / 'include' / 'ATen').mkdir(parents=True)
    (fake / 'torch' / '__init__.py').write_text("__version__ = '2.15.0+cpu'\n")
    (fake / 'torch' / 'include' / 'ATen' / 'ATen.h').write_text(
        f'#error {header} or later compatible compiler is required to use ATen.\n')
    (fake / 'pip').mkdir()
    (fake / 'pip' / '__init__.py').write_text('')
    (fake / 'pip' / '__main__.py').write_text(FAKE_PIP)
    log = tmp_path / 'pip.log'
    env = dict(os.environ, PYTHON=bare_python, PYTHONPATH=str(fake), FAKE_PIP_LOG=str(log))
    env.pop('DAVIT_MM_WHEELHOUSE', None)
    result = subprocess.run(['bash', os.path.join(REPO, 'tools', 'setup_env.sh')], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1  # the fake pip installs nothing: the final check fails
    assert 'the environment is still broken after installing' in result.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    mmcv_calls = [c for c in calls if 'mmcv==2.1.0' in c or c[-1].endswith('/mmcv-2.1.0')]
    message = 'torch 2.15.0+cpu needs C++20 and no mmcv==2.1.0 wheel was found'
    if header == 'C++17':
        assert mmcv_calls == [] and message not in result.stdout
    else:
        assert message in result.stdout
        assert [c[0] for c in mmcv_calls] == ['install', 'download', 'install']
        assert '--only-binary' in mmcv_calls[0] and '--no-binary' in mmcv_calls[1]
        setup = (tmp_path / 'pip.log.setup.py').read_text()
        assert setup.count('-std=c++20') == 2 and 'c++17' not in setup
        assert not os.path.exists(mmcv_calls[2][-1])  # the unpacked source is removed afterwards
    assert calls[-2][:3] == ['install', '--no-build-isolation', '-r']  # then the whole stack
    assert calls[-2][3].endswith('requirements/openmmlab.txt')


def test_an_installed_torch_that_fails_to_import_is_reported_not_replaced(bare_python, tmp_path):
    fake = tmp_path / 'fake'
    (fake / 'torch').mkdir(parents=True)
    (fake / 'torch' / '__init__.py').write_text("raise ImportError('libcudart.so.12: cannot open')\n")
    (fake / 'torch-2.1.2.dist-info').mkdir()
    (fake / 'torch-2.1.2.dist-info' / 'METADATA').write_text('Name: torch\nVersion: 2.1.2\n')
    env = dict(os.environ, PYTHON=bare_python, PYTHONPATH=str(fake))
    result = subprocess.run(['bash', os.path.join(REPO, 'tools', 'setup_env.sh')], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert 'torch 2.1.2 is installed but does not import' in result.stderr
    assert 'libcudart.so.12: cannot open' in result.stderr
    assert 'installing torch' not in result.stdout and 'No module named pip' not in result.stderr


def test_check_names_what_is_missing_and_installs_nothing(bare_python, tmp_path):
    result = run_setup(bare_python, tmp_path, '2.13.0+cpu', '--check')
    assert result.returncode == 1
    assert 'not set up (--check installs nothing)' in result.stderr
    assert "mmcv.ops: ModuleNotFoundError: No module named 'mmcv'" in result.stderr
    assert 'installing' not in result.stdout and 'No module named pip' not in result.stderr


def test_an_unknown_argument_is_refused_before_anything_runs(bare_python, tmp_path):
    result = run_setup(bare_python, tmp_path, '2.13.0+cpu', '--chek')
    assert result.returncode == 2 and "unknown argument '--chek'" in result.stderr
    assert result.stdout == ''


def test_setup_env_is_fast_when_everything_is_in_place():
    # --check: verifies the environment running the tests, and can never install into it
    result = subprocess.run(['bash', os.path.join(REPO, 'tools', 'setup_env.sh'), '--check'],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'already set up: torch' in result.stdout


def test_setup_env_rejects_a_wheelhouse_that_is_not_a_folder(tmp_path):
    result = subprocess.run(['bash', os.path.join(REPO, 'tools', 'setup_env.sh'), '--check'],
                            capture_output=True, text=True,
                            env=dict(os.environ, DAVIT_MM_WHEELHOUSE=str(tmp_path / 'no')))
    assert result.returncode == 1  # an environment it cannot set up, as for --check
    assert 'DAVIT_MM_WHEELHOUSE=' in result.stderr and 'is not a directory' in result.stderr


def run_tests_sh(tmp_path, args, **env):
    """What tools/run_tests.sh ``args`` would give pytest (options it always adds left out), and
    OMP_NUM_THREADS as pytest would see it: a fake interpreter records both."""
    fake = tmp_path / 'python'  # answers everything with success; records what pytest would get
    fake.write_text('#!/usr/bin/env bash\n'
                    'if [ "$1 $2" = "-m pytest" ]; then shift 2; printf "%s\\n" "$@" > "$0.args"; '
                    'echo "${OMP_NUM_THREADS:-unset}" > "$0.omp"; fi\n')
    fake.chmod(0o755)
    environ = {k: v for k, v in os.environ.items()
               if k not in ('DAVIT_MM_TEST_WORKERS', 'OMP_NUM_THREADS', 'OMP_THREAD_LIMIT')}
    result = subprocess.run(['bash', os.path.join(REPO, 'tools', 'run_tests.sh'), *args], timeout=120,
                            env=dict(environ, PYTHON=str(fake), **env), capture_output=True, text=True)
    if result.returncode != 0:
        return result
    given = (tmp_path / 'python.args').read_text().splitlines()
    always = ['-p', 'no:cacheprovider', '-W', 'ignore:pkg_resources is deprecated']
    start = next(i for i in range(len(given)) if given[i:i + len(always)] == always)
    return given[:start] + given[start + len(always):], (tmp_path / 'python.omp').read_text().strip()


@pytest.mark.parametrize('args,expected', [
    ([], ['tests']),
    (['-m', 'not slow', '-x'], ['tests', '-m', 'not slow', '-x']),
    (['tests/test_registry.py', '-q'], ['tests/test_registry.py', '-q']),
    (['-q', 'tests/test_cli.py::test_traceback_on_request'], ['-q', 'tests/test_cli.py::test_traceback_on_request']),
])
def test_run_tests_runs_the_files_given_or_the_whole_suite(tmp_path, args, expected):
    """The files or tests given, or else the whole suite, in one process with 1 worker asked for."""
    assert run_tests_sh(tmp_path, args, DAVIT_MM_TEST_WORKERS='1') == (expected, 'unset')


def test_run_tests_runs_the_whole_suite_in_two_workers_sharing_the_cores(tmp_path):
    """By default the whole suite runs in 2 xdist workers, each test file in one of them, with the
    cores shared out as threads; given files run in one process."""
    cores = len(os.sched_getaffinity(0))
    default, share = (['-n', '2', '--dist', 'loadfile'], str(cores // 2)) if cores >= 2 else ([], 'unset')
    assert run_tests_sh(tmp_path, []) == (['tests'] + default, share)
    assert run_tests_sh(tmp_path, ['-x']) == (['tests'] + default + ['-x'], share)
    assert run_tests_sh(tmp_path, ['tests/test_registry.py']) == (['tests/test_registry.py'], 'unset')
    # asked for: 3 workers for given files; the caller's threads and worker options are kept
    assert run_tests_sh(tmp_path, ['tests/test_registry.py'], DAVIT_MM_TEST_WORKERS='3') == (
        ['-n', '3', '--dist', 'loadfile', 'tests/test_registry.py'], str(max(1, cores // 3)))
    assert run_tests_sh(tmp_path, [], OMP_NUM_THREADS='4') == (['tests'] + default, '4')
    # the cores are counted without the caller's thread settings (nproc itself answers them)
    assert run_tests_sh(tmp_path, [], OMP_NUM_THREADS='1') == (['tests'] + default, '1')
    assert run_tests_sh(tmp_path, [], OMP_THREAD_LIMIT='1')[0] == ['tests'] + default
    assert run_tests_sh(tmp_path, ['-n', '4']) == (['tests', '-n', '4'], 'unset')
    assert run_tests_sh(tmp_path, ['-p', 'no:xdist']) == (['tests', '-p', 'no:xdist'], 'unset')
    assert run_tests_sh(tmp_path, ['-pno:xdist']) == (['tests', '-pno:xdist'], 'unset')


@pytest.mark.parametrize('workers', ['0', 'two', '-1'])
def test_run_tests_refuses_a_worker_count_that_is_not_a_positive_integer(tmp_path, workers):
    result = run_tests_sh(tmp_path, [], DAVIT_MM_TEST_WORKERS=workers)
    assert result.returncode == 2
    assert f"error: DAVIT_MM_TEST_WORKERS='{workers}': accepted a positive integer" in result.stderr
