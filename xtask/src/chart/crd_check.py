"""Validates CRD objects (KEDA, cert-manager, prometheus-operator) against the
pydantic models cloudcoil generates from those projects' CRD schemas.

Reads a JSON list of Kubernetes objects on stdin; objects of other kinds are left
to kubernetes-validate. Prints `VALID Kind/name` or `INVALID Kind/name: why` per
object and exits 1 if any is invalid. The models ignore unknown fields, so the
object is also compared with the model's own dump: a field the model dropped is
one the CRD does not have (a typo, a wrong level).
"""

import importlib
import json
import sys

MODELS = {
    ("keda.sh/v1alpha1", "ScaledObject"): ("cloudcoil.models.keda.v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "ScaledJob"): ("cloudcoil.models.keda.v1alpha1", "ScaledJob"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): ("cloudcoil.models.keda.v1alpha1", "TriggerAuthentication"),
    ("keda.sh/v1alpha1", "ClusterTriggerAuthentication"): (
        "cloudcoil.models.keda.v1alpha1",
        "ClusterTriggerAuthentication",
    ),
    ("cert-manager.io/v1", "Certificate"): ("cloudcoil.models.cert_manager.v1", "Certificate"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ("cloudcoil.models.prometheus_operator.v1", "ServiceMonitor"),
}


def unknown_fields(given, dumped, path):
    if isinstance(given, dict):
        if not isinstance(dumped, dict):
            return [path or "/"]
        out = []
        for key, value in given.items():
            if key not in dumped:
                out.append(f"{path}/{key}")
            else:
                out += unknown_fields(value, dumped[key], f"{path}/{key}")
        return out
    if isinstance(given, list) and isinstance(dumped, list):
        out = []
        for i, (g, d) in enumerate(zip(given, dumped)):
            out += unknown_fields(g, d, f"{path}/{i}")
        return out
    return []


def main():
    failed = False
    for obj in json.load(sys.stdin):
        key = (obj.get("apiVersion"), obj.get("kind"))
        if key not in MODELS:
            continue
        what = f"{key[1]}/{obj.get('metadata', {}).get('name')}"
        module, cls = MODELS[key]
        model = getattr(importlib.import_module(module), cls)
        try:
            parsed = model.model_validate(obj)
        except Exception as e:  # pydantic.ValidationError, with every problem listed
            print(f"INVALID {what}: {e}".replace("\n", " | "))
            failed = True
            continue
        dumped = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
        extra = unknown_fields(obj, dumped, "")
        if extra:
            print(f"INVALID {what}: fields the CRD does not have: {extra}")
            failed = True
            continue
        print(f"VALID {what}")
    sys.exit(1 if failed else 0)


main()
