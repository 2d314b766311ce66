"""The causal quality suite: data, tokenizer, scorer, decoding, training gains and the cache.

One quick-mode suite is prepared once per session in a temporary cache (about a minute on two
CPU cores), shared with test_bench_auto.py; every other test only reads it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from ia3fuse import load_adapter
from benchmarks.quality import causal
from benchmarks.quality.causal import (
    QUICK,
    SUITE_VERSION,
    TASKS,
    CausalSuite,
    CharTokenizer,
    exact_match,
    greedy_decode,
    make_splits,
    make_tokenizer,
    pretraining_examples,
)
from ia3fuse.errors import DataError, IA3FuseError

TASK_NAMES = [t.name for t in TASKS]


@pytest.fixture(scope="session")
def prepared(causal_quick: tuple[CausalSuite, Path]) -> tuple[CausalSuite, Path]:
    """A quick-mode suite trained once into a temporary cache (conftest's causal_quick)."""
    return causal_quick


@pytest.fixture(scope="session")
def base_scores(prepared: tuple[CausalSuite, Path]) -> dict[str, float]:
    suite, _ = prepared
    model = suite.base_model()
    return {t: suite.evaluate(model, t, "test") for t in TASK_NAMES}


def _peft(suite: CausalSuite, adapter_dir: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(suite.base_model(), str(adapter_dir)).eval()


# -- data ---------------------------------------------------------------------------------


def test_task_rules_hand_checked() -> None:
    tasks = {t.name: t for t in TASKS}
    assert tasks["rev"].prompt("abc") == "rev:abc="
    assert (tasks["rev"].rule("abc"), tasks["rev"].distractor("abc")) == ("cba", "abc")
    assert (tasks["sort"].rule("3141"), tasks["sort"].distractor("3141")) == ("1134", "4311")
    assert (tasks["add"].rule("079"), tasks["add"].distractor("079")) == ("302", "746")
    assert (tasks["dup"].rule("abc"), tasks["dup"].distractor("abc")) == ("aabbcc", "abcabc")


def test_splits_are_deterministic_disjoint_and_sized() -> None:
    a, b = make_splits(0, QUICK), make_splits(0, QUICK)
    assert a == b
    assert make_splits(1, QUICK)["rev"]["test"] != a["rev"]["test"]
    sizes = {"train": QUICK.n_train, "val": QUICK.n_val, "test": QUICK.n_test}
    for task in TASKS:
        prompts = {sp: {p for p, _ in a[task.name][sp]} for sp in sizes}
        for sp, n in sizes.items():
            assert len(a[task.name][sp]) == len(prompts[sp]) == n  # no repeated prompt either
        assert not prompts["train"] & prompts["val"]
        assert not prompts["train"] & prompts["test"]
        assert not prompts["val"] & prompts["test"]
        for p, answer in a[task.name]["test"]:
            assert p.startswith(task.tag) and p.endswith("=")
            assert answer == task.rule(p[len(task.tag) : -1])


def test_pretraining_mixture_skips_held_out_prompts_and_mixes_rules() -> None:
    splits = make_splits(0, QUICK)
    held_out = {p for t in splits.values() for sp in ("val", "test") for p, _ in t[sp]}
    # hold out the stream's own first prompts as well, so skipping is exercised for sure
    stream = pretraining_examples(0, set())
    held_out |= {next(stream)[0] for _ in range(50)}
    tasks = {t.tag: t for t in TASKS}
    own = n = 0
    stream = pretraining_examples(0, held_out)
    for _ in range(4000):
        prompt, answer = next(stream)
        assert prompt not in held_out
        task = tasks[prompt[:4]]
        x = prompt[4:-1]
        assert answer in (task.rule(x), task.distractor(x))
        if task.rule(x) != task.distractor(x):
            n += 1
            own += answer == task.rule(x)
    assert 0.35 < own / n < 0.45  # PRETRAIN_RULE_SHARE = 0.4


# -- tokenizer and scorer -----------------------------------------------------------------


def test_tokenizer_round_trip_and_tags_as_single_tokens() -> None:
    tok = make_tokenizer()
    ids = tok.encode("rev:abc=")
    assert len(ids) == 5 and tok.vocab[ids[0]] == "rev:"
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == "rev:abc="
    assert CharTokenizer.from_dict(json.loads(json.dumps(tok.to_dict()))).vocab == tok.vocab
    with pytest.raises(IA3FuseError, match=r"character 'X' at position 4 of 'rev:X=' is not in the vocabulary"):
        tok.encode("rev:X=")


def test_exact_match_hand_checked() -> None:
    assert exact_match(["cba", "ab", "x"], ["cba", "abc", "x"]) == pytest.approx(2 / 3)
    assert exact_match(["a"], ["a"]) == 1.0
    assert exact_match(["abc "], ["abc"]) == 0.0
    with pytest.raises(IA3FuseError, match="2 predictions for 1 answers"):
        exact_match(["a", "b"], ["a"])


def test_render_only_clean_answer_plus_eos_matches() -> None:
    tok = make_tokenizer()
    abc = tok.encode("abc")
    assert tok.render(abc + [tok.eos_id]) == "abc"
    assert tok.render(abc) == "abc\u2026"  # ran on without <eos>: never equal to an answer
    assert tok.render(abc[:2] + [tok.pad_id] + abc[2:] + [tok.eos_id]) == "ab<pad>c"


# -- the prepared suite -------------------------------------------------------------------


def test_cache_layout_and_adapter_targets(prepared: tuple[CausalSuite, Path]) -> None:
    suite, cache = prepared
    folder = cache / f"causal-v{SUITE_VERSION}-seed0-quick"
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no temporary folder left
    assert (folder / "base" / "config.json").is_file()
    assert suite.multitask_adapter_dir() == folder / "adapters" / "multitask"
    for task in TASK_NAMES:
        d = suite.adapter_dir(task)
        config = json.loads((d / "adapter_config.json").read_text())
        assert config["peft_type"] == "IA3" and config["task_type"] == "CAUSAL_LM"
        assert set(config["target_modules"]) == {"k_proj", "v_proj", "down_proj"}
        assert set(config["feedforward_modules"]) == {"down_proj"}
        adapter = load_adapter(d, name=task)
        assert len(adapter.vectors) == 3 * QUICK.num_layers


@pytest.mark.parametrize("task", TASK_NAMES)
def test_task_adapter_beats_base_model(
    prepared: tuple[CausalSuite, Path], base_scores: dict[str, float], task: str
) -> None:
    suite, _ = prepared
    own = suite.evaluate(_peft(suite, suite.adapter_dir(task)), task, "test")
    assert own >= base_scores[task] + 0.3, (task, base_scores[task], own)


def test_multitask_adapter_beats_base_model_on_average(
    prepared: tuple[CausalSuite, Path], base_scores: dict[str, float]
) -> None:
    suite, _ = prepared
    model = _peft(suite, suite.multitask_adapter_dir())
    multi = {t: suite.evaluate(model, t, "test") for t in TASK_NAMES}
    assert sum(multi.values()) / 4 >= sum(base_scores.values()) / 4 + 0.3, (base_scores, multi)


def test_evaluate_accepts_plain_and_peft_models_and_leaves_them_alone(prepared: tuple[CausalSuite, Path]) -> None:
    suite, _ = prepared
    plain = suite.base_model()
    assert not plain.training
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    acc = suite.evaluate(plain, "rev", "val")
    assert 0.0 <= acc <= 1.0
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())
    peft_model = _peft(suite, suite.adapter_dir("rev"))
    assert 0.0 <= suite.evaluate(peft_model, "rev", "val") <= 1.0
    # base_model() gives independent copies: wrapping one with PEFT does not touch the next
    assert suite.evaluate(suite.base_model(), "rev", "val") == acc


def test_cached_batched_decoding_matches_plain_greedy_reference(prepared: tuple[CausalSuite, Path]) -> None:
    """KV cache + left padding give the same tokens as recomputing each unpadded prompt."""
    suite, _ = prepared
    tok = suite.tokenizer
    model = _peft(suite, suite.adapter_dir("dup"))
    prompts = [p for t in TASK_NAMES for p, _ in suite.examples(t, "val")[:4]]
    ids = [[tok.bos_id] + tok.encode(p) for p in prompts]
    got = greedy_decode(model, ids, max_new_tokens=14, pad_id=tok.pad_id, eos_id=tok.eos_id)
    with torch.no_grad():
        for row, out in zip(ids, got):
            seq, ref = list(row), []
            for _ in range(14):
                nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
                ref.append(nxt)
                seq.append(nxt)
                if nxt == tok.eos_id:
                    break
            assert out == ref


def test_describe_is_json_and_lists_tasks(prepared: tuple[CausalSuite, Path]) -> None:
    suite, _ = prepared
    d = json.loads(json.dumps(suite.describe()))
    assert d["suite"] == "causal" and d["suite_version"] == SUITE_VERSION and d["quick"] is True
    assert [t["name"] for t in d["tasks"]] == TASK_NAMES
    assert d["tasks"][0]["splits"] == {"train": QUICK.n_train, "val": QUICK.n_val, "test": QUICK.n_test}
    assert d["model"]["hidden_size"] == QUICK.hidden_size
    assert set(d["training"]["runs"]) == {"pretraining", *TASK_NAMES, "multitask"}


def test_bad_task_split_and_unprepared_suite_errors(prepared: tuple[CausalSuite, Path]) -> None:
    suite, _ = prepared
    with pytest.raises(IA3FuseError, match="unknown task 'nope'; the causal suite's tasks are: rev, sort, add, dup"):
        suite.evaluate(suite.base_model(), "nope", "test")
    with pytest.raises(IA3FuseError, match="unknown split 'dev'; valid splits are: train, val, test"):
        suite.evaluate(suite.base_model(), "rev", "dev")
    with pytest.raises(IA3FuseError, match="not prepared; call prepare"):
        CausalSuite().base_model()


def test_second_prepare_reuses_the_cache(prepared: tuple[CausalSuite, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    suite, cache = prepared

    def no_training(*args, **kwargs):
        raise AssertionError("prepare trained again instead of using the cache")

    monkeypatch.setattr(causal, "_train", no_training)
    again = CausalSuite()
    again.prepare(cache, quick=True, seed=0, progress=False)
    assert again.adapter_dir("rev") == suite.adapter_dir("rev")
    a, b = suite.base_model().state_dict(), again.base_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cache_built_from_other_data_is_refused(prepared: tuple[CausalSuite, Path], tmp_path: Path) -> None:
    suite, _ = prepared
    folder = tmp_path / suite.adapter_dir("rev").parent.parent.name
    shutil.copytree(suite.adapter_dir("rev").parent.parent, folder)
    meta = json.loads((folder / "meta.json").read_text())
    meta["fingerprint"] = "0" * 16
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IA3FuseError, match="built from other data than this code makes; delete that folder"):
        CausalSuite().prepare(tmp_path, quick=True, seed=0, progress=False)


def test_incomplete_cache_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(causal, "_train", lambda *a, **k: pytest.fail("must not train"))
    (tmp_path / f"causal-v{SUITE_VERSION}-seed0-quick").mkdir()
    with pytest.raises(IA3FuseError, match="exists but holds no meta.json"):
        CausalSuite().prepare(tmp_path, quick=True, seed=0, progress=False)


def test_cli_quick_quality_run_schema_and_sanity(prepared, tmp_path):
    """`python -m benchmarks.quality run --quick` from the repository root, on the cache trained above."""
    import subprocess
    import sys

    _, cache = prepared
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.quality",
            "run",
            "--suite",
            "causal",
            "--quick",
            "--cache",
            str(cache),
            "--out",
            str(tmp_path),
            # the search and router rows (benchmarks.quality.auto) have their own tests; this one checks the table
            "--methods",
            "linear",
            "ties",
            "--no-progress",
            "--no-search",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert res.returncode == 0, res.stderr
    data = json.loads((tmp_path / "quality_causal_quick.json").read_text())
    assert (tmp_path / "quality_causal_quick.md").is_file() and (tmp_path / "quality_causal_quick.png").is_file()
    assert set(data) >= {"suite", "tasks", "quick", "seed", "describe", "rows", "seconds", "machine"}
    assert data["suite"] == "causal" and data["quick"] is True and data["tasks"] == list(TASK_NAMES)
    rows = {r["name"]: r for r in data["rows"]}
    assert set(rows) == {
        "base model",
        *(f"adapter: {t}" for t in TASK_NAMES),
        "PEFT add_weighted_adapter (uniform)",
        "linear",
        "ties",
        "linear (tuned)",
        "ties (tuned)",
        "multi-task adapter (upper bound)",
    }
    for r in data["rows"]:
        assert set(r) >= {"name", "group", "params", "accuracy", "average", "normalized"}
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"].values())
    for t in TASK_NAMES:
        assert rows[f"adapter: {t}"]["accuracy"][t] > rows["base model"]["accuracy"][t]
    assert rows["PEFT add_weighted_adapter (uniform)"]["accuracy"] == rows["linear"]["accuracy"]


# -- search problem (few-shot batches and objectives for ia3fuse.search) -------------------

PER_TASK = 8


@pytest.fixture(scope="session")
def search_val(prepared: tuple[CausalSuite, Path]):
    suite, _ = prepared
    return suite.search_problem("val", PER_TASK, seed=0)


def _batch_of(batches, task: str) -> dict:
    (batch,) = [b for b in batches if b["task"] == task]
    return batch


def test_search_problem_picks_per_task_examples_of_the_split(prepared: tuple[CausalSuite, Path], search_val) -> None:
    suite, _ = prepared
    batches, objectives = search_val
    assert set(objectives) == {"loss", "entropy"}
    assert [b["task"] for b in batches] == TASK_NAMES  # one batch per task: 8 <= 32
    splits = make_splits(0, QUICK)
    tok = suite.tokenizer
    eq = tok.encode("=")[0]
    for batch in batches:
        examples = batch["examples"]
        assert len(examples) == len(set(examples)) == PER_TASK
        assert set(examples) <= set(splits[batch["task"]]["val"])
        expected = causal._collate(tok, examples)  # collated as the adapters were trained
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(batch[key], expected[key])
        rows = torch.arange(PER_TASK)
        end = batch["prompt_end"]
        # the prompt ends with "=", unlabeled; the next position holds the first answer token
        assert (batch["input_ids"][rows, end] == eq).all()
        assert (batch["labels"][rows, end] == -100).all() and (batch["labels"][rows, end + 1] != -100).all()
        assert (batch["labels"][rows, end + 1] == batch["input_ids"][rows, end + 1]).all()


def test_search_problem_splits_many_examples_evenly_and_reads_the_asked_split(
    prepared: tuple[CausalSuite, Path],
) -> None:
    suite, _ = prepared
    batches, _ = suite.search_problem("test", 40, seed=0)
    splits = make_splits(0, QUICK)
    for task in TASK_NAMES:
        own = [b for b in batches if b["task"] == task]
        assert [len(b["examples"]) for b in own] == [20, 20]  # at most 32 per batch, evenly
        picked = [e for b in own for e in b["examples"]]
        assert len(set(picked)) == 40 and set(picked) <= set(splits[task]["test"])


def test_search_problem_is_deterministic_in_the_seed(prepared: tuple[CausalSuite, Path], search_val) -> None:
    suite, _ = prepared
    batches, _ = search_val
    again, _ = suite.search_problem("val", PER_TASK, seed=0)
    assert [b.keys() for b in again] == [b.keys() for b in batches]
    for a, b in zip(again, batches):
        assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
    other, _ = suite.search_problem("val", PER_TASK, seed=1)
    assert [b["examples"] for b in other] != [b["examples"] for b in batches]


def test_search_loss_is_the_training_loss_and_lower_with_each_tasks_own_adapter(
    prepared: tuple[CausalSuite, Path], search_val
) -> None:
    suite, _ = prepared
    batches, objectives = search_val
    base = suite.base_model()
    with torch.no_grad():
        for task in TASK_NAMES:
            batch = _batch_of(batches, task)
            before = objectives["loss"](base, batch)
            reference = base(**causal._collate(suite.tokenizer, batch["examples"])).loss
            assert before.dim() == 0 and torch.allclose(before, reference)
            after = objectives["loss"](_peft(suite, suite.adapter_dir(task)), batch)
            assert after < before, (task, float(before), float(after))


def test_search_entropy_is_the_first_answer_tokens_and_label_free(
    prepared: tuple[CausalSuite, Path], search_val
) -> None:
    suite, _ = prepared
    batches, objectives = search_val
    model = suite.base_model()
    vocab = len(suite.tokenizer)
    with torch.no_grad():
        for batch in batches:
            value = objectives["entropy"](model, batch)
            assert value.dim() == 0 and torch.isfinite(value) and 0.0 <= float(value) <= math.log(vocab) + 1e-5
            # other answers (labels and answer tokens) leave it as it is
            answers = batch["labels"] != -100
            scrambled = torch.where(answers, (batch["input_ids"] + 7) % vocab, batch["input_ids"])
            relabeled = {**batch, "input_ids": scrambled, "labels": torch.where(answers, scrambled, batch["labels"])}
            assert torch.allclose(objectives["entropy"](model, relabeled), value, rtol=1e-5, atol=1e-6)
    # hand-checked on one prompt, unpadded
    batch = batches[0]
    prompt = batch["examples"][0][0]
    ids = torch.tensor([[suite.tokenizer.bos_id] + suite.tokenizer.encode(prompt)])
    with torch.no_grad():
        p = torch.softmax(model(input_ids=ids).logits[0, -1], -1)
        one = {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        assert torch.allclose(objectives["entropy"](model, one), -(p * p.log()).sum(), rtol=1e-4)


def test_search_objectives_drive_search_weights(prepared: tuple[CausalSuite, Path], search_val) -> None:
    """One short Adam search per objective: the batches and objectives fit `search_weights`."""
    from ia3fuse.search import search_weights

    suite, _ = prepared
    batches, objectives = search_val
    adapters = {t: suite.adapter_dir(t) for t in TASK_NAMES}
    for name, objective in objectives.items():
        result = search_weights(
            suite.base_model(),
            adapters,
            batches,
            objective=objective,
            granularity="layer",
            budget=3 * len(batches),
            lr=0.1,
        )
        assert result.objective == name
        assert min(h["objective"] for h in result.history) < result.initial_objective, (name, result.history)


def test_search_problem_refuses_bad_split_and_counts(prepared: tuple[CausalSuite, Path]) -> None:
    suite, _ = prepared
    with pytest.raises(IA3FuseError, match="unknown split 'dev'; valid splits are: train, val, test"):
        suite.search_problem("dev", 4, seed=0)
    with pytest.raises(DataError, match=r"per_task=True; pass the number of examples per task, an integer >= 1"):
        suite.search_problem("val", True, seed=0)
    n = QUICK.n_val
    with pytest.raises(
        DataError, match=rf"per_task={n + 1} but task 'rev' has only {n} 'val' examples; pass per_task <= {n}"
    ):
        suite.search_problem("val", n + 1, seed=0)
    with pytest.raises(IA3FuseError, match="not prepared; call prepare"):
        CausalSuite().search_problem("val", 4, seed=0)


def test_search_accuracy_scores_a_batch_as_the_split_is_scored(prepared: tuple[CausalSuite, Path]) -> None:
    """The held-out metric of method='auto': exact match of greedy decoding, as `evaluate` scores a
    split. Over every val example of a task it equals `evaluate` on that task's val split."""
    suite, _ = prepared
    model = suite.base_model()
    for task in TASK_NAMES[:2]:
        n = len(suite.examples(task, "val"))
        batches, _ = suite.search_problem("val", n, seed=0)
        own = [b for b in batches if b["task"] == task]
        total = sum(suite.search_accuracy(model, b) * len(b["examples"]) for b in own) / n
        assert total == pytest.approx(suite.evaluate(model, task, "val"))
