"""Validates JSON documents against a JSON Schema (the `jsonschema` package, independent of
smoe-opt's own code). Usage: validate_schema.py SCHEMA.json DOC.json... ; exit 0 when all fit."""
import json, sys

import jsonschema

schema = json.load(open(sys.argv[1]))
validator = jsonschema.validators.validator_for(schema)(schema)
bad = 0
for path in sys.argv[2:]:
    for err in validator.iter_errors(json.load(open(path))):
        print(f"{path}: {'/'.join(map(str, err.absolute_path))}: {err.message}")
        bad += 1
sys.exit(1 if bad else 0)
