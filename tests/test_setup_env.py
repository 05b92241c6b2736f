"""tools/setup_env.sh never replaces a torch it finds: it refuses one older than 2.1 and constrains
pip to numpy < 2 for torch < 2.3. Run against a throwaway venv, a stand-in torch module and a
stand-in pip that records its calls and the constraints file each is given, or with --check (which
never calls pip) in the environment running the tests, so nothing can be installed anywhere."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import REPO


@pytest.fixture(scope='module')
def bare_python(tmp_path_factory):
    venv = tmp_path_factory.mktemp('venv')
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
    return str(venv / 'bin' / 'python')


def run_setup(bare_python, tmp_path, torch_version, *args, distribution=None, header=None,
              **extra_env):
    """setup_env.sh with a stand-in torch reporting ``torch_version``, installed (a dist-info)
    as version ``distribution`` if given, its ATen.h asking for the C++ standard ``header`` if
    given; stand-in modules of ``tmp_path / 'fake'`` come first on the path."""
    fake = tmp_path / 'fake'
    (fake / 'torch').mkdir(parents=True)
    (fake / 'torch' / '__init__.py').write_text(f'__version__ = {torch_version!r}\n')
    if distribution:
        (fake / f'torch-{distribution}.dist-info').mkdir()
        (fake / f'torch-{distribution}.dist-info' / 'METADATA').write_text(
            f'Name: torch\nVersion: {distribution}\n')
    if header:
        (fake / 'torch' / 'include' / 'ATen').mkdir(parents=True)
        (fake / 'torch' / 'include' / 'ATen' / 'ATen.h').write_text(
            f'#error {header} or later compatible compiler is required to use ATen.\n')
    env = dict(os.environ, PYTHON=bare_python, PYTHONPATH=str(fake), **extra_env)
    env.pop('DAVIT_MM_WHEELHOUSE', None)
    return subprocess.run(['bash', os.path.join(REPO, 'tools', 'setup_env.sh'), *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_torch_older_than_2_1_is_refused_not_replaced(bare_python, tmp_path):
    result = run_setup(bare_python, tmp_path, '1.13.1+cu117')
    assert result.returncode == 1
    assert 'torch 1.13.1+cu117 is installed; davit_mm needs torch >= 2.1' in result.stderr
    assert 'No module named pip' not in result.stderr  # stopped before any pip call


def test_torch_before_2_3_gets_the_numpy_1_constraints(bare_python, tmp_path):
    result, constraints = run_setup_with_fake_pip(bare_python, tmp_path, '2.1.2+cu121')
    assert 'torch 2.1.2+cu121 < 2.3: adding the constraints of requirements/torch_before_2.3.txt' \
        in result.stdout
    with open(os.path.join(REPO, 'requirements', 'torch_before_2.3.txt')) as f:
        before_2_3 = f.read().splitlines()
    assert constraints[0] == 'torch==2.1.2+cu121' and constraints[1:] == before_2_3
    assert 'numpy<2' in constraints and 'opencv-python<5' in constraints


def test_a_current_torch_gets_no_numpy_constraint(bare_python, tmp_path):
    result, constraints = run_setup_with_fake_pip(bare_python, tmp_path, '2.13.0+cpu')
    assert 'torch_before_2.3' not in result.stdout and 'needs torch >= 2.1' not in result.stderr
    assert constraints == ['torch==2.13.0+cpu']


def test_pip_keeps_the_installed_torch_distributions_version(bare_python, tmp_path):
    """PyPI's CUDA builds report torch.__version__ 2.11.0+cu130 but are torch 2.11.0 to pip: a
    pin on the former matches nothing installed, and pip could not install davit_mm."""
    result, constraints = run_setup_with_fake_pip(bare_python, tmp_path, '2.11.0+cu130',
                                                  distribution='2.11.0')
    assert 'every pip call below keeps torch==2.11.0\n' in result.stdout
    assert constraints == ['torch==2.11.0']


# The lines of mmcv 2.1.0's setup.py that setup_env.sh changes, as they stand there: runnable, so
# that the stand-in pip can call get_version() the way setuptools would.
MMCV_SETUP = """
def get_version():
    version_file = 'mmcv/version.py'
    with open(version_file, encoding='utf-8') as f:
        exec(compile(f.read(), version_file, 'exec'))
    return locals()['__version__']


