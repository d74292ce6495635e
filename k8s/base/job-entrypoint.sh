#!/bin/sh
# Entrypoint of the learner, actor and evaluator Jobs: `crl ROLE ...` whose exit code tells the
# Job what happened. The roles exit 0 both when the run finished (contract B) and after a
# SIGTERM (a clean stop); to a Job, 0 means "done, never run again". So a pod stopped by
# Kubernetes (eviction, preemption, node drain, `kubectl delete pod`) exits 143 instead and
# its Job starts a replacement that resumes; only a role that ended by itself passes its own
# code on (0 at the budget, non-zero on a crash).
stopped=0
trap 'stopped=1; kill -TERM "$child" 2>/dev/null' TERM INT
crl "$@" &
child=$!
while :; do
    wait "$child"
    rc=$?
    kill -0 "$child" 2>/dev/null || break     # a trapped signal interrupted the wait: again
done
if [ "$stopped" = 1 ]; then
    exit 143
fi
exit "$rc"
