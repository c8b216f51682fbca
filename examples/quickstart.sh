#!/usr/bin/env bash
# Quickstart on a fresh CPU machine: install, then import a tiny decoder, train stage 1 and
# stage 2 with 2 processes, export to the HF format and compare held-out retrieval before/after.
# OUT_DIR (default quickstart_out/) receives summary.json, checkpoints, logs and the export.
# The pip installs run unless this checkout is already installed with its eval extra and torch
# 2.13.0 and setup.py has not changed since (a re-run then skips 10-30 s of pip);
# QUICKSTART_INSTALL=1 always installs.
set -euo pipefail
cd "$(dirname "$0")/.."
# -I: the installed packages only (not this folder), as the tools' processes see them.
if [[ "${QUICKSTART_INSTALL:-0}" != "1" ]] && python3 -I - "$PWD" <<'EOF'; then
import importlib.metadata as md
import importlib.util
import sys
from pathlib import Path

root = Path(sys.argv[1]).resolve()
try:
    from packaging.requirements import Requirement

    dist = md.distribution("megatron_nvembed")
    spec = importlib.util.find_spec("megatron_nvembed")
    assert md.version("torch").split("+")[0] == "2.13.0", "torch is not 2.13.0"
    assert spec and Path(spec.origin).parent.parent == root, f"installed from {spec.origin}"
    metadata = next(f for f in dist.files if f.name == "METADATA")
    assert (root / "setup.py").stat().st_mtime < dist.locate_file(metadata).stat().st_mtime, (
        "setup.py changed since the install"
    )
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": "eval"}):
            assert req.specifier.contains(md.version(req.name), prereleases=True), text
except Exception as err:  # anything missing or unclear: install
    print(f"quickstart: installing ({type(err).__name__}: {err})", file=sys.stderr)
    sys.exit(1)
print("quickstart: torch 2.13.0 and this checkout's .[eval] are installed; skipping pip")
EOF
  :
else
  python3 -m pip install -q torch==2.13.0
  python3 -m pip install -q -e ".[eval]"
fi
python3 examples/quickstart.py --out-dir "${OUT_DIR:-quickstart_out}"
