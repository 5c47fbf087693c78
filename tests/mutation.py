"""The mutation run (`make mutation`, not part of `make test`): mutmut over the decision and format core.

Each target is one module (or the named functions of one) and the fast, Ray-free test files that
cover it. mutmut 3 copies the sources into ``mutants/`` and reads one ``[tool.mutmut]`` section, so
every target runs in its own scratch folder (``build/mutation/NAME``) holding a copy of the repository's
code and tests and a pyproject.toml with that target's section: one module mutated, its test files
selected. Inside a run mutmut maps each test to the functions it executes and runs, per mutant, only
the tests that reach the mutated function.

A module too big for one run is split into targets by functions (``dedup``: the helpers, called
directly by fast tests; ``dedup-decide``: the edges, clusters, applied columns and explain, reached
through plans run in this process).

Usage: python tests/mutation.py [NAME ...] [--jobs N] [--show] [--retest] [--no-run]
Prints killed / total per target and writes build/mutation/summary.json; with --show, the diff of
every surviving mutant (the equivalent ones are listed with their reason in docs/TESTING.md).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "build" / "mutation"


@dataclass(frozen=True)
class Target:
    path: str  # the module mutated
    tests: tuple[str, ...]  # the test files (or node ids) run against its mutants
    functions: tuple[str, ...] = ()  # only these functions / methods; empty: the whole module
    deselect: tuple[str, ...] = ()  # test node ids left out (they need Ray or a subprocess)


TARGETS: dict[str, Target] = {
    "filter": Target(
        "curate/stages/filter.py",
        ("tests/filter/test_filter_rules.py", "tests/filter/test_filter_stage.py::test_size_format_and_caption_rules",
         "tests/filter/test_filter_stage.py::test_datacomp_basic_preset", "tests/filter/test_language.py"),
        deselect=("tests/filter/test_language.py::test_rejects_carry_language_and_score_through_the_runner",
                  "tests/filter/test_language.py::test_demo_pipeline_drops_no_english_title",
                  "tests/filter/test_language.py::test_unknown_detector_from_the_cli"),
    ),
    "schedule": Target("trainer/schedule.py", ("tests/trainer/test_schedule.py",)),
    "clip-selection": Target(
        "curate/stages/clip.py",
        ("tests/clip/test_clip_selection.py",),
        ("sortable_bits", "_scored", "_hist_high", "_hist_low", "_tied_uids", "_merge", "_descend",
         "top_threshold", "keep_top", "ClipStage._reasons"),
    ),
    "phash": Target(
        "curate/phash.py",
        ("tests/dedup/test_phash.py", "tests/dedup/test_phash_oracle.py"),
        # quality measures on 800 px photos (16 s a run): the oracle tests pin the same code exactly
        deselect=("tests/dedup/test_phash.py::test_bytes_path_close_to_imagehash_and_pil_path",
                  "tests/dedup/test_phash.py::test_near_duplicates_close_distinct_far"),
    ),
    "neardup": Target(
        "curate/neardup.py",
        ("tests/dedup/test_leader_clusters.py", "tests/dedup/test_neardup.py"),
        # the decision core (clusters, equal keys, components) and the sort engine with its layout;
        # the faiss and distributed engines are checked against brute force by test_neardup
        ("leader_clusters", "_csr", "equal_key_pairs", "components", "near_pairs_sort", "_collapse", "_expand",
         "_table_pairs", "_equal_runs", "_sort_order", "block_layout", "tables", "popcount"),
        deselect=("tests/dedup/test_neardup.py::test_all_paths_equal_bruteforce[8-11]",),
    ),
    "dedup": Target(
        "curate/stages/dedup.py",
        ("tests/dedup/test_dedup_units.py",
         "tests/dedup/test_decisions.py::test_missing_color_column_is_named_with_the_fix"),
        # the helpers under the decisions, each called directly: caption keys, plan columns, crop
        # entries and their row pairs, exact keys, identity columns, pair searches, the refusal and
        # rule texts (the pydantic validators are decorated: mutmut skips them)
        ("normalize_caption", "_u64", "_colors", "_crops", "_near_groups", "_entries", "_rows_of", "_rule_key",
         "_near_in_groups", "_minhash_band_pairs", "_sigs", "_identity", "_confirms", "missing_confirmation",
         "_rule_text"),
    ),
    "dedup-decide": Target(
        "curate/stages/dedup.py",
        ("tests/dedup/test_dedup_keep.py", "tests/dedup/test_decisions.py", "tests/dedup/test_dedup_stage.py",
         "tests/dedup/test_dedup_units.py"),
        # the rules' edges in one process, confirmation, clusters and the keep policy, the applied
        # columns, explain; not the scan (hashing, I/O) or the distributed engine's jobs
        ("_edges_local", "DedupStage._decide", "DedupStage.process", "DedupStage.explain"),
        deselect=("tests/dedup/test_decisions.py::test_report_and_inspect_show_dedup_clusters_with_distances",
                  # the three engines, and every rule combination, on the 330-row corpus (10 s each):
                  # test_decisions runs the engines and test_dedup_units the rules on small cases
                  "tests/dedup/test_dedup_stage.py::test_engines_identical",
                  "tests/dedup/test_dedup_stage.py::test_rules_combinations_and_keep_policy"),
    ),
    "dataset": Target(
        "curate/dataset.py",
        ("tests/core/test_dataset.py", "tests/core/test_commit_order.py", "tests/core/test_dataset_files.py"),
        # naming, the atomic commit and its debris, the committed-shard listing, reading bytes back
        ("tmp_name", "make_key", "digits_for", "tar_file_name", "Dataset.shard_name", "Dataset.tar_name",
         "Dataset.shard_path", "Dataset.write_bytes", "Dataset.write_manifest",
         "Dataset.rename", "Dataset.shard_ids", "Dataset.clear_shard", "Dataset.sweep_tmp", "Dataset.commit_shard",
         "Dataset._read", "write_parquet", "read_images"),
    ),
    # the Ray-free tests on datasets written straight to disk; tests/ops/test_removal.py (stage runs
    # on Ray, the CLI, S3) covers the same code end to end and is too slow for a run per mutant
    "removal": Target("curate/removal.py", ("tests/ops/test_removal_files.py",)),
    "train-loss": Target(
        "trainer/train.py",
        ("tests/trainer/test_loss.py",),
        ("make_loss", "_Weighted.forward", "train_step", "_grad_sync"),
    ),
}

# what the copied tests read besides the code (recipes travel inside trainer/; dedup_data reads the corpus)
ALSO_COPY = ("bench/data", "pipelines", "demo/corpus")
COPY = ("curate", "trainer", "tests", *ALSO_COPY, "pyproject.toml")


def _module(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def _patterns(t: Target) -> list[str]:
    mod = _module(t.path)
    out = []
    for fn in t.functions:
        if "." in fn:  # Class.method
            cls, meth = fn.split(".")
            out.append(f"{mod}.xǁ{cls}ǁ{meth}__mutmut_*")
        else:
            out += [f"{mod}.x_{fn}__mutmut_*", f"{mod}.xǁ*ǁ{fn}__mutmut_*"]
    return out


def _prepare(name: str, t: Target) -> Path:
    work = OUT / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for rel in COPY:
        src = REPO / rel
        if src.is_dir():
            shutil.copytree(src, work / rel, ignore=shutil.ignore_patterns("__pycache__", ".cache", "out"))
        elif src.exists():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / rel)
    missing = [p for p in t.tests if not (REPO / p.split("::")[0]).exists()]
    if missing:
        raise SystemExit(f"mutation target {name}: test files missing: {', '.join(missing)}")
    selection = [*t.tests, *(x for d in t.deselect for x in ("--deselect", d))]
    section = [
        "",
        "[tool.mutmut]",
        'source_paths = ["curate", "trainer"]',
        f"only_mutate = [{json.dumps(t.path)}]",
        f"pytest_add_cli_args_test_selection = {json.dumps(selection)}",
        f"also_copy = {json.dumps(list(ALSO_COPY))}",
        'pytest_add_cli_args = ["-q", "-p", "no:cacheprovider", "-m", "not gpu"]',
        # generous: on a shared 2-core machine a slow test must not pass for a killed mutant; a
        # mutant that really hangs is still stopped (and counted as detected, reported apart)
        "timeout_multiplier = 20.0",
        "timeout_constant = 30.0",
        "",
    ]
    with open(work / "pyproject.toml", "a", encoding="utf-8") as f:
        f.write("\n".join(section))
    return work


def _mutmut() -> str:
    exe = Path(sys.executable).with_name("mutmut")
    if not exe.exists():
        raise SystemExit("mutmut is not installed: pip install -e '.[dev]' (it is in the dev extra)")
    return str(exe)


def _results(work: Path, t: Target) -> dict[str, str]:
    from mutmut.stats import status_by_exit_code

    meta = work / "mutants" / (t.path + ".meta")
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    pats = _patterns(t)
    return {
        k: status_by_exit_code[v]
        for k, v in codes.items()
        if not pats or any(fnmatch.fnmatch(k, p) for p in pats)
    }


def _retest_names(work: Path, t: Target) -> list[str]:
    """Bring the current tests into a run and name its survivors and its unchecked mutants (a run
    that was stopped), to run them: tests added since only ever kill more, so the killed mutants
    stay killed. The mutated module must be unchanged since the run (its mutants are the old
    code); the other modules are brought up to date, as the current tests expect them."""
    if (REPO / t.path).read_bytes() != (work / t.path).read_bytes():
        raise SystemExit(f"{t.path} changed since its mutation run: run the target again, without --retest")
    for dest in (work / "tests", work / "mutants" / "tests"):
        shutil.rmtree(dest)
        shutil.copytree(REPO / "tests", dest, ignore=shutil.ignore_patterns("__pycache__"))
    for src in [*(REPO / "curate").rglob("*.py"), *(REPO / "trainer").rglob("*.py")]:
        rel = src.relative_to(REPO)
        if rel.as_posix() != t.path and "__pycache__" not in rel.parts:
            for dest in (work / rel, work / "mutants" / rel):
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)
    return [k for k, s in _results(work, t).items() if s not in ("killed", "timeout")]


def run(name: str, jobs: int, show: bool, again: bool = True, retest: bool = False) -> dict:
    """Mutate one target and run its tests (``again``: False reads the results of the last run;
    ``retest``: run the last run's survivors again against the current tests)."""
    t = TARGETS[name]
    work = OUT / name
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["RAY_ADDRESS"] = ""  # never reach a cluster from a mutant
    # mutmut forks each mutant from a process that ran the tests once: an OpenMP thread pool (faiss)
    # started there leaves the child waiting forever on a lock no thread holds (and a CPU-time
    # limit never fires on a process that sleeps); one thread starts no pool
    env["OMP_NUM_THREADS"] = "1"
    t0 = time.time()
    names = _retest_names(work, t) if again and retest else None
    if again and not (retest and not names):
        if not retest:
            _prepare(name, t)
        cmd = [_mutmut(), "run", "--max-children", str(jobs), *(names if retest else _patterns(t))]
        with open(work / "mutmut.log", "w", encoding="utf-8") as log:
            rc = subprocess.run(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            tail = (work / "mutmut.log").read_text(errors="replace")[-3000:]
            raise SystemExit(f"mutation target {name}: mutmut exited {rc}\n{tail}")
    res = _results(work, t)
    counts: dict[str, int] = {}
    for status in res.values():
        counts[status] = counts.get(status, 0) + 1
    detected = counts.get("killed", 0) + counts.get("timeout", 0)
    survivors = sorted(k for k, s in res.items() if s not in ("killed", "timeout"))
    summary = {
        "target": name,
        "module": t.path,
        "functions": list(t.functions),
        "tests": list(t.tests),
        "total": len(res),
        "killed": detected,
        "statuses": counts,
        "score": round(detected / len(res), 4) if res else None,
        "seconds": round(time.time() - t0, 1) if again else None,
        "survivors": survivors,
    }
    if show:
        for key in survivors:
            diff = subprocess.run([_mutmut(), "show", key], cwd=work, env=env, capture_output=True, text=True)
            print(diff.stdout)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"targets (default: all): {', '.join(TARGETS)}")
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--show", action="store_true", help="print the diff of every surviving mutant")
    ap.add_argument("--no-run", action="store_true", help="report the last run's results, run nothing")
    ap.add_argument("--retest", action="store_true",
                    help="run the last run's surviving and unchecked mutants against the current tests")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in TARGETS]
    if unknown:
        print(f"unknown mutation target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "summary.json"
    for name in args.names or list(TARGETS):
        s = run(name, args.jobs, args.show, again=not args.no_run, retest=args.retest)
        done = json.loads(path.read_text()) if path.exists() else {}  # another run may have added some
        done[name] = s
        path.write_text(json.dumps(done, indent=1, sort_keys=True) + "\n")
        print(f"{name:16} {s['module']:28} killed {s['killed']:4} / {s['total']:4}  "
              f"score {s['score']:.1%}  {s['statuses']}  {s['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
