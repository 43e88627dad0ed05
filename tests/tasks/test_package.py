"""tasks.package against a throwaway BentoML home."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.tasks.conftest import LINEAGE, METRICS
from textgate.config import Params
from textgate.io import read_json

pytestmark = pytest.mark.slow  # builds real bentos


@pytest.fixture(scope="module")
def params(registry_params: Params) -> Params:
    """The project's params with a registry of this module's own (packaged_twice uses it)."""
    return registry_params


def test_two_packages_give_distinct_exact_tags(packaged_twice, params: Params) -> None:
    first, second = packaged_twice
    assert first.model_tag != second.model_tag
    assert first.bento_tag != second.bento_tag
    for result in packaged_twice:
        name, _, version = result.model_tag.partition(":")
        assert name == params.package.model_name
        assert version and version != "latest"


def test_each_bento_is_pinned_to_its_own_model(packaged_twice, params: Params) -> None:
    import bentoml

    first, second = packaged_twice
    # The second model is now `latest`; the first bento must still carry the first model.
    assert str(bentoml.models.get(f"{first.model_tag.split(':')[0]}:latest").tag) == (
        second.model_tag
    )
    for result in (first, second):
        bento = bentoml.get(result.bento_tag)
        assert [str(model.tag) for model in bento.info.all_models] == [result.model_tag]
        # The bento arguments the service reads when the bento is served: params' values.
        assert bento.info.args == {
            "model_tag": result.model_tag,
            "runtime": "torch",  # the tiny model has no ONNX export (package.runtime: auto)
            "model_name": params.package.model_name,
            "max_text_chars": params.validate_.max_text_chars,
            "batch_size": params.evaluate.batch_size,
            "request_log_max_bytes": params.serve.request_log_max_bytes,
            "request_log_backups": params.serve.request_log_backups,
            "max_concurrency": params.serve.max_concurrency,
            "retry_after_s": params.serve.retry_after_s,
        }
        assert bento.info.labels["model"] == result.model_tag
        assert bento.info.labels["project"] == "textgate"


def test_model_holds_the_directory_and_metadata(packaged_twice, tiny_model_dir: Path) -> None:
    import bentoml

    first, _ = packaged_twice
    model = bentoml.models.get(first.model_tag)
    for source in tiny_model_dir.iterdir():
        assert (Path(model.path) / source.name).read_bytes() == source.read_bytes()
    metadata = model.info.metadata
    assert metadata["metrics"] == METRICS
    assert metadata["lineage"] == LINEAGE
    assert metadata["labels"] == read_json(tiny_model_dir / "label_map.json")["labels"]
    assert metadata["training"]["max_length"] == 32


def test_bento_includes_the_service_and_the_core(packaged_twice) -> None:
    import bentoml

    first, _ = packaged_twice
    src = Path(bentoml.get(first.bento_tag).path) / "src"
    assert (src / "bentos" / "service.py").is_file()
    assert (src / "textgate" / "model.py").is_file()
    assert not (src / "tests").exists()


def test_not_a_model_directory_saves_nothing(
    bentoml_home: Path, tmp_path: Path, params: Params
) -> None:
    import bentoml

    from tasks.package import PackageError, package_model

    before = {str(m.tag) for m in bentoml.models.list()}
    with pytest.raises(PackageError, match="not a textgate model directory"):
        package_model(tmp_path, params=params, metrics={}, lineage={})
    assert {str(m.tag) for m in bentoml.models.list()} == before


def test_failed_build_leaves_no_model_in_the_store(
    bentoml_home: Path, tiny_model_dir: Path, params: Params, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bentoml
    from bentoml.exceptions import BentoMLException

    from tasks.package import PackageError, package_model

    def broken_build(*args: object, **kwargs: object) -> None:
        raise BentoMLException("no space left for the bento")

    monkeypatch.setattr(bentoml.bentos, "build_bentofile", broken_build)
    models_before = {str(m.tag) for m in bentoml.models.list()}
    bentos_before = {str(b.tag) for b in bentoml.bentos.list()}

    with pytest.raises(PackageError, match="no space left"):
        package_model(tiny_model_dir, params=params, metrics={}, lineage={})
    assert {str(m.tag) for m in bentoml.models.list()} == models_before
    assert {str(b.tag) for b in bentoml.bentos.list()} == bentos_before


def test_failed_copy_leaves_no_model_in_the_store(
    bentoml_home: Path, tiny_model_dir: Path, params: Params, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bentoml

    from tasks.package import PackageError, package_model

    def broken_copy(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("tasks.package.shutil.copytree", broken_copy)
    before = {str(m.tag) for m in bentoml.models.list()}
    with pytest.raises(PackageError, match="disk full"):
        package_model(tiny_model_dir, params=params, metrics={}, lineage={})
    assert {str(m.tag) for m in bentoml.models.list()} == before


def test_metadata_without_nulls_for_bentoml() -> None:
    from tasks.package import metadata_for_bentoml

    converted = metadata_for_bentoml(
        {
            "metrics": {"accuracy": 0.9, "recall": None, "per_class": [0.5, None]},
            "lineage": {"data_dir": Path("data/raw"), "test_file": None},
        }
    )
    assert converted["metrics"]["accuracy"] == 0.9
    assert "recall" not in converted["metrics"]
    assert converted["metrics"]["per_class"][0] == 0.5
    assert math.isnan(converted["metrics"]["per_class"][1])
    assert converted["lineage"] == {"data_dir": "data/raw"}


def test_nulls_in_metrics_and_lineage_are_left_out_of_model_metadata(packaged_twice) -> None:
    import bentoml

    _, second = packaged_twice
    metadata = bentoml.models.get(second.model_tag).info.metadata
    assert metadata["metrics"] == {"accuracy": 0.95}
    assert metadata["lineage"] == {"run": "second"}


def test_local_bento_matches_the_version_exactly_not_as_a_prefix(packaged_twice) -> None:
    from bentoml.exceptions import NotFound

    from tasks.package import local_bento

    for result in packaged_twice:
        assert str(local_bento(result.bento_tag).tag) == result.bento_tag
        name, _, version = result.bento_tag.partition(":")
        # BentoML's own lookup takes "name:<prefix>" for a bento; a pointer must not.
        with pytest.raises(NotFound, match="no bento"):
            local_bento(f"{name}:{version[:1]}")
    with pytest.raises(NotFound):
        local_bento(f"{name}:{version}x")
