"""Small labelled datasets made on the spot, for tests, benchmarks and demos (no download).

- ``tickets_csv``: support tickets in five classes (billing, login, shipping, bug, feature), templated sentences
  with varied fillers and a few words of noise; about one ticket in twelve is a vague one that could be any class,
  so a classifier on sentence embeddings learns it well but not perfectly.
- ``digits_zip``: scikit-learn's handwritten digits (8x8, shipped with the package) as 32x32 PNGs in a ZIP with one
  folder per digit.
"""

from __future__ import annotations

import csv
import io
import random
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from aimass.runtime.errors import InvalidArgument

TICKET_LABELS = ("billing", "login", "shipping", "bug", "feature")
# How often each label is drawn: a little imbalanced, as real queues are.
_WEIGHTS = (0.26, 0.22, 0.2, 0.18, 0.14)

_SLOTS: dict[str, tuple[str, ...]] = {
    "amount": ("$12.99", "$49", "$120", "€30", "£15", "$9.50", "$240", "$75"),
    "plan": ("Pro plan", "basic plan", "team subscription", "annual plan", "starter tier", "business plan"),
    "month": ("January", "March", "May", "July", "September", "November", "last month", "this month"),
    "device": ("iPhone", "Android phone", "laptop", "work PC", "tablet", "Chromebook", "Mac"),
    "browser": ("Chrome", "Firefox", "Safari", "Edge", "the mobile app", "the desktop app"),
    "item": ("headphones", "the blue jacket", "a coffee grinder", "two books", "the desk lamp", "running shoes"),
    "carrier": ("UPS", "FedEx", "DHL", "the postal service", "the courier"),
    "days": ("three", "five", "ten", "two", "twelve", "several"),
    "page": ("dashboard", "settings page", "export screen", "search page", "reports tab", "checkout page"),
    "action": ("save a draft", "upload a file", "sort the table", "open a report", "change my avatar", "print"),
    "feature": ("dark mode", "a CSV export", "keyboard shortcuts", "calendar sync", "bulk editing", "an API for tags"),
    "order": ("#4471", "#10293", "#88120", "#5530", "#70011", "#3307"),
}

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "billing": (
        "I was charged {amount} twice for the {plan} in {month}",
        "Please refund the {amount} you billed me {month}",
        "My invoice for {month} shows {amount} but my {plan} should be cheaper",
        "Why did my card get charged {amount} after I cancelled the {plan}?",
        "Can I get a receipt for the {amount} payment on my {plan}",
        "The price of the {plan} went up to {amount} without any notice",
        "I need to update the credit card used for my {plan}",
        "There is an unknown charge of {amount} on my statement from {month}",
    ),
    "login": (
        "I cannot log in to my account on my {device}",
        "The password reset email never arrives, I tried it on {browser}",
        "My account is locked after too many sign in attempts",
        "Two-factor code is rejected every time on my {device}",
        "I forgot my password and the reset link has expired",
        "Sign in with Google fails on {browser} with an error",
        "It keeps logging me out every few minutes on {browser}",
        "I changed my email address and now I can't sign in",
    ),
    "shipping": (
        "My order {order} with {item} has not arrived after {days} days",
        "The tracking for {order} from {carrier} has not updated in {days} days",
        "{carrier} says {item} was delivered but I never got the package",
        "Can you ship {item} to a different address, order {order}",
        "The box with {item} arrived damaged, order {order}",
        "How long does delivery take with {carrier} for {item}?",
        "I received the wrong item instead of {item} in order {order}",
        "My parcel is stuck at customs for {days} days now",
    ),
    "bug": (
        "The {page} crashes when I try to {action}",
        "I get an error 500 on the {page} every time I {action}",
        "The {page} is blank on {browser} since the last update",
        "Clicking the button to {action} does nothing on the {page}",
        "The app freezes on my {device} when I {action}",
        "Numbers on the {page} are wrong after I {action}",
        "The {page} shows a spinner forever on {browser}",
        "Something broke: I can no longer {action} on my {device}",
    ),
    "feature": (
        "It would be great to have {feature} in the app",
        "Please add {feature}, we really need it for our team",
        "Are you planning to support {feature} on the {page}?",
        "Feature request: {feature} for the {page}",
        "Could you add an option for {feature} on {browser}",
        "We would pay more for {feature}, any plans?",
        "Suggestion: let us {action} with {feature}",
        "I'd love {feature}, is it on the roadmap?",
    ),
}

# Tickets that say too little to tell their class: the label is real, the text is not enough.
_VAGUE = (
    "I have a problem with my account, please help",
    "Something is wrong, can someone contact me",
    "This is the second time I am writing about this issue",
    "Nothing works as expected, please look into it",
    "Urgent: I need help today",
    "Can you check my case please",
    "I am not happy with the service this week",
    "Following up on my previous ticket",
)

_OPENERS = ("", "", "", "Hi, ", "Hello team, ", "Hey, ", "Good morning. ", "Dear support, ", "URGENT ")
_CLOSERS = ("", "", "", " Thanks.", " thx", " Please help!", " asap", " Regards, Sam", " cheers", " :(", "!!")
_NOISE = ("really", "again", "today", "still", "honestly", "btw", "pls", "just", "now", "so", "also", "kindly")


def _ticket(rng: random.Random, label: str) -> str:
    if rng.random() < 0.08:
        body = rng.choice(_VAGUE)
    else:
        template = rng.choice(_TEMPLATES[label])
        body = template.format(**{slot: rng.choice(values) for slot, values in _SLOTS.items()})
    words = body.split(" ")
    for _ in range(rng.randint(0, 3)):  # a few words of noise in random places
        words.insert(rng.randint(0, len(words)), rng.choice(_NOISE))
    text = " ".join(words)
    if rng.random() < 0.15:
        text = text.lower()
    return f"{rng.choice(_OPENERS)}{text}{rng.choice(_CLOSERS)}".strip()


def tickets_csv(path: Path, rows: int = 300, seed: int = 0) -> Path:
    """Writes a UTF-8 CSV (columns ``text``, ``label``) of ``rows`` distinct support tickets drawn with ``seed``;
    returns ``path``."""
    if rows < 1:
        raise InvalidArgument(f"rows is {rows}; write at least one")
    rng = random.Random(seed)
    seen: set[str] = set()
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "label"])
        written = 0
        while written < rows:
            label = rng.choices(TICKET_LABELS, _WEIGHTS)[0]
            text = _ticket(rng, label)
            if text in seen:
                continue
            seen.add(text)
            writer.writerow([text, label])
            written += 1
    return path


def digits_zip(path: Path, per_class: int = 30) -> Path:
    """Writes a ZIP of scikit-learn's handwritten digits: ``per_class`` images of each digit as 32x32 greyscale PNGs
    (white on black), in folders ``0`` ... ``9``; returns ``path``."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    digits = load_digits()
    images: np.ndarray = digits.images
    targets: np.ndarray = digits.target
    available = int(np.bincount(targets).min())
    if not 1 <= per_class <= available:
        raise InvalidArgument(f"per_class is {per_class}; scikit-learn's digits hold 1-{available} of each digit")
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for digit in range(10):
            for n, index in enumerate(np.flatnonzero(targets == digit)[:per_class]):
                pixels = np.clip(images[index] * (255.0 / 16.0), 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels, mode="L").resize((32, 32), Image.Resampling.BILINEAR)
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                archive.writestr(f"{digit}/{digit}_{n:03d}.png", buffer.getvalue())
    return path
