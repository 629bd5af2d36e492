"""Run every benchmark and collect their tables into ``benchmarks/RESULTS.md``.

Each benchmark is a standalone script that measures embed_assets against its peer *in the same run* and
prints Markdown tables; this driver records the machine, the library versions, the exact command, the wall
time and the peak memory (VmHWM) of each, and writes one report.

    python benchmarks/run_all.py                 # all
    python benchmarks/run_all.py --only serve,eval
    python benchmarks/run_all.py --skip mining-10k   # without the issue-size mining run (~45 min the first time)

``mining-10k`` (10K queries x 50K passages) keeps its phases in ``benchmarks/.work/mining-10k``: a re-run
resumes the phases already measured with the same settings (the report says which and when).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata as md
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: name -> (script, extra arguments). Sizes are the scripts' defaults, chosen to finish on a 2-core CPU.
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "serve": ("serve.py", []),
    "mining": ("mining.py", []),
    "mining-10k": (
        "mining.py",
        [
            "--queries",
            "10000",
            "--passages",
            "50000",
            "--max-seq-length",
            "128",
            "--work-dir",  # resumable state, git-ignored; relative to the repository root (the scripts' cwd)
            "benchmarks/.work/mining-10k",
        ],
    ),
    "eval": ("eval.py", ["--max-seq-length", "128"]),
    "quality": ("quality.py", []),
    "training": ("training.py", []),
    "pipeline": ("pipeline.py", []),
    # corpora and passage embeddings are generated once into the work folder (resumable, git-ignored)
    "scale": ("scale.py", ["--work-dir", "benchmarks/.work/scale"]),
}


def machine_info() -> list[str]:
    """Lines describing the machine and the versions that matter for the numbers."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = []
    for pkg in (
        "torch",
        "sentence-transformers",
        "transformers",
        "onnxruntime",
        "faiss-cpu",
        "dagster",
        "beir",
    ):
        try:
            versions.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            versions.append(f"{pkg} (not installed)")
    cuda = "no"
    try:
        import torch

        cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no"
    except ImportError:
        pass
    return [
        f"- date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {os.cpu_count()} cores ({cpu}), {mem_gib:.0f} GiB RAM, CUDA: {cuda}",
        f"- python {platform.python_version()}; " + ", ".join(versions),
    ]


def _process_tree(root: int) -> list[int]:
    """``root`` and its live descendants (from /proc/<pid>/task/<tid>/children)."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def run_one(script: str, args: list[str]) -> tuple[int, str, float, float]:
    """Run a benchmark script; return (exit code, stdout, seconds, peak RSS in MiB of its largest process)."""
    cmd = [sys.executable, str(HERE / script), *args]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=sys.stderr, text=True, cwd=HERE.parent)
    peak_kib = 0
    out_chunks: list[str] = []
    # Poll the child's high-water mark while it runs (it is gone once it exits).
    while proc.poll() is None:
        # The largest high-water mark among the script and its worker processes (pipeline.py uses workers).
        for pid in _process_tree(proc.pid):
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak_kib = max(peak_kib, int(line.split()[1]))
            except OSError:
                pass
        time.sleep(0.5)
    out_chunks.append(proc.stdout.read() if proc.stdout else "")
    return proc.returncode, "".join(out_chunks), time.monotonic() - start, peak_kib / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    parser.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args(argv)
    skipped = [b for b in args.skip.split(",") if b]
    selected = [b for b in ([b for b in args.only.split(",") if b] or list(BENCHMARKS)) if b not in skipped]
    unknown = (set(selected) | set(skipped)) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")

    report = ["# embed_assets benchmarks", "", *machine_info(), ""]
    summary = ["| benchmark | exit | wall s | peak RSS MiB |", "|---|---|---|---|"]
    sections = []
    failed = False
    for name in selected:
        script, extra = BENCHMARKS[name]
        if not (HERE / script).exists():
            sections += [f"## {name}", "", f"_not available: benchmarks/{script} is missing_", ""]
            continue
        print(f"== {name}: {script} {' '.join(extra)}", file=sys.stderr, flush=True)
        code, out, seconds, peak = run_one(script, extra)
        failed |= code != 0
        summary.append(f"| {name} | {code} | {seconds:.0f} | {peak:.0f} |")
        sections += [
            f"## {name}",
            "",
            f"`python benchmarks/{script} {' '.join(extra)}`".replace(" `", "`"),
            "",
            out.strip(),
            "",
        ]
    Path(args.output).write_text("\n".join([*report, *summary, "", *sections]) + "\n", encoding="utf-8")
    print(f"wrote {args.output}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
