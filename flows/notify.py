"""Alerts through a Prefect notification block (`notify.block` in params.yaml).

Any block with the `notify` capability works: a custom webhook (the default that
`textgate notify-setup --url` saves), Slack, Microsoft Teams, SendGrid e-mail, ... The block is
looked up by its name alone, or by `block-type-slug/name`. Sending never fails the caller:
a missing block, an unreachable server or a webhook error is logged as a warning and the
run's own outcome stands.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect.blocks.abstract import NotificationBlock
from prefect.blocks.core import Block
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import BlockDocument
from prefect.exceptions import MissingContextError
from prefect.logging import get_logger, get_run_logger

# What `textgate notify-setup --url` posts: a small JSON any receiver can read; Slack's
# incoming webhooks read `text`.
WEBHOOK_JSON = {"title": "{{subject}}", "text": "{{body}}", "source": "textgate"}


class NotifyError(Exception):
    """The notification block cannot be found or loaded."""


def _logger() -> logging.Logger | logging.LoggerAdapter[Any]:
    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("textgate.notify")


def _can_notify(document: BlockDocument) -> bool:
    return document.block_schema is not None and "notify" in document.block_schema.capabilities


def load_notifier(name: str) -> NotificationBlock:
    """The notification block called `name` (or `slug/name`) on the current Prefect server.

    Raises:
        NotifyError: there is none, or the block under that name cannot notify.
    """
    import prefect.blocks.notifications  # noqa: F401  (registers the built-in block types)

    if "/" in name:
        try:
            block = Block.load(name)
        except ValueError as error:
            raise NotifyError(str(error)) from None
    else:
        with get_client(sync_client=True) as client:
            documents = [
                document
                for document in client.read_block_documents()
                if document.name == name and _can_notify(document)
            ]
        if not documents:
            raise NotifyError(
                f"no notification block named {name!r} on this Prefect server: create one with "
                "`textgate notify-setup --url URL`, or set notify.block: null"
            )
        block = Block._from_block_document(documents[0])
    if not isinstance(block, NotificationBlock):
        raise NotifyError(f"block {name!r} is a {type(block).__name__}, which cannot notify")
    return block


def send_alert(block_name: str | None, subject: str, body: str) -> bool:
    """Send `subject` and `body` through the block; True if sent. Never raises."""
    logger = _logger()
    if block_name is None:
        return False
    try:
        load_notifier(block_name).notify(body=body, subject=subject)
    except Exception as error:  # an alert must never change the run's outcome
        logger.warning("alert not sent through %r: %s: %s", block_name, type(error).__name__, error)
        return False
    logger.info("alert sent through %r: %s", block_name, subject)
    return True


def save_webhook_block(name: str, url: str, kind: str = "webhook", overwrite: bool = True) -> str:
    """Save a notification block named `name` posting to `url`; return its `slug/name`.

    kind: "webhook" (a JSON POST of title and text, see WEBHOOK_JSON) or "slack" (a Slack
    incoming webhook URL).
    """
    # Apprise, which these blocks use, takes a second or two to import: only here.
    from prefect.blocks.notifications import CustomWebhookNotificationBlock, SlackWebhook

    if kind == "slack":
        block: NotificationBlock = SlackWebhook(url=url)
    elif kind == "webhook":
        block = CustomWebhookNotificationBlock(name=name, url=url, json_data=dict(WEBHOOK_JSON))
    else:
        raise ValueError(f"unknown notification kind {kind!r}: webhook or slack")
    block.save(name, overwrite=overwrite)
    return f"{block.get_block_type_slug()}/{name}"
