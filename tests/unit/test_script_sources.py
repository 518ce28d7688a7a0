"""Each script carries only the lib.lua helpers it uses (they are defined anew at every call), and still runs."""

from __future__ import annotations

import re
from importlib import resources

import redis

from queue_service.store import scripts

LIB = """-- a helper nobody calls
local function unused(x)
  return x
end

local function base(x)
  return x + 1
end

-- calls base
local function twice(x)
  return base(base(x))
end
"""


def test_a_script_gets_the_helpers_it_names_and_theirs_in_lib_order() -> None:
    helpers = scripts.helpers_for("return twice(1)", LIB)

    assert "local function unused" not in helpers
    assert helpers.index("local function base") < helpers.index("local function twice")


def test_a_script_that_names_no_helper_gets_none() -> None:
    assert scripts.helpers_for("return 1", LIB) == ""


def test_lib_splits_into_each_of_its_functions_whole() -> None:
    lib = (resources.files("queue_service.store") / "lua" / "lib.lua").read_text()
    names = re.findall(r"^local function (\w+)\(", lib, re.M)

    every = scripts.helpers_for(" ".join(f"{name}()" for name in names), lib)

    assert re.findall(r"^local function (\w+)\(", every, re.M) == names
    assert every.count("\nend\n") == len(names)  # each one ends where it ends in lib.lua


def test_every_script_loads_with_its_helpers(client: redis.Redis) -> None:
    for name in scripts.NAMES:
        client.script_load(scripts.source(name))  # the suite runs each of them
