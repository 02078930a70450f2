# Sourced by run_all.sh and confirm.sh: run two commands (strings naming the caller's shell
# functions) in parallel, one process a core, and fail if either fails.
both() {
    eval "$1" & local a=$!
    eval "$2" & local b=$!
    local rc=0
    wait $a || rc=$?
    wait $b || rc=$?
    return $rc
}
