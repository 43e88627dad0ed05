"""tasks.promote: a packaged bento becomes production in the registry, or nothing changes."""

from __future__ import annotations

import pytest

from tests.tasks.conftest import LINEAGE, METRICS
from textgate.config import Params

pytestmark = pytest.mark.slow  # builds real bentos


@pytest.fixture(scope="module")
def params(registry_params: Params) -> Params:
    """The project's params with a registry of this module's own (packaged_twice uses it)."""
    return registry_params


def test_promote_unknown_bento_fails_and_changes_nothing(packaged_twice, params: Params) -> None:
    from tasks.package import PackageResult
    from tasks.promote import PromotionError, promote
    from textgate.registry import Registry

    first, _ = packaged_twice
    registry = Registry(params.registry.path)
    before = registry.path.read_bytes() if registry.path.exists() else None

    unknown = PackageResult(model_tag=first.model_tag, bento_tag="textgate:doesnotexist")
    with pytest.raises(PromotionError, match="textgate:doesnotexist"):
        promote(params, unknown, metrics=METRICS, lineage=LINEAGE, reason="should fail")
    mismatched = PackageResult(model_tag="textgate-classifier:other", bento_tag=first.bento_tag)
    with pytest.raises(PromotionError, match="not textgate-classifier:other"):
        promote(params, mismatched, metrics=METRICS, lineage=LINEAGE, reason="should fail")

    after = registry.path.read_bytes() if registry.path.exists() else None
    assert after == before


def test_promote_appends_to_the_registry(packaged_twice, params: Params) -> None:
    from tasks.promote import promote
    from textgate.registry import Registry

    first, second = packaged_twice
    registry = Registry(params.registry.path)
    start = len(registry.history())

    release = promote(params, first, metrics=METRICS, lineage=LINEAGE, reason="first release")
    assert release.bento_tag == first.bento_tag
    assert release.model_tag == first.model_tag
    assert release.metrics == METRICS and release.lineage == LINEAGE
    promote(params, second, metrics={"accuracy": 0.95}, lineage={}, reason="better model")

    history = registry.history()
    assert [r.bento_tag for r in history[start:]] == [first.bento_tag, second.bento_tag]
    production = registry.production()
    assert production is not None and production.bento_tag == second.bento_tag
