#!/usr/bin/env bash
# What tests/test_gitlab_*.py need on a fresh Debian machine (run as root, non-interactive, idempotent):
#   - rsync (gitlab-ci-local copies the project with it),
#   - gitlab-ci-local 4.73.0 in .ci/node/ (4.74+ crash on Node 20: Set.prototype.union),
#   - check-jsonschema (vendored GitLab CI schema, works offline).
set -euo pipefail
cd "$(dirname "$0")/.."

GITLAB_CI_LOCAL_VERSION=4.73.0
CHECK_JSONSCHEMA_VERSION=0.39.0
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

if ! command -v rsync >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends rsync >/dev/null
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

prefix=.ci/node
installed=$(node -p "try { require('./$prefix/node_modules/gitlab-ci-local/package.json').version } catch (e) { '' }" 2>/dev/null || true)
if [ "$installed" != "$GITLAB_CI_LOCAL_VERSION" ]; then
  mkdir -p "$prefix"
  npm install --prefix "$prefix" --no-save --no-audit --no-fund --loglevel=error \
    "gitlab-ci-local@$GITLAB_CI_LOCAL_VERSION" >/dev/null
fi
"$prefix/node_modules/.bin/gitlab-ci-local" --version >/dev/null

python3 -m pip install -q "check-jsonschema==$CHECK_JSONSCHEMA_VERSION"
