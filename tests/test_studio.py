"""The studio's logic without a browser: a fusion's outputs against PEFT, `Mixture` and `merge`;
per-layer maps; search; export; the HTTP API served by the real server; the command."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import ia3fuse
from ia3fuse import IA3FuseError, InvalidWeightsError, OutputPathError, UnknownMethodError
from ia3fuse.errors import DataError, InvalidParameterError
from ia3fuse.search import read_records
from ia3fuse.studio import Studio, StudioServer
from ia3fuse.studio.demo import DEMO_PROMPTS, build_studio_demo
from ia3fuse.weights import WeightSchedule

from cli_runner import run_cli
from factories import random_ia3_adapter, tiny_config, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("studio")
    base, tok, base_dir, adapter_dirs, data = build_studio_demo(root)
    studio = Studio(base, adapter_dirs, tokenizer=tok, records=read_records(data), base_dir=base_dir)
    yield studio
    studio.close()


def _peft(base_dir: Path, adapter_dir: Path) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter_dir)).eval()


def _generate(model: Any, tok: Any, prompts: list[str], n: int) -> list[str]:
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    tok.padding_side = "right"
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def _peft_loss(model: Any, studio: Studio) -> float:
    total = 0.0
    with torch.no_grad():
        for b in studio.batches:
            total += float(model(**b.model_inputs).loss) * b.size
    return total / sum(b.size for b in studio.batches)


def _column(out: dict[str, Any], name: str) -> list[str]:
    j = out["columns"].index(name)
    return [row[j] for row in out["rows"]]


# ---------------------------------------------------------------------- outputs
def test_the_demo_examples_are_written_by_task_a_and_task_b(demo: Studio) -> None:
    assert [r["input"] for r in demo.records] == list(DEMO_PROMPTS)
    out = demo.outputs({"weights": [1, 0, 0]}, list(DEMO_PROMPTS[:4]), max_new_tokens=6)
    assert _column(out, "task_a") == [r["target"] for r in demo.records[:4]]
    out = demo.outputs({"weights": [0, 1, 0]}, list(DEMO_PROMPTS[4:]), max_new_tokens=6)
    assert _column(out, "task_b") == [r["target"] for r in demo.records[4:]]


@pytest.mark.parametrize(
    ("method", "params", "weights"),
    [
        ("task_arithmetic", {"lam": 0.8}, [0.9, -0.3, 0.5]),
        ("ties", {"density": 0.5}, [0.6, 0.2, 0.4]),
        ("geometric", {}, [0.5, 0.3, 0.2]),
    ],
)
def test_the_fusion_column_is_the_merged_adapter_run_by_peft(
    demo: Studio, tmp_path: Path, method: str, params: dict[str, Any], weights: list[float]
) -> None:
    prompts = list(DEMO_PROMPTS[:5])
    out = demo.outputs({"weights": weights, "method": method, "params": params}, prompts, max_new_tokens=12)
    fused = ia3fuse.merge(demo.adapters, weights, method, **params)
    fused.save(tmp_path / "fused")
    assert demo.base_dir is not None
    peft_model = _peft(demo.base_dir, tmp_path / "fused")
    assert _column(out, "fusion") == _generate(peft_model, demo.tokenizer, prompts, 12)
    assert out["scores"]["fusion"]["loss"] == pytest.approx(_peft_loss(peft_model, demo), rel=1e-6)
    full = ia3fuse.get_method(method).validate(params)  # the defaults filled in, as the page shows them
    assert out["fusion"] == {"method": method, "params": full, "weights": weights, "layer_weights": None}


def test_the_fusion_column_equals_a_mixture_with_those_weights(demo: Studio) -> None:
    prompts = list(DEMO_PROMPTS[2:6])
    weights = [0.3, 0.5, 0.2]
    out = demo.outputs({"weights": weights}, prompts, max_new_tokens=10)
    model, tok = demo.model, demo.tokenizer
    demo.hooks.remove()  # the mixture hooks the same model; put the studio's hooks back after
    try:
        with ia3fuse.Mixture(model, demo.adapters) as mix:
            tok.padding_side = "left"
            enc = tok(prompts, return_tensors="pt", padding=True)
            tok.padding_side = "right"
            gen = mix.generate(**enc, mixture_weights=weights, max_new_tokens=10, do_sample=False, pad_token_id=0)
            texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        from ia3fuse.scaling import ScaleHooks

        demo.hooks = ScaleHooks(model, demo.stack.segments)
    assert _column(out, "fusion") == texts


def test_base_and_single_adapter_columns_are_the_base_and_each_adapter_in_peft(demo: Studio) -> None:
    prompts = list(DEMO_PROMPTS[:3])
    out = demo.outputs({"weights": [0.2, 0.2, 0.2]}, prompts, max_new_tokens=8)
    assert out["columns"] == ["base", "task_a", "task_b", "task_c", "fusion"]
    assert demo.base_dir is not None
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(demo.base_dir)).eval()
    assert _column(out, "base") == _generate(base, demo.tokenizer, prompts, 8)
    for a in demo.adapters:
        assert a.source is not None
        assert _column(out, a.name) == _generate(_peft(demo.base_dir, Path(a.source)), demo.tokenizer, prompts, 8)
    # task_c lacks the feed-forward modules: identity there, so its column is not the base's
    assert _column(out, "task_c") != _column(out, "base")


def test_a_per_layer_map_is_merge_with_one_override_per_layer(demo: Studio, tmp_path: Path) -> None:
    table = [[1.0, 0.0], [0.0, 1.0], [0.25, -0.5]]
    assert demo.groups == ["model.layers.0", "model.layers.1"]
    fusion = demo.fusion({"weights": [0.5, 0.5, -0.125], "layer_weights": table})
    by_hand = WeightSchedule(
        default=[0.0, 0.0, 0.0],
        overrides=[(r"^model\.layers\.0\.", [1.0, 0.0, 0.25]), (r"^model\.layers\.1\.", [0.0, 1.0, -0.5])],
    )
    ours, theirs = demo.fuse(fusion), ia3fuse.merge(demo.adapters, by_hand)
    assert set(ours.vectors) == set(theirs.vectors)
    for p, v in theirs.vectors.items():
        assert torch.equal(ours.vectors[p], v), p
    out = demo.outputs(fusion, ["Once upon a time"], max_new_tokens=6)
    theirs.save(tmp_path / "by_hand")
    assert demo.base_dir is not None
    assert _column(out, "fusion") == _generate(
        _peft(demo.base_dir, tmp_path / "by_hand"), demo.tokenizer, ["Once upon a time"], 6
    )


def test_every_change_is_recomputed_and_the_fixed_columns_are_cached(demo: Studio) -> None:
    prompts = list(DEMO_PROMPTS[:4])
    a = demo.outputs({"weights": [1.0, 0.0, 0.0]}, prompts, max_new_tokens=10)
    b = demo.outputs({"weights": [0.0, 1.0, 0.0]}, prompts, max_new_tokens=10)
    assert _column(a, "fusion") == _column(a, "task_a")
    assert _column(b, "fusion") == _column(b, "task_b")
    assert _column(a, "fusion") != _column(b, "fusion")
    assert a["scores"]["task_a"] == b["scores"]["task_a"]
    assert a["scores"]["fusion"] == pytest.approx(a["scores"]["task_a"])


def test_no_prompts_still_scores_the_examples(demo: Studio) -> None:
    out = demo.outputs({"weights": [0.4, 0.3, 0.3]}, [], max_new_tokens=5)
    assert out["rows"] == []
    assert set(out["scores"]) == {"base", "task_a", "task_b", "task_c", "fusion"}
    assert 0.0 <= out["scores"]["fusion"]["accuracy"] <= 1.0


@pytest.mark.parametrize(
    ("fusion", "prompts", "tokens", "error", "message"),
    [
        (
            {"weights": [1, 2]},
            [],
            5,
            InvalidWeightsError,
            "weights have shape (2,); pass one weight per adapter (task_a, task_b, task_c)",
        ),
        ({"weights": [1, "x", 0]}, [], 5, InvalidWeightsError, "weights [1, 'x', 0] are not numbers"),
        ({"weights": [1, float("nan"), 0]}, [], 5, InvalidWeightsError, "weights hold NaN or Inf"),
        (
            {"weights": [1, 0, 0], "layer_weights": [[1, 2]]},
            [],
            5,
            InvalidWeightsError,
            "pass a 3 x 2 table (adapters x layer groups)",
        ),
        ({"weights": [1, 0, 0], "method": "bogus"}, [], 5, UnknownMethodError, "bogus"),
        ({"weights": [1, 0, 0], "method": "ties", "params": {"density": 2}}, [], 5, InvalidParameterError, "density"),
        ({"weights": [1, 0, 0]}, ["a"] * 17, 5, DataError, "17 prompts; the page shows at most 16"),
        ({"weights": [1, 0, 0]}, ["a"], 0, InvalidParameterError, "max tokens 0; pass a whole number from 1 to 256"),
        (
            {"weights": [1, 0, 0]},
            ["x" * 60],
            10,
            DataError,
            "a prompt of 60 tokens plus 10 new ones exceeds the model's context of 64",
        ),
    ],
)
def test_bad_settings_are_one_clear_error(
    demo: Studio, fusion: dict[str, Any], prompts: list[str], tokens: int, error: type, message: str
) -> None:
    with pytest.raises(error) as info:
        demo.outputs(fusion, prompts, max_new_tokens=tokens)
    assert message in str(info.value)
    assert demo.hooks.scales is None  # the model is left unscaled after a failure
    demo.outputs({"weights": [0.5, 0.5, 0]}, ["2 + 2 ="], max_new_tokens=3)  # and the studio still works


# ---------------------------------------------------------------------- search
def test_search_lowers_the_loss_and_its_weights_reproduce_it(demo: Studio) -> None:
    steps: list[dict[str, float]] = []
    start = {"weights": [0.5, 0.5, 0.0]}
    result = demo.search(start, optimizer="adam", granularity="task", budget=20, on_step=steps.append)
    assert len(steps) == 20 and [s["forwards"] for s in steps] == list(range(1, 21))
    assert steps[0]["objective"] == pytest.approx(demo.outputs(start, [])["scores"]["fusion"]["loss"], rel=1e-6)
    assert result["final"] < result["initial"]
    found = result["fusion"]
    assert found["layer_weights"] is None and len(found["weights"]) == 3
    assert demo.outputs(found, [])["scores"]["fusion"]["loss"] == pytest.approx(result["final"], rel=1e-6)


def test_layer_wise_search_fills_the_map(demo: Studio) -> None:
    result = demo.search({"weights": [0.5, 0.5, 0.0]}, optimizer="cma", granularity="layer", budget=12)
    table = result["fusion"]["layer_weights"]
    assert len(table) == 3 and all(len(row) == 2 for row in table)
    score = demo.outputs(result["fusion"], [])["scores"]["fusion"]["loss"]
    assert score == pytest.approx(result["final"], rel=1e-6)


def test_search_needs_examples_and_a_searchable_method(tmp_path: Path) -> None:
    base = tiny_model("llama")
    a = random_ia3_adapter(base, tmp_path / "a", seed=1)
    studio = Studio(base, [a], tokenizer=tiny_tokenizer())
    try:
        with pytest.raises(DataError, match="the studio has no examples to search on; start it with --data"):
            studio.search({"weights": [1.0]})
        assert studio.outputs({"weights": [1.0]}, ["hi"], max_new_tokens=2)["scores"] == {}
    finally:
        studio.close()


# ---------------------------------------------------------------------- export
def test_export_writes_an_adapter_peft_loads_a_recipe_merge_reproduces_and_a_folded_model(
    demo: Studio, tmp_path: Path
) -> None:
    fusion = {"weights": [0.7, 0.1, 0.4], "layer_weights": [[0.7, 0.5], [0.1, 0.0], [0.4, 0.9]], "method": "ties"}
    out = tmp_path / "export"
    result = demo.export(fusion, out, fold=True, name="mine")
    assert result == {"folder": str(out.resolve()), "written": ["adapter/", "recipe.yaml", "model/"]}
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "model", "recipe.yaml"]
    # the adapter is the fusion the page showed
    shown = demo.fuse(demo.fusion(fusion), name="mine")
    loaded = ia3fuse.load_adapter(out / "adapter")
    import yaml

    assert yaml.safe_load((out / "recipe.yaml").read_text())["name"] == "mine"
    for p, v in shown.vectors.items():
        assert torch.equal(loaded.vectors[p], v)
    # the recipe reproduces it bit for bit through the command
    res = run_cli("merge", out / "recipe.yaml", "-o", tmp_path / "again", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    again = ia3fuse.load_adapter(tmp_path / "again")
    assert set(again.vectors) == set(shown.vectors)
    for p, v in shown.vectors.items():
        assert torch.equal(again.vectors[p], v)
    # PEFT loads the adapter; the folded model gives PEFT's logits
    assert demo.base_dir is not None
    peft_model = _peft(demo.base_dir, out / "adapter")
    from transformers import AutoModelForCausalLM

    folded = AutoModelForCausalLM.from_pretrained(str(out / "model")).eval()
    ids = demo.tokenizer(["Dear customer,"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(folded(ids).logits, peft_model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_export_refuses_an_existing_folder_and_leaves_it_as_it_was(demo: Studio, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="already exists"):
        demo.export({"weights": [1, 0, 0]}, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    demo.export({"weights": [1, 0, 0]}, out, overwrite=True, recipe=False)
    assert sorted(p.name for p in out.iterdir()) == ["adapter"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"adapter": False, "recipe": False}, "nothing to export; tick the adapter, the recipe or the folded model"),
        ({"folder": "  "}, "no export folder given; type a folder path"),
    ],
)
def test_export_bad_requests(demo: Studio, tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    folder = kwargs.pop("folder", tmp_path / "x")
    with pytest.raises(IA3FuseError) as info:
        demo.export({"weights": [1, 0, 0]}, folder, **kwargs)
    assert str(info.value) == message
    assert not (tmp_path / "x").exists()


def test_fold_needs_the_base_folder(tmp_path: Path) -> None:
    base = tiny_model("llama")
    a = random_ia3_adapter(base, tmp_path / "a", seed=1)
    studio = Studio(base, [a], tokenizer=tiny_tokenizer())
    try:
        with pytest.raises(IA3FuseError, match="cannot fold; start it with --model DIR"):
            studio.export({"weights": [1.0]}, tmp_path / "out", fold=True)
    finally:
        studio.close()


# ---------------------------------------------------------------------- other model families
def test_a_classifier_shows_labels_and_scores_as_peft_computes_them(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    labels = {0: "neg", 1: "neu", 2: "pos"}
    cfg = tiny_config("bert", id2label=labels, label2id={v: k for k, v in labels.items()})
    base = BertForSequenceClassification(cfg).eval()
    base.save_pretrained(str(tmp_path / "base"))
    tok = tiny_tokenizer()
    tok.save_pretrained(str(tmp_path / "base"))
    dirs = [random_ia3_adapter(base, tmp_path / n, seed=i + 5, spread=0.8) for i, n in enumerate(["x", "y"])]
    data = tmp_path / "few.jsonl"
    data.write_text("".join(json.dumps({"input": t, "label": i % 3}) + "\n" for i, t in enumerate(["ab", "cd", "ef"])))
    studio = Studio.from_dirs(tmp_path / "base", dirs, data=data)
    try:
        assert studio.family == "classifier"
        out = studio.outputs({"weights": [0.3, 0.9]}, ["good day", "bad day"], max_new_tokens=1)
        fused = ia3fuse.merge(dirs, [0.3, 0.9])
        fused.save(tmp_path / "fused")
        peft_model = PeftModel.from_pretrained(
            BertForSequenceClassification.from_pretrained(str(tmp_path / "base")), str(tmp_path / "fused")
        ).eval()
        with torch.no_grad():
            probs = peft_model(**tok(["good day", "bad day"], return_tensors="pt", padding=True)).logits.softmax(-1)
        want = [f"{cfg.id2label[int(p.argmax())]} ({float(p.max()):.3f})" for p in probs]
        assert _column(out, "fusion") == want
        assert out["scores"]["fusion"]["accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0)
        assert studio.info()["metric"] == "accuracy"
    finally:
        studio.close()


def test_close_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    base = tiny_model("gpt2")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = base(ids).logits.clone()
    a = random_ia3_adapter(base, tmp_path / "a", seed=3)
    tok = tiny_tokenizer()
    tok.pad_token = None  # as GPT-2's own tokenizer: the studio pads with eos and puts it back
    studio = Studio(base, [a], tokenizer=tok)
    out = studio.outputs({"weights": [1.0]}, ["hello", "a longer prompt"], max_new_tokens=3)
    assert len(out["rows"]) == 2
    assert tok.pad_token is None and tok.padding_side == "right"
    studio.close()
    with torch.no_grad():
        assert torch.equal(base(ids).logits, before)


# ---------------------------------------------------------------------- the HTTP API
@pytest.fixture(scope="module")
def server(demo: Studio) -> Any:
    srv = StudioServer(demo, port=0)
    srv.start()
    yield srv
    srv.stop()


def _call(url: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_server_listens_on_localhost_and_serves_the_page(server: StudioServer) -> None:
    assert server.url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(server.url, timeout=30) as resp:
        page = resp.read().decode()
    assert "<title>ia3fuse studio</title>" in page and "/static/app.js" in page
    with urllib.request.urlopen(server.url + "static/app.js", timeout=30) as resp:
        assert b"/api/outputs" in resp.read()
    status, info = _call(server.url + "api/info")
    assert status == 200
    assert info["adapters"] == ["task_a", "task_b", "task_c"]
    assert info["groups"] == ["model.layers.0", "model.layers.1"]
    assert {m["name"]: m["searchable"] for m in info["methods"]}["ties"] is True
    assert info["prompts"] == list(DEMO_PROMPTS[:4]) and info["labeled"] and info["can_fold"]


def test_the_api_returns_what_the_session_computes(server: StudioServer, demo: Studio) -> None:
    body = {"fusion": {"weights": [0.2, 0.7, 0.1]}, "prompts": ["2 + 2 ="], "max_new_tokens": 7}
    status, out = _call(server.url + "api/outputs", body)
    assert status == 200
    direct = demo.outputs(body["fusion"], body["prompts"], max_new_tokens=7)
    assert out["rows"] == direct["rows"] and out["scores"] == direct["scores"]


@pytest.mark.parametrize(
    ("path", "body", "raw", "status", "message"),
    [
        (
            "api/outputs",
            {"fusion": {"weights": [1]}},
            None,
            400,
            "weights have shape (1,); pass one weight per adapter",
        ),
        ("api/outputs", None, b"{not json", 400, "the request is not JSON"),
        ("api/outputs", None, b"[1, 2]", 400, "the request is not a JSON object"),
        ("api/export", {"fusion": {"weights": [1, 0, 0]}, "folder": ""}, None, 400, "no export folder given"),
        ("api/search", {"fusion": {"weights": [1, 0, 0]}, "budget": "many"}, None, 400, "budget 'many'"),
    ],
)
def test_api_errors_are_one_line_and_the_app_keeps_working(
    server: StudioServer, path: str, body: Any, raw: bytes | None, status: int, message: str
) -> None:
    code, out = _call(server.url + path, body, raw)
    assert code == status
    assert message in out["error"] and "\n" not in out["error"] and "Traceback" not in out["error"]
    assert _call(server.url + "api/outputs", {"fusion": {"weights": [1, 0, 0]}, "prompts": []})[0] == 200


def test_a_bug_is_reported_in_one_line_without_a_traceback(
    server: StudioServer, demo: Studio, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(demo, "outputs", broken)
    code, out = _call(server.url + "api/outputs", {"fusion": {"weights": [1, 0, 0]}})
    assert code == 500
    assert out["error"] == "internal error (RuntimeError: boom second line); the server log has the details"


def test_search_through_the_api_reports_its_curve_and_result(server: StudioServer) -> None:
    import time

    code, job = _call(server.url + "api/search", {"fusion": {"weights": [0.5, 0.5, 0]}, "budget": 10})
    assert code == 200 and job["state"] == "running"
    deadline = time.monotonic() + 120
    while job["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
        job = _call(server.url + "api/search")[1]
    assert job["state"] == "done", job
    assert [h["forwards"] for h in job["history"]] == list(range(1, 11))
    assert len(job["result"]["fusion"]["weights"]) == 3


def test_a_failed_search_is_shown_and_the_next_one_runs(server: StudioServer) -> None:
    import time

    code, job = _call(server.url + "api/search", {"fusion": {"weights": [0.5, 0.5, 0]}, "granularity": "module"})
    assert code == 200
    while job["state"] == "running":
        time.sleep(0.05)
        job = _call(server.url + "api/search")[1]
    assert job["state"] == "error" and job["error"] == "granularity 'module'; pick task or layer"


def test_a_taken_port_is_a_clear_error(server: StudioServer, demo: Studio) -> None:
    with pytest.raises(IA3FuseError, match=rf"cannot listen on 127.0.0.1:{server.port} .*; pick another --port"):
        StudioServer(demo, port=server.port)


# ---------------------------------------------------------------------- the command
def test_the_command_needs_a_model_and_adapters_or_demo() -> None:
    res = run_cli("studio")
    assert res.returncode == 2
    assert res.stderr.strip() == "ia3fuse: error: pass --demo, or --model DIR with --adapters DIR [DIR ...]"
    res = run_cli("studio", "--model", "m")
    assert res.stderr.strip() == "ia3fuse: error: --model needs --adapters DIR [DIR ...]"


def test_without_the_extra_the_command_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real = builtins.__import__

    def no_starlette(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "starlette" or name.startswith("starlette."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_starlette)
    res = run_cli("studio", "--demo")
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "ia3fuse: error: ia3fuse studio needs the starlette package; install it with pip install 'ia3fuse[studio]'"
    )


@pytest.mark.slow
def test_the_console_script_serves_the_demo(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "ia3fuse", "studio", "--demo", "--workdir", str(tmp_path), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert lines[0].strip() == f"demo files in {tmp_path}"
        assert lines[1].startswith("ia3fuse studio: http://127.0.0.1:") and lines[1].endswith("(Ctrl-C stops it)\n")
        url = lines[1].split()[2]
        deadline = time.monotonic() + 60
        while True:
            try:
                status, info = _call(url + "api/info")
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert status == 200 and info["adapters"] == ["task_a", "task_b", "task_c"] and info["examples"] == 8
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_public_host_prints_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    from ia3fuse.studio.server import warn_if_public

    warn_if_public("127.0.0.1")
    assert capsys.readouterr().err == ""
    warn_if_public("0.0.0.0")
    assert capsys.readouterr().err.startswith(
        "ia3fuse: warning: the studio listens on 0.0.0.0, beyond this machine, and has no authentication"
    )
