"""The studio in a real browser: Debian's Chromium (``apt-get install chromium``) driven by
Playwright, against the server on a free localhost port with the built-in demo.

It moves a slider and checks the shown outputs against the studio's own computation (which
tests/test_studio.py checks against PEFT, `Mixture` and `merge`), edits the per-layer map, runs
a search, exports, and loads the export with PEFT. A screenshot is saved to
``$IA3FUSE_ARTIFACTS`` (default: the test's temporary folder).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra has it)")

from ia3fuse.search import read_records
from ia3fuse.studio import Studio, StudioServer
from ia3fuse.studio.demo import build_studio_demo

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("IA3FUSE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# as root in a sandbox, with no network: no sandbox, no GPU, no background connections
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Any:
    if CHROMIUM is None:
        pytest.skip("no chromium executable (apt-get install chromium, or set IA3FUSE_CHROMIUM)")
    root = tmp_path_factory.mktemp("studio-browser")
    base, tok, base_dir, adapter_dirs, data = build_studio_demo(root)
    studio = Studio(base, adapter_dirs, tokenizer=tok, records=read_records(data), base_dir=base_dir, title="demo")
    server = StudioServer(studio, port=0)
    server.start()
    with sync_api.sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        except Exception as exc:  # noqa: BLE001 - a browser that cannot start here is a skip with its reason
            server.stop()
            studio.close()
            pytest.skip(f"chromium at {CHROMIUM} does not start: {str(exc).splitlines()[0]}")
        tab = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.goto(server.url)
        tab.wait_for_function("Number(document.body.dataset.version) >= 1 && document.body.dataset.pending === '0'")
        yield tab, studio, root, errors
        browser.close()
    server.stop()
    studio.close()


def _settle(tab: Any, after: int) -> None:
    tab.wait_for_function(
        f"Number(document.body.dataset.version) > {after} && document.body.dataset.pending === '0'", timeout=60_000
    )


def _version(tab: Any) -> int:
    return int(tab.evaluate("document.body.dataset.version"))


def _shown(tab: Any, studio: Studio) -> list[str]:
    rows = len(studio.default_prompts())
    return [tab.inner_text(f"#out-{i}-fusion") for i in range(rows)]


def _expected(studio: Studio, fusion: dict[str, Any]) -> dict[str, Any]:
    return studio.outputs(fusion, studio.default_prompts(), max_new_tokens=20)


def _fusion_column(out: dict[str, Any]) -> list[str]:
    return [row[-1] for row in out["rows"]]


def test_the_page_shows_the_uniform_fusion_first(page: Any) -> None:
    tab, studio, _, errors = page
    third = round(1 / 3, 4)
    want = _expected(studio, {"weights": [third] * 3})
    assert _shown(tab, studio) == _fusion_column(want)
    assert float(tab.get_attribute("#score-fusion-loss", "data-value")) == pytest.approx(
        want["scores"]["fusion"]["loss"], rel=1e-9
    )
    assert tab.input_value("#method") == "task_arithmetic"
    assert errors == []


def test_moving_a_slider_changes_the_output_to_that_fusion(page: Any) -> None:
    tab, studio, _, errors = page
    before = _shown(tab, studio)
    v = _version(tab)
    tab.fill("#slider-0", "1.5")  # a range input: fill sets its value and fires input
    _settle(tab, v)
    third = round(1 / 3, 4)
    want = _expected(studio, {"weights": [1.5, third, third]})
    shown = _shown(tab, studio)
    assert shown != before
    assert shown == _fusion_column(want)
    assert tab.input_value("#weight-0") == "1.5"
    assert float(tab.get_attribute("#score-fusion-loss", "data-value")) == pytest.approx(
        want["scores"]["fusion"]["loss"], rel=1e-9
    )
    assert errors == []


def test_a_bad_parameter_shows_one_line_and_the_page_recovers(page: Any) -> None:
    tab, studio, _, _ = page
    tab.select_option("#method", "ties")
    v = _version(tab)
    tab.fill("#param-density", "5")
    _settle(tab, v)
    message = tab.inner_text("#error")
    assert "density" in message and "\n" not in message and "Traceback" not in message
    v = _version(tab)
    tab.fill("#param-density", "0.5")
    _settle(tab, v)
    assert tab.is_hidden("#error")
    fusion = tab.evaluate("fusion()")
    assert fusion["method"] == "ties" and fusion["params"]["density"] == 0.5
    assert _shown(tab, studio) == _fusion_column(_expected(studio, fusion))


def test_the_layer_map_takes_a_depth_gradient(page: Any) -> None:
    tab, studio, _, _ = page
    v = _version(tab)
    tab.check("#per-layer")
    _settle(tab, v)
    tab.select_option("#grad-adapter", "1")
    tab.fill("#grad-from", "-0.5")
    tab.fill("#grad-to", "1.25")
    v = _version(tab)
    tab.click("#grad-apply")
    _settle(tab, v)
    assert [tab.input_value(f"#cell-1-{g}") for g in range(2)] == ["-0.5", "1.25"]
    fusion = tab.evaluate("fusion()")
    assert fusion["layer_weights"][1] == [-0.5, 1.25]
    assert _shown(tab, studio) == _fusion_column(_expected(studio, fusion))


def test_a_search_from_the_page_loads_its_weights_into_the_sliders(page: Any) -> None:
    tab, studio, _, _ = page
    tab.select_option("#method", "task_arithmetic")
    tab.select_option("#granularity", "layer")
    tab.fill("#budget", "12")
    v = _version(tab)
    tab.click("#search-run")
    tab.wait_for_function(
        "document.getElementById('search-status').textContent.startsWith('done')"
        " || document.getElementById('search-status').textContent === 'search failed'",
        timeout=120_000,
    )
    assert tab.inner_text("#search-status").startswith("done: loss ")
    _settle(tab, v)
    assert tab.locator("#curve polyline").count() == 1
    fusion = tab.evaluate("fusion()")
    assert fusion["layer_weights"] is not None and tab.is_checked("#per-layer")
    for k, row in enumerate(fusion["layer_weights"]):
        assert float(tab.input_value(f"#cell-{k}-0")) == pytest.approx(row[0], abs=1e-4)
    loss = float(tab.get_attribute("#score-fusion-loss", "data-value"))
    final = float(tab.inner_text("#search-status").split("→ ")[1].split(";")[0])
    assert loss == pytest.approx(final, abs=1e-4)


def test_export_from_the_page_loads_in_peft_and_a_screenshot_is_kept(page: Any) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tab, studio, root, errors = page
    out = root / "exported"
    tab.fill("#export-folder", str(out))
    tab.click("#export-run")
    tab.wait_for_function("document.getElementById('export-status').textContent.startsWith('wrote')")
    assert tab.inner_text("#export-status") == f"wrote adapter/, recipe.yaml in {out}"
    fusion = tab.evaluate("fusion()")
    fused = studio.fuse(studio.fusion(fusion))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(studio.base_dir)), str(out / "adapter"))
    for path, vec in fused.vectors.items():
        layer = model.base_model.model.get_submodule(path)
        assert torch.equal(layer.ia3_l["default"].detach().reshape(vec.shape), vec), path
    artifacts = Path(os.environ.get("IA3FUSE_ARTIFACTS") or root)
    artifacts.mkdir(parents=True, exist_ok=True)
    tab.screenshot(path=str(artifacts / "studio.png"), full_page=True)
    assert (artifacts / "studio.png").stat().st_size > 10_000
    # a second export to the same folder is refused in the page, and the folder is kept
    tab.click("#export-run")
    tab.wait_for_function("document.getElementById('export-status').textContent === 'export failed'")
    assert "already exists" in tab.inner_text("#error")
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "recipe.yaml"]
    assert errors == []
