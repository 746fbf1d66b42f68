"""Checks of this machine against a spec, before any work starts: the packages that the spec's
options need. (The trial worker raises the same errors, for launchers that run elsewhere.)"""

from __future__ import annotations

import importlib.util

from contract.spec import SweepSpec

# spec option → (package, pip requirement)
_NEEDS = {
    ("train.optimizer", "adamw8bit"): ("bitsandbytes", "'bitsandbytes>=0.45'"),
    ("train.attention", "xformers"): ("xformers", "xformers"),
    ("train.deepspeed", "set"): ("deepspeed", "deepspeed"),
    ("eval.fid_features", "inception"): ("torch_fidelity", "'dreamsweep[fid]'"),
    ("launcher.kind", "ray"): ("ray", "'dreamsweep[ray]'"),
}


def missing_packages(spec: SweepSpec) -> list[str]:
    """One problem per option whose package is not installed here."""
    chosen = {
        ("train.optimizer", spec.train.optimizer),
        ("train.attention", spec.train.attention),
        ("train.deepspeed", "set" if spec.train.deepspeed is not None else "unset"),
        ("launcher.kind", spec.launcher.kind),
    }
    if "fid" in spec.eval.metrics:
        chosen.add(("eval.fid_features", spec.eval.fid_features))
    problems = []
    for (field, value), (package, requirement) in _NEEDS.items():
        if (field, value) in chosen and importlib.util.find_spec(package) is None:
            shown = "" if value == "set" else f" {value!r}"
            problems.append(
                f"{field}:{shown} needs the {package!r} package, which is not installed here "
                f"(pip install {requirement})"
            )
    return problems


def tracking_warnings(spec: SweepSpec) -> list[str]:
    """Settings that run but are risky: a SQLite file as the store of a cluster sweep."""
    if spec.launcher.kind != "local" and spec.tracking_uri.startswith("sqlite:"):
        return [
            f"tracking: {spec.tracking_uri} is a SQLite file, and launcher.kind is "
            f"{spec.launcher.kind!r}: trials on many nodes write to it at once, and network "
            "filesystems do not honour SQLite's locks. Fine on one machine (the local test "
            "cluster); on a real cluster run mlflow/server.sh on the login node and set "
            "tracking.uri to it."
        ]
    return []


def network_warnings(spec: SweepSpec) -> list[str]:
    """Servers a run would start that listen beyond this machine."""
    if spec.launcher.kind == "ray" and spec.launcher.address is None:
        return [
            "launcher: the Ray launcher without launcher.address starts Ray on this machine; "
            "Ray's GCS and raylets listen on every network interface (Ray has no loopback-only "
            "mode; dreamsweep starts no Ray dashboard). Run it on a trusted network or behind "
            "a firewall, or set launcher.address to a cluster you run."
        ]
    return []
