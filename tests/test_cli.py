"""The ``ia3fuse`` command: in-process through ``ia3fuse.cli.main`` (see ``cli_runner``), and
through its real entry point in a subprocess for a smoke test and, in the full suite, the whole
bad-input matrix again.

The inputs are built once per module and each test groups its assertions. Bad input must give
exit status 2, one ``ia3fuse: error:`` line naming the problem, untouched inputs and no output
(nor a temporary directory) left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import ia3fuse
from cli_runner import RUNNERS, run_cli
from factories import random_ia3_adapter, tiny_model


METHOD_PAPERS = {
    "linear": "https://arxiv.org/abs/2205.05638",
    "task_arithmetic": "https://arxiv.org/abs/2212.04089",
    "geometric": "https://arxiv.org/abs/2205.05638",
    "ties": "https://arxiv.org/abs/2306.01708",
    "dare_linear": "https://arxiv.org/abs/2311.03099",
    "dare_ties": "https://arxiv.org/abs/2311.03099",
    "magnitude_prune": "https://arxiv.org/abs/2306.01708",
    "breadcrumbs": "https://arxiv.org/abs/2312.06795",
    "svd": "https://arxiv.org/abs/2412.00081",
}
PREFIX = "base_model.model."
K_PROJ0 = "model.layers.0.self_attn.k_proj"


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links not followed): file hashes, directories, link targets."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(folder: Path, name: str) -> list[str]:
    """Temporary siblings that an interrupted atomic write of ``folder/name`` would leave."""
    if not folder.is_dir():
        return []
    return [n for n in os.listdir(folder) if n.startswith((f".{name}.tmp-", f".{name}.old-"))]


def vectors_of(path: Path) -> dict[str, torch.Tensor]:
    return ia3fuse.load_adapter(path).vectors


def assert_same_vectors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for p in want:
        assert got[p].dtype == want[p].dtype, p
        assert torch.equal(got[p], want[p]), p


def _copy_with(src: Path, dst: Path, change: Callable[[dict[str, torch.Tensor], dict], None]) -> Path:
    """Copy adapter ``src`` to ``dst`` after ``change(tensors, config)`` edits it in place."""
    tensors = load_file(str(src / "adapter_model.safetensors"))
    config = json.loads((src / "adapter_config.json").read_text())
    change(tensors, config)
    dst.mkdir()
    (dst / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


@dataclass(frozen=True)
class Inputs:
    root: Path  # holds every input below; no test writes here
    a: Path  # tiny llama, seed 1, base "tiny"
    b: Path  # seed 2, base "tiny"
    other_base: Path  # seed 3, base "other-base"
    wide: Path  # a llama with hidden size 48: k_proj/v_proj vectors (24, 1) instead of (16, 1)
    lora: Path
    k_ff: Path  # like a, but k_proj is declared feed-forward with (1, in) vectors
    nan: Path  # like a, with one NaN
    nonpositive: Path  # like a, with one value -0.5 (geometric cannot take its log)
    pickle_only: Path  # like a, saved as adapter_model.bin only


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    root = tmp_path_factory.mktemp("cli-inputs")
    model = tiny_model("llama", seed=0)
    a = random_ia3_adapter(model, root / "a", seed=1, base_name="tiny")
    b = random_ia3_adapter(model, root / "b", seed=2, base_name="tiny")
    other = random_ia3_adapter(model, root / "other_base", seed=3, base_name="other-base")
    # head_dim must change too: LlamaConfig fixes it at hidden_size // heads when built.
    wide = random_ia3_adapter(
        tiny_model("llama", seed=0, hidden_size=48, head_dim=12), root / "wide", seed=4, base_name="tiny"
    )

    lora = root / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"], "base_model_name_or_path": "tiny"})
    )
    save_file(
        {
            f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 32),
            f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 2),
        },
        str(lora / "adapter_model.safetensors"),
    )

    def k_feedforward(tensors: dict[str, torch.Tensor], config: dict) -> None:
        for key in list(tensors):
            if ".k_proj." in key:
                tensors[key] = torch.full((1, 32), 1.1)  # input side of k_proj: hidden size 32
        config["feedforward_modules"] = [*config["feedforward_modules"], "k_proj"]

    def poison(value: float) -> Callable[[dict[str, torch.Tensor], dict], None]:
        def change(tensors: dict[str, torch.Tensor], config: dict) -> None:
            tensors[f"{PREFIX}{K_PROJ0}.ia3_l"][3, 0] = value

        return change

    k_ff = _copy_with(a, root / "k_ff", k_feedforward)
    nan = _copy_with(a, root / "nan", poison(float("nan")))
    nonpositive = _copy_with(a, root / "nonpositive", poison(-0.5))

    pickle_only = root / "pickle_only"
    pickle_only.mkdir()
    shutil.copy(a / "adapter_config.json", pickle_only)
    torch.save(load_file(str(a / "adapter_model.safetensors")), pickle_only / "adapter_model.bin")

    return Inputs(root, a, b, other, wide, lora, k_ff, nan, nonpositive, pickle_only)


# --- happy paths ------------------------------------------------------------------------------


def test_merge_flags_writes_the_api_result_with_model_card(inputs: Inputs, tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    before = snapshot(inputs.root)
    res = run_cli(
        "merge",
        inputs.a,
        inputs.b,
        "--weights",
        "0.3",
        "0.7",
        "--method",
        "ties",
        "--density",
        "0.5",
        "-o",
        out,
        cwd=tmp_path,
        real=True,
    )  # the installed console script, end to end
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert f"wrote {out}" in res.stdout and "ties" in res.stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["base_model_name_or_path"] == "tiny"
    card = (out / "README.md").read_text()
    assert "ties" in card and "0.3" in card and "0.7" in card and "density: 0.5" in card
    want = ia3fuse.merge([inputs.a, inputs.b], [0.3, 0.7], "ties", density=0.5)
    assert_same_vectors(vectors_of(out), want.vectors)
    # The weights matter: an equal-weights fusion differs.
    other = ia3fuse.merge([inputs.a, inputs.b], [0.5, 0.5], "ties", density=0.5)
    assert any(not torch.equal(other.vectors[p], want.vectors[p]) for p in want.vectors)
    assert snapshot(inputs.root) == before
    assert leftovers(tmp_path, "OUT") == []


def test_merge_recipe_resolves_paths_against_its_folder(inputs: Inputs, tmp_path: Path) -> None:
    # The cwd sits at another depth, so a path taken relative to the cwd would miss.
    recipes, elsewhere = tmp_path / "recipes", tmp_path / "run" / "from" / "here"
    recipes.mkdir()
    elsewhere.mkdir(parents=True)
    override = r"layers\.1\.self_attn\.v_proj"
    (recipes / "fuse.yaml").write_text(
        textwrap.dedent(f"""\
        adapters:
          - {{path: {os.path.relpath(inputs.a, recipes)}, name: math}}
          - {{path: {os.path.relpath(inputs.b, recipes)}, name: code}}
        method: ties
        parameters: {{density: 0.5}}
        weights:
          default: {{math: 0.6, code: 0.4}}
          kinds:
            feedforward: {{math: 1.0, code: 0.2}}
          overrides:
            - filter: '{override}'
              weights: [0.1, 0.9]
        name: mathcode
        output: fused
        """)
    )
    res = run_cli("merge", os.path.relpath(recipes / "fuse.yaml", elsewhere), cwd=elsewhere)
    assert res.returncode == 0, res.stderr
    out = recipes / "fused"
    assert out.is_dir() and os.listdir(elsewhere) == []
    schedule = {
        "default": {"math": 0.6, "code": 0.4},
        "kinds": {"feedforward": {"math": 1.0, "code": 0.2}},
        "overrides": [{"filter": override, "weights": [0.1, 0.9]}],
    }
    want = ia3fuse.merge({"math": inputs.a, "code": inputs.b}, schedule, "ties", density=0.5)
    got = vectors_of(out)
    assert_same_vectors(got, want.vectors)
    # Each module took the weights the schedule gives it (ties fuses each module on its own).
    plain = {
        w: ia3fuse.merge([inputs.a, inputs.b], list(w), "ties", density=0.5).vectors
        for w in [(0.6, 0.4), (1.0, 0.2), (0.1, 0.9)]
    }
    for p in got:
        w = (
            (0.1, 0.9)
            if p == "model.layers.1.self_attn.v_proj"
            else (1.0, 0.2)
            if p.endswith("down_proj")
            else (0.6, 0.4)
        )
        assert torch.equal(got[p], plain[w][p]), p
    card = (out / "README.md").read_text()
    assert "# mathcode" in card and "math" in card and "code" in card


def test_merge_depth_gradient_with_force_over_an_existing_output(inputs: Inputs, tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    res = run_cli("merge", inputs.a, inputs.b, "--weights", "0,1", "0.5", "--force", "-o", out, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    # --force replaced the whole folder, atomically (no stale file, no temporary sibling).
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["OUT"]
    got = vectors_of(out)
    assert_same_vectors(got, ia3fuse.merge([inputs.a, inputs.b], [[0.0, 1.0], 0.5]).vectors)
    # By hand (task_arithmetic): layer 0 of 2 gets a's first anchor 0, layer 1 its last, 1.
    va, vb = vectors_of(inputs.a), vectors_of(inputs.b)
    for p in got:
        wa = 0.0 if ".layers.0." in p else 1.0
        assert torch.allclose(got[p], 1 + wa * (va[p] - 1) + 0.5 * (vb[p] - 1), atol=1e-6), p


def test_merge_different_bases_warns_but_fuses(inputs: Inputs, tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    res = run_cli("merge", inputs.a, inputs.other_base, "-o", out, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "ia3fuse: warning: the adapters name different base models" in res.stderr and "other-base" in res.stderr
    with pytest.warns(ia3fuse.IA3FuseWarning, match="different base models"):
        want = ia3fuse.merge([inputs.a, inputs.other_base])
    assert_same_vectors(vectors_of(out), want.vectors)


def _table_rows(text: str) -> list[list[str]]:
    """The body rows of a markdown table in ``text``, as stripped cells."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def test_inspect_lists_every_module_with_its_kind(inputs: Inputs) -> None:
    res = run_cli("inspect", inputs.a)
    assert res.returncode == 0, res.stderr
    assert "base model: tiny" in res.stdout and "modules: 6 (2 feed-forward)" in res.stdout
    rows = {r[0]: r for r in _table_rows(res.stdout)}
    expected = {
        f"model.layers.{i}.{m}": kind
        for i in (0, 1)
        for m, kind in [
            ("self_attn.k_proj", "attention"),
            ("self_attn.v_proj", "attention"),
            ("mlp.down_proj", "feedforward"),
        ]
    }
    assert set(rows) == set(expected)
    for path, kind in expected.items():
        assert rows[path][1] == kind, rows[path]
        assert rows[path][2] == ("1x64" if kind == "feedforward" else "16x1")


