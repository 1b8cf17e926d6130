"""The training library on its real backbones (all-MiniLM-L6-v2, EfficientNet-Lite0): features as the replicas
compute them, heads that learn a small labelled text set and scikit-learn's digits well past chance, reproducible
and cancellable training, evaluation metrics checked against figures worked out by hand, and the artifact's bytes."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits  # type: ignore[import-untyped]
from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]

from aimass.runtime.errors import InvalidArgument
from aimass.training.artifact import IMAGE_BACKBONE, IMAGE_TASK, TEXT_BACKBONE, TEXT_TASK, HeadArtifact
from aimass.training.backbones import ImageBackbone, TextBackbone, load_backbone
from aimass.training.evaluation import compare, evaluate, predict
from aimass.training.head import HeadSettings, TrainingCancelled, default_settings, train_head
from aimass.v1 import training_pb2
from services.nlp.engine import NlpEngine
from services.vision.engine import build_torch_classifier, preprocess

Features = npt.NDArray[np.float32]

# Four kinds of support message, 25 each, worded differently so no single keyword gives the class away.
TEXTS: dict[str, list[str]] = {
    "billing": [
        "I was charged twice for the same order this month.",
        "Why does my invoice show a fee I never agreed to?",
        "Please refund the payment that went through by mistake.",
        "My credit card was billed even though I cancelled the subscription.",
        "The amount on my receipt is higher than the price on your website.",
        "Can I get a copy of last year's invoices for my accountant?",
        "You took money from my account without asking.",
        "The discount code was not applied at checkout and I paid full price.",
        "How do I change the card you charge every month?",
        "I need a VAT receipt for the purchase I made on Tuesday.",
        "There is an unexpected charge of 49 dollars on my statement.",
        "Your annual plan renewed automatically and I want my money back.",
        "The bank says the transaction was declined but you still charged me.",
        "Why is tax added twice on the bill?",
        "I paid by bank transfer a week ago and the balance still shows as owed.",
        "Can I pay in instalments instead of one payment?",
        "My refund has not reached my card after ten days.",
        "The pricing page says 10 euros but I was charged 12.",
        "Please stop billing my old company credit card.",
        "I was overcharged for the premium tier I never used.",
        "Is there a cheaper plan for students?",
        "The payment failed and now my account is flagged as unpaid.",
        "Send me an itemised statement of all fees.",
        "I got billed in dollars instead of pounds.",
        "How much will I pay if I upgrade halfway through the month?",
    ],
    "delivery": [
        "My parcel has not arrived and it has been two weeks.",
        "The courier left the box outside in the rain.",
        "Tracking says delivered but there is nothing at my door.",
        "Can you ship to an address in Norway?",
        "The package arrived crushed and the vase inside is broken.",
        "When will my order be dispatched from the warehouse?",
        "I need to change the delivery address before it ships.",
        "The driver never rang the bell and took the parcel back.",
        "How long does express shipping take to Canada?",
        "Only two of the three items came in the box.",
        "My order is stuck at the customs office.",
        "Can I pick the package up from a locker instead?",
        "The tracking number you sent does not work on the carrier's site.",
        "The shipment went to my old flat across town.",
        "Is there free postage for orders over fifty euros?",
        "The box was opened and resealed before it reached me.",
        "I was told next-day delivery but it is now day four.",
        "Please hold my parcel at the depot until Monday.",
        "The delivery window was 9 to 12 and nobody came.",
        "You sent me someone else's order.",
        "Do you deliver on Saturdays?",
        "The label on my package has the wrong postcode.",
        "My neighbour received my parcel by mistake.",
        "The courier asked me to pay an import duty on arrival.",
        "How can I return an item that came damaged in transit?",
    ],
    "technical": [
        "The app crashes every time I open the settings screen.",
        "I cannot log in, it says my password is wrong although it is right.",
        "The website shows a blank white page in Firefox.",
        "Uploading a photo fails with error 500.",
        "The sync between my phone and laptop stopped working yesterday.",
        "Two-factor codes never arrive on my phone.",
        "The export to PDF produces a corrupted file.",
        "After the last update the program will not start on Windows 11.",
        "Notifications stopped appearing on my Android device.",
        "The search bar returns no results for anything I type.",
        "My screen freezes when I scroll through the dashboard.",
        "The API returns a timeout for every request since this morning.",
        "I get a certificate warning when I visit your site.",
        "The reset password link in the email has expired immediately.",
        "Videos keep buffering and never play to the end.",
        "The mobile app logs me out every few minutes.",
        "Dark mode makes the buttons invisible.",
        "The installer says a required library is missing.",
        "My saved files disappeared after I reinstalled the software.",
        "The keyboard shortcuts do nothing on a Mac.",
        "The page loads forever when I click on my profile.",
        "The chart on the reports page shows the wrong dates.",
        "I keep getting a 'session expired' message while typing.",
        "The printer integration throws an unknown device error.",
        "Bluetooth pairing with the scanner fails every time.",
    ],
    "praise": [
        "Thank you so much, your support agent was wonderful.",
        "I love the new design, it is so much easier to use.",
        "Great service, I will recommend you to all my friends.",
        "Just wanted to say the team did an amazing job.",
        "Best purchase I have made this year, really happy with it.",
        "Your staff were friendly and patient with all my questions.",
        "Fantastic quality, it exceeded my expectations.",
        "Keep up the great work, everything was perfect.",
        "Thanks for going the extra mile to help me out.",
        "I am delighted with how quickly you solved my problem.",
        "What a lovely experience from start to finish.",
        "Kudos to Maria, she was incredibly helpful today.",
        "This is the most pleasant company I have dealt with.",
        "Five stars, brilliant product and brilliant people.",
        "I really appreciate the thoughtful note in the box.",
        "You have made a loyal customer out of me.",
        "Everything worked beautifully, thank you!",
        "The attention to detail is impressive, well done.",
        "My whole family enjoys it, a big thank you to the team.",
        "Superb support, friendly and knowledgeable.",
        "Honestly the nicest customer service I've had in years.",
        "Very pleased, I will definitely order again.",
        "I'm grateful for your kindness during a stressful week.",
        "Wonderful experience, you made my day.",
        "Congratulations on a really excellent product.",
    ],
}


@pytest.fixture(scope="module")
def text_backbone() -> TextBackbone:
    return TextBackbone("cpu")


@pytest.fixture(scope="module")
def image_backbone() -> ImageBackbone:
    return ImageBackbone("cpu")


@pytest.fixture(scope="module")
def text_data(text_backbone: TextBackbone) -> tuple[Features, list[str]]:
    texts = [text for texts in TEXTS.values() for text in texts]
    labels = [label for label, texts in TEXTS.items() for _ in texts]
    return text_backbone.features(texts), labels


def digit_images(count: int) -> tuple[list[Image.Image], list[str]]:
    """scikit-learn's 8x8 grey digits (0-16) as RGB PIL images, upscaled to 32x32."""
    digits = load_digits()
    images = [
        Image.fromarray((pixels * (255 / 16)).astype(np.uint8))
        .resize((32, 32), Image.Resampling.BICUBIC)
        .convert("RGB")
        for pixels in digits.images[:count]
    ]
    return images, [str(target) for target in digits.target[:count]]


