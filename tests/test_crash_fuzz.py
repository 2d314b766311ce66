"""Crash safety of the CLI's outputs under SIGKILL, and fuzzing of the adapter loader and the recipe parser.

Crash safety: ``ia3fuse merge`` and ``ia3fuse fold`` run as subprocesses and are killed with
SIGKILL at seeded moments: once during start-up, once just after the output appears, and the rest
spread over the write (from the moment the process's temporary sibling appears, as a fraction of
the write time an uninterrupted run took). Each trial is the rerun of the same command after the
previous kill (``--force`` when the output exists; every other trial first deletes it, so both
cases occur). After each kill the output is absent, or byte-identical to an uninterrupted run's;
the inputs never change. A killed writer leaves its temporary sibling (no cleanup can run); the
next write of that output removes it (its pid is dead). A last rerun must succeed.

Fuzzing: the strategies and targets live in ``benchmarks/fuzz.py`` (which runs them longer); here
each target gets ~150 derandomized hypothesis examples: anything but an IA3FuseError is a failure.

``pytest -s`` prints what was tried and seen.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from safetensors.torch import load_file, save_file

import ia3fuse
from ia3fuse import AdapterFormatError, RecipeError
from ia3fuse._io import atomic_output_dir
from factories import random_ia3_adapter, tiny_model
from ia3fuse.recipe import load_recipe, parse_recipe
from cli_runner import CLI
from test_cli import leftovers, snapshot

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fuzz  # benchmarks/fuzz.py: the shared strategies and targets

SUMMARY: dict[str, Any] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_summary() -> Iterator[None]:
    yield
    print("\n--- test_crash_fuzz summary ---")
    for key, value in SUMMARY.items():
        print(f"{key}: {json.dumps(value, default=str)}")


# --- crash safety -------------------------------------------------------------------------------

KILLS = {"merge": 8, "fold": 7}  # crash points per command; ~55 s in all on 2 cores
SEED = 20240531


@dataclass(frozen=True)
class Job:
    """A CLI command that writes ``out``, and how to check a complete output beyond its bytes."""

    name: str
    inputs: Path  # every input lies below
    argv: Callable[[Path], list[object]]
    check: Callable[[Path, Path], None]  # (output, reference output)


def _big_adapter(path: Path, seed: int, modules: int = 16, width: int = 1_000_000) -> Path:
    """A PEFT-layout IA3 adapter of 64 MB, so that writing a merge takes a measurable time."""
    gen = torch.Generator().manual_seed(seed)
    path.mkdir()
    save_file(
        {
            f"base_model.model.model.layers.{i}.self_attn.k_proj.ia3_l": 1 + 0.1 * torch.randn(width, 1, generator=gen)
            for i in range(modules)
        },
        str(path / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    (path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "IA3",
                "target_modules": ["k_proj"],
                "feedforward_modules": [],
                "base_model_name_or_path": "big",
            }
        )
    )
    return path


def _check_merge(out: Path, ref: Path) -> None:
    got, want = ia3fuse.load_adapter(out), ia3fuse.load_adapter(ref)
    assert list(got.vectors) == list(want.vectors)
    for p, v in want.vectors.items():
        assert got.vectors[p].dtype == v.dtype and torch.equal(got.vectors[p], v), p


def _check_fold(out: Path, ref: Path) -> None:
    """transformers loads it, and every tensor equals the reference fold's bit for bit."""
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(str(out))
    state = model.state_dict()
    index = json.loads((ref / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted(set(index.values())):
        for name, want in load_file(str(ref / shard)).items():
            got = state[name]
            assert got.dtype == want.dtype and torch.equal(got.view(torch.int32), want.view(torch.int32)), name


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    root = tmp_path_factory.mktemp("crash-inputs")
    a, b = _big_adapter(root / "A", 1), _big_adapter(root / "B", 2)
    # A llama of 6M parameters saved in 14 shards; the fold writes ~100 shards of 256 KB each.
    model = tiny_model(
        "llama", seed=0, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, vocab_size=4096, head_dim=64
    )
    model.save_pretrained(str(root / "base"), max_shard_size="2MB")
    adapter = random_ia3_adapter(model, root / "adapter", seed=1)
    return {
        "merge": Job("merge", root, lambda out: ["merge", a, b, "--weights", "0.7", "0.4", "-o", out], _check_merge),
        "fold": Job(
            "fold",
            root,
            lambda out: [
                "fold",
                "--base",
                root / "base",
                "--adapter",
                adapter,
                "-o",
                out,
                "--max-shard-size",
                "256KB",
                "--no-progress",
            ],
            _check_fold,
        ),
    }


@dataclass
class Run:
    pid: int
    returncode: int
    stderr: str
    t_tmp: Optional[float]  # seconds from start until this process's temporary sibling appeared
    t_out: Optional[float]  # ... until the output (a new one) appeared
    t_end: float
    killed_at: Optional[float] = None


def _ours(folder: Path, name: str, pid: int) -> list[str]:
    return [n for n in leftovers(folder, name) if ".tmp-" in n and f"-{pid}-" in n]


def _run(argv: list[object], out: Path, *, kill: Optional[tuple[str, float]] = None) -> Run:
    """Run the CLI, polling for its temporary sibling and its output; SIGKILL it as ``kill`` says:
    ("start", s): s seconds after the start; ("write", s): s seconds after its temporary sibling
    appeared; ("out", 0): as soon as the new output appears."""
    ino = out.stat().st_ino if out.exists() else None
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [*CLI, *map(str, argv)], stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )
        t_tmp = t_out = killed_at = None
        while proc.poll() is None:
            now = time.perf_counter() - t0
            if t_tmp is None and _ours(out.parent, out.name, proc.pid):
                t_tmp = now
            if t_out is None and out.exists() and out.stat().st_ino != ino:
                t_out = now
            due = None
            if kill is not None:
                phase, delay = kill
                due = {
                    "start": delay,
                    "write": None if t_tmp is None else t_tmp + delay,
                    "out": None if t_out is None else t_out,
                }[phase]
            if due is not None and now >= due:
                proc.kill()
                killed_at = now
                break
            time.sleep(0.001)
        proc.wait(timeout=120)
        t_end = time.perf_counter() - t0
        err.seek(0)
        stderr = err.read()
    return Run(proc.pid, proc.returncode, stderr, t_tmp, t_out, t_end, killed_at)


def _plan(n: int, rng: random.Random, t_tmp: float, write: float) -> list[tuple[str, float]]:
    """Crash points: one during start-up, one just after the output appears (so both outcomes
    occur whatever the timings), the rest stratified over [0, 1.15) of the write time."""
    spread = [("write", (i + rng.random()) / (n - 2) * 1.15 * write) for i in range(n - 2)]
    rng.shuffle(spread)
    return [("start", rng.uniform(0.1, 0.8) * t_tmp), *spread[:1], ("out", 0.0), *spread[1:]]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KILLS))