def _method_blocks(text: str) -> dict[str, dict[str, str]]:
    """``ia3fuse methods``: name -> its summary, parameters and paper, wrapped lines joined."""
    out: dict[str, dict[str, str]] = {}
    for block in text.strip().split("\n\n"):
        first, *rest = block.splitlines()
        name, summary = first.split(maxsplit=1)
        indent = first.index(summary)  # labels start where the summary does; their continuations further in
        fields, key = {"summary": summary}, "summary"
        for line in rest:
            label, _, value = line.strip().partition(": ")
            if label in ("parameters", "paper") and len(line) - len(line.lstrip()) == indent:
                fields[label], key = value, label
            else:
                fields[key] += " " + line.strip()
        out[name] = fields
    return out


def test_methods_lists_all_nine_with_papers_in_100_columns() -> None:
    res = run_cli("methods")
    assert res.returncode == 0, res.stderr
    assert max(len(line) for line in res.stdout.splitlines()) <= 100
    blocks = _method_blocks(res.stdout)
    assert set(blocks) == set(METHOD_PAPERS)
    for name, paper in METHOD_PAPERS.items():
        assert blocks[name]["paper"] == paper, blocks[name]
    for m in ia3fuse.methods():  # nothing is cut: every summary and default, whole
        params = ", ".join(f"{p.name}={p.default!r}" for p in m.params) or "-"
        assert blocks[m.name] == {"summary": m.summary, "parameters": params, "paper": m.paper}
    assert blocks["ties"]["parameters"] == "density=0.2, majority_sign_method='total', lam=1.0"


