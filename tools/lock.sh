#!/usr/bin/env bash
# `make lock`: regenerate requirements/lock.txt from the ranges in setup.cfg
# (fcq's dependencies and its test extra) and requirements/build.in, at the
# newest versions those ranges allow today, with the hashes of every file.
# `make floors`: the lowest versions setup.cfg allows for fcq's own direct
# dependencies, in build/floors-venv, and the tests that need no QEMU run
# against them: the floors in setup.cfg are the ones that pass there.
#
# Both use uv (pinned below) from a virtualenv of its own under build/;
# installing fcq never needs uv, only pip and the lock.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.8
tools=build/lock-tools
if [ "$("$tools/bin/uv" --version 2>/dev/null | cut -d' ' -f2)" != "$UV_VERSION" ]; then
    rm -rf "$tools"
    python3 -m venv "$tools"
    "$tools/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
fi
uv=$tools/bin/uv

case "${1:-lock}" in
lock)
    "$uv" pip compile -q setup.cfg requirements/build.in --extra test --upgrade \
        --generate-hashes --python-version 3.11 --custom-compile-command "make lock" \
        -o requirements/lock.txt
    echo "lock: requirements/lock.txt written; run make test on a fresh clone before committing"
    ;;
floors)
    "$uv" pip compile -q setup.cfg --resolution lowest-direct --python-version 3.11 \
        --custom-compile-command "make floors" -o build/floors.txt
    rm -rf build/floors-venv
    python3 -m venv build/floors-venv
    "$uv" pip install -q --python build/floors-venv/bin/python -r build/floors.txt \
        "$(grep -E '^pytest==' requirements/lock.txt | cut -d' ' -f1)"
    "$uv" pip install -q --python build/floors-venv/bin/python --no-deps -e .
    site=$(build/floors-venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    realpath .venv/ceph-bindings > "$site/fcq-ceph-bindings.pth"
    grep -E '^[a-z].*==' build/floors.txt | cut -d' ' -f1 | tr '\n' ' '; echo
    shift
    # Without arguments: the tests that exercise the dependencies without a
    # guest (settings, plan, logs, metrics, progress) and those that run
    # real workers, beat and Sentinel against Redis (celery, kombu,
    # redis-py, flower at their floors).
    if [ $# -eq 0 ]; then
        set -- tests/test_config.py tests/test_plan.py tests/test_plan_preview.py \
            tests/test_progress.py tests/test_metrics.py tests/test_oplock.py \
            tests/test_phases.py tests/test_storage_local.py tests/test_logs.py \
            tests/test_beat_fanout.py tests/test_sentinel.py tests/test_cluster.py
    fi
    build/floors-venv/bin/pytest -q "$@"
    ;;
*)
    echo "usage: $0 [lock|floors]" >&2; exit 2
    ;;
esac
