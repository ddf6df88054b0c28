#!/usr/bin/env bash
# shellcheck disable=SC2016 # the remote command's $ expands on the workers
# Usage: tpu/setup.sh [options]
#
# On every worker of the slice, at once: clones (or fetches) the project into ~/lmhead_jax, checks
# out COMMIT, makes a Python venv ~/lmhead_jax/.venv with uv and runs pip install -e ".[tpu]" in it.
# Run it again after pushing new commits.
#
#   --name, --zone, --project   the slice (env LMHEAD_TPU_NAME, LMHEAD_TPU_ZONE, LMHEAD_TPU_PROJECT)
#   --repo URL          git URL the workers clone (env LMHEAD_REPO; required)
#   --commit REV        commit to install (env LMHEAD_COMMIT; default: this checkout's HEAD, which
#                       must be pushed to --repo)
#   --python VERSION    Python for the venv (env LMHEAD_PYTHON; default 3.12)
#   --dry-run           print the gcloud command, run nothing
#   -h, --help          this help

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

REPO=${LMHEAD_REPO:-}
COMMIT=${LMHEAD_COMMIT:-}
PYTHON=${LMHEAD_PYTHON:-3.12}
OPTIONS+=([repo]=REPO [commit]=COMMIT [python]=PYTHON)
parse_args "$@"
(( ${#ARGS[@]} == 0 )) || die "unexpected argument(s): ${ARGS[*]}"

[[ -n $REPO ]] || die "no repository URL: set LMHEAD_REPO or pass --repo URL (the workers clone it)"
if [[ -z $COMMIT ]]; then
  COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null) ||
    die "cannot read the commit of $ROOT: pass --commit REV"
  [[ -z $(git -C "$ROOT" status --porcelain --untracked-files=no) ]] ||
    warn "uncommitted changes in $ROOT are not installed on the workers (only commit $COMMIT is)"
fi

remote="repo=$(shquote "$REPO"); commit=$(shquote "$COMMIT"); python=$(shquote "$PYTHON"); "'set -e;
  [ -d lmhead_jax/.git ] || git clone -q "$repo" lmhead_jax;
  cd lmhead_jax && git remote set-url origin "$repo" && git fetch -q origin &&
    git checkout -q --detach "$commit";
  [ -x ~/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh;
  ~/.local/bin/uv venv -q --seed --allow-existing --python "$python" .venv;
  .venv/bin/pip install -q -e ".[tpu]";
  echo "lmhead: $(hostname) ready at $(git rev-parse --short HEAD), python $(.venv/bin/python -V)"'
on_workers all "setup failed" "$remote"