def test_demo_loads_every_method_in_peft(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    res = run_cli("demo", "--workdir", work, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows = {r[0]: r for r in _table_rows(res.stdout)}
    assert set(rows) == set(METHOD_PAPERS)
    for name, row in rows.items():
        assert row[3] == "yes", row
        assert (work / "fused" / name / "adapter_model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["demo"]


# --- bad input ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """Argv (built from the inputs and the test's folder) and the phrase the error must hold."""

    build: Callable[[Inputs, Path], list[object]]
    phrase: str
    out: Callable[[Inputs, Path], Path] = lambda i, t: t / "OUT"


def _pair(*extra: str) -> Callable[[Inputs, Path], list[object]]:
    return lambda i, t: ["merge", i.a, i.b, *extra, "-o", t / "OUT"]


def _existing_output(i: Inputs, t: Path) -> list[object]:
    (t / "OUT").mkdir()
    (t / "OUT" / "keep.txt").write_text("mine")
    return ["merge", i.a, i.b, "-o", t / "OUT"]


def _symlink_output(i: Inputs, t: Path) -> list[object]:
    (t / "real").mkdir()
    (t / "real" / "keep.txt").write_text("mine")
    (t / "OUT").symlink_to(t / "real", target_is_directory=True)
    return ["merge", i.a, i.b, "--force", "-o", t / "OUT"]


def _recipe(text: str, *extra: object) -> Callable[[Inputs, Path], list[object]]:
    def build(i: Inputs, t: Path) -> list[object]:
        (t / "r.yaml").write_text(text.format(a=i.a, b=i.b))
        return ["merge", t / "r.yaml", *extra]

    return build


_GOOD_RECIPE = "adapters: [{a}, {b}]\nmethod: ties\noutput: OUT\n"

BAD = {
    "lora": Case(lambda i, t: ["merge", i.a, i.lora, "-o", t / "OUT"], "not IA3"),
    "shapes": Case(lambda i, t: ["merge", i.a, i.wide, "-o", t / "OUT"], "different shapes"),
    "feedforward_flags": Case(lambda i, t: ["merge", i.a, i.k_ff, "-o", t / "OUT"], "feed-forward in one adapter"),
    "weight_count": Case(_pair("--weights", "0.5"), "weights has 1 value for 2 adapters"),
    "nan_weight": Case(_pair("--weights", "nan", "1"), "finite"),
    "nan_vector": Case(lambda i, t: ["merge", i.a, i.nan, "-o", t / "OUT"], "NaN/Inf"),
    "unknown_method": Case(_pair("--method", "tie"), "valid methods are:"),
    "foreign_parameter": Case(_pair("--method", "linear", "--density", "0.5"), "has no parameter 'density'"),
    "density_range": Case(_pair("--method", "ties", "--density", "1.5"), "density=1.5 is invalid"),
    "geometric_nonpositive": Case(
        lambda i, t: ["merge", i.a, i.nonpositive, "--method", "geometric", "-o", t / "OUT"], "must be > 0"
    ),
    "output_exists": Case(_existing_output, "already exists"),
    "output_is_input": Case(
        lambda i, t: ["merge", i.a, i.b, "--force", "-o", i.b], "is also an input", out=lambda i, t: i.b
    ),
    "output_inside_input": Case(
        lambda i, t: ["merge", i.a, i.b, "-o", i.a / "sub"], "lies inside the input", out=lambda i, t: i.a / "sub"
    ),
    "output_symlink": Case(_symlink_output, "symbolic link"),
    "recipe_yaml": Case(_recipe("adapters: [{a}, {b}\nmethod: ties\n"), "not valid YAML"),
    "recipe_unknown_key": Case(_recipe(_GOOD_RECIPE + "densty: 0.5\n"), "densty"),
    "recipe_and_flags": Case(_recipe(_GOOD_RECIPE, "--method", "linear"), "conflict with the recipe"),
    "no_output": Case(lambda i, t: ["merge", i.a, i.b], "no output directory"),
    "missing_adapter": Case(lambda i, t: ["merge", i.a, t / "nowhere", "-o", t / "OUT"], "does not exist"),
    "pickle_only": Case(lambda i, t: ["merge", i.a, i.pickle_only, "-o", t / "OUT"], "allow_pickle"),
    "output_parent_is_file": Case(
        lambda i, t: (t / "afile").write_text("x") and ["merge", i.a, i.b, "-o", t / "afile" / "OUT"],
        "is not a directory",
        out=lambda i, t: t / "afile" / "OUT",
    ),
    "demo_arch": Case(lambda i, t: ["demo", "--workdir", t / "w", "--arch", "foo"], "is not a built-in tiny model"),
    "strict_bases": Case(
        lambda i, t: ["merge", i.a, i.other_base, "--strict", "-o", t / "OUT"], "different base models"
    ),
}


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("case", list(BAD.values()), ids=list(BAD))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    case: Case, inputs: Inputs, tmp_path: Path, runner: str
) -> None:
    argv = case.build(inputs, tmp_path)
    out = case.out(inputs, tmp_path)
    before_inputs, before_here = snapshot(inputs.root), snapshot(tmp_path)
    res = run_cli(*argv, cwd=tmp_path, real=runner == "subprocess")
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ia3fuse: error: "), res.stderr
    assert case.phrase in lines[0]
    assert res.stdout == ""
    assert snapshot(inputs.root) == before_inputs
    assert snapshot(tmp_path) == before_here  # no output, no temporary directory, pre-existing OUT kept
    assert leftovers(out.parent, out.name) == []


def test_debug_shows_the_traceback(inputs: Inputs, tmp_path: Path) -> None:
    res = run_cli("--debug", "merge", inputs.a, inputs.lora, "-o", tmp_path / "OUT", cwd=tmp_path, real=True)
    assert res.returncode != 0
    assert "Traceback" in res.stderr and "AdapterFormatError" in res.stderr and "not IA3" in res.stderr
    assert not (tmp_path / "OUT").exists()


def test_force_never_replaces_a_folder_that_holds_an_input(inputs: Inputs, tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    for src in (inputs.a, inputs.b):
        shutil.copytree(src, out / "adapters" / src.name)
    before = snapshot(tmp_path)
    res = run_cli("merge", out / "adapters" / "a", out / "adapters" / "b", "--force", "-o", out, cwd=tmp_path)
    assert snapshot(tmp_path) == before, "the input adapters were deleted"
    assert res.returncode == 2 and res.stderr.startswith("ia3fuse: error: ")
    assert "contains the input" in res.stderr and "writing it would delete" in res.stderr


# --- entry points, imports, wording -----------------------------------------------------------

# Run in a fresh interpreter: the help of every command and a usage error, then the heavy
# libraries that got imported (none may be).
_NO_TORCH = """
import sys
import ia3fuse.cli as cli
for argv in (["--help"], ["merge", "--help"], ["search", "--help"], ["fold", "--help"], ["merge"], ["nope"]):
    try:
        cli.main(argv)
    except SystemExit:
        pass
print(sorted(m for m in ("torch", "transformers", "peft", "safetensors") if m in sys.modules))
"""


def test_help_and_usage_errors_import_no_torch() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-c", _NO_TORCH], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stderr
    assert "--density FLOAT" in res.stdout  # the method-parameter flags were built, from the registry
    assert "the following arguments are required: inputs" in res.stderr
    assert "invalid choice: 'nope'" in res.stderr
    assert res.stdout.splitlines()[-1] == "[]"


def test_python_m_ia3fuse_runs_the_command(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ia3fuse", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    res = run("--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: ia3fuse ") and "{merge,inspect,methods,fold,search,demo,studio}" in res.stdout
    res = run("methods")
    assert res.returncode == 0, res.stderr
    assert set(_method_blocks(res.stdout)) == set(METHOD_PAPERS)
    res = run("merge")  # a usage error: argparse's status 2, passed on by sys.exit
    assert res.returncode == 2 and "required: inputs" in res.stderr


def test_merge_counts_adapters_in_the_singular_and_plural(inputs: Inputs, tmp_path: Path) -> None:
    res = run_cli("merge", inputs.a, "-o", tmp_path / "one", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"wrote {tmp_path / 'one'} (task_arithmetic, 1 adapter)\n"
    res = run_cli("merge", inputs.a, inputs.b, "--method", "ties", "-o", tmp_path / "two", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"wrote {tmp_path / 'two'} (ties, 2 adapters)\n"


def test_count_says_one_noun_and_other_nouns() -> None:
    from ia3fuse._text import count

    assert [count(n, "adapter") for n in (0, 1, 2)] == ["0 adapters", "1 adapter", "2 adapters"]
    assert count(1, "forward pass", "forward passes") == "1 forward pass"
    assert count(40, "forward pass", "forward passes") == "40 forward passes"


_LAZY_NAMES = """
import sys
import ia3fuse
print("torch" in sys.modules)
import ia3fuse.merging, ia3fuse.folding.gguf, ia3fuse.fusion.registry  # no submodule shadows a function
print([type(getattr(ia3fuse, n)).__name__ for n in ("merge", "fold", "methods")])
print([n for n in ia3fuse.__all__ if not callable(getattr(ia3fuse, n))], callable(ia3fuse.search.load_model))
"""


def test_public_names_load_on_first_use_and_stay_the_functions() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-c", _LAZY_NAMES], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["False", "['function', 'function', 'function']", "[] True"]


def test_main_restores_the_global_state_it_touches(
    inputs: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ia3fuse.cli.main sets HF_HUB_OFFLINE, its warning printer and quieter dependency loggers
    while it runs, then restores all three."""
    import logging
    import warnings

    from ia3fuse.cli import main

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hook = warnings.showwarning
    import ia3fuse.merging

    noisy = logging.getLogger("torchao")  # import noise of a dependency: quiet while the command runs
    monkeypatch.setattr(noisy, "level", logging.INFO)
    seen = []
    real = ia3fuse.merging.run_recipe

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(noisy.level)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ia3fuse.merging, "run_recipe", spy)
    assert main(["merge", str(inputs.a), str(inputs.b), "-o", str(tmp_path / "out")]) == 0
    assert "HF_HUB_OFFLINE" not in os.environ and warnings.showwarning is hook
    assert seen == [logging.ERROR] and noisy.level == logging.INFO
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert main(["merge", str(inputs.a), str(inputs.lora), "-o", str(tmp_path / "bad")]) == 2
    assert os.environ["HF_HUB_OFFLINE"] == "0" and warnings.showwarning is hook


def test_a_missing_optional_package_is_one_error_type_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import ia3fuse
    from ia3fuse.search.optim import run_cma

    monkeypatch.setitem(sys.modules, "cma", None)  # importing it raises ImportError
    with pytest.raises(ia3fuse.MissingDependencyError) as caught:
        run_cma(
            lambda theta, grad: (0.0, 0.0, None),
            torch.zeros(2),
            budget=2,
            cost=1,
            sigma0=0.1,
            popsize=None,
            bounds=None,
            seed=0,
        )
    assert isinstance(caught.value, ImportError) and isinstance(caught.value, ia3fuse.IA3FuseError)
    assert str(caught.value) == "optimizer 'cma' needs the cma package; install it with pip install 'ia3fuse[search]'"
    assert (caught.value.package, caught.value.extra) == ("cma", "search")


def test_a_closed_pipe_is_not_an_error() -> None:
    """`ia3fuse methods | head -1`: the reader closes the pipe early; no traceback, status 0."""
    from cli_runner import CLI

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([*CLI, "methods"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the command prints (it imports for a second first)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == ""
