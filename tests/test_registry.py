"""Registration: DaViT builds by its type name under mmdet's and mmseg's scopes, once or many times."""
import pytest
from mmengine.registry import MODELS, DefaultScope

from davit_mm.models import DaViT
from davit_mm.registry import register_all_modules


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_davit_builds_by_type_name_under_each_library_scope(scope, tiny_arch):
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(dict(type='DaViT', arch=tiny_arch, out_indices=(1, 2, 3)))
    assert isinstance(model, DaViT) and model.out_indices == (1, 2, 3)


def test_registration_is_idempotent():
    assert register_all_modules() == ['mmdet', 'mmseg']
    assert register_all_modules() == ['mmdet', 'mmseg']
