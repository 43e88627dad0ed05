"""Promote: make a packaged bento production by appending it to the registry file."""

from __future__ import annotations

from typing import Any

import bentoml
from bentoml.exceptions import NotFound

from tasks.package import PackageResult
from textgate.config import Params
from textgate.errors import TextgateError
from textgate.registry import Registry, Release


class PromotionError(TextgateError):
    """The bento or model to promote is not in the BentoML store, or does not match."""


def promote(
    params: Params,
    result: PackageResult,
    *,
    metrics: dict[str, Any],
    lineage: dict[str, Any],
    reason: str,
) -> Release:
    """Record `result` as the production release in `params.registry.path`.

    The bento must exist in the local BentoML store and carry `result.model_tag`, and that
    model must still be in the model store (serving the bento needs it); otherwise nothing
    is written.

    Raises:
        PromotionError: the bento or model is unknown, or the bento serves another model.
        RegistryError: the registry file is corrupt (it is left unchanged).
    """
    try:
        bento = bentoml.bentos.get(result.bento_tag)
    except NotFound:
        raise PromotionError(
            f"cannot promote {result.bento_tag}: no such bento in the BentoML store "
            "(package it first; check BENTOML_HOME)"
        ) from None
    served = sorted(str(model.tag) for model in bento.info.all_models)
    if result.model_tag not in served:
        raise PromotionError(
            f"cannot promote {bento.tag}: it serves {served}, not {result.model_tag}"
        )
    try:
        bentoml.models.get(result.model_tag)
    except NotFound:
        raise PromotionError(
            f"cannot promote {bento.tag}: its model {result.model_tag} is no longer in the "
            "BentoML model store"
        ) from None
    release = Release.create(
        bento_tag=str(bento.tag),
        model_tag=result.model_tag,
        reason=reason,
        metrics=metrics,
        lineage=lineage,
    )
    Registry(params.registry.path).promote(release)
    return release