@pytest.fixture(scope="module")
def digits_data(image_backbone: ImageBackbone) -> tuple[Features, list[str]]:
    images, labels = digit_images(400)
    return image_backbone.features(images), labels


def split(features: Features, labels: list[str], holdout: float) -> tuple[Features, Features, list[str], list[str]]:
    train_x, test_x, train_y, test_y = train_test_split(
        features, labels, test_size=holdout, stratify=labels, random_state=0
    )
    return train_x, test_x, list(train_y), list(test_y)


def text_head(
    features: Features, labels: list[str], *, epochs: int = 60, batch_size: int = 64, seed: int = 0
) -> HeadArtifact:
    settings = HeadSettings(epochs=epochs, batch_size=batch_size, seed=seed)
    return train_head(features, labels, settings, base_model=TEXT_BACKBONE, task=TEXT_TASK)


# Features


def test_text_features_are_the_nlp_replicas_normalised_embeddings(
    text_backbone: TextBackbone, nlp_engine: NlpEngine
) -> None:
    texts = [*TEXTS["billing"][:7], "", "a much longer sentence " * 40, "Ünïcödé and emoji 🎉 too"]
    seen: list[tuple[int, int]] = []
    features = text_backbone.features(texts, batch_size=4, progress=lambda done, total: seen.append((done, total)))

    assert features.shape == (10, 384)
    assert features.dtype == np.float32
    assert np.allclose(features, nlp_engine.encode(texts, normalize=True), atol=1e-5)
    assert np.allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    assert seen == [(4, 10), (8, 10), (10, 10)]
    assert text_backbone.features([]).shape == (0, 384)


