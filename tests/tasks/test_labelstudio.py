"""A real Label Studio through its REST API: project with the intents, tasks imported with the
model's predictions, annotated by a script, exported and read back as labelled rows.

Label Studio is ~1 GB with pins that clash with the project's, so it is not a test
dependency: the test runs where `TEXTGATE_LABEL_STUDIO_VENV` names its virtual environment
(`textgate label serve --install` makes one), and is skipped, saying so, elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks import labelstudio
from textgate import labelling as lab
from textgate.process import stop

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get(labelstudio.VENV_ENV),
        reason=f"Label Studio is not installed here (set {labelstudio.VENV_ENV} to its venv)",
    ),
]


def item(text: str, reason: str, label: str = "refund") -> lab.ReviewItem:
    candidate = lab.Candidate(
        text=text,
        label=label,
        best_label=label,
        score=0.5,
        abstained=False,
        margin=0.1,
        model_tag="textgate-classifier:v1",
    )
    return lab.ReviewItem(candidate, reason)  # type: ignore[arg-type]


def test_round_trip_through_label_studio(tmp_path: Path) -> None:
    process, url = labelstudio.start(tmp_path)
    try:
        client = labelstudio.Client(url, labelstudio.token(tmp_path))
        project = client.project("textgate-test", ["refund", "lost_card"])
        assert client.project("textgate-test", ["refund", "lost_card"]) == project  # found again
        items = [item("where is my money", "random"), item("card gone", "novel", "lost_card")]
        assert client.import_tasks(project, lab.to_tasks(items)) == 2
        tasks = client.tasks(project)
        assert {task["data"]["text"] for task in tasks} == {"where is my money", "card gone"}
        for task in tasks:
            if task["data"]["text"] == "card gone":
                client.annotate(task["id"], "lost_card")
        rows, unlabelled = lab.read_label_studio_export(client.export(project), "export")
        assert [(row.text, row.label, row.reason) for row in rows] == [
            ("card gone", "lost_card", "novel")
        ]
        assert unlabelled == 1
        token = labelstudio.token(tmp_path)
        assert (
            token not in (tmp_path / ".textgate" / "label-studio" / "label-studio.log").read_text()
        )
    finally:
        stop(process)
    assert not process.running()
