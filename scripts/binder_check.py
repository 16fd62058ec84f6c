"""Build the Binder environment as repo2docker would (a fresh venv from binder/ only, then postBuild) and
run every notebook in it, recording each kernel's peak memory (VmHWM) into binder/memory.json and .md.

    python scripts/binder_check.py [--venv /tmp/binder-venv] [--reuse]

mybinder.org gives about 2 GB of RAM; every notebook must stay under it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def sh(*cmd: str, **kw: object) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def kernel_peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--venv", default="/tmp/binder-venv")
    ap.add_argument("--reuse", action="store_true", help="reuse an existing venv (skip the build)")
    args = ap.parse_args()
    venv = Path(args.venv)
    py = venv / "bin" / "python"
    if not args.reuse:
        t0 = time.perf_counter()
        sh(sys.executable, "-m", "venv", "--clear", str(venv))
        sh(str(py), "-m", "pip", "install", "-q", "-r", "binder/requirements.txt", cwd=ROOT)
        sh(
            "bash",
            "binder/postBuild",
            cwd=ROOT,
            env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(Path.home())},
        )
        # What the Binder image provides besides: a Jupyter server and a kernel.
        sh(str(py), "-m", "pip", "install", "-q", "ipykernel", "nbclient", "nbformat", cwd=ROOT)
        print(f"environment built in {time.perf_counter() - t0:.0f} s", flush=True)
    code = r"""
import json, sys, time
import nbformat
from nbclient import NotebookClient
path = sys.argv[1]
nb = nbformat.read(path, 4)
client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": sys.argv[2]}})
t0 = time.perf_counter()
with client.setup_kernel():
    pid = client.km.provisioner.process.pid
    for i, cell in enumerate(nb.cells):
        client.execute_cell(cell, i)
    peak = 0.0
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
print(json.dumps({"notebook": path.split("/")[-1], "kernel_peak_mib": round(peak), "seconds": round(time.perf_counter() - t0, 1), "errors": len(errors)}))
"""
    rows = []
    for nb in NOTEBOOKS:
        out = subprocess.run(
            [str(py), "-c", code, str(nb), str(nb.parent)],
            capture_output=True,
            text=True,
            check=True,
            env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1"},
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    import platform

    built = (
        "Built from `binder/` only (a fresh venv, `requirements.txt`, then `postBuild`)"
        if not args.reuse
        else f"Run in an existing venv ({venv}: `--reuse`, e.g. when download.pytorch.org is unreachable; check that "
        "it holds the torch build `binder/requirements.txt` pins)"
    )
    torch_version = subprocess.run(
        [str(py), "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True, check=True
    ).stdout.strip()
    record = {
        "python": platform.python_version(),
        "torch": torch_version,
        "environment": built,
        "notebooks": rows,
        "limit_mib": 2048,
    }
    (ROOT / "binder" / "memory.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["| notebook | kernel peak MiB | seconds | errors |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['notebook']} | {r['kernel_peak_mib']} | {r['seconds']} | {r['errors']} |" for r in rows]
    (ROOT / "binder" / "memory.md").write_text(
        f"# Notebook kernels in the Binder environment\n\n{built} by `scripts/binder_check.py`, torch "
        f"{torch_version}; peak resident memory (VmHWM) of "
        "each notebook's kernel, run top to bottom on the embedded toy model (tiny-edit for the edits).\n\n"
        + "\n".join(lines)
        + "\n"
    )
    print("\n".join(lines))
    bad = [r for r in rows if r["kernel_peak_mib"] >= 2048 or r["errors"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