def test_image_features_are_what_imagenets_classifier_reads(image_backbone: ImageBackbone) -> None:
    images, _ = digit_images(5)
    images.append(Image.new("L", (300, 200), 128))  # grey and not square: converted and cropped as the service does
    seen: list[tuple[int, int]] = []
    features = image_backbone.features(images, batch_size=4, progress=lambda done, total: seen.append((done, total)))

    assert features.shape == (6, 1280)
    assert features.dtype == np.float32
    assert seen == [(4, 6), (6, 6)]
    # The vision service's preprocessing, and its network's logits from these features through its own classifier.
    pixels = np.stack([preprocess(image.convert("RGB")) for image in images])
    assert np.array_equal(np.stack([ImageBackbone.preprocess(image) for image in images]), pixels)
    classifier = build_torch_classifier()
    with torch.inference_mode():
        logits = classifier(torch.from_numpy(pixels)).numpy()
        fc_weight, fc_bias = classifier._fc.weight.numpy(), classifier._fc.bias.numpy()
    assert np.allclose(features @ fc_weight.T + fc_bias, logits, atol=1e-3)
    # Deterministic, and the same whatever the batching.
    assert np.array_equal(image_backbone.features(images, batch_size=4), features)
    assert np.allclose(image_backbone.features(images[::-1], batch_size=1)[::-1], features, atol=1e-4)
    assert image_backbone.features([]).shape == (0, 1280)


def test_load_backbone_knows_the_two_base_models(text_backbone: TextBackbone) -> None:
    with pytest.raises(InvalidArgument, match="unknown base model 'resnet50'; known: all-MiniLM-L6-v2"):
        load_backbone("resnet50")


# Heads


def test_text_head_learns_support_messages_well_past_chance(
    text_backbone: TextBackbone, text_data: tuple[Features, list[str]]
) -> None:
    features, labels = text_data
    train_x, test_x, train_y, test_y = split(features, labels, 0.2)
    losses: list[tuple[int, float]] = []
    head = train_head(
        train_x,
        train_y,
        HeadSettings(epochs=60),
        base_model=TEXT_BACKBONE,
        task=TEXT_TASK,
        on_epoch=lambda epoch, loss: losses.append((epoch, loss)),
    )

    assert head.labels == ("billing", "delivery", "praise", "technical")
    assert [epoch for epoch, _ in losses] == list(range(1, 61))
    assert losses[-1][1] < losses[0][1] / 2
    evaluation = evaluate(head, test_x, test_y, train_rows=len(train_y))
    # Chance is 0.25; measured 1.0 on this split for seeds 0-4.
    assert evaluation.accuracy >= 0.8, evaluation
    assert evaluation.macro_f1 >= 0.75, evaluation
    new = [
        "You charged my card three times for one order",
        "Where is my package? It was due Friday",
        "The app shows an error when I try to sign in",
        "You people are awesome, thanks a lot",
    ]
    assert predict(head, text_backbone.features(new)) == ["billing", "delivery", "technical", "praise"]
    assert (evaluation.train_rows, evaluation.eval_rows) == (80, 20)
    assert [metrics.support for metrics in evaluation.per_class] == [5, 5, 5, 5]
    assert sum(evaluation.confusion) == 20


def test_image_head_learns_digits_well_past_chance(digits_data: tuple[Features, list[str]]) -> None:
    features, labels = digits_data
    train_x, test_x, train_y, test_y = split(features, labels, 0.25)
    head = train_head(train_x, train_y, HeadSettings(epochs=40), base_model=IMAGE_BACKBONE, task=IMAGE_TASK)

    assert head.labels == tuple(str(digit) for digit in range(10))
    evaluation = evaluate(head, test_x, test_y, train_rows=len(train_y))
    # Chance is 0.1; measured 0.98 on this split for seeds 0-4 (0.86 when the 100 held out are the last writers').
    assert evaluation.accuracy >= 0.85, evaluation
    assert evaluation.macro_f1 >= 0.85, evaluation
    assert evaluation.eval_rows == 100
    assert len(evaluation.confusion) == 100


def test_the_same_seed_gives_the_same_head_and_another_seed_another(
    text_data: tuple[Features, list[str]],
) -> None:
    features, labels = text_data
    first = text_head(features, labels, epochs=5, seed=7)
    again = text_head(features, labels, epochs=5, seed=7)
    other = text_head(features, labels, epochs=5, seed=8)

    assert np.array_equal(first.weight, again.weight) and np.array_equal(first.bias, again.bias)
    assert first.to_bytes() == again.to_bytes()
    assert not np.array_equal(first.weight, other.weight)
    assert first.info["seed"] == 7 and other.info["seed"] == 8


