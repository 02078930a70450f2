#!/usr/bin/env bash
# The whole placement study of one family on a 2-core machine, resumable: rerun the same command
# after an interruption and every finished run is skipped (python/placement_study.py keeps them in
# python/results/placement/FAMILY/runs.jsonl). Two processes of one thread each share the family's
# folder where the work splits cleanly: the core test one task each, the budget stage one half of
# the arms each (after the decisions and the base model's runs, which both halves need, are made
# once). Progress: FAMILY/log.txt and each process's tqdm bars on stderr.
#
#     bash python/placement_all.sh smollm2        # or gemma3
#
# Extra arguments go to every stage, e.g. --tasks / --core-tasks / --budget-tasks for another cut.
set -euo pipefail
cd "$(dirname "$0")/.."
FAMILY=${1:-smollm2}
shift || true
PY=${PYTHON:-.venv/bin/python}
STUDY=(python/placement_study.py --family "$FAMILY" "$@")
CORE_TASKS=(math instruction)
BUDGET_TASK=math
HALF_A=page_top1,page_budget,shallow_down,random_module,lora_qv
HALF_B=plop_vod,eva,kappatune,lora_all

run_pair() {  # two stage commands in parallel; fail if either fails
    "$PY" "${STUDY[@]}" $1 & local a=$!
    "$PY" "${STUDY[@]}" $2 & local b=$!
    local rc=0
    wait $a || rc=$?
    wait $b || rc=$?
    return $rc
}

"$PY" "${STUDY[@]}" --stage probe
run_pair "--stage core --tasks ${CORE_TASKS[0]} --core-tasks ${CORE_TASKS[0]} --budget-tasks=" \
         "--stage core --tasks ${CORE_TASKS[1]} --core-tasks ${CORE_TASKS[1]} --budget-tasks="
"$PY" "${STUDY[@]}" --stage budget --tasks $BUDGET_TASK --budget-arms=
run_pair "--stage budget --tasks $BUDGET_TASK --budget-arms $HALF_A" \
         "--stage budget --tasks $BUDGET_TASK --budget-arms $HALF_B"
"$PY" "${STUDY[@]}" --stage report
