"""Write the JSON schemas of KubeRay's CRDs that tests/ops/test_infra.py validates the manifests with.

    python infra/kuberay/schemas/from_crd.py v1.7.0 ray.io_rayclusters.yaml ray.io_rayjobs.yaml

Input: the CRD files of a KubeRay release (ray-operator/config/crd/bases/ in its repository,
Apache-2.0). Output, beside this file (or in ``--out DIR``, given first): ``{kind}_{version}.json`` (lower case, the names kubeconform's
``-schema-location 'infra/kuberay/schemas/{{.ResourceKind}}_{{.ResourceAPIVersion}}.json'`` looks for):
the version's ``openAPIV3Schema`` without its descriptions (they make up most of the bytes), and
strict: every object that lists its properties refuses others, as the API server's pruning would
silently drop a misspelt key instead. Only ``v1`` is kept (the manifests use it); the KubeRay release
named on the command line is recorded as ``x-source``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def strict(node):
    if isinstance(node, dict):
        out = {k: strict(v) for k, v in node.items() if k != "description"}
        if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [strict(v) for v in node]
    return node


def main(argv: list[str]) -> int:
    out_dir = HERE
    if argv[:1] == ["--out"]:
        out_dir, argv = Path(argv[1]), argv[2:]
    release, paths = argv[0], argv[1:]
    for path in paths:
        crd = yaml.safe_load(Path(path).read_text())
        kind = crd["spec"]["names"]["kind"].lower()
        for version in crd["spec"]["versions"]:
            if version["name"] != "v1":
                continue
            schema = strict(version["schema"]["openAPIV3Schema"])
            schema["x-source"] = f"KubeRay {release}, {Path(path).name}"
            out = out_dir / f"{kind}_{version['name']}.json"
            out.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
            print(f"{out}: {out.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
