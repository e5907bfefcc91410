"""Validates a CycloneDX 1.5 JSON SBOM against the format's published JSON schema, with the
CycloneDX project's own validator (cyclonedx-python-lib). Prints `valid`, or the first problem
and exits 1."""

import sys

from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

with open(sys.argv[1], encoding="utf-8") as sbom:
    error = JsonStrictValidator(SchemaVersion.V1_5).validate_str(sbom.read())
if error is not None:
    cause = error.data
    where = "/".join(str(part) for part in getattr(cause, "absolute_path", []))
    print(f"invalid at /{where}: {getattr(cause, 'message', cause)}")
    sys.exit(1)
print("valid")
