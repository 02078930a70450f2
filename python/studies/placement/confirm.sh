#!/usr/bin/env bash
# The confirmation of the default placement (docs/placement_protocol.md) on one family and task,
# at both budgets, resumable like run_all.sh (every finished run is skipped on a rerun):
#
#     bash python/studies/placement/confirm.sh smollm2 chat
#     bash python/studies/placement/confirm.sh qwen05 instruction
#
# Order: the task's probe if missing; the decisions and the base model's runs; the peers and
# vanilla LoRA, two queues in parallel; then, in each cell where the peers separate (best peer
# clear of the worst: `decide separation`), the committed default's arm (`decide arm`, from
# python/results/placement/decision.json); last the confirmation table (`decide confirm`).
# The rate grids start at 3.16e-3 (single-module arms) and 1e-3 (wide arms) for every arm here;
# a pick at a grid edge extends the grid either way. Extra arguments go to every study call.
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root: the study runs as a module from there
FAMILY=${1:?usage: confirm.sh FAMILY TASK}
TASK=${2:?usage: confirm.sh FAMILY TASK}
shift 2
PY=${PYTHON:-.venv/bin/python}
STUDY=(-m python.studies.placement.study --family "$FAMILY" "$@")
DECIDE=(-m python.studies.placement.decide)
BUDGETS=(0.007 0.05)
[ -f python/results/placement/decision.json ] || { echo "no committed decision.json: run decide first" >&2; exit 2; }

budget() { "$PY" "${STUDY[@]}" --stage budget --tasks "$TASK" --budget-tasks "$TASK" --lr-single 0.00316 --lr-multi 0.001 "$@"; }
queue() { local e; for e in "$@"; do budget --budget-arms "${e%%:*}" --budgets "${e##*:}" || return; done; }
both() {  # two commands (strings of the functions above) in parallel; fail if either fails
    eval "$1" & local a=$!
    eval "$2" & local b=$!
    local rc=0
    wait $a || rc=$?
    wait $b || rc=$?
    return $rc
}

[ -f "python/results/placement/$FAMILY/predictors_$TASK.json" ] || "$PY" "${STUDY[@]}" --stage probe --tasks "$TASK"
budget --budget-arms=
# the two queues have about equal work: the 0.7% cell first, so that a cut run has one whole cell
QUEUE_A=(random_module:0.007 kappatune:0.007 page_budget:0.007 plop_vod:0.05 kappatune:0.05 random_module:0.05)
QUEUE_B=(eva:0.007 shallow_down:0.007 lora_all:0.007 eva:0.05 shallow_down:0.05)
both "queue ${QUEUE_A[*]}" "queue ${QUEUE_B[*]}"
cells=()
defaults=()
for b in "${BUDGETS[@]}"; do
    cell="$FAMILY:$TASK:$b"
    cells+=("$cell")
    if "$PY" "${DECIDE[@]}" separation --cells "$cell"; then
        defaults+=("$("$PY" "${DECIDE[@]}" arm --cells "$cell"):$b")
    else
        echo "$cell: the peers tie, so the cell is no evidence; the default is not run there" >&2
    fi
done
if [ ${#defaults[@]} -eq 2 ]; then
    both "queue ${defaults[0]}" "queue ${defaults[1]}"
elif [ ${#defaults[@]} -eq 1 ]; then
    queue "${defaults[0]}"
fi
"$PY" "${STUDY[@]}" --stage report --tasks "$TASK" --budget-tasks "$TASK"
"$PY" "${DECIDE[@]}" confirm --cells "$(IFS=,; echo "${cells[*]}")" --out "python/results/placement/$FAMILY"
