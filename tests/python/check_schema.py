"""Validate pipeline files against flowrun's JSON Schema (pipelines/flowrun.schema.json).

usage: check_schema.py SCHEMA FILE... ; a FILE prefixed with `!` must be rejected.
Prints one line per file; exits 1 if any file is judged differently than expected."""
import json
import sys

import jsonschema
import yaml

schema = json.load(open(sys.argv[1]))
jsonschema.Draft202012Validator.check_schema(schema)
validator = jsonschema.Draft202012Validator(schema)
failed = 0
for arg in sys.argv[2:]:
    expect_ok = not arg.startswith("!")
    path = arg.lstrip("!")
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:120]}"
              for e in validator.iter_errors(yaml.safe_load(open(path)))]
    ok = not errors
    print(f"{'accepted' if ok else 'rejected'} {path}" + ("" if ok else f" ({errors[0]})"))
    if ok != expect_ok:
        failed += 1
        print(f"  UNEXPECTED: expected {'accepted' if expect_ok else 'rejected'}")
sys.exit(1 if failed else 0)
