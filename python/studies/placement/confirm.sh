#!/usr/bin/env bash
# The confirmation of the default placement (docs/placement_protocol.md) on one family and task,
# at both budgets, resumable like run_all.sh (every finished run is skipped on a rerun):
#
#     bash python/studies/placement/confirm.sh smollm2 chat
#     bash python/studies/placement/confirm.sh qwen05 instruction
#
# Order: the task's probe if missing; the decisions and the base model's runs; then per cell
# (0.7%, then 5%) the peers and vanilla LoRA, two queues in parallel, and, on a task other than
# the design task, only if the peers separate (best peer clear of the worst: `decide separation`,
# exit status 3 when they tie), the committed default's arm (`decide arm`,
# from python/results/placement/decision.json); last the confirmation table (`decide confirm`).
# The rate grids start at 3.16e-3 (single-module arms) and 1e-3 (wide arms) for every arm here
# (the design runs started wide peers at 1e-4; every wide pick there was >= 1e-3); a pick at a
# grid edge extends the grid either way. Extra arguments go to every study call. The criterion
# pools every confirmation cell: `decide confirm` over all of them (docs/placement_protocol.md).
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
source python/studies/placement/both.sh  # both "cmd1" "cmd2": the two in parallel

[ -f "python/results/placement/$FAMILY/predictors_$TASK.json" ] || "$PY" "${STUDY[@]}" --stage probe --tasks "$TASK"
budget --budget-arms=
# One cell at a time, the 0.7% cell first (a run cut by the clock then has one whole cell): its
# peers and vanilla LoRA in two queues of about equal work, then the default's arm if they separate.
declare -A QUEUE_A=([0.007]="random_module kappatune page_budget" [0.05]="plop_vod kappatune random_module page_budget")
declare -A QUEUE_B=([0.007]="eva shallow_down lora_all page_top1" [0.05]="eva shallow_down page_top1")
cells=()
defaults=()  # ARM@BUDGET of each default arm run: the report plans it at that budget only
for b in "${BUDGETS[@]}"; do
    cell="$FAMILY:$TASK:$b"
    cells+=("$cell")
    a=(${QUEUE_A[$b]}) && a=("${a[@]/%/:$b}")
    c=(${QUEUE_B[$b]}) && c=("${c[@]/%/:$b}")
    both "queue ${a[*]}" "queue ${c[*]}"
    if [ "$TASK" != instruction ]; then  # the design task needs no gate; another task must separate placements
        rc=0
        "$PY" "${DECIDE[@]}" separation --cells "$cell" || rc=$?
        if [ $rc -eq 3 ]; then
            echo "$cell: the peers tie, so the cell is no evidence; the default is not run there" >&2
            continue
        elif [ $rc -ne 0 ]; then
            exit $rc
        fi
    fi
    arm=$("$PY" "${DECIDE[@]}" arm --cells "$cell")
    queue "$arm:$b"
    defaults+=("$arm@$b")
done
arms="random_module,kappatune,page_budget,plop_vod,eva,shallow_down,lora_all,page_top1$(if ((${#defaults[@]})); then printf ',%s' "${defaults[@]}"; fi)"
"$PY" "${STUDY[@]}" --stage report --tasks "$TASK" --budget-tasks "$TASK" --budget-arms "$arms"
"$PY" "${DECIDE[@]}" confirm --cells "$(IFS=,; echo "${cells[*]}")" --out "python/results/placement/$FAMILY"
