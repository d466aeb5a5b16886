#!/usr/bin/env python3
"""The crate's module graph, from its `crate::`/`super::` paths: fails on an
import cycle or an import that points up the layers, except the ones listed
in KNOWN (each with why it is still there). Run by scripts/test.sh.

Layers, lowest first: a module may import its own layer and the ones below.
"""
import collections
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

LAYERS = [
    ["fhir"],
    ["config", "operations::metrics", "operations::trace_context"],
    ["store", "auth"],
    ["group", "loadtest"],
    ["operations"],
    ["proxy"],
    ["crate", "main"],
]

# Cycles allowed to stay, each with why. None: every new one fails the check.
KNOWN = set()


def module_of(path):
    parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return "::".join(parts) or "crate"


def layer_of(module):
    best = None
    for rank, layer in enumerate(LAYERS):
        for prefix in layer:
            if module == prefix or module.startswith(prefix + "::"):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    return best[0] if best else len(LAYERS)


def graph():
    modules = {}
    for directory, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".rs"):
                path = os.path.join(directory, name)
                modules[module_of(path)] = path
    edges = collections.defaultdict(set)
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        cut = text.find("#[cfg(test)]\nmod tests")
        if cut >= 0:
            text = text[:cut]
        refs = re.findall(r"crate::((?:[a-z_]+::)*[a-z_]+)", text)
        for prefix, body in re.findall(r"crate::((?:[a-z_]+::)+)\{([^}]*)\}", text):
            for item in body.split(","):
                item = item.strip().split(" ")[0]
                if item and item[0].islower():
                    refs.append(prefix + item.split("::")[0])
        parent = "::".join(module.split("::")[:-1])
        refs += [(parent + "::" if parent else "") + s for s in re.findall(r"\bsuper::([a-z_]+)", text)]
        for ref in refs:
            parts = ref.split("::")
            for k in range(len(parts), 0, -1):
                target = "::".join(parts[:k])
                if target in modules:
                    if target != module and not module.startswith(target + "::"):
                        edges[module].add(target)
                    break
    return modules, edges


def cycles(modules, edges):
    index, low, stack, on, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    sys.setrecursionlimit(10000)
    for v in modules:
        if v not in index:
            visit(v)
    return found


def main():
    modules, edges = graph()
    problems = []
    for component in cycles(modules, edges):
        if component not in KNOWN:
            problems.append("import cycle: " + " <-> ".join(sorted(component)))
    for source, targets in sorted(edges.items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(source):
                problems.append(f"upward import: {source} -> {target}")
    for problem in problems:
        print(problem)
    known = len(KNOWN)
    print(f"module graph: {len(modules)} modules, {sum(map(len, edges.values()))} imports, "
          f"{len(problems)} problem(s), {known} known cycle(s) left to take apart")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
