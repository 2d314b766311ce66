"""The causal quality suite: a tiny Llama, four generative string tasks, exact-match scoring.

Everything is built here from a seed, with no download: a character-level tokenizer
(`CharTokenizer`), a tiny `LlamaForCausalLM` pretrained with a plain torch loop on a mixture of
the tasks' formats, one PEFT IA3 adapter per task (PEFT's default Llama targets: ``k_proj``,
``v_proj``, ``down_proj``) and one adapter trained on all tasks together.

The pretraining mixture makes the base model *ambiguous*, not ignorant: under each task's tag
it saw the task's rule on a minority of examples (40%) and a related distractor rule (copy
instead of reverse, the other sort order, subtract instead of add, ...) on the rest. So the base
model knows every format and both rules, is right only now and then, and a task's adapter has to
pick its rule: a big gain for a few thousand scales, and fusing the adapters is a real trade-off
(they all scale the same layers). See docs/bench-causal.md.

Example:
    >>> from pathlib import Path
    >>> from benchmarks.quality.causal import CausalSuite
    >>> suite = CausalSuite()
    >>> suite.prepare(Path("bench-cache"), quick=True, seed=0, progress=False)  # doctest: +SKIP
    >>> suite.evaluate(suite.base_model(), "add", "test")  # doctest: +SKIP
    0.0547
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import os
import random
import shutil
import string
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ia3fuse._runtime import no_hf_progress_bars as _no_hf_progress_bars
from ia3fuse._runtime import torch_threads as _torch_threads
from ia3fuse.errors import IA3FuseError

from .suite import SUITE_SPLITS, SearchObjective, check_search_pick, even_batches, mean_entropy

__all__ = [
    "SUITE_VERSION",
    "TASKS",
    "CausalSuite",
    "CharTokenizer",
    "GenerativeTask",
    "Settings",
    "exact_match",
    "greedy_decode",
    "make_splits",
    "pretraining_examples",
    "settings_for",
]

# Bump on any change to the data, the model, the training or the file layout: it keys the cache.
SUITE_VERSION = 1

# Intra-op threads while training and decoding (see `_torch_threads`).
TORCH_THREADS = 1

# Share of the pretraining examples under a task's tag that follow the task's own rule; the rest
# follow its distractor rule. Below 1/2, so the base model prefers the distractor.
PRETRAIN_RULE_SHARE = 0.4


# ----------------------------------------------------------------------------------------------
# Tokenizer


class CharTokenizer:
    """A character-level tokenizer: three special tokens, whole-word tags, then single characters.

    Args:
        words: multi-character tokens (the task tags, e.g. ``"rev:"``), matched before characters.
        chars: the single-character tokens.

    Example:
        >>> tok = CharTokenizer(["rev:"], "abc=")
        >>> tok.encode("rev:ab=")
        [3, 4, 5, 7]
        >>> tok.decode([3, 4, 5, 7, 2, 0])
        'rev:ab='
    """

    PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, words: Sequence[str], chars: str) -> None:
        self.words = list(words)
        self.chars = chars
        self.vocab = [self.PAD, self.BOS, self.EOS, *self.words, *chars]
        if len(set(self.vocab)) != len(self.vocab):
            raise IA3FuseError(f"the tokenizer vocabulary repeats a token: {self.vocab}; pass distinct words and chars")
        self._ids = {tok: i for i, tok in enumerate(self.vocab)}
        # longest word first, so a tag wins over a prefix of it
        self._words = sorted(self.words, key=len, reverse=True)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        ids, i = [], 0
        while i < len(text):
            word = next((w for w in self._words if text.startswith(w, i)), None)
            if word is None:
                tok = text[i]
                if tok not in self._ids or tok in (self.PAD, self.BOS, self.EOS):
                    raise IA3FuseError(
                        f"character {tok!r} at position {i} of {text!r} is not in the vocabulary; "
                        f"use only {self.chars!r} and the tags {self.words}"
                    )
                word = tok
            ids.append(self._ids[word])
            i += len(word)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, stopping at the first EOS and skipping PAD/BOS."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            out.append(self.vocab[i])
        return "".join(out)

    def render(self, ids: Sequence[int]) -> str:
        """A generated continuation as text: special tokens spelled out (``<pad>``, ``<bos>``),
        a final EOS dropped, and ``\u2026`` appended when there is no EOS (the answer ran on).
        Only a clean answer + EOS can equal an answer string."""
        ids = [int(i) for i in ids]
        ended = bool(ids) and ids[-1] == self.eos_id
        body = ids[:-1] if ended else ids
        return "".join(self.vocab[i] for i in body) + ("" if ended else "\u2026")

    def to_dict(self) -> dict[str, Any]:
        return {"words": self.words, "chars": self.chars, "vocab": self.vocab}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CharTokenizer:
        return cls(data["words"], data["chars"])


# ----------------------------------------------------------------------------------------------
# Tasks


def _letters(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def _digits(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(rng.randint(lo, hi)))


def _add_mod10(x: str, k: int) -> str:
    return "".join(str((int(d) + k) % 10) for d in x)


@dataclass(frozen=True)
class GenerativeTask:
    """One prompt -> answer task: ``f"{tag}{input}="`` -> ``rule(input)``, scored by exact match.

    ``distractor`` is the related rule the base model also saw under the same tag in pretraining.
    """

    name: str
    tag: str
    rule_text: str
    distractor_text: str
    sample: Callable[[random.Random], str]
    rule: Callable[[str], str]
    distractor: Callable[[str], str]

    def prompt(self, x: str) -> str:
        return f"{self.tag}{x}="


TASKS: tuple[GenerativeTask, ...] = (
    GenerativeTask(
        "rev",
        "rev:",
        "reverse 3-8 letters",
        "copy them unchanged",
        lambda r: _letters(r, 3, 8),
        lambda x: x[::-1],
        lambda x: x,
    ),
    GenerativeTask(
        "sort",
        "srt:",
        "sort 4-8 digits ascending",
        "sort them descending",
        lambda r: _digits(r, 4, 8),
        lambda x: "".join(sorted(x)),
        lambda x: "".join(sorted(x, reverse=True)),
    ),
    GenerativeTask(
        "add",
        "add:",
        "add 3 to each of 3-8 digits, mod 10",
        "subtract 3 from each digit, mod 10",
        lambda r: _digits(r, 3, 8),
        lambda x: _add_mod10(x, 3),
        lambda x: _add_mod10(x, -3),
    ),
    GenerativeTask(
        "dup",
        "dup:",
        "write each of 3-6 letters twice (abc -> aabbcc)",
        "write the whole string twice (abcabc)",
        lambda r: _letters(r, 3, 6),
        lambda x: "".join(c + c for c in x),
        lambda x: x + x,
    ),
)
_TASKS_BY_NAME = {t.name: t for t in TASKS}


def make_tokenizer() -> CharTokenizer:
    """The suite's tokenizer: the task tags as whole tokens, digits, lowercase letters and ``=``."""
    return CharTokenizer([t.tag for t in TASKS], string.digits + string.ascii_lowercase + "=")


