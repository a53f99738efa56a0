"""Calling a served Dash app the way the browser does (test code): POST
/_dash-update-component with the output spec from /_dash-dependencies, and small readers
of the serialized layouts and figures it returns."""

from __future__ import annotations

from typing import Any

import requests


class DashClient:
    """Calls an app's callbacks the way the browser does: POST /_dash-update-component
    with the output spec from /_dash-dependencies."""

    def __init__(self, base: str):
        self.base = base
        self.deps = requests.get(f"{base}/_dash-dependencies", timeout=30).json()

    def dep(self, output_prefix: str) -> dict[str, Any]:
        for d in self.deps:
            if d["output"].lstrip(".").startswith(output_prefix):
                return d
        raise KeyError(output_prefix)

    def call(self, output_prefix: str, values: dict[str, Any],
             changed: str | None = None) -> dict[str, Any]:
        d = self.dep(output_prefix)
        multi = d["output"].startswith("..")
        outs = [o.rsplit(".", 1) for o in d["output"].strip(".").split("...")]
        outputs = [{"id": i, "property": p} for i, p in outs]

        def fill(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [{**x, "value": values.get(f"{x['id']}.{x['property']}")} for x in items]

        inputs = fill(d["inputs"])
        body = {"output": d["output"], "outputs": outputs if multi else outputs[0],
                "inputs": inputs, "state": fill(d["state"]),
                "changedPropIds": [changed or f"{inputs[0]['id']}.{inputs[0]['property']}"]}
        r = requests.post(f"{self.base}/_dash-update-component", json=body, timeout=60)
        assert r.status_code == 200, r.text[:2000]
        return r.json()["response"]

    def page(self, pathname: str) -> dict[str, Any]:
        """The server-rendered layout of a URL (the routing callback's JSON)."""
        return self.call("page.children", {"url.pathname": pathname})["page"]["children"]


def find(tree: Any, comp_id: str) -> dict[str, Any] | None:
    """The component with ``id`` in a serialized Dash layout."""
    if isinstance(tree, dict):
        if tree.get("props", {}).get("id") == comp_id:
            return tree
        for v in (tree.get("props") or {}).values():
            hit = find(v, comp_id)
            if hit is not None:
                return hit
    elif isinstance(tree, list):
        for v in tree:
            hit = find(v, comp_id)
            if hit is not None:
                return hit
    return None


def text_of(tree: Any) -> str:
    if isinstance(tree, str | int | float):
        return str(tree)
    if isinstance(tree, list):
        return " ".join(text_of(t) for t in tree)
    if isinstance(tree, dict):
        return text_of(tree.get("props", {}).get("children", ""))
    return ""


def trace(fig: dict[str, Any], name: str) -> dict[str, Any]:
    return next(t for t in fig["data"] if t.get("name") == name)
