"""Refresh the KubeRay CRD schemas that tests/test_kuberay.py validates deploy/kuberay/ against.

KubeRay's CRDs (``ray-operator/config/crd/bases/ray.io_*.yaml``) are about 1 MB each and carry
two API versions; the manifests use only ``ray.io/v1``. This keeps the ``openAPIV3Schema`` of
that version, as KubeRay wrote it (no rewriting: the test adapts the Kubernetes dialect to JSON
Schema), in sorted JSON with one key per line so a refresh diffs line by line, and records
where it came from in ``kuberay.json``.

    git clone https://github.com/ray-project/kuberay /tmp/kuberay   # or an existing checkout
    python tests/specs/kuberay/extract.py /tmp/kuberay --ref v1.7.0

``--ref`` reads the files at that tag or commit (``git show``), so the checkout's work tree may
be anywhere; without it the work tree's files are read. Run from anywhere; it writes next to
itself. The test never downloads anything.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRD_DIR = "ray-operator/config/crd/bases"
API_VERSION = "v1"  # the served version the manifests use (apiVersion: ray.io/v1)
# kind -> (CRD file in KubeRay, schema file written here)
CRDS = {
    "RayService": ("ray.io_rayservices.yaml", "rayservice.v1.json"),
    "RayJob": ("ray.io_rayjobs.yaml", "rayjob.v1.json"),
}
SOURCE_NOTE = "kuberay.json"
REPO_URL = "https://github.com/ray-project/kuberay"


def read_crd(checkout: Path, ref: str | None, name: str) -> str:
    path = f"{CRD_DIR}/{name}"
    if ref is None:
        return (checkout / path).read_text()
    return _git(checkout, "show", f"{ref}:{path}")


def _git(checkout: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(checkout), *args], capture_output=True, text=True, check=True
    )
    return done.stdout


def served_schema(crd: dict, kind: str) -> dict:
    """The openAPIV3Schema of API_VERSION; refuses a CRD of another kind or one not serving it."""
    if crd["spec"]["names"]["kind"] != kind:
        raise ValueError(f"expected the {kind} CRD, got {crd['spec']['names']['kind']}")
    for version in crd["spec"]["versions"]:
        if version["name"] == API_VERSION:
            if not version.get("served"):
                raise ValueError(f"{kind} {API_VERSION} is not served by this KubeRay")
            return version["schema"]["openAPIV3Schema"]
    raise ValueError(f"{kind} has no {API_VERSION}: {[v['name'] for v in crd['spec']['versions']]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a clone of ray-project/kuberay")
    parser.add_argument("--ref", help="tag or commit to read (default: the work tree)")
    args = parser.parse_args(argv)
    note = {
        "kuberay_version": args.ref or "work tree",
        "commit": _git(args.checkout, "rev-parse", f"{args.ref or 'HEAD'}^{{commit}}").strip(),
        "source": f"{REPO_URL}/tree/{args.ref or 'master'}/{CRD_DIR}",
        "api_version": f"ray.io/{API_VERSION}",
        "schemas": {},
    }
    for kind, (crd_name, out_name) in CRDS.items():
        crd = yaml.safe_load(read_crd(args.checkout, args.ref, crd_name))
        schema = served_schema(crd, kind)
        (HERE / out_name).write_text(json.dumps(schema, indent=0, sort_keys=True) + "\n")
        note["schemas"][kind] = {"crd": crd_name, "file": out_name}
        print(f"{kind}: {CRD_DIR}/{crd_name} -> {out_name}")
    (HERE / SOURCE_NOTE).write_text(json.dumps(note, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