def test_sigkill_leaves_no_output_or_a_complete_one(name: str, jobs: dict[str, Job], tmp_path: Path) -> None:
    job = jobs[name]
    start = time.perf_counter()
    inputs_before = snapshot(job.inputs)

    ref = tmp_path / "ref" / "OUT"
    ref.parent.mkdir()
    first = _run(job.argv(ref), ref)
    assert first.returncode == 0, first.stderr
    assert first.t_tmp is not None and first.t_out is not None, first
    write = first.t_out - first.t_tmp  # from temporary sibling to renamed output

    work = tmp_path / "work"
    work.mkdir()
    out = work / "OUT"
    (work / "neighbour").mkdir()  # the reruns must leave it (and the inputs) alone
    (work / "neighbour" / "keep.txt").write_text("mine")
    (work / ".OTHER.tmp-x").mkdir()  # another output's temporary sibling
    neighbours = snapshot(work)

    rng = random.Random(SEED + len(name))
    trials, outcomes, first_complete_checked = [], Counter(), False
    for i, (phase, delay) in enumerate(_plan(KILLS[name], rng, first.t_tmp, write)):
        if out.exists() and i % 2 == 0:  # every other trial starts with no output
            shutil.rmtree(out)
        existed = out.exists()
        ino = out.stat().st_ino if existed else None
        run = _run(job.argv(out) + (["--force"] if existed else []), out, kill=(phase, delay))
        assert run.returncode in (0, -signal.SIGKILL), run.stderr  # killed, or done before the kill
        tmp_left = [n for n in leftovers(work, "OUT") if ".tmp-" in n]
        partial = [p for n in tmp_left for p in (work / n).iterdir()]  # how far the killed write got
        old_left = [n for n in leftovers(work, "OUT") if ".old-" in n]
        if run.t_tmp is not None:  # it reached the write: earlier kills' temporary siblings are gone
            assert all(f"-{run.pid}-" in n for n in tmp_left), tmp_left
        if out.exists():
            assert snapshot(out) == snapshot(ref), f"trial {i}: a partial or different output"
            if not first_complete_checked:
                job.check(out, ref)
                first_complete_checked = True
            outcome = "complete" if out.stat().st_ino != ino else "complete (previous kept)"
        else:
            outcome = "absent"
            # A kill between the two renames of --force: the previous copy waits in .OUT.old-*/x.
            for n in old_left:
                if (work / n / "x").exists():
                    assert snapshot(work / n / "x") == snapshot(ref)
                    outcome = "absent (previous in .old-)"
        outcomes[outcome] += 1
        assert snapshot(job.inputs) == inputs_before
        trials.append(
            {
                "phase": phase,
                "at_s": None if run.killed_at is None else round(run.killed_at, 3),
                "after_tmp_ms": None
                if run.killed_at is None or run.t_tmp is None
                else round(1000 * (run.killed_at - run.t_tmp), 1),
                "force": existed,
                "outcome": outcome,
                "tmp_left": len(tmp_left),
                "old_left": len(old_left),
                "partial_files": len(partial),
                "partial_bytes": sum(p.stat().st_size for p in partial),
                "exit": run.returncode,
            }
        )

    final = _run(job.argv(out) + (["--force"] if out.exists() else []), out)
    assert final.returncode == 0, final.stderr
    assert snapshot(out) == snapshot(ref)
    job.check(out, ref)
    assert [n for n in leftovers(work, "OUT") if ".tmp-" in n] == []  # the killed writers' siblings were removed
    left = snapshot(work)
    for key in list(left):
        if key == "OUT" or key.startswith(("OUT/", ".OUT.old-")):
            del left[key]
    assert left == neighbours
    assert snapshot(job.inputs) == inputs_before

    assert outcomes["absent"] >= 1 and outcomes["complete"] >= 1, outcomes  # guaranteed by the plan
    SUMMARY[f"crash {name}"] = {
        "uninterrupted_s": round(first.t_end, 2),
        "temp_sibling_at_s": round(first.t_tmp, 2),
        "write_s": round(write, 3),
        "crash_points": len(trials),
        "outcomes": dict(outcomes),
        "tmp_left_after_kills": sum(t["tmp_left"] for t in trials),
        "old_left_at_end": len([n for n in leftovers(work, "OUT") if ".old-" in n]),
        "trials": trials,
        "test_s": round(time.perf_counter() - start, 1),
    }


