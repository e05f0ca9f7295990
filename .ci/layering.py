#!/usr/bin/env python3
"""Checks the layering of the workspace; exits non-zero on a violation.

1. Crate dependencies point down. Each workspace crate may depend only on
   the workspace crates listed for it in ALLOWED (normal, build and dev
   dependencies alike, except where DEV_ALLOWED widens dev-dependencies for
   tests and benches). A new crate must be added to the table.

2. No module import circles. Within a crate, modules that share a parent
   (siblings, each standing for itself and everything below it) may use
   each other in one direction only. A module using its own ancestors is
   fine: a parent is its children's interface, and a child may implement
   part of it. References are read from `use` trees and from inline
   `crate::...`, `super::...` and `self::...` paths.

Usage: .ci/layering.py [--graph]   (--graph prints the crate graph)
"""

import json
import os
import re
import subprocess
import sys

# Workspace crates a crate may depend on (normal and build dependencies).
ALLOWED = {
    "isdp-proto": set(),
    "isdp-core": {"isdp-proto"},
    "isdp-xds": {"isdp-proto", "isdp-core"},
    "isdp-control-plane": {"isdp-proto", "isdp-core", "isdp-xds"},
    "isdp-sidecar": {"isdp-proto", "isdp-core", "isdp-xds"},
    "isdp-cli": {"isdp-proto", "isdp-core"},
    "isdp-examples": {"isdp-proto", "isdp-core"},
    "isdp-tests": {"isdp-proto", "isdp-core"},
    # The fuzz targets drive each application's parsers, as a test would.
    "isdp-fuzz": {"isdp-proto", "isdp-core", "isdp-sidecar", "isdp-control-plane", "isdp-cli"},
}
# Extra workspace crates that tests and benches (dev-dependencies) may use.
DEV_ALLOWED = {
    "isdp-control-plane": {"isdp-tests"},
    "isdp-sidecar": {"isdp-tests"},
    "isdp-cli": {"isdp-tests"},
    "isdp-tests": {
        "isdp-control-plane",
        "isdp-sidecar",
        "isdp-xds",
        "isdp-examples",
        "isdp-cli",
    },
}


def workspace():
    out = subprocess.run(
        ["cargo", "metadata", "--no-deps", "--format-version", "1"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)


def check_crates(meta, show):
    names = {p["name"] for p in meta["packages"]}
    problems = []
    for p in sorted(meta["packages"], key=lambda p: p["name"]):
        name = p["name"]
        if name not in ALLOWED:
            problems.append(f"{name}: not in .ci/layering.py's ALLOWED table; add it with the crates it may use")
            continue
        deps = []
        for d in p["dependencies"]:
            if d["name"] not in names:
                continue
            deps.append(d["name"])
            allowed = set(ALLOWED[name])
            if d.get("kind") == "dev":
                allowed |= DEV_ALLOWED.get(name, set())
            if d["name"] not in allowed:
                kind = d.get("kind") or "normal"
                problems.append(f"{name} depends on {d['name']} ({kind}): not allowed (allowed: {', '.join(sorted(allowed)) or 'none'})")
        if show:
            print(f"{name} -> {', '.join(sorted(set(deps))) or '(none)'}")
    return problems


# --- modules -------------------------------------------------------------

USE_RE = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?use\s+([^;]+);", re.M | re.S)
INLINE_RE = re.compile(r"\b((?:crate|super|self)(?:::[A-Za-z_][A-Za-z0-9_]*)+)")
MOD_RE = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+([a-z_][a-z0-9_]*)\s*;", re.M)


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    # String literals could hold `crate::` text; drop simple ones.
    return re.sub(r'"(?:[^"\\\n]|\\.)*"', '""', text)


def expand_use(tree):
    """Flattens a use tree (`a::{b, c::{d, e}}`) into paths."""
    tree = re.sub(r"\s+", "", tree)

    def split_top(s):
        parts, depth, cur = [], 0, ""
        for ch in s:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        if cur:
            parts.append(cur)
        return parts

    def walk(prefix, s):
        i = s.find("{")
        if i < 0:
            yield prefix + s
            return
        head, body = s[:i], s[i + 1 : s.rfind("}")]
        for part in split_top(body):
            yield from walk(prefix + head, part)

    for p in walk("", tree):
        yield re.sub(r"\sas\s.*$", "", p)


class Crate:
    def __init__(self, name, src):
        self.name = name
        self.src = src
        self.modules = {}  # module path tuple -> file
        self.walk((), os.path.join(src, "lib.rs"))

    def walk(self, path, file):
        if not os.path.isfile(file):
            return
        self.modules[path] = file
        text = strip_comments(open(file, encoding="utf-8").read())
        base = os.path.splitext(file)[0]
        if os.path.basename(file) == "lib.rs":
            base = os.path.dirname(file)
        for m in MOD_RE.findall(text):
            child = os.path.join(base, m + ".rs")
            self.walk(path + (m,), child)

    def resolve(self, current, ref):
        """The module (path tuple) a reference names, or None if outside."""
        parts = ref.split("::")
        if parts[0] == "crate":
            path, rest = (), parts[1:]
        elif parts[0] in ("super", "self"):
            path, rest = current, parts
            while rest and rest[0] in ("super", "self"):
                if rest[0] == "super":
                    path = path[:-1]
                rest = rest[1:]
        else:
            return None
        # The deepest module the path reaches.
        for seg in rest:
            if path + (seg,) in self.modules:
                path = path + (seg,)
            else:
                break
        return path

    def edges(self):
        for module, file in self.modules.items():
            text = strip_comments(open(file, encoding="utf-8").read())
            refs = set()
            for tree in USE_RE.findall(text):
                refs.update(expand_use(tree))
            refs.update(INLINE_RE.findall(text))
            for ref in refs:
                target = self.resolve(module, ref)
                if target is None or target == module:
                    continue
                yield module, target


def cycles_in(graph):
    """Strongly connected components with more than one node."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def check_modules(meta):
    problems = []
    root = meta["workspace_root"]
    for p in sorted(meta["packages"], key=lambda p: p["name"]):
        src = os.path.join(os.path.dirname(p["manifest_path"]), "src")
        if not os.path.isfile(os.path.join(src, "lib.rs")):
            continue
        crate = Crate(p["name"], src)
        # Per parent, the graph between its children.
        graphs = {}
        for a, b in crate.edges():
            if a[: len(b)] == b or b[: len(a)] == a:
                continue  # ancestor or descendant
            n = 0
            while a[n] == b[n]:
                n += 1
            parent = a[:n]
            graphs.setdefault(parent, {}).setdefault(a[n], set()).add(b[n])
        for parent, graph in sorted(graphs.items()):
            for comp in cycles_in(graph):
                where = "::".join(parent) or "crate root"
                files = [os.path.relpath(crate.modules[parent + (c,)], root) for c in comp]
                problems.append(f"{p['name']}: import circle among the children of {where}: {', '.join(files)}")
    return problems


def main():
    show = "--graph" in sys.argv
    meta = workspace()
    problems = check_crates(meta, show) + check_modules(meta)
    for p in problems:
        print(f"layering: {p}", file=sys.stderr)
    if problems:
        print(f"layering: {len(problems)} problem(s); see ARCHITECTURE.md for the intended layers", file=sys.stderr)
        return 1
    print("layering: crate dependencies point down; no module import circles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