extra_compile_args = {'cxx': ['-std=c++17'], 'nvcc': ['-std=c++17']}
"""

# Stands in for pip (``python -m pip``): records each call and the lines of the $PIP_CONSTRAINT file
# it is given. ``download`` leaves the unpacked
# source in a folder of $TMPDIR (as pip's --no-clean does) and fails, as pip's metadata step does
# on Python >= 3.13; ``install --only-binary`` finds no wheel; an install of a folder keeps its
# setup.py and what its get_version() gives; every other call succeeds without installing.
FAKE_PIP = r"""
import json, os, shutil, sys
log = os.environ['FAKE_PIP_LOG']
args = sys.argv[1:]
with open(log, 'a') as f:
    f.write(json.dumps(args) + '\n')
with open(os.environ['PIP_CONSTRAINT']) as f, open(log + '.constraints', 'a') as out:
    out.write(json.dumps(f.read().splitlines()) + '\n')
if args[0] == 'download':
    tree = os.path.join(os.environ['TMPDIR'], 'pip-download-x', 'mmcv_0')
    os.makedirs(os.path.join(tree, 'mmcv'))
    with open(os.path.join(tree, 'setup.py'), 'w') as f:
        f.write(os.environ['MMCV_SETUP'])
    with open(os.path.join(tree, 'mmcv', 'version.py'), 'w') as f:
        f.write("__version__ = '2.1.0'\n")
    sys.exit(1)
elif args[0] == 'install' and '--only-binary' in args:
    sys.exit(1)
elif args[0] == 'install' and os.path.isdir(args[-1]):
    shutil.copy(os.path.join(args[-1], 'setup.py'), log + '.setup.py')
    os.chdir(args[-1])
    namespace = {}
    exec(open('setup.py').read(), namespace)
    try:
        version = namespace['get_version']()
    except KeyError as error:
        version = f'KeyError: {error}'
    with open(log + '.version', 'w') as f:
        f.write(version)