# ----------------------------------------------------------------------------------------------
# Settings and data


@dataclass(frozen=True)
class Settings:
    """Sizes and training hyper-parameters of one mode (full or quick)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    n_train: int
    n_val: int
    n_test: int
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    adapter_steps: int
    multitask_steps: int
    adapter_batch: int
    adapter_lr: float
    warmup_frac: float = 0.05


FULL = Settings(
    hidden_size=128,
    num_layers=4,
    num_heads=4,
    intermediate_size=256,
    n_train=3000,
    n_val=128,
    n_test=256,
    pretrain_steps=2000,
    pretrain_batch=64,
    pretrain_lr=3e-3,
    adapter_steps=150,
    multitask_steps=300,
    adapter_batch=32,
    adapter_lr=3e-2,
)
QUICK = Settings(
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    intermediate_size=128,
    n_train=512,
    n_val=64,
    n_test=128,
    pretrain_steps=2000,
    pretrain_batch=64,
    pretrain_lr=5e-3,
    adapter_steps=60,
    multitask_steps=120,
    adapter_batch=32,
    adapter_lr=3e-2,
)


def settings_for(quick: bool) -> Settings:
    return QUICK if quick else FULL


Example = tuple[str, str]  # (prompt, answer)


def make_splits(seed: int, settings: Settings) -> dict[str, dict[str, list[Example]]]:
    """Deterministic, disjoint train / val / test splits per task (distinct inputs).

    Returns:
        task name -> split name -> list of (prompt, answer).
    """
    splits: dict[str, dict[str, list[Example]]] = {}
    sizes = {"test": settings.n_test, "val": settings.n_val, "train": settings.n_train}
    for task in TASKS:
        rng = random.Random(f"ia3fuse-causal-{seed}-{task.name}")
        seen: set[str] = set()
        inputs: list[str] = []
        total = sum(sizes.values())
        while len(inputs) < total:
            x = task.sample(rng)
            if x not in seen:
                seen.add(x)
                inputs.append(x)
        out: dict[str, list[Example]] = {}
        start = 0
        for name in ("test", "val", "train"):
            chunk = inputs[start : start + sizes[name]]
            out[name] = [(task.prompt(x), task.rule(x)) for x in chunk]
            start += sizes[name]
        splits[task.name] = {s: out[s] for s in SUITE_SPLITS}
    return splits


def pretraining_examples(seed: int, held_out: set[str]) -> Iterator[Example]:
    """An endless stream of the pretraining mixture: tasks uniform, each task's rule with
    probability `PRETRAIN_RULE_SHARE`, its distractor otherwise; prompts in ``held_out`` skipped."""
    rng = random.Random(f"ia3fuse-causal-pretrain-{seed}")
    while True:
        task = rng.choice(TASKS)
        x = task.sample(rng)
        prompt = task.prompt(x)
        if prompt in held_out:
            continue
        rule = task.rule if rng.random() < PRETRAIN_RULE_SHARE else task.distractor
        yield prompt, rule(x)


def _fingerprint(splits: dict[str, dict[str, list[Example]]]) -> str:
    return hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Training


def _collate(tok: CharTokenizer, batch: Sequence[Example]) -> dict[str, Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` and ``labels`` on the answer and EOS only."""
    rows, labels = [], []
    for prompt, answer in batch:
        p = [tok.bos_id] + tok.encode(prompt)
        a = tok.encode(answer) + [tok.eos_id]
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(l)] = torch.tensor(l)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def _answer_loss(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    """The training loss of a `CausalSuite.search_problem` batch: mean next-token cross-entropy
    on the answer and EOS tokens (the model's own loss, as in `_train`)."""
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"]).loss


def _first_answer_entropy(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    """Mean entropy of the next-token distribution at each prompt's last token (the first answer
    token's prediction) of a `CausalSuite.search_problem` batch; ``labels`` unused."""
    end = inputs["prompt_end"]
    # nothing after the longest prompt is needed; answer tokens of shorter rows that stay in the
    # window sit after their row's prompt end, where causal attention keeps them out of it
    width = int(end.max()) + 1
    logits = model(input_ids=inputs["input_ids"][:, :width], attention_mask=inputs["attention_mask"][:, :width]).logits
    return mean_entropy(logits[torch.arange(logits.shape[0], device=logits.device), end])


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def _train(
    model: nn.Module,
    batches: Callable[[int], Sequence[Example]],
    tok: CharTokenizer,
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    warmup_frac: float,
    progress: bool,
    desc: str,
) -> dict[str, float]:
    """A plain AdamW loop (warmup + cosine); ``batches(step)`` gives the step's examples.

    Returns:
        ``seconds`` and ``final_loss`` (mean of the last 20 steps).
    """
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, int(steps * warmup_frac))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, warmup))
    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        batch = _collate(tok, batches(step))
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    tail = losses[-20:]
    return {"seconds": round(time.perf_counter() - started, 2), "final_loss": round(sum(tail) / len(tail), 4)}


