#!/usr/bin/env bash
# The whole placement study of one family on a 2-core machine, resumable: rerun the same command
# after an interruption and every finished run is skipped (python -m python.studies.placement.study
# keeps them in python/results/placement/FAMILY/runs.jsonl). Two processes of one thread each
# share the family's folder where the work splits cleanly: the core test one task each, the
# budget stage one half of the arms each (after the decisions and the base model's runs, which
# both halves need, are made once). Each half is a queue of (arms, budgets) calls in the order of what matters most to the
# study's questions (the 0.7% arms and vanilla LoRA first), so that a study cut short by the
# clock has its most important comparisons. Progress: FAMILY/log.txt and tqdm bars on stderr.
#
#     bash python/studies/placement/run_all.sh smollm2        # or gemma3
#     CUT=1 bash python/studies/placement/run_all.sh gemma3   # Gemma 3's reduced plan (below)
#
# Extra arguments go to every stage, e.g. --tasks / --core-tasks / --budget-tasks for another cut.
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root: the study runs as a module from there
FAMILY=${1:-smollm2}
shift || true
PY=${PYTHON:-.venv/bin/python}
STUDY=(-m python.studies.placement.study --family "$FAMILY" "$@")
CORE_TASKS=(math instruction)
# The budgets run on instruction: on maths every module but q/k reached the same loss drop in the
# core test (1.42-1.44), so placements cannot differ there; on instruction they ranged 0.8-1.7.
# Every instruction core pick was >= 1e-2, so the budget grids of narrow arms start half a decade
# above the core's (3.16e-3 .. 1e-1) instead of spending a run on 1e-3 and one on an extension.
BUDGET_TASK=${BUDGET_TASK:-instruction}
BUDGET_LR=(--lr-single 0.00316)
# "arms:budgets" per call; the two queues have about equal predicted hours (--plan)
QUEUE_A=(page_top1:0.007 lora_all:0.007 page_budget:0.007 shallow_down:0.007 page_budget:0.05 lora_qv:0.007
         page_top1:0.05 shallow_down:0.05)
QUEUE_B=(eva:0.007 random_module:0.007 kappatune:0.007 plop_vod:0.05 eva:0.05 kappatune:0.05 random_module:0.05
         plop_vod:0.007)
# The package's strategy arms (docs/placement_protocol.md), after the arms above. Their wide plans
# (types, at 5%) start the rate grid at 1e-3, not 1e-4: plop_vod's pick at 5% was 1e-2, so a grid
# from 1e-4 would spend its first points below it and extend twice.
STRATEGY_LR=(--lr-multi 0.001)
# heldout after adam in one queue: where the two plan alike, heldout's runs are adam's, copied
QUEUE_SA=(adam:0.007 heldout:0.007 adam:0.05 heldout:0.05)
QUEUE_SB=(types:0.007 pilot:0.007 types:0.05 pilot:0.05)

# Gemma 3's reduced plan, about 3 hours of the 2-core machine (CUT=1; python/results/placement/gemma3/plan_cut.txt):
# the core test on the budget task alone, in parallel with that task's budget stage at 0.7% plus
# vanilla LoRA. The wide arms go first: they tune their own rates, while the single-module arms
# that come later take their module type's core-stage rate once the core test has picked it
# (before that they tune their own grid, recorded "from": "grid" in lr_picks.json).
CUT_QUEUE=(lora_all:0.007 page_budget:0.007 kappatune:0.007 eva:0.007 page_top1:0.007 shallow_down:0.007
           random_module:0.007)

core() { "$PY" "${STUDY[@]}" --stage core --tasks "$1" --core-tasks "$1" --budget-tasks=; }
budget() { "$PY" "${STUDY[@]}" --stage budget --tasks $BUDGET_TASK --budget-tasks $BUDGET_TASK "${BUDGET_LR[@]}" "$@"; }
queue() {  # one budget call per "arms:budgets" entry, in order
    local e
    for e in "$@"; do
        budget --budget-arms "${e%%:*}" --budgets "${e##*:}" || return
    done
}
squeue() { local e; for e in "$@"; do budget "${STRATEGY_LR[@]}" --budget-arms "${e%%:*}" --budgets "${e##*:}" || return; done; }
source python/studies/placement/both.sh  # both "cmd1" "cmd2": the two in parallel

"$PY" "${STUDY[@]}" --stage probe
if [ "${CUT:-}" = 1 ]; then
    # the budget stage's first call makes the decisions and the base model's runs the arms need
    both "core $BUDGET_TASK" "budget --budget-arms= && queue ${CUT_QUEUE[*]}"
    arms=("${CUT_QUEUE[@]%%:*}")
    # the report's "planned" is this cut's (plan_cut.txt), not the whole study's
    "$PY" "${STUDY[@]}" --stage report --tasks $BUDGET_TASK --core-tasks $BUDGET_TASK --budget-tasks $BUDGET_TASK \
        --budgets 0.007 --budget-arms "$(IFS=,; echo "${arms[*]}")"
    exit 0
fi
both "core ${CORE_TASKS[0]}" "core ${CORE_TASKS[1]}"
budget --budget-arms=
both "queue ${QUEUE_A[*]}" "queue ${QUEUE_B[*]}"
both "squeue ${QUEUE_SA[*]}" "squeue ${QUEUE_SB[*]}"
"$PY" "${STUDY[@]}" --stage report