def test_training_stops_between_batches_when_cancelled(text_data: tuple[Features, list[str]]) -> None:
    features, labels = text_data
    checks = 0
    epochs: list[int] = []

    def should_stop() -> bool:
        nonlocal checks
        checks += 1
        return checks > 5  # 100 rows in batches of 16: 7 batches an epoch, so this stops inside the first

    with pytest.raises(TrainingCancelled):
        train_head(
            features,
            labels,
            HeadSettings(epochs=50, batch_size=16),
            base_model=TEXT_BACKBONE,
            task=TEXT_TASK,
            on_epoch=lambda epoch, _: epochs.append(epoch),
            should_stop=should_stop,
        )
    assert checks == 6 and epochs == []


def test_training_refuses_data_it_cannot_learn(text_data: tuple[Features, list[str]]) -> None:
    features, labels = text_data
    with pytest.raises(InvalidArgument, match="two or more labels, got 1"):
        text_head(features, ["billing"] * len(labels))
    with pytest.raises(InvalidArgument, match="100 feature rows but 99 labels"):
        text_head(features, labels[:-1])
    with pytest.raises(InvalidArgument, match=r"not N x 1280 features of efficientnet-lite0"):
        train_head(features, labels, HeadSettings(epochs=1), base_model=IMAGE_BACKBONE, task=IMAGE_TASK)
    with pytest.raises(InvalidArgument, match="is for text-classification, not image-classification"):
        train_head(features, labels, HeadSettings(epochs=1), base_model=TEXT_BACKBONE, task=IMAGE_TASK)
    with pytest.raises(InvalidArgument, match=r"hyperparameters.batch_size is 0; it must be 1-4096"):
        text_head(features, labels, batch_size=0)


def test_the_artifact_round_trips_and_predicts_the_same(text_data: tuple[Features, list[str]]) -> None:
    features, labels = text_data
    head = train_head(
        features,
        labels,
        HeadSettings(epochs=10, seed=3),
        base_model=TEXT_BACKBONE,
        task=TEXT_TASK,
        info={"dataset_sha256": "ab" * 32, "code_version": "test"},
    )
    back = HeadArtifact.from_bytes(head.to_bytes())

    assert back.labels == head.labels and back.base_model == TEXT_BACKBONE and back.task == TEXT_TASK
    assert np.array_equal(back.weight, head.weight) and np.array_equal(back.bias, head.bias)
    assert np.array_equal(back.probabilities(features), head.probabilities(features))
    assert predict(back, features) == predict(head, features)
    assert back.info["dataset_sha256"] == "ab" * 32 and back.info["code_version"] == "test"
    assert back.info["epochs"] == 10 and back.info["train_rows"] == 100 and back.info["learning_rate"] == 0.01


# Hyperparameters


