"""The README documents every config key the schema defines, with the schema's default, and
nothing the schema lacks: the schema holds the defaults, the README shows them."""

import re

import yaml

from conftest import PROJECT


def schema_keys(schema, prefix=""):
    for key, spec in schema.get("properties", {}).items():
        name = f"{prefix}{key}"
        nested = [k for k in spec.get("properties", {})] if spec.get("type") == "object" else []
        if nested and key != "models":
            yield from schema_keys(spec, f"{name}.")
        else:
            yield name, spec


def test_every_config_key_is_documented_with_its_default():
    schema = yaml.safe_load((PROJECT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    readme = (PROJECT / "README.md").read_text()
    table = re.search(r"## Config keys\n(.*?)\n## ", readme, re.S).group(1)
    documented = dict(re.findall(r"^\| `([^`]+)` \| ([^|]+) \|", table, re.M))
    keys = dict(schema_keys(schema))
    assert set(documented) == set(keys)
    for key, spec in keys.items():
        shown = documented[key].strip()
        if "default" not in spec:
            assert shown == "(required)", key
        else:
            assert yaml.safe_load(shown.strip("`")) == spec["default"], key


def test_quick_start_has_the_two_commands():
    readme = (PROJECT / "README.md").read_text()
    quick = re.search(r"## Quick start\n(.*?)\n## ", readme, re.S).group(1)
    assert re.findall(r"^make \w+", quick, re.M) == ["make run", "make test"]