def _model_config(tok: CharTokenizer, s: Settings) -> Any:
    import transformers as tf

    return tf.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_heads,
        max_position_embeddings=64,
        pad_token_id=tok.pad_id,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        tie_word_embeddings=False,
    )


def _epoch_sampler(examples: list[Example], batch: int, seed: int) -> Callable[[int], list[Example]]:
    """Batches that walk seeded shuffles of ``examples`` (each example once per epoch)."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []

    def sample(step: int) -> list[Example]:
        nonlocal order
        while len(order) < batch:
            order += torch.randperm(len(examples), generator=gen).tolist()
        idx, order = order[:batch], order[batch:]
        return [examples[i] for i in idx]

    return sample


# ----------------------------------------------------------------------------------------------
# Decoding and scoring


def _cache_keyword(model: Any) -> str:
    """``cache`` (transformers >= 5.x) or ``past_key_values`` (older), read off the HF model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def greedy_decode(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    eos_id: int,
    batch_size: int = 512,
) -> list[list[int]]:
    """Greedy continuations of token-id ``prompts`` (left-padded batches, KV cache).

    Each continuation stops after its first ``eos_id`` (kept) or ``max_new_tokens`` tokens.
    Works with a plain causal LM and a PeftModel around one.
    """
    device = next(model.parameters()).device
    cache_kw = _cache_keyword(model)
    results: list[list[int]] = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
                mask[i, width - len(p) :] = 1
            ids, mask = ids.to(device), mask.to(device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
            steps: list[Tensor] = []
            for step in range(max_new_tokens):
                nxt = out.logits[:, -1].argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
                steps.append(nxt)
                done |= nxt == eos_id
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                cache = getattr(out, "cache", None)
                if cache is None:
                    cache = out.past_key_values
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                pos = pos[:, -1:] + 1
                out = model(
                    input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kw: cache}
                )
            for row in torch.stack(steps, dim=1).tolist():
                # the padding after <eos> is ours; anything before it is the model's
                results.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return results


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Share of ``predictions`` equal to their answer, character for character.

    Example:
        >>> exact_match(["cba", "ab", "x"], ["cba", "abc", "x"])
        0.6666666666666666
    """
    if len(predictions) != len(answers):
        raise IA3FuseError(f"{len(predictions)} predictions for {len(answers)} answers; pass one prediction per answer")
    if not answers:
        raise IA3FuseError("no answers to score; pass a non-empty split")
    return sum(p == a for p, a in zip(predictions, answers)) / len(answers)


# ----------------------------------------------------------------------------------------------
# The suite


class CausalSuite:
    """Four generative string tasks on a tiny Llama pretrained here (see the module docstring).

    Files under ``cache/causal-v{SUITE_VERSION}-seed{seed}-{full|quick}/``: ``base/`` (the
    model, ``save_pretrained``), ``adapters/<task>/`` and ``adapters/multitask/`` (PEFT IA3),
    ``tokenizer.json``, ``splits.json`` and ``meta.json`` (settings, timings, losses).
    """

    name = "causal"

    def __init__(self) -> None:
        self.tasks: list[str] = [t.name for t in TASKS]
        self._dir: Path | None = None
        self._base: Any = None  # a LlamaForCausalLM once prepared
        self._splits: dict[str, dict[str, list[Example]]] = {}
        self._meta: dict[str, Any] = {}
        self._tok = make_tokenizer()
        self._settings: Settings | None = None

    # -- protocol --------------------------------------------------------------------------

    def prepare(self, cache: Path, *, quick: bool, seed: int, progress: bool) -> None:
        """Build (or load from ``cache``) the splits, the base model and the adapters."""
        cache = Path(cache)
        cache.mkdir(parents=True, exist_ok=True)
        settings = settings_for(quick)
        splits = make_splits(seed, settings)
        folder = cache / f"causal-v{SUITE_VERSION}-seed{seed}-{'quick' if quick else 'full'}"
        if folder.exists() and not (folder / "meta.json").is_file():
            raise IA3FuseError(
                f"{str(folder)!r} exists but holds no meta.json (not written by this suite, or damaged); "
                "delete it and prepare again"
            )
        if not (folder / "meta.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=cache))
            try:
                with _torch_threads(TORCH_THREADS), _no_hf_progress_bars():
                    self._build(tmp, splits, settings, seed=seed, quick=quick, progress=progress)
                try:
                    os.rename(tmp, folder)
                except OSError:
                    if not (folder / "meta.json").is_file():
                        raise
                    # another process finished first: keep its files
                    shutil.rmtree(tmp, ignore_errors=True)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("fingerprint") != _fingerprint(splits):
            raise IA3FuseError(
                f"the cached suite in {str(folder)!r} was built from other data than this code makes; "
                f"delete that folder, or bump SUITE_VERSION (now {SUITE_VERSION}) when changing the data"
            )
        self._tok = CharTokenizer.from_dict(json.loads((folder / "tokenizer.json").read_text()))
        self._base = self._load_base(folder)
        self._dir, self._splits, self._meta, self._settings = folder, splits, meta, settings

    def base_model(self) -> nn.Module:
        """A fresh copy of the pretrained base model (``LlamaForCausalLM``) in eval mode."""
        return copy.deepcopy(self._prepared_base()).eval()

    def adapter_dir(self, task: str) -> Path:
        """The PEFT IA3 adapter directory trained on ``task`` alone."""
        self._check_task(task)
        return self._folder() / "adapters" / task

    def multitask_adapter_dir(self) -> Path:
        """The PEFT IA3 adapter directory trained on all tasks together."""
        return self._folder() / "adapters" / "multitask"

    def evaluate(self, model: nn.Module, task: str, split: str) -> float:
        """Exact-match accuracy of greedy decoding on ``task``'s ``split`` (train, val or test)."""
        examples = self.examples(task, split)
        longest = max(len(self._tok.encode(a)) for _, a in examples)
        predictions = self.predict(model, [p for p, _ in examples], max_new_tokens=longest + 1)
        return exact_match(predictions, [a for _, a in examples])

    def describe(self) -> dict[str, Any]:
        """Model, tokenizer, tasks (rules, split sizes, example prompts), training setup, timings."""
        self._folder()
        assert self._settings is not None
        s = self._settings
        cfg = self._prepared_base().config
        return {
            "suite": self.name,
            "suite_version": SUITE_VERSION,
            "seed": self._meta["seed"],
            "quick": self._meta["quick"],
            "cache_dir": str(self._folder()),
            "model": {
                "class": "LlamaForCausalLM",
                "hidden_size": cfg.hidden_size,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_attention_heads": cfg.num_attention_heads,
                "intermediate_size": cfg.intermediate_size,
                "vocab_size": cfg.vocab_size,
                "parameters": self._meta["parameters"],
            },
            "tokenizer": {"kind": "character-level, tags as whole tokens", "vocab": self._tok.vocab},
            "scoring": "exact match of greedy decoding (stop at <eos> or the longest answer + 1 tokens)",
            "tasks": [
                {
                    "name": t.name,
                    "tag": t.tag,
                    "rule": t.rule_text,
                    "pretraining": f"{PRETRAIN_RULE_SHARE:.0%} this rule, {1 - PRETRAIN_RULE_SHARE:.0%} "
                    f"the distractor: {t.distractor_text}",
                    "splits": {sp: len(self._splits[t.name][sp]) for sp in SUITE_SPLITS},
                    "examples": [f"{p}{a}" for p, a in self._splits[t.name]["test"][:3]],
                }
                for t in TASKS
            ],
            "training": {
                "pretraining": {
                    "steps": s.pretrain_steps,
                    "batch": s.pretrain_batch,
                    "lr": s.pretrain_lr,
                    "optimizer": "AdamW (weight decay 0.01), warmup + cosine, loss on answer tokens",
                    "rule_share": PRETRAIN_RULE_SHARE,
                },
                "adapters": {
                    "peft": "IA3Config(task_type='CAUSAL_LM'): k_proj, v_proj, down_proj (feed-forward)",
                    "steps": s.adapter_steps,
                    "multitask_steps": s.multitask_steps,
                    "batch": s.adapter_batch,
                    "lr": s.adapter_lr,
                    "optimizer": "AdamW (no weight decay), warmup + cosine, loss on answer tokens",
                },
                "runs": copy.deepcopy(self._meta["runs"]),
            },
        }

    def search_problem(
        self, split: str, per_task: int, seed: int
    ) -> tuple[list[dict[str, Any]], dict[str, SearchObjective]]:
        """Few-shot batches of every task's ``split`` and the search objectives on them.

        ``per_task`` examples per task, a seeded sample (the same ``seed`` gives the same
        batches). Each batch holds one task's examples (at most 32; more are split evenly),
        collated as in training: right-padded ``input_ids`` and ``attention_mask``, ``labels``
        on the answer and EOS tokens only, plus ``prompt_end`` (each row's last prompt token),
        ``task`` (the task's name) and ``examples`` (the ``(prompt, answer)`` pairs).

        Objectives, ``objective(model, batch)`` for the base ``LlamaForCausalLM`` or a PeftModel:
        ``"loss"``, the adapters' training loss (mean next-token loss on the answer tokens);
        ``"entropy"``, the mean entropy of the next-token distribution at ``prompt_end`` (the
        first answer token), ``labels`` unused.

        Raises:
            IA3FuseError: unknown split, or ``prepare`` not called yet.
            DataError: ``per_task`` not an integer in [1, the split's size].
        """
        self._folder()
        check_search_pick(split, per_task, self._splits)
        batches: list[dict[str, Any]] = []
        for task in self.tasks:
            rng = random.Random(f"ia3fuse-causal-search-{task}-{split}-{seed}")
            for chunk in even_batches(rng.sample(self._splits[task][split], per_task)):
                batches.append(
                    {
                        **_collate(self._tok, chunk),
                        # <bos> + the prompt's tokens: the last of them is at index len(prompt tokens)
                        "prompt_end": torch.tensor([len(self._tok.encode(prompt)) for prompt, _ in chunk]),
                        "task": task,
                        "examples": chunk,
                    }
                )

        # named as their keys: the search reports an objective by its function's __name__
        def loss(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
            """Mean next-token loss on the answer tokens (the training loss)."""
            return _answer_loss(model, inputs)

        def entropy(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
            """Mean entropy of the first answer token's prediction; labels unused."""
            return _first_answer_entropy(model, inputs)

        return batches, {"loss": loss, "entropy": entropy}

    def search_predictions(self, model: nn.Module, inputs: dict[str, Any]) -> list[str]:
        """Greedy answers to the prompts of a `search_problem` batch, decoded as `evaluate` decodes."""
        pairs = inputs["examples"]
        longest = max(len(self._tok.encode(a)) for _, a in pairs)
        with torch.no_grad():
            return self.predict(model, [p for p, _ in pairs], max_new_tokens=longest + 1)

    def search_accuracy(self, model: nn.Module, inputs: dict[str, Any]) -> float:
        """Exact match of greedy decoding on a `search_problem` batch's examples, as the test split
        is scored (the held-out metric of ``method="auto"``)."""
        return exact_match(self.search_predictions(model, inputs), [a for _, a in inputs["examples"]])

    # -- helpers beyond the protocol ----------------------------------------------------

    @property
    def tokenizer(self) -> CharTokenizer:
        return self._tok

    def examples(self, task: str, split: str) -> list[Example]:
        """The (prompt, answer) pairs of ``task``'s ``split``."""
        self._check_task(task)
        if split not in SUITE_SPLITS:
            raise IA3FuseError(f"unknown split {split!r}; valid splits are: {', '.join(SUITE_SPLITS)}")
        self._folder()
        return self._splits[task][split]

    def predict(self, model: nn.Module, prompts: Sequence[str], *, max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers of ``model`` to ``prompts`` (strings like ``"rev:abc="``)."""
        ids = [[self._tok.bos_id] + self._tok.encode(p) for p in prompts]
        if not ids:
            return []
        if max_new_tokens is None:
            # no answer is longer than twice its input (dup); + 1 for <eos>
            max_new_tokens = 2 * max(len(i) for i in ids) + 1
        with _torch_threads(TORCH_THREADS):
            out = greedy_decode(
                model, ids, max_new_tokens=max_new_tokens, pad_id=self._tok.pad_id, eos_id=self._tok.eos_id
            )
        return [self._tok.render(o) for o in out]

    # -- private ------------------------------------------------------------------------

    def _check_task(self, task: str) -> None:
        if task not in _TASKS_BY_NAME:
            raise IA3FuseError(f"unknown task {task!r}; the causal suite's tasks are: {', '.join(self.tasks)}")

    def _folder(self) -> Path:
        if self._dir is None:
            raise IA3FuseError(
                "the causal suite is not prepared; call prepare(cache, quick=..., seed=..., progress=...) first"
            )
        return self._dir

    def _prepared_base(self) -> Any:
        self._folder()
        assert self._base is not None
        return self._base

    @staticmethod
    def _load_base(folder: Path) -> Any:
        import transformers as tf

        with _no_hf_progress_bars():
            return tf.LlamaForCausalLM.from_pretrained(str(folder / "base")).eval()

    def _build(
        self,
        out: Path,
        splits: dict[str, dict[str, list[Example]]],
        s: Settings,
        *,
        seed: int,
        quick: bool,
        progress: bool,
    ) -> None:
        import transformers as tf

        tok = self._tok
        runs: dict[str, Any] = {}
        held_out = {p for t in splits.values() for sp in ("val", "test") for p, _ in t[sp]}
        stream = pretraining_examples(seed, held_out)
        torch.manual_seed(seed)
        model = tf.LlamaForCausalLM(_model_config(tok, s))
        runs["pretraining"] = _train(
            model,
            lambda _: [next(stream) for _ in range(s.pretrain_batch)],
            tok,
            steps=s.pretrain_steps,
            lr=s.pretrain_lr,
            weight_decay=0.01,
            warmup_frac=s.warmup_frac,
            progress=progress,
            desc="causal: pretraining",
        )
        model.save_pretrained(str(out / "base"))
        base = self._load_base(out)
        jobs = [(t.name, splits[t.name]["train"], s.adapter_steps) for t in TASKS]
        jobs.append(("multitask", [e for t in TASKS for e in splits[t.name]["train"]], s.multitask_steps))
        for i, (name, train, steps) in enumerate(jobs):
            runs[name] = self._train_adapter(
                base,
                train,
                out / "adapters" / name,
                steps=steps,
                seed=seed * 1000 + i + 1,
                s=s,
                progress=progress,
                name=f"causal-v{SUITE_VERSION}-seed{seed}",
            )
        meta = {
            "suite_version": SUITE_VERSION,
            "seed": seed,
            "quick": quick,
            "settings": asdict(s),
            "parameters": sum(p.numel() for p in base.parameters()),
            "fingerprint": _fingerprint(splits),
            "runs": runs,
        }
        (out / "tokenizer.json").write_text(json.dumps(tok.to_dict(), indent=1))
        (out / "splits.json").write_text(json.dumps(splits))
        (out / "meta.json").write_text(json.dumps(meta, indent=1))

    def _train_adapter(
        self,
        base: nn.Module,
        train: list[Example],
        out: Path,
        *,
        steps: int,
        seed: int,
        s: Settings,
        progress: bool,
        name: str,
    ) -> dict[str, float]:
        from peft import IA3Config, get_peft_model

        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(base), IA3Config(task_type="CAUSAL_LM"))
        result = _train(
            model,
            _epoch_sampler(train, s.adapter_batch, seed),
            self._tok,
            steps=steps,
            lr=s.adapter_lr,
            weight_decay=0.0,
            warmup_frac=s.warmup_frac,
            progress=progress,
            desc=f"causal: adapter {out.name}",
        )
        model.peft_config["default"].base_model_name_or_path = name
        model.save_pretrained(str(out), save_embedding_layers=False)
        return result