def test_default_settings_fill_the_documented_defaults() -> None:
    text = default_settings(TEXT_TASK, training_pb2.Hyperparameters())
    image = default_settings(IMAGE_TASK, training_pb2.Hyperparameters(batch_size=8, seed=42))

    assert (text.epochs, text.batch_size, text.seed) == (60, 64, 0)
    assert text.learning_rate == pytest.approx(0.01) and text.weight_decay == pytest.approx(1e-4)
    assert text.holdout_fraction == pytest.approx(0.2)
    assert (image.epochs, image.batch_size, image.seed) == (40, 8, 42)
    edges = default_settings(
        TEXT_TASK,
        training_pb2.Hyperparameters(
            epochs=500, learning_rate=1.0, batch_size=4096, weight_decay=1, holdout_fraction=0.05
        ),
    )
    assert HeadSettings.from_hyperparameters(edges) == HeadSettings(
        epochs=500, learning_rate=1.0, batch_size=4096, weight_decay=1.0, seed=0
    )
    assert HeadSettings.from_hyperparameters(text) == HeadSettings(epochs=60)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (training_pb2.Hyperparameters(epochs=501), "hyperparameters.epochs is 501; it must be 1-500"),
        (training_pb2.Hyperparameters(epochs=-1), "hyperparameters.epochs is -1; it must be 1-500"),
        (
            training_pb2.Hyperparameters(learning_rate=1.5),
            "hyperparameters.learning_rate is 1.5; it must be greater than 0 and at most 1",
        ),
        (training_pb2.Hyperparameters(batch_size=5000), "hyperparameters.batch_size is 5000; it must be 1-4096"),
        (training_pb2.Hyperparameters(weight_decay=-0.1), "hyperparameters.weight_decay is -0.1; it must be 0-1"),
        (
            training_pb2.Hyperparameters(holdout_fraction=0.6),
            "hyperparameters.holdout_fraction is 0.6; it must be 0.05-0.5",
        ),
        (
            training_pb2.Hyperparameters(holdout_fraction=0.01),
            "hyperparameters.holdout_fraction is 0.01; it must be 0.05-0.5",
        ),
    ],
)
def test_default_settings_refuse_values_out_of_range(given: training_pb2.Hyperparameters, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        default_settings(TEXT_TASK, given)


def test_default_settings_refuse_an_unknown_task() -> None:
    with pytest.raises(InvalidArgument, match="unknown task 'audio'; known: text-classification, image-classification"):
        default_settings("audio", training_pb2.Hyperparameters())


# Evaluation


def hand_made_head() -> HeadArtifact:
    """Predicts label i for a one-hot feature vector with a 1 at i."""
    weight = np.zeros((3, 384), dtype=np.float32)
    weight[[0, 1, 2], [0, 1, 2]] = 1.0
    return HeadArtifact(("a", "b", "c"), weight, np.zeros(3, dtype=np.float32), TEXT_BACKBONE, TEXT_TASK)


def one_hot(indices: list[int]) -> Features:
    features = np.zeros((len(indices), 384), dtype=np.float32)
    features[np.arange(len(indices)), indices] = 1.0
    return features


def test_evaluation_matches_metrics_worked_out_by_hand() -> None:
    truth = ["a", "a", "a", "b", "b", "c"]
    predicted = [0, 0, 1, 1, 2, 2]  # a a b | b c | c
    evaluation = evaluate(hand_made_head(), one_hot(predicted), truth, train_rows=24)

    assert evaluation.accuracy == pytest.approx(4 / 6)
    # a: P 2/2, R 2/3, F1 0.8; b: P 1/2, R 1/2, F1 0.5; c: P 1/2, R 1/1, F1 2/3.
    per_class = {m.label: (m.precision, m.recall, m.f1, m.support) for m in evaluation.per_class}
    assert per_class["a"] == pytest.approx((1.0, 2 / 3, 0.8, 3))
    assert per_class["b"] == pytest.approx((0.5, 0.5, 0.5, 2))
    assert per_class["c"] == pytest.approx((0.5, 1.0, 2 / 3, 1))
    assert evaluation.macro_f1 == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert list(evaluation.labels) == ["a", "b", "c"]
    assert list(evaluation.confusion) == [2, 1, 0, 0, 1, 1, 0, 0, 1]
    assert (evaluation.train_rows, evaluation.eval_rows) == (24, 6)
    assert evaluation.previous_version == ""


def test_evaluation_of_a_class_never_held_out_nor_predicted() -> None:
    evaluation = evaluate(hand_made_head(), one_hot([0, 1, 1]), ["a", "b", "b"], train_rows=9)

    assert evaluation.accuracy == 1.0 and evaluation.macro_f1 == 1.0
    assert [(m.label, m.f1, m.support) for m in evaluation.per_class] == [("a", 1.0, 1), ("b", 1.0, 2), ("c", 0.0, 0)]
    assert list(evaluation.confusion) == [1, 0, 0, 0, 2, 0, 0, 0, 0]


def test_evaluation_refuses_labels_the_head_does_not_know() -> None:
    with pytest.raises(InvalidArgument, match="held-out labels 'z' are not among the head's labels \\(a, b, c\\)"):
        evaluate(hand_made_head(), one_hot([0]), ["z"], train_rows=1)
    with pytest.raises(InvalidArgument, match="at least one held-out example"):
        evaluate(hand_made_head(), one_hot([]), [], train_rows=1)


def test_compare_records_the_gains_over_the_previous_version() -> None:
    previous = training_pb2.Evaluation(accuracy=0.9, macro_f1=0.85)
    better = training_pb2.Evaluation(accuracy=0.95, macro_f1=0.8)
    compare(better, previous, "3")

    assert better.previous_version == "3"
    assert better.accuracy_delta == pytest.approx(0.05)
    assert better.macro_f1_delta == pytest.approx(-0.05)
    compare(better, None, "")
    assert (better.previous_version, better.accuracy_delta, better.macro_f1_delta) == ("", 0.0, 0.0)
