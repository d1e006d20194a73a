"""The minimal RFC 6902 patch from the pod as sent to the pod as wanted.

The mutation copies only what it changes, so every subtree it left alone is the *same object*
in both pods: the diff skips those by identity and never walks them (managedFields included).
Lists of named items (containers, env) are matched by name; other lists by common prefix and
suffix, which turns an insertion or a removal into one operation.
"""

from __future__ import annotations

from typing import Any

Operation = dict[str, Any]


def escape(token: str) -> str:
    """A JSON Pointer reference token (RFC 6901): `~` as `~0`, `/` as `~1`."""
    return token.replace("~", "~0").replace("/", "~1")


def diff(old: Any, new: Any) -> list[Operation]:
    """Operations that turn `old` into `new`, valid against `old` as sent."""
    ops: list[Operation] = []
    _diff(old, new, "", ops)
    return ops


def _diff(old: Any, new: Any, path: str, ops: list[Operation]) -> None:
    if old is new:
        return
    if isinstance(old, dict) and isinstance(new, dict):
        _diff_dict(old, new, path, ops)
    elif isinstance(old, list) and isinstance(new, list):
        if _edited_in_place(old, new):
            for index, item in enumerate(old):
                if item is not new[index]:
                    _diff(item, new[index], f"{path}/{index}", ops)
            for item in new[len(old) :]:
                ops.append({"op": "add", "path": f"{path}/-", "value": item})
        elif _named(old) and _named(new):
            _diff_named(old, new, path, ops)
        else:
            _diff_list(old, new, path, ops)
    elif type(old) is not type(new) or old != new:
        ops.append({"op": "replace", "path": path, "value": new})


def _diff_dict(old: dict[str, Any], new: dict[str, Any], path: str, ops: list[Operation]) -> None:
    for key in old:
        if key not in new:
            ops.append({"op": "remove", "path": f"{path}/{escape(key)}"})
    for key, value in new.items():
        if key in old:
            if old[key] is not value:  # untouched subtrees: not even a path to build
                _diff(old[key], value, f"{path}/{escape(key)}", ops)
        else:
            ops.append({"op": "add", "path": f"{path}/{escape(key)}", "value": value})


def _edited_in_place(old: list[Any], new: list[Any]) -> bool:
    """`new` is `old` with items edited where they stand (same object, or same name) and
    perhaps some appended: what the mutation does to containers and env lists."""
    if len(old) > len(new):
        return False
    for before, after in zip(old, new, strict=False):
        if before is after:
            continue
        if not (isinstance(before, dict) and isinstance(after, dict)):
            return False
        name = before.get("name")
        if not isinstance(name, str) or after.get("name") != name:
            return False
    return True


def _named(items: list[Any]) -> bool:
    """Every item is an object with a distinct string name (containers, env vars, ports)."""
    names = [item.get("name") if isinstance(item, dict) else None for item in items]
    return all(isinstance(n, str) for n in names) and len(set(names)) == len(names)


def _diff_named(old: list[Any], new: list[Any], path: str, ops: list[Operation]) -> None:
    new_names = {item["name"] for item in new}
    # Remove from the end first so the indices still to be removed stay valid.
    kept = []
    for index in range(len(old) - 1, -1, -1):
        if old[index]["name"] in new_names:
            kept.append(old[index])
        else:
            ops.append({"op": "remove", "path": f"{path}/{index}"})
    kept.reverse()
    kept_names = [item["name"] for item in kept]
    kept_set = set(kept_names)
    appended = [item for item in new if item["name"] not in kept_set]
    if [item["name"] for item in new] != kept_names + [item["name"] for item in appended]:
        # Reordered or inserted in the middle: not something the mutation does; stay correct.
        _diff_list(kept, new, path, ops)
        return
    for index, item in enumerate(kept):
        _diff(item, new[index], f"{path}/{index}", ops)
    for item in appended:
        ops.append({"op": "add", "path": f"{path}/-", "value": item})


def _same(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and a == b)


def _diff_list(old: list[Any], new: list[Any], path: str, ops: list[Operation]) -> None:
    prefix = 0
    limit = min(len(old), len(new))
    while prefix < limit and _same(old[prefix], new[prefix]):
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and _same(old[len(old) - 1 - suffix], new[len(new) - 1 - suffix]):
        suffix += 1
    old_middle = old[prefix : len(old) - suffix]
    new_middle = new[prefix : len(new) - suffix]
    common = min(len(old_middle), len(new_middle))
    for offset in range(common):
        _diff(old_middle[offset], new_middle[offset], f"{path}/{prefix + offset}", ops)
    for offset in range(len(old_middle) - 1, common - 1, -1):
        ops.append({"op": "remove", "path": f"{path}/{prefix + offset}"})
    for offset in range(common, len(new_middle)):
        ops.append({"op": "add", "path": f"{path}/{prefix + offset}", "value": new_middle[offset]})
