"""Benchmark: converting a big checkpoint in parts, its wall time and peak memory.

    .venv/bin/python benchmarks/scale.py --preset qwen3-8b [--context 512] [--batch 64]
        [--max-chunk-mb 1024] [--lut N] [--keep DIR] [--no-baseline]

Three child processes, one after the other, each measured on its own (``os.wait4`` gives the
rusage of that one child, so nothing of this process or of another child is counted):

1. the writer: seeded random fp16 weights of the preset as a Hugging Face checkpoint folder
   (``write_random_checkpoint``, streamed shard by shard; shards of at most 4 GB as the published
   Qwen3 checkpoints have them); ``checkpoint_s`` is the write itself, without the child's
   imports (``checkpoint_wall_s`` with them);
2. the conversion: ``anefx convert FOLDER -o OUT --context C --batch B --max-chunk-mb M --json``
   (the stateful decoder in parts of at most M MB of weights; with more than one part OUT is a
   folder holding the parts' packages and ``manifest.json``). ``wall_s`` is its wall time,
   interpreter start-up included; ``peak_rss_gb`` its peak RSS; ``bytes_written`` the size of
   everything it wrote;
3. the baseline (unless --no-baseline): what the stock route holds before it can do anything,
   ``AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float16)`` with every weight read
   once (transformers memory-maps fp16 safetensors, so the load alone reads nothing; exporting
   or converting the model reads it all); ``rss_ratio`` is the conversion's peak RSS over the
   baseline's.

Peak RSS is the larger of the child's ``ru_maxrss`` (which covers the children it waited for,
one at a time) and the summed RSS of its process tree sampled from /proc every 0.2 s (which
catches parts converted concurrently). RSS counts the pages of memory-mapped checkpoint files
once read; ``peak_anon_gb`` (sampled the same way) is the anonymous part alone, the memory the
converter allocated. The checkpoint and the output live in a temporary folder, removed at the
end, or under --keep DIR (DIR/checkpoint, DIR/out, and the children's output in DIR/logs).

Printed: a readable summary, then as the LAST line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

T_START = time.perf_counter()

from convert import _quiet, git_revision, peak_rss_gb  # noqa: E402

SHARD_BYTES = 4 * 10**9  # Qwen3-8B's published shards hold up to ~4 GB each
_SAMPLE_S = 0.2


@dataclass
class Run:
    """One measured child process."""

    code: int
    wall_s: float
    peak_rss_bytes: int
    peak_anon_bytes: int | None  # sampled; None without /proc
    stdout: str
    stderr: str


def _tree_rss_bytes(root: int) -> tuple[int, int] | None:
    """Summed (resident, anonymous resident) bytes of `root` and its descendants; None when
    there is no /proc. Resident memory also counts pages of memory-mapped files (safetensors
    read in place), which the kernel can drop; anonymous memory is what the process allocated."""
    parent: dict[int, int] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # the command name (field 2) may hold spaces and parentheses: split after the last ')'
        parent[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parent.items() if p == pid and c not in tree]
        tree.update(children)
        frontier.extend(children)
    resident = anon = 0
    for pid in tree:
        try:
            fields = (proc / str(pid) / "statm").read_text().split()
        except OSError:
            continue
        # statm: size resident shared ...; shared = resident file-backed (and shmem) pages
        resident += int(fields[1])
        anon += int(fields[1]) - int(fields[2])
    page = resource.getpagesize()
    return resident * page, anon * page


def run_measured(cmd: list[str], logs: Path, name: str) -> Run:
    """Run `cmd` to completion; its wall time, its own peak RSS and its output."""
    out_path, err_path = logs / f"{name}.stdout", logs / f"{name}.stderr"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        t0 = time.perf_counter()
        # Output to files, not pipes: nobody reads pipes while this loop waits for the child.
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        sampled, anon = 0, None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            tree = _tree_rss_bytes(proc.pid)
            if tree is not None:
                sampled, anon = max(sampled, tree[0]), max(anon or 0, tree[1])
            time.sleep(_SAMPLE_S)
        wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code  # reaped by wait4; keeps Popen from waiting for it again
    maxrss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    out_text, err_text = out_path.read_text(), err_path.read_text()
    return Run(code, wall, max(maxrss, sampled), anon, out_text, err_text)


def folder_bytes(path: Path) -> int:
    """Total size of the files under `path` (a file: its size)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def count_parts(output: Path) -> int:
    """Packages the conversion wrote at `output`: the manifest's parts, or 1 for one package."""
    manifest = output / "manifest.json"
    if manifest.is_file():
        parts = json.loads(manifest.read_text())["parts"]
        missing = [p["file"] for p in parts if not (output / p["file"]).exists()]
        if missing:
            raise RuntimeError(f"{manifest}: part {missing[0]} is not in {output}")
        return len(parts)
    if (output / "Manifest.json").is_file():  # a single .mlpackage
        return 1
    raise RuntimeError(f"{output}: neither a package nor a folder holding manifest.json")