"""


@pytest.fixture(scope='module')
def bare_python313(tmp_path_factory):
    """A venv without pip of a Python >= 3.13 found on this machine (PATH or pyenv), or a skip."""
    candidates = [shutil.which(f'python3.{minor}') for minor in range(13, 20)]
    candidates += sorted(glob.glob(os.path.expanduser('~/.pyenv/versions/3.1[3-9]*/bin/python3')))
    for python in filter(None, candidates):
        probe = subprocess.run([python, '-c', 'import sys; sys.exit(sys.version_info < (3, 13))'],
                               capture_output=True)
        if probe.returncode == 0:
            venv = tmp_path_factory.mktemp('venv313')
            subprocess.run([python, '-m', 'venv', '--without-pip', str(venv)], check=True)
            return str(venv / 'bin' / 'python')
    pytest.skip('no Python >= 3.13 on this machine')


def run_setup_with_fake_pip(python, tmp_path, torch_version, **kwargs):
    """setup_env.sh with the stand-in pip and a stand-in torch ``torch_version`` (``kwargs`` as
    run_setup's); returns the result and the lines of the constraints file, the same for every
    pip call."""
    (tmp_path / 'fake' / 'pip').mkdir(parents=True)
    (tmp_path / 'fake' / 'pip' / '__init__.py').write_text('')
    (tmp_path / 'fake' / 'pip' / '__main__.py').write_text(FAKE_PIP)
    log = tmp_path / 'pip.log'
    result = run_setup(python, tmp_path, torch_version, FAKE_PIP_LOG=str(log),
                       MMCV_SETUP=MMCV_SETUP, **kwargs)
    seen = [json.loads(line) for line in (tmp_path / 'pip.log.constraints').read_text().splitlines()]
    assert len(seen) >= 2 and all(lines == seen[0] for lines in seen)
    return result, seen[0]


def run_setup_building_mmcv(python, tmp_path, header):
    """setup_env.sh with the stand-in pip and a torch 2.15.0 whose ATen.h asks for ``header``;
    returns the result and pip's calls that install mmcv."""
    result, _ = run_setup_with_fake_pip(python, tmp_path, '2.15.0+cpu', header=header)
    assert result.returncode == 1  # the fake pip installs nothing: the final check fails
    assert 'the environment is still broken after installing' in result.stderr
    calls = [json.loads(line) for line in (tmp_path / 'pip.log').read_text().splitlines()]
    assert calls[-2][:3] == ['install', '--no-build-isolation', '-r']  # then the whole stack
    assert calls[-2][3].endswith('requirements/openmmlab.txt')
    return result, [c for c in calls if 'mmcv==2.1.0' in c or c[-1].endswith('/mmcv_0')]


def assert_built_from_source(tmp_path, mmcv_calls):
    assert [c[0] for c in mmcv_calls] == ['install', 'download', 'install']
    assert '--only-binary' in mmcv_calls[0] and '--no-clean' in mmcv_calls[1]
    assert not os.path.exists(mmcv_calls[2][-1])  # the unpacked source is removed afterwards
    return (tmp_path / 'pip.log.setup.py').read_text(), (tmp_path / 'pip.log.version').read_text()


@pytest.mark.parametrize('header', ['C++20', 'C++17'])
def test_mmcv_is_built_with_cxx20_where_torchs_headers_need_it(bare_python, tmp_path, header):
    """torch >= 2.14's headers need C++20; mmcv 2.1.0's setup.py asks for C++17. Where the headers
    say C++20 and no mmcv wheel is found, its source is built with -std=c++20; elsewhere pip
    installs mmcv from the requirements as before (on Python < 3.13, where nothing else needs
    changing; the bare venv runs the tests' Python)."""
    result, mmcv_calls = run_setup_building_mmcv(bare_python, tmp_path, header)
    new_python = sys.version_info >= (3, 13)
    if header == 'C++17' and not new_python:
        assert mmcv_calls == [] and 'building it from source' not in result.stdout
        return
    setup, version = assert_built_from_source(tmp_path, mmcv_calls)
    if header == 'C++20':
        assert ('building it from source with -std=c++20 (torch 2.15.0+cpu needs C++20, mmcv asks '
                'for C++17)') in result.stdout
        assert setup.count('-std=c++20') == 2 and 'c++17' not in setup
    else:
        assert 'c++17' in setup and 'c++20' not in setup
    assert ("return locals()['__version__']" in setup) is not new_python and version == '2.1.0'


def test_mmcv_reads_its_version_from_globals_on_python_3_13(bare_python313, tmp_path):
    """On Python >= 3.13 exec() no longer writes a function's locals (PEP 667): mmcv's
    get_version() fails with KeyError as published, and works once version.py runs in globals()."""
    (tmp_path / 'mmcv').mkdir()
    (tmp_path / 'mmcv' / 'version.py').write_text("__version__ = '2.1.0'\n")
    published = subprocess.run([bare_python313, '-c', MMCV_SETUP + 'get_version()'], cwd=tmp_path,
                               capture_output=True, text=True)
    assert "KeyError: '__version__'" in published.stderr
    result, mmcv_calls = run_setup_building_mmcv(bare_python313, tmp_path / 'run', 'C++17')
    assert 'building it from source with its version read from globals()' in result.stdout
    setup, version = assert_built_from_source(tmp_path / 'run', mmcv_calls)
    assert version == '2.1.0' and 'c++17' in setup and 'c++20' not in setup


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