def test_next_write_removes_only_dead_writers_temporary_siblings(tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    with atomic_output_dir(out) as tmp:
        name = tmp.name
        (tmp / "f").write_text("x")
    me = f"-{os.getpid()}-"
    assert name.startswith(".OUT.tmp-") and me in name
    writer = name[: name.index(me)]  # ".OUT.tmp-<host and pid namespace>"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid = int(dead.stdout)  # exited and reaped
    stale = tmp_path / f"{writer}-{dead_pid}-abc123_z"
    keep = [
        tmp_path / f"{writer}-{os.getpid()}-live0001",  # a live writer (this process)
        tmp_path / f".OUT.tmp-00000000-{dead_pid}-otherhst",  # another host or pid namespace
        tmp_path / ".OUT.tmp-abc123_z",  # named as before pids were recorded: owner unknown
        tmp_path / ".OUT.old-abc123_z",  # may hold the only complete copy
        tmp_path / f".OUT2{writer[len('.OUT') :]}-{dead_pid}-abc123_z",  # another output's
    ]
    for d in [stale, *keep]:
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "data").write_text("partial")
    (tmp_path / f"{writer}-{dead_pid}-file0001").write_text("a file, not a writer's directory")
    before = snapshot(tmp_path)

    ia3fuse.IA3Adapter({"m": torch.ones(2, 1)}, {"m": False}, {"peft_type": "IA3"}).save(out, overwrite=True)

    after = snapshot(tmp_path)
    gone = {k for k in before if k not in after and not k.startswith("OUT/")}
    assert gone == {stale.name, f"{stale.name}/sub", f"{stale.name}/sub/data"}
    assert all(d.is_dir() for d in keep)
    assert (out / "adapter_model.safetensors").is_file()


# --- fuzzing ------------------------------------------------------------------------------------

FUZZ_EXAMPLES = 150
FUZZ_SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module")
def seed_files() -> tuple[tuple[str, bytes], ...]:
    return fuzz.seed_adapter()


def test_fuzz_adapter_loader_raises_only_ia3fuse_errors(seed_files: Any, tmp_path: Path) -> None:
    outcomes: Counter = Counter()

    @FUZZ_SETTINGS
    @given(case=fuzz.adapter_cases(seed_files))
    def one(case: fuzz.AdapterCase) -> None:
        outcomes[fuzz.run_adapter_case(case, tmp_path)] += 1  # anything but an IA3FuseError fails here

    start = time.perf_counter()
    one()
    SUMMARY["fuzz adapter loader"] = {
        "inputs": sum(outcomes.values()),
        "outcomes": dict(outcomes),
        "seconds": round(time.perf_counter() - start, 1),
    }
    assert sum(outcomes.values()) >= FUZZ_EXAMPLES
    assert outcomes["ok"] and outcomes["AdapterFormatError"], outcomes  # both paths ran