def _child_error(what: str, run: Run) -> str:
    lines = [ln for ln in run.stderr.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else "no error output"
    return f"{what} failed (exit {run.code}): {last}"


def _last_json(text: str) -> dict | None:
    """The last line of `text` as a JSON object, if it is one."""
    lines = text.strip().splitlines()
    try:
        doc = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def _gb(n: int | float) -> float:
    return round(n / 1e9, 3)


def _human(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


# ---------------------------------------------------------------------------------------------
# the child processes' own work (this script re-invoked with --only)


def write_checkpoint(preset: str, folder: Path, seed: int) -> dict:
    """Child 1: the preset's random fp16 checkpoint, streamed; prints its numbers."""
    import torch

    from anefx.models.presets import get_preset
    from anefx.models.synthetic import write_random_checkpoint

    t0 = time.perf_counter()
    write_random_checkpoint(
        folder, get_preset(preset), dtype=torch.float16, seed=seed, max_shard_bytes=SHARD_BYTES
    )
    return {"write_s": round(time.perf_counter() - t0, 2), "peak_rss_gb": round(peak_rss_gb(), 3)}


def load_baseline(folder: Path) -> dict:
    """Child 3: the stock route's load of the same checkpoint into transformers, made resident."""
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16)
    load_s = time.perf_counter() - t0
    # from_pretrained leaves fp16 weights memory-mapped from the safetensors files, unread; any
    # use (export, convert, run) reads them all. One element per 4 KB page makes them resident.
    t0 = time.perf_counter()
    with torch.no_grad():
        for param in model.parameters():
            flat = param.detach().reshape(-1)
            flat[:: max(1, 4096 // flat.element_size())].float().sum()
    touch_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    return {
        "load_s": round(load_s, 2),
        "touch_s": round(touch_s, 2),
        "params": params,
        "peak_rss_gb": round(peak_rss_gb(), 3),
    }


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from anefx.cli import float_range, int_range
    from anefx.core.rules import DIM_LIMITS
    from anefx.models.presets import PRESETS

    # the same ranges anefx convert checks, checked here first: a bad value fails in a second,
    # not after the minutes of writing the checkpoint
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--preset", default="qwen3-8b", choices=PRESETS, help="model preset (random fp16 weights)"
    )
    width = DIM_LIMITS["W"]
    p.add_argument(
        "--context", type=int_range(1, width), default=512, help="KV cache length (default 512)"
    )
    p.add_argument(
        "--batch", type=int_range(1, width), default=64, help="prefill batch (default 64)"
    )
    p.add_argument(
        "--max-chunk-mb",
        type=float_range(0, float(1 << 30), lo_open=True),
        default=1024,
        help="weights per converted part, in MB (default 1024; fractions allowed)",
    )
    p.add_argument(
        "--lut",
        type=int_range(1, 8),
        help="palettize weights to N-bit lookup tables (anefx convert checks the bit widths)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument(
        "--keep", type=Path, help="write the checkpoint and the output under DIR and keep them"
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the transformers load")
    # internal: a child process does one step and prints its numbers as one JSON line
    p.add_argument("--only", choices=("checkpoint", "baseline"), help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch > args.context:
        p.error(f"--batch {args.batch} must not exceed --context {args.context}")
    return args


def _convert_cmd(args: argparse.Namespace, folder: Path, output: Path) -> list[str]:
    anefx = Path(sys.executable).with_name("anefx")
    if not anefx.is_file():
        raise SystemExit(f"scale: the anefx command is not installed beside {sys.executable}")
    cmd = [str(anefx), "convert", str(folder), "-o", str(output), "--json"]
    cmd += ["--context", str(args.context), "--batch", str(args.batch)]
    cmd += ["--max-chunk-mb", f"{args.max_chunk_mb:g}"]
    if args.lut is not None:
        cmd += ["--lut", str(args.lut)]
    return cmd


def _self_cmd(args: argparse.Namespace, only: str, folder: Path) -> list[str]:
    return [sys.executable, __file__, "--only", only, "--folder", str(folder)] + [
        "--preset", args.preset, "--seed", str(args.seed),
    ]  # fmt: skip


def measure(args: argparse.Namespace, work: Path) -> dict:
    """The three runs in `work`; the numbers of the JSON line (raises SystemExit on failure)."""
    folder, out_dir, logs = work / "checkpoint", work / "out", work / "logs"
    for d in (folder, out_dir):
        if d.exists() and any(d.iterdir()):
            raise SystemExit(f"scale: {d} is not empty; use an empty --keep folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)

    writer = run_measured(_self_cmd(args, "checkpoint", folder), logs, "checkpoint")
    if writer.code != 0:
        raise SystemExit("scale: " + _child_error("writing the checkpoint", writer))
    written = _last_json(writer.stdout)
    if written is None:
        raise SystemExit("scale: the checkpoint writer printed no JSON line")

    output = out_dir / args.preset
    conv = run_measured(_convert_cmd(args, folder, output), logs, "convert")
    if conv.code != 0:
        raise SystemExit("scale: " + _child_error("anefx convert", conv))
    try:
        parts = count_parts(output)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise SystemExit(
            f"scale: anefx convert exited 0 but its output is unusable: {exc}"
        ) from None

    rec = {
        "preset": args.preset,
        "git": git_revision(),
        "context": args.context,
        "batch": args.batch,
        "max_chunk_mb": args.max_chunk_mb,
        "lut": args.lut,
        "seed": args.seed,
        "checkpoint_s": written["write_s"],
        "checkpoint_wall_s": round(writer.wall_s, 2),
        "checkpoint_peak_rss_gb": _gb(writer.peak_rss_bytes),
        "checkpoint_bytes": folder_bytes(folder),
        "checkpoint_shards": len(list(folder.glob("*.safetensors"))),
        "wall_s": round(conv.wall_s, 2),
        "peak_rss_gb": _gb(conv.peak_rss_bytes),
        "peak_anon_gb": None if conv.peak_anon_bytes is None else _gb(conv.peak_anon_bytes),
        "parts": parts,
        "bytes_written": folder_bytes(out_dir),
    }
    report = _last_json(conv.stdout) or {}  # anefx convert --json: the checker's totals
    rec["checker_errors"] = report.get("errors")
    rec["checker_warnings"] = report.get("warnings")
    if not args.no_baseline:
        base = run_measured(_self_cmd(args, "baseline", folder), logs, "baseline")
        inner = _last_json(base.stdout) if base.code == 0 else None
        if inner is not None:
            rec.update(
                {
                    "baseline_wall_s": round(base.wall_s, 2),
                    "baseline_load_s": inner["load_s"],
                    "baseline_touch_s": inner["touch_s"],
                    "baseline_peak_rss_gb": _gb(base.peak_rss_bytes),
                    "rss_ratio": round(conv.peak_rss_bytes / base.peak_rss_bytes, 3),
                    "baseline_error": None,
                }
            )
        else:  # e.g. killed for want of memory: the conversion's numbers still stand
            rec["baseline_error"] = _child_error("the transformers load", base)
    return rec


def render(rec: dict) -> str:
    """The readable summary printed before the JSON line."""
    lines = [
        f"scale: preset {rec['preset']} (random fp16), context {rec['context']}, batch "
        f"{rec['batch']}, parts of <= {rec['max_chunk_mb']:g} MB"
        + (f", {rec['lut']}-bit LUT" if rec["lut"] else "")
        + f"; revision {rec['git']}",
        f"  checkpoint  {rec['checkpoint_s']:8.1f} s   peak RSS "
        f"{rec['checkpoint_peak_rss_gb']:6.2f} GB   {_human(rec['checkpoint_bytes'])} in "
        f"{rec['checkpoint_shards']} shard(s) (not counted below)",
        f"  anefx       {rec['wall_s']:8.1f} s   peak RSS {rec['peak_rss_gb']:6.2f} GB   "
        f"{rec['parts']} part(s), {_human(rec['bytes_written'])} written",
    ]
    if rec["peak_anon_gb"] is not None:
        lines.append(
            f"              of which allocated (not file-backed), sampled: "
            f"{rec['peak_anon_gb']:.2f} GB at most"
        )
    if rec.get("baseline_peak_rss_gb") is not None:
        lines += [
            f"  baseline    {rec['baseline_wall_s']:8.1f} s   peak RSS "
            f"{rec['baseline_peak_rss_gb']:6.2f} GB   (transformers from_pretrained fp16 "
            f"{rec['baseline_load_s']:.1f} s, reading every weight "
            f"{rec['baseline_touch_s']:.1f} s)",
            f"  anefx / baseline peak RSS = {rec['rss_ratio']:.3f}",
        ]
    elif rec.get("baseline_error"):
        lines.append(f"  baseline    {rec['baseline_error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet()
    if args.only == "checkpoint":
        print(json.dumps(write_checkpoint(args.preset, args.folder, args.seed)))
        return 0
    if args.only == "baseline":
        print(json.dumps(load_baseline(args.folder)))
        return 0
    if args.keep is not None:
        rec = measure(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="anefx-scale-") as tmp:
            rec = measure(args, Path(tmp))
    rec["total_s"] = round(time.perf_counter() - T_START, 2)
    print(render(rec))
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
