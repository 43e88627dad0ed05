"""ONNX export and runtime, runtime selection, threads and explanations by occlusion."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from textgate.errors import DataError
from textgate.export import export_onnx
from textgate.model import (
    MAX_EXPLAIN_CHARS,
    TRAINING_FILE,
    UNKNOWN_LABEL,
    Prediction,
    TextClassifier,
    explain_by_occlusion,
)
from textgate.runtime import (
    LEGACY_THREADS_ENV,
    ONNX_DIR,
    ONNX_FP32,
    ONNX_INT8,
    THREADS_ENV,
    OnnxClassifier,
    default_threads,
    load_classifier,
)
from textgate.text import TextCleaning, clean_text
from textgate.unknown import Gaussian, fit_standardization, unknown_scores

# Very different lengths, so a batch of them is sorted and padded; the long one is truncated.
TEXTS = [
    "I lost my card yesterday",
    "x",
    "password reset does not work and I have tried three times already today, please help " * 3,
    "please refund my order",
    "",
    "hello there",
    "my wallet was stolen with all my cards in it",
    "cannot sign in to the app, mail me at jo@example.com",
]
needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks torch on CUDA")


def _copy(src: Path, dst: Path, **metadata: object) -> Path:
    shutil.copytree(src, dst)
    if metadata:
        training = json.loads((dst / TRAINING_FILE).read_text(encoding="utf-8"))
        (dst / TRAINING_FILE).write_text(json.dumps(training | metadata), encoding="utf-8")
    return dst


@pytest.fixture(scope="session")
def varied_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny_model_dir-like model whose labels and scores vary from text to text.

    The untrained tiny model gives every text about 1/3 per label, which would hide a mixed-up
    order or a wrong argmax. Random weights 25 times larger (initializer_range 0.5) spread
    the scores over about 0.5 to 0.8 with three different top labels, no training needed.
    """
    from transformers import AutoTokenizer, BertForSequenceClassification

    from bench.workspace import tiny_bert_config
    from textgate.io import read_json
    from textgate.model import LABEL_MAP_FILE, save_classifier

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    labels = read_json(tiny_model_dir / LABEL_MAP_FILE)["labels"]
    config = tiny_bert_config(
        tokenizer.vocab_size,
        initializer_range=0.5,
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    return save_classifier(
        model,
        tokenizer,
        labels,
        read_json(tiny_model_dir / TRAINING_FILE),
        tmp_path_factory.mktemp("varied-model") / "model",
    )


@pytest.fixture(scope="session")
def int8_export(varied_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    model_dir = _copy(varied_model_dir, tmp_path_factory.mktemp("onnx-int8") / "model")
    return export_onnx(model_dir) | {"model_dir": model_dir}


@pytest.fixture(scope="session")
def fp32_dir(varied_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = _copy(varied_model_dir, tmp_path_factory.mktemp("onnx-fp32") / "model")
    export_onnx(model_dir, quantize=False)
    return model_dir


@pytest.fixture(scope="session")
def torch_reference(varied_model_dir: Path) -> TextClassifier:
    return TextClassifier(varied_model_dir)


# --- export -------------------------------------------------------------------------------


def test_int8_export_keeps_only_the_file_serving_loads(int8_export: dict) -> None:
    model_dir = int8_export["model_dir"]
    assert int8_export["file"] == str(model_dir / ONNX_INT8)
    assert list((model_dir / ONNX_DIR).iterdir()) == [model_dir / ONNX_INT8]
    assert not [path for path in model_dir.iterdir() if path.name.startswith(".")]  # no staging
    assert int8_export["runtime"] == "onnx-int8"
    assert 0 < int8_export["size_mb"] < 3  # the tiny model; fp32 is ~3.9 MB
    assert int8_export["export_seconds"] > 0


def test_export_fuses_attention_into_one_operator(int8_export: dict, fp32_dir: Path) -> None:
    import onnx

    def op_types(path: Path) -> set[str]:
        return {node.op_type for node in onnx.load(str(path)).graph.node}

    # One fused operator per layer (QAttention once quantised), not the unfused products:
    # the exporter traces the eager attention, which ONNX Runtime's optimiser recognises.
    fp32_ops = op_types(fp32_dir / ONNX_FP32)
    assert {"Attention", "EmbedLayerNormalization"} <= fp32_ops
    assert "Softmax" not in fp32_ops
    assert "QAttention" in op_types(int8_export["model_dir"] / ONNX_INT8)


def test_onnx_inputs_are_the_tokenizer_inputs_with_dynamic_axes(fp32_dir: Path) -> None:
    from transformers import AutoTokenizer

    classifier = OnnxClassifier(fp32_dir)
    inputs = classifier.session.get_inputs()
    expected = AutoTokenizer.from_pretrained(fp32_dir).model_input_names
    assert [node.name for node in inputs] == list(expected)
    assert all(node.shape == ["batch", "sequence"] for node in inputs)
    assert [node.name for node in classifier.session.get_outputs()] == ["logits", "embedding"]


def test_fp32_onnx_matches_torch(fp32_dir: Path, torch_reference: TextClassifier) -> None:
    classifier = OnnxClassifier(fp32_dir)
    assert classifier.runtime == "onnx-fp32"
    assert classifier.labels == torch_reference.labels
    logits = classifier.predict_logits(TEXTS, batch_size=3)
    assert logits.dtype == np.float32
    expected = torch_reference.predict_logits(TEXTS, batch_size=64)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("onnx_dir", ["fp32", "int8"])
def test_onnx_gives_the_unknown_score_torch_gives(
    onnx_dir: str, fp32_dir: Path, int8_export: dict, torch_reference: TextClassifier
) -> None:
    # The Gaussian is fitted on torch's embeddings (as the train stage does); ONNX serving
    # reads its own embedding output into the same numpy score.
    model_dir = fp32_dir if onnx_dir == "fp32" else int8_export["model_dir"]
    _, reference = torch_reference.predict_outputs(TEXTS, batch_size=64)
    # Eight texts cannot give a well-conditioned covariance (a near-singular one would magnify
    # int8 noise): an isotropic one at the embeddings' own scale, two texts as class means.
    precision = np.eye(reference.shape[1], dtype=np.float32) / reference.var()
    gaussian = Gaussian(means=reference[:2].copy(), precision=precision)
    onnx = OnnxClassifier(model_dir)
    logits, embeddings = onnx.predict_outputs(TEXTS, batch_size=3)
    torch_logits, _ = torch_reference.predict_outputs(TEXTS, batch_size=64)
    expected = unknown_scores("mahalanobis", torch_logits, reference, gaussian=gaussian)
    served = unknown_scores("mahalanobis", logits, embeddings, gaussian=gaussian)
    if onnx_dir == "fp32":
        np.testing.assert_allclose(served, expected, rtol=1e-3, atol=1e-3)
    else:  # int8 weights and activations: within a tenth of the scores' range (random weights)
        np.testing.assert_allclose(served, expected, atol=0.1 * expected.max())
        assert np.argsort(served)[-3:].tolist() == np.argsort(expected)[-3:].tolist()
    if onnx_dir == "fp32":
        # The combined score, standardised on torch's outputs: the same from ONNX's. (Not
        # int8: the random model's energy is near constant, and standardising it magnifies
        # int8 noise: the distance is checked above, the logits by the next test.)
        combined = "mahalanobis+energy"
        std = fit_standardization(
            combined, torch_logits, reference, np.zeros(len(TEXTS)), None, gaussian=gaussian
        )
        both = {"gaussian": gaussian, "standardization": std}
        expected = unknown_scores(combined, torch_logits, reference, **both)
        served = unknown_scores(combined, logits, embeddings, **both)
        np.testing.assert_allclose(served, expected, atol=1e-3)


def test_int8_onnx_is_close_to_torch(int8_export: dict, torch_reference: TextClassifier) -> None:
    classifier = OnnxClassifier(int8_export["model_dir"])
    assert classifier.runtime == "onnx-int8"
    assert classifier.labels == torch_reference.labels
    expected = torch_reference.predict_proba(TEXTS, batch_size=64)
    probabilities = classifier.predict_proba(TEXTS, batch_size=64)
    assert len(set(expected.argmax(axis=1))) > 1  # the varied head tells texts apart
    # The large random weights quantize far worse than trained ones (the sample's fine-tuned
    # MiniLM loses no test accuracy at all): int8 noise of up to 0.25 in a probability here.
    tolerance = 0.25
    difference = np.abs(probabilities - expected)
    assert difference.max() < tolerance and difference.mean() < 0.06
    top_two = np.sort(expected, axis=1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > 0.3  # well above the typical int8 noise here
    assert clear.sum() >= len(TEXTS) // 2
    np.testing.assert_array_equal(
        probabilities.argmax(axis=1)[clear], expected.argmax(axis=1)[clear]
    )


def test_cpu_runs_one_text_per_pass_so_answers_do_not_depend_on_the_batch(
    int8_export: dict,
) -> None:
    classifier = OnnxClassifier(int8_export["model_dir"])
    assert classifier.max_batch_size == 1
    alone = classifier.predict_logits([TEXTS[0]], batch_size=1)
    with_others = classifier.predict_logits([TEXTS[2], TEXTS[0], *TEXTS[3:]], batch_size=64)
    np.testing.assert_array_equal(with_others[1], alone[0])  # bit for bit


def test_batches_come_back_in_input_order(fp32_dir: Path) -> None:
    classifier = OnnxClassifier(fp32_dir)
    classifier.max_batch_size = None  # batches of several texts, padded to their longest
    one_by_one = np.concatenate([classifier.predict_logits([text], batch_size=1) for text in TEXTS])
    np.testing.assert_allclose(
        classifier.predict_logits(TEXTS, batch_size=3), one_by_one, atol=1e-5
    )
    reversed_order = classifier.predict_logits(TEXTS[::-1], batch_size=2)
    np.testing.assert_allclose(reversed_order[::-1], one_by_one, atol=1e-5)
    assert classifier.predict_logits([], batch_size=64).shape == (0, len(classifier.labels))


def test_export_is_deterministic_and_a_new_export_replaces_the_old(
    int8_export: dict, varied_model_dir: Path, tmp_path: Path
) -> None:
    model_dir = _copy(varied_model_dir, tmp_path / "model")
    info = export_onnx(model_dir)
    assert Path(info["file"]).read_bytes() == Path(int8_export["file"]).read_bytes()
    export_onnx(model_dir, quantize=False)
    assert list((model_dir / ONNX_DIR).iterdir()) == [model_dir / ONNX_FP32]
    assert OnnxClassifier(model_dir).runtime == "onnx-fp32"


def test_export_refuses_a_directory_that_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a textgate model directory"):
        export_onnx(tmp_path)


# --- runtime selection and threads ------------------------------------------------------


@needs_cpu_only
def test_auto_picks_onnx_when_exported_and_torch_otherwise(
    int8_export: dict, varied_model_dir: Path
) -> None:
    assert load_classifier(int8_export["model_dir"]).runtime == "onnx-int8"
    assert isinstance(load_classifier(int8_export["model_dir"], "torch"), TextClassifier)
    classifier = load_classifier(varied_model_dir)
    assert isinstance(classifier, TextClassifier)
    assert classifier.runtime == "torch-cpu"


def test_explicit_onnx_without_an_export_is_a_clear_error(varied_model_dir: Path) -> None:
    with pytest.raises(DataError, match=r"no ONNX export \(onnx/model\.int8\.onnx"):
        load_classifier(varied_model_dir, "onnx")


def test_unknown_runtime_is_refused(varied_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        load_classifier(varied_model_dir, "tensorrt")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", [THREADS_ENV, LEGACY_THREADS_ENV])
@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5"])
def test_bad_threads_variable_is_named(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
        default_threads()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, 2),  # 4 cores (patched below) shared by 2 workers
        ({THREADS_ENV: " 3 "}, 3),
        ({LEGACY_THREADS_ENV: "3"}, 3),
        ({THREADS_ENV: "2", LEGACY_THREADS_ENV: "3"}, 2),  # the current name wins
    ],
)
def test_default_threads(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: int
) -> None:
    for name in (THREADS_ENV, LEGACY_THREADS_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("textgate.runtime.usable_cpus", lambda: 4)
    assert default_threads(processes=2) == expected


def test_default_threads_never_oversubscribe_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (THREADS_ENV, LEGACY_THREADS_ENV):
        monkeypatch.delenv(name, raising=False)
    for cores, workers, expected in [(1, 1, 1), (2, 2, 1), (2, 1, 2), (16, 2, 4), (3, 2, 1)]:
        monkeypatch.setattr("textgate.runtime.usable_cpus", lambda cores=cores: cores)
        threads = default_threads(processes=workers)
        assert threads == expected
        assert threads * workers <= max(cores, workers)


def test_session_uses_the_requested_threads(
    int8_export: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = int8_export["model_dir"]
    options = OnnxClassifier(model_dir, threads=1).session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    monkeypatch.setenv(THREADS_ENV, "3")
    options = load_classifier(model_dir, "onnx").session.get_session_options()
    assert options.intra_op_num_threads == 3
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        OnnxClassifier(model_dir, threads=0)


@needs_cpu_only
def test_torch_runtime_sets_its_threads(varied_model_dir: Path) -> None:
    before = torch.get_num_threads()
    try:
        load_classifier(varied_model_dir, "torch", threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# --- abstention in both runtimes ----------------------------------------------------------


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_both_runtimes_abstain_below_the_threshold(
    int8_export: dict, tmp_path: Path, runtime: str
) -> None:
    model_dir = _copy(int8_export["model_dir"], tmp_path / "model", abstention={"threshold": 0.6})
    classifier = load_classifier(model_dir, runtime)  # type: ignore[arg-type]
    assert classifier.unknown is not None and classifier.unknown.method == "msp"
    predictions = classifier.predict(TEXTS, batch_size=64)
    assert any(p.abstained for p in predictions) and not all(p.abstained for p in predictions)
    for prediction in predictions:
        assert prediction.abstained == (prediction.score < 0.6)
        expected = UNKNOWN_LABEL if prediction.abstained else prediction.best_label
        assert prediction.label == expected
        assert prediction.best_label in classifier.labels


# --- explanations ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def explainers(fp32_dir: Path) -> list:
    return [TextClassifier(fp32_dir), OnnxClassifier(fp32_dir)]


def test_explanation_tokens_are_the_wordpieces_of_the_cleaned_text(explainers: list) -> None:
    text = "My card was stolen, email jo@example.com"
    torch_explanation, onnx_explanation = (c.explain(text) for c in explainers)
    tokenizer = explainers[0].tokenizer
    assert torch_explanation.tokens == tokenizer.tokenize(clean_text(text))
    assert "[" in torch_explanation.tokens and "jo" not in torch_explanation.tokens  # redacted
    assert onnx_explanation.tokens == torch_explanation.tokens
    assert len(torch_explanation.attributions) == len(torch_explanation.tokens)
    assert np.all(np.isfinite(torch_explanation.attributions))
    np.testing.assert_allclose(
        onnx_explanation.attributions, torch_explanation.attributions, atol=1e-5
    )
    assert onnx_explanation.label == torch_explanation.label


def test_explanation_agrees_with_prediction_and_occlusion_matters(explainers: list) -> None:
    classifier = explainers[1]
    text = "my wallet was stolen with all my cards in it"
    explanation = classifier.explain(text)
    (prediction,) = classifier.predict([text], batch_size=1)
    assert (explanation.label, explanation.best_label) == (prediction.label, prediction.best_label)
    assert explanation.score == pytest.approx(prediction.score, abs=1e-5)
    assert max(abs(value) for value in explanation.attributions) > 1e-4


def test_explanation_is_truncated_like_prediction(explainers: list) -> None:
    explanation = explainers[0].explain("word " * 90)  # 450 characters, 90 tokens
    assert len(explanation.tokens) == explainers[0].max_length - 2  # [CLS] and [SEP]
    assert explainers[0].explain("").tokens == []


def test_explaining_a_long_text_is_refused(explainers: list) -> None:
    with pytest.raises(ValueError, match=f"MAX_EXPLAIN_CHARS={MAX_EXPLAIN_CHARS}"):
        explainers[1].explain("a" * (MAX_EXPLAIN_CHARS + 1))


def test_occlusion_credits_the_one_token_the_model_looks_at(explainers: list) -> None:
    tokenizer = explainers[0].tokenizer
    key = tokenizer.convert_tokens_to_ids("stolen")
    calls = []

    def logits_from_ids(input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
        calls.append(input_ids.shape)
        has_key = (input_ids == key).any(axis=1)  # (rows,)
        return np.stack([np.where(has_key, 4.0, 0.0), np.zeros(len(input_ids))], axis=1)

    score = float(1 / (1 + np.exp(-4)))  # softmax([4, 0])[0]
    prediction = Prediction(label="lost_card", score=score, best_label="lost_card")
    explanation = explain_by_occlusion(
        "my card was stolen today",
        prediction=prediction,
        tokenizer=tokenizer,
        logits_from_ids=logits_from_ids,
        labels=["lost_card", "other"],
        max_length=32,
        cleaning=TextCleaning.from_metadata({}),
    )
    assert len(calls) == 1  # one batch: each occlusion (the text itself is the prediction's)
    assert calls[0] == (len(explanation.tokens), len(explanation.tokens) + 2)
    assert (explanation.label, explanation.score) == ("lost_card", score)
    attributions = dict(zip(explanation.tokens, explanation.attributions, strict=True))
    assert attributions.pop("stolen") == pytest.approx(score - 0.5)
    assert set(attributions.values()) == {0.0}


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_an_explanation_answers_exactly_what_prediction_answers(
    int8_export: dict, tmp_path: Path, runtime: str
) -> None:
    # The int8 model quantises activations per forward pass, so a text scored in one batch
    # with its occlusions got another score than alone (/explain said "unknown" where
    # /classify answered). The threshold sits among the scores, so a flip would show.
    model_dir = _copy(int8_export["model_dir"], tmp_path / "model", abstention={"threshold": 0.6})
    classifier = load_classifier(model_dir, runtime)  # type: ignore[arg-type]
    texts = [*TEXTS[:2], *TEXTS[3:], "hello", "what is the meaning of life", "refund me now"]
    for text in texts:
        # As /classify answers a one-text request.
        (prediction,) = classifier.predict([text], batch_size=1)
        explanation = classifier.explain(text)
        explained = (explanation.label, explanation.score, explanation.abstained)
        assert explained == (prediction.label, prediction.score, prediction.abstained), text


# --- the ONNX runtime without transformers --------------------------------------------------


def test_onnx_answers_exactly_as_with_the_transformers_tokenizer(int8_export: dict) -> None:
    """The ONNX runtime's own tokenizer (tokenizers on tokenizer.json) changes no answer."""
    from transformers import AutoTokenizer

    from textgate.tokenizer import FastTokenizer

    model_dir = _copy(int8_export["model_dir"], int8_export["model_dir"].parent / "swapped")
    lean, reference = OnnxClassifier(model_dir), OnnxClassifier(model_dir)
    assert isinstance(lean.tokenizer, FastTokenizer)
    reference.tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [*TEXTS[:4], *TEXTS[5:], "Ünïcödé café 東京 😀", "[MASK] my card"]
    np.testing.assert_array_equal(
        lean.predict_logits(texts, batch_size=64), reference.predict_logits(texts, batch_size=64)
    )
    assert lean.predict(texts, batch_size=64) == reference.predict(texts, batch_size=64)
    for text in texts:
        assert lean.explain(text) == reference.explain(text), text


def test_onnx_forward_gives_the_logits_and_the_pooled_embedding(int8_export: dict) -> None:
    classifier = OnnxClassifier(int8_export["model_dir"])
    ids = np.array([[101, 2026, 4003, 102]])
    assert classifier.output_names == {"logits", "embedding"}
    logits, pooled = classifier.forward_from_ids(ids, np.ones_like(ids))
    np.testing.assert_array_equal(logits, classifier.logits_from_ids(ids, np.ones_like(ids)))
    assert pooled.shape == (1, classifier.hidden_size) and pooled.dtype == np.float32


def test_cuda_is_not_asked_of_torch_without_an_nvidia_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import textgate.runtime as runtime

    monkeypatch.setattr(runtime.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("torch was asked"))
    assert runtime.cuda_usable() is False
    monkeypatch.setattr(runtime.glob, "glob", lambda pattern: ["/dev/nvidia0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.cuda_usable() is True
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert runtime.cuda_usable() is False


def test_predicting_cleaned_texts_answers_as_predicting_raw_ones(int8_export: dict) -> None:
    classifier = OnnxClassifier(int8_export["model_dir"])
    texts = [*TEXTS[:4], "mail jo@example.com or call +44 20 7946 0958"]
    cleaned = classifier.clean(texts)
    assert cleaned[-1] != texts[-1]  # redacted
    assert classifier.predict(cleaned, 64, cleaned=True) == classifier.predict(texts, 64)


def test_predictions_carry_the_margin_between_the_two_most_probable_labels() -> None:
    import numpy as np

    from textgate.inference import make_predictions

    probabilities = np.array([[0.1, 0.6, 0.3], [0.45, 0.1, 0.45]])
    first, second = make_predictions(
        probabilities, ["a", "b", "c"], probabilities.max(axis=1) < 0.5
    )
    assert first.margin == pytest.approx(0.3) and not first.abstained
    assert second.margin == pytest.approx(0.0) and second.abstained
    (only,) = make_predictions(np.array([[1.0]]), ["a"])
    assert only.margin == 1.0
