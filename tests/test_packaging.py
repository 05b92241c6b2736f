"""`pip install .` (not editable) ships davit_mm's configs and tools inside the package in the
OpenMMLab layout (davit_mm/.mim/), so a config outside the repository inherits
`davit_mm::davit_maskrcnn_1x_coco.py`; the version is defined once."""
import glob
import os
import os.path as osp
import re
import shutil
import site
import subprocess
import sys
import zipfile

import pytest

from helpers import REPO


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    """Built from a copy of the working tree without build outputs: setuptools reuses a checkout's
    build/ folder, which would ship files deleted since, and leave build/ behind."""
    out = tmp_path_factory.mktemp('wheel')
    source = out / 'source'
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        '.git', 'build', 'dist', '*.egg-info', '__pycache__', 'work_dirs', 'outputs', 'data', '.venv'))
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
                    str(source), '-w', str(out)], check=True, capture_output=True)
    wheel, = glob.glob(str(out / 'davit_mm-*.whl'))
    return wheel


def test_the_wheel_ships_every_config_tool_and_the_model_index(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {osp.relpath(p, REPO) for p in glob.glob(osp.join(REPO, 'configs', '**', '*.py'),
                                                          recursive=True)}
    tools = {osp.relpath(p, REPO) for p in glob.glob(osp.join(REPO, 'tools', '**', '*.*'), recursive=True)
             if p.endswith(('.py', '.sh'))}
    checkout_only = {f'tools/{name}' for name in ('setup_env.sh', 'run_tests.sh', 'quickstart.sh')}
    assert configs and checkout_only < tools
    for path in sorted(configs | tools - checkout_only) + ['model-index.yml', 'configs/metafile.yml',
                                                           'demo/image_demo.py']:
        assert f'davit_mm/.mim/{path}' in names, path
    # they set up and use a checkout (requirements/, tests/): from the package they failed
    assert not {f'davit_mm/.mim/{path}' for path in checkout_only} & names
    assert not any(name.startswith(('tests/', 'build/')) or '/tests/' in name for name in names)
    for legal in ('LICENSE', 'NOTICE'):
        assert any(n.endswith(f'.dist-info/licenses/{legal}') or n.endswith(f'.dist-info/{legal}')
                   for n in names), legal


USER_SCRIPT = '''
import os, sys
import davit_mm
from mmengine.config import Config
from davit_mm.checks import check_num_classes
cfg = Config.fromfile('my_maskrcnn.py')
check_num_classes(cfg)  # the heads' 3 classes are the dataset's
print(os.path.realpath(davit_mm.__file__))
print(cfg.model.backbone.type, cfg.model.backbone.arch, cfg.model.roi_head.bbox_head.num_classes,
      cfg.tta_model.type, cfg.default_scope)
'''


@pytest.mark.slow
def test_a_config_outside_the_repository_inherits_from_the_installed_package(wheel, tmp_path):
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
    python = str(venv / 'bin' / 'python')
    # torch, mmcv, ... of the interpreter running the tests stay visible after the venv's own
    # packages (--system-site-packages would expose the base interpreter's, not a venv's)
    own_site, = glob.glob(str(venv / 'lib' / 'python*' / 'site-packages'))
    with open(osp.join(own_site, 'zz_test_packages.pth'), 'w') as f:
        f.write('\n'.join(p for p in site.getsitepackages() if osp.isdir(p)) + '\n')
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--ignore-installed',
                    '--prefix', str(venv), wheel], check=True, capture_output=True)  # into the venv
    project = tmp_path / 'my_project'
    project.mkdir()
    readme = open(osp.join(REPO, 'README.md')).read()  # the README's example, as it stands
    (project / 'my_maskrcnn.py').write_text(re.search(
        r'```python\n(# my_project/my_maskrcnn.py.*?)```', readme, re.S).group(1))
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}  # no checkout on the path
    result = subprocess.run([python, '-W', 'ignore', '-c', USER_SCRIPT], cwd=project, capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    where, summary = result.stdout.strip().splitlines()[-2:]
    assert where.startswith(str(venv)), where  # the installed copy, not the checkout
    assert summary == 'DaViT tiny 3 DetTTAModelWithMasks mmdet'
    # mim runs a package's tools from <package>/.mim/tools; they work from there
    train = osp.join(osp.dirname(where), '.mim', 'tools', 'train.py')
    result = subprocess.run([python, '-W', 'ignore', train, '--help'], cwd=project, capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0 and 'usage' in result.stdout, result.stderr[-3000:]


def test_davit_mm_scope_resolves_to_the_imported_package_in_a_checkout(tmp_path):
    """Editable installs and checkouts: `davit_mm::` finds the configs of the davit_mm imported."""
    import davit_mm
    from mmengine.config import Config
    config = tmp_path / 'mine.py'
    config.write_text("_base_ = ['davit_mm::davit_retinanet_1x_coco.py',\n"
                      "          'davit_mm::quickstart/davit_mini_maskrcnn_synthetic_coco.py']\n")
    with pytest.raises(Exception, match='Duplicate key'):  # both bases define `model`: both were found
        Config.fromfile(str(config))
    config.write_text("_base_ = ['davit_mm::davit_retinanet_1x_coco.py']\n")
    cfg = Config.fromfile(str(config))
    assert cfg.model.backbone.type == 'DaViT' and cfg.model.neck.start_level == 0
    assert osp.realpath(osp.dirname(davit_mm.__file__)) == osp.join(REPO, 'davit_mm')
    config.write_text("_base_ = ['davit_mm::no_such_config.py']\n")
    with pytest.raises(FileNotFoundError):
        Config.fromfile(str(config))


def test_version_lives_in_one_place():
    """davit_mm/version.py holds the version; setup.py reads it from there, and no other file of
    the package or its build names it."""
    import davit_mm
    result = subprocess.run([sys.executable, 'setup.py', '--version'], cwd=REPO,
                            capture_output=True, text=True)
    assert result.stdout.strip().splitlines()[-1] == davit_mm.__version__
    files = glob.glob(osp.join(REPO, 'davit_mm', '**', '*.py'), recursive=True) + [
        osp.join(REPO, name) for name in ('setup.py', 'setup.cfg', 'pyproject.toml') if osp.exists(osp.join(REPO, name))]
    quoted = (f"'{davit_mm.__version__}'", f'"{davit_mm.__version__}"')

    def names_the_version(path):
        with open(path) as f:
            text = f.read()
        return any(q in text for q in quoted)

    holders = [osp.relpath(f, REPO) for f in files if names_the_version(f)]
    assert holders == [osp.join('davit_mm', 'version.py')]
