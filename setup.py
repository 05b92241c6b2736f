"""Packaging for davit_mm (the version lives in davit_mm/version.py only; static metadata in
pyproject.toml).

configs/, tools/, demo/ and model-index.yml are shipped inside the package as ``davit_mm/.mim/``
(symlinks in the source tree, copied into wheels), the OpenMMLab layout: mmengine resolves
``_base_ = ['davit_mm::davit_maskrcnn_1x_coco.py']`` there and mim finds the tools there.
"""
import os.path as osp

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))


CHECKOUT_SCRIPTS = ('setup_env.sh', 'run_tests.sh', 'quickstart.sh')


def read_version() -> str:
    namespace: dict = {}
    with open(osp.join(HERE, 'davit_mm', 'version.py'), encoding='utf-8') as f:
        exec(f.read(), namespace)
    return namespace['__version__']


def read_requirements(name: str) -> list:
    """Requirement lines of requirements/<name>.txt, comments and blanks dropped."""
    with open(osp.join(HERE, 'requirements', f'{name}.txt'), encoding='utf-8') as f:
        lines = (line.split('#', 1)[0].strip() for line in f)
        return [line for line in lines if line]


setup(
    version=read_version(),
    packages=find_packages(include=['davit_mm', 'davit_mm.*']),
    package_data={'davit_mm': ['.mim/model-index.yml', '.mim/configs/**/*.py', '.mim/configs/**/*.yml',
                               '.mim/tools/**/*.py', '.mim/tools/**/*.sh', '.mim/demo/*.py']},
    # They set up and use a checkout (requirements/, tests/, an editable install): not an installed package.
    exclude_package_data={'davit_mm': [f'.mim/tools/{name}' for name in CHECKOUT_SCRIPTS]},
    install_requires=read_requirements('runtime'),
    extras_require={
        'det': read_requirements('det'),
        'seg': read_requirements('seg'),
        'tests': read_requirements('tests') + read_requirements('det') + read_requirements('seg'),
        'all': read_requirements('det') + read_requirements('seg'),
    },
    zip_safe=False,
)
