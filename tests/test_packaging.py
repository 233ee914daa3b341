"""The dependency floors that pyproject.toml declares are the versions `.ci/floor` tests."""

import pathlib
import re
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _floors():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for dep in deps:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9A-Za-z.]*)", dep)
        assert match, f"{dep!r}: every runtime dependency declares a floor, name>=version"
        floors[match[1].lower()] = match[2]
    return floors


def _pins():
    pins = {}
    for line in (ROOT / ".ci" / "floor.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def test_floor_constraints_pin_the_declared_floors():
    pins = _pins()
    # jax pins its own jaxlib; the constraints name it so that pip cannot pick another.
    assert pins.pop("jaxlib") == pins["jax"]
    assert pins == _floors()
