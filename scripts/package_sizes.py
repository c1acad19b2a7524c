"""The Lambda functions of template.yaml and the size of what `sam build` made.

    package_sizes.py functions --template T
        one line per function: logical id, build method, binary or image
    package_sizes.py report --template T --build-dir D [--json OUT]
        each function's artifact zipped and unzipped against Lambda's limits;
        exit 1 if one is over a hard limit

Zipped sizes are those of the deployment package `sam package` uploads (the
artifact directory, deflated at the highest level, as the AWS CLI does).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import zipfile
from pathlib import Path

from cfnlint.decode import decode

MB = 1_000_000
# Lambda's quotas (https://docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html).
DIRECT_UPLOAD_ZIPPED = 50 * 1024 * 1024
UNZIPPED_LIMIT = 250 * 1024 * 1024
# This project's goals (issue #13).
GOAL_ZIPPED = 50 * MB
GOAL_UNZIPPED = 120 * MB


def functions(template: Path) -> list[tuple[str, str, str]]:
    """(logical id, build method, binary or image context) of every function."""
    parsed, errors = decode(str(template))
    if errors or parsed is None:
        raise SystemExit(f"cannot read {template}: {errors}")
    found = []
    for name, resource in parsed["Resources"].items():
        if resource.get("Type") != "AWS::Serverless::Function":
            continue
        metadata = resource.get("Metadata", {})
        if resource["Properties"].get("PackageType") == "Image":
            found.append((name, "image", metadata.get("DockerContext", "")))
        else:
            method = metadata.get("BuildMethod", "")
            binary = metadata.get("BuildProperties", {}).get("Binary", "")
            found.append((name, method, binary))
    return found


def zipped_size(directory: Path) -> int:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            archive.write(path, path.relative_to(directory))
    return buffer.tell()


def unzipped_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def verdict(zipped: int, unzipped: int) -> str:
    if unzipped > UNZIPPED_LIMIT:
        return "OVER Lambda's 250 MiB unzipped limit"
    notes = []
    if zipped > DIRECT_UPLOAD_ZIPPED:
        notes.append("over 50 MiB zipped: deploy through S3 (sam deploy does)")
    if zipped > GOAL_ZIPPED or unzipped > GOAL_UNZIPPED:
        notes.append("above the project's goal (50 MB zipped, 120 MB unzipped)")
    return "; ".join(notes) or "within limits and goals"


def report(template: Path, build_dir: Path, json_out: Path | None) -> int:
    rows, over = [], False
    print(f"{'function':<18} {'unzipped MB':>12} {'zipped MB':>10}  verdict")
    for name, method, source in functions(template):
        artifact = build_dir / name
        if method == "image" or not artifact.is_dir():
            print(f"{name:<18} {'-':>12} {'-':>10}  not built ({method} {source})")
            continue
        zipped, unzipped = zipped_size(artifact), unzipped_size(artifact)
        said = verdict(zipped, unzipped)
        over |= said.startswith("OVER")
        print(f"{name:<18} {unzipped / MB:>12.1f} {zipped / MB:>10.1f}  {said}")
        rows.append({"function": name, "binary": source, "zipped": zipped, "unzipped": unzipped})
    if json_out:
        json_out.write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if over else 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["functions", "report"])
    parser.add_argument("--template", type=Path, required=True)
    parser.add_argument("--build-dir", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.command == "functions":
        for row in functions(args.template):
            print(*row)
        return 0
    if args.build_dir is None:
        parser.error("report needs --build-dir")
    return report(args.template, args.build_dir, args.json)


if __name__ == "__main__":
    sys.exit(main())
