"""Packaging for davit_mm (the version lives in davit_mm/version.py only)."""
import os.path as osp

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))


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


with open(osp.join(HERE, 'README.md'), encoding='utf-8') as f:
    long_description = f.read()

setup(
    name='davit_mm',
    version=read_version(),
    description='DaViT (Dual Attention Vision Transformer) backbones for mmdet 3.x and mmseg 1.x',
    long_description=long_description,
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    packages=find_packages(include=['davit_mm', 'davit_mm.*']),
    python_requires='>=3.8',
    install_requires=read_requirements('runtime'),
    extras_require={
        'det': read_requirements('det'),
        'seg': read_requirements('seg'),
        'tests': read_requirements('tests') + read_requirements('det') + read_requirements('seg'),
        'all': read_requirements('det') + read_requirements('seg'),
    },
    zip_safe=False,
)
