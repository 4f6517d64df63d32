"""benchmarks/results/ holds current results only (issue #33): at most 150 files and 5 MB, and no `stale*` folder.
A benchmark keeps its latest results and one run file per task; superseded runs live in git history."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MAX_FILES, MAX_BYTES = 150, 5 * 1024 * 1024


def held_files(results: Path) -> list[Path]:
    """The files under `results` that the repository holds: tracked, or new and not ignored by git (a benchmark's
    ignored `work/` folder is not results); every file there when git cannot say."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--",
                                 str(results)], cwd=ROOT, capture_output=True, check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        return sorted(p for p in results.rglob("*") if p.is_file())
    return sorted(p for p in (ROOT / name for name in listed.split("\0") if name) if p.is_file())


def problems(results: Path, files: list[Path]) -> list[str]:
    found = []
    if len(files) > MAX_FILES:
        found.append(f"{len(files)} files (at most {MAX_FILES})")
    size = sum(f.stat().st_size for f in files)
    if size > MAX_BYTES:
        found.append(f"{size / 2**20:.2f} MB (at most {MAX_BYTES / 2**20:.0f} MB)")
    found += [f"a stale folder: {d.relative_to(results)}" for d in sorted(results.rglob("*"))
              if d.is_dir() and d.name.lower().startswith("stale")]
    return found


def test_the_results_folder_holds_current_results_only():
    files = held_files(RESULTS)
    assert files and all(f.is_relative_to(RESULTS) for f in files)
    assert problems(RESULTS, files) == []


def test_the_limits_catch_too_many_files_too_many_bytes_and_stale_folders(tmp_path):
    (tmp_path / "sparse_runs" / "Stale_runs").mkdir(parents=True)
    for i in range(MAX_FILES):
        (tmp_path / f"run{i}.json").write_text("{}")
    assert problems(tmp_path, held_files(tmp_path)) == ["a stale folder: sparse_runs/Stale_runs"]
    (tmp_path / "big.png").write_bytes(b"\0" * MAX_BYTES)
    assert problems(tmp_path, held_files(tmp_path)) == [
        f"{MAX_FILES + 1} files (at most {MAX_FILES})", f"{(MAX_BYTES + 2 * MAX_FILES) / 2**20:.2f} MB (at most 5 MB)",
        "a stale folder: sparse_runs/Stale_runs"]
