"""Promote: make a packaged bento production by appending it to the registry file.

Also the checks behind the manual commands: promoting a bento already in the store by hand,
and verifying that a rollback's target can still be served.
"""

from __future__ import annotations

from typing import Any

import bentoml
from bentoml.exceptions import NotFound

from tasks.package import PROJECT, PackageResult, local_bento
from textgate.artifacts import EvaluateMetrics, evaluate_outputs, read_payload
from textgate.config import Params
from textgate.errors import TextgateError
from textgate.gate import Verdict
from textgate.registry import Action, Registry, Release


class PromotionError(TextgateError):
    """The bento or model to promote is not in the BentoML store, or does not match."""


def promote(
    params: Params,
    result: PackageResult,
    *,
    metrics: dict[str, Any],
    lineage: dict[str, Any],
    reason: str,
    verdict: dict[str, Any] | None = None,
    action: Action = "promote",
    actor: str | None = None,
) -> Release:
    """Record `result` as the production release in `params.registry.path`.

    The bento must exist in the local BentoML store and carry `result.model_tag`, and that
    model must still be in the model store (serving the bento needs it); otherwise nothing
    is written.

    Args:
        verdict: the gate verdict that justified the release (its JSON), kept in the history.
        action: how the release came about, see `textgate.registry.Release`.
        actor: who promoted it, default `user@host`.

    Raises:
        PromotionError: the bento or model is unknown, or the bento serves another model.
        RegistryError: the registry file is corrupt (it is left unchanged).
    """
    bento = _get_bento(result.bento_tag, f"cannot promote {result.bento_tag}")
    _check_models(bento, result.model_tag, f"cannot promote {bento.tag}")
    release = Release.create(
        bento_tag=str(bento.tag),
        model_tag=result.model_tag,
        reason=reason,
        metrics=metrics,
        lineage=lineage,
        verdict=verdict,
        action=action,
        actor=actor,
    )
    Registry(params.registry.path).promote(release)
    return release


def promote_passed(
    params: Params, result: PackageResult, lineage: dict[str, Any], verdict: Verdict
) -> Release:
    """Promote the pipeline's bento that passed the gate; the approval, if any, is the reason."""
    approval = next((c for c in verdict.checks if c.kind == "approval"), None)
    return promote(
        params,
        result,
        metrics=read_payload(EvaluateMetrics, evaluate_outputs(params).metrics),
        lineage=lineage,
        reason="passed the gate" + (f"; {approval.reason}" if approval else ""),
        verdict=verdict.model_dump(mode="json"),
    )


def promote_existing(
    params: Params,
    bento_tag: str,
    *,
    reason: str,
    actor: str | None = None,
    verdict: dict[str, Any] | None = None,
) -> Release:
    """Promote by hand a textgate bento that is already in the BentoML store (action "manual").

    The bento must carry the label `project=textgate` and serve exactly one model, which must
    still be in the model store; the release's metrics and lineage are that model's
    metadata. `bento_tag` may omit the version (`textgate` means its latest); the release
    records the exact tag.

    Raises:
        PromotionError: the bento is unknown or is not a textgate bento, its model is gone,
            or it is production already; nothing is written.
        RegistryError: the registry file is corrupt (it is left unchanged).
    """
    bento = _get_bento(bento_tag, f"cannot promote {bento_tag}")
    where = f"cannot promote {bento.tag}"
    if bento.info.labels.get("project") != PROJECT:
        raise PromotionError(
            f"{where}: it is not a textgate bento (label project="
            f"{bento.info.labels.get('project')!r}, expected {PROJECT!r})"
        )
    served = [str(model.tag) for model in bento.info.all_models]
    if len(served) != 1:
        raise PromotionError(f"{where}: it should serve exactly one model, it serves {served}")
    model = _check_models(bento, served[0], where)
    registry = Registry(params.registry.path)
    current = registry.production()
    if current is not None and current.bento_tag == str(bento.tag):
        raise PromotionError(f"{where}: it is production already; nothing to do")
    metadata = model.info.metadata
    release = Release.create(
        bento_tag=str(bento.tag),
        model_tag=served[0],
        reason=reason,
        metrics=_section(metadata, "metrics"),
        lineage=_section(metadata, "lineage"),
        action="manual",
        actor=actor,
        verdict=verdict,
    )
    registry.promote(release)
    return release


def ensure_servable(release: Release) -> None:
    """Check that `release`'s bento, and its model, are still in the BentoML stores.

    Used as the `check` of `Registry.rollback`, so production never points at a bento
    that `bentoml serve` cannot find.

    Raises:
        PromotionError: the bento or its model was deleted, or the bento serves another model.
    """
    where = f"{release.bento_tag} cannot be served"
    bento = _get_bento(release.bento_tag, where)
    _check_models(bento, release.model_tag, where)


def _get_bento(tag: str, where: str) -> bentoml.Bento:
    try:
        return local_bento(tag)
    except NotFound:
        raise PromotionError(
            f"{where}: no such bento in the BentoML store "
            "(never built here, or deleted since; check BENTOML_HOME)"
        ) from None
    except ValueError as error:  # not a valid tag
        raise PromotionError(f"{where}: {error}") from None


def _check_models(bento: bentoml.Bento, model_tag: str, where: str) -> bentoml.Model:
    """The model `model_tag`, after checking `bento` serves it and it is still in the store."""
    served = sorted(str(model.tag) for model in bento.info.all_models)
    if model_tag not in served:
        raise PromotionError(f"{where}: it serves {served}, not {model_tag}")
    try:
        return bentoml.models.get(model_tag)
    except NotFound:
        raise PromotionError(
            f"{where}: its model {model_tag} is no longer in the BentoML model store"
        ) from None


def _section(metadata: dict[str, Any], key: str) -> dict[str, Any]:
    value = metadata.get(key, {})
    return dict(value) if isinstance(value, dict) else {}