def test_fuzz_recipe_parser_raises_only_recipe_errors(tmp_path: Path) -> None:
    outcomes: Counter = Counter()

    @FUZZ_SETTINGS
    @given(case=fuzz.recipe_cases())
    def one(case: fuzz.RecipeCase) -> None:
        outcomes[fuzz.run_recipe_case(case, tmp_path)] += 1

    start = time.perf_counter()
    one()
    SUMMARY["fuzz recipe parser"] = {
        "inputs": sum(outcomes.values()),
        "outcomes": dict(outcomes),
        "seconds": round(time.perf_counter() - start, 1),
    }
    assert sum(outcomes.values()) >= FUZZ_EXAMPLES
    assert set(outcomes) == {"ok", "RecipeError"}, outcomes  # the parser raises RecipeError alone


# What the fuzzers found (each was a non-ia3fuse exception before the fix), kept as plain cases.


def _edit_config(seed_files: Any, path: Path, text: str) -> Path:
    fuzz.AdapterCase({**dict(seed_files), "adapter_config.json": text.encode()}).write(path)
    return path


def _config_with(**changes: Any) -> Callable[[dict], str]:
    return lambda config: json.dumps({**config, **changes})


ADAPTER_FINDINGS = {
    "deep_json": (lambda c: "[" * 100_000 + "]" * 100_000, "is not valid JSON (maximum recursion depth exceeded"),
    "huge_int": (
        lambda c: json.dumps({**c, "r": 0}).replace('"r": 0', '"r": ' + "9" * 5000),
        "is not valid JSON (Exceeds the limit",
    ),
    "bad_regex": (
        _config_with(feedforward_modules="(down_proj"),
        "feedforward_modules '(down_proj' is not a valid regular expression",
    ),
    "bad_target_regex": (
        _config_with(target_modules="[z-a]"),
        "target_modules '[z-a]' is not a valid regular expression",
    ),
    "none_in_list": (
        _config_with(feedforward_modules=["down_proj", None]),
        "feedforward_modules holds None (a NoneType)",
    ),
    "int_in_list": (_config_with(target_modules=[3]), "target_modules holds 3 (a int)"),
}


@pytest.mark.parametrize("finding", list(ADAPTER_FINDINGS))
def test_fuzz_findings_in_adapter_config(finding: str, seed_files: Any, tmp_path: Path) -> None:
    edit, phrase = ADAPTER_FINDINGS[finding]
    config = json.loads(dict(seed_files)["adapter_config.json"])
    path = _edit_config(seed_files, tmp_path / "a", edit(config))
    with pytest.raises(AdapterFormatError) as info:
        ia3fuse.load_adapter(path)
    assert phrase in str(info.value)


def test_fuzz_finding_fp8_vector_is_refused(seed_files: Any, tmp_path: Path) -> None:
    tensors = load_file(
        str(
            _edit_config(seed_files, tmp_path / "a", dict(seed_files)["adapter_config.json"].decode())
            / "adapter_model.safetensors"
        )
    )
    key = min(tensors)
    tensors[key] = tensors[key].to(torch.float8_e4m3fn)  # torch.isfinite is not implemented for it
    save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(
        AdapterFormatError, match=r"has dtype torch.float8_e4m3fn; IA3 vectors are floating point \(float32"
    ):
        ia3fuse.load_adapter(tmp_path / "a")


@pytest.mark.parametrize(
    "text, phrase",
    [
        ("!!float adapters: [a]\n", "could not convert string to float: 'adapters'"),
        ("adapters: [a]\nname: !!bool x\n", "is not valid YAML ('x')"),
        ("adapters: [a]\nname: !!timestamp x\n", "is not valid YAML ("),
        ("adapters: [a]\nweights: !!int 0x\n", "invalid literal for int()"),
        ("[" * 5000 + "]" * 5000, "is not valid YAML (maximum recursion depth exceeded"),
    ],
)
def test_fuzz_findings_in_recipe_yaml(text: str, phrase: str, tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "r.yaml")
    assert "is not valid YAML" in str(info.value) and phrase in str(info.value)


def test_fuzz_finding_overrides_not_a_list() -> None:
    with pytest.raises(RecipeError, match=r"weights.overrides is 0.5; pass a list of \{filter: REGEX"):
        parse_recipe({"adapters": ["a"], "weights": {"default": {}, "overrides": 0.5}})
