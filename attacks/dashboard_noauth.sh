#!/usr/bin/env bash
# Issue 10: the dashboard must require its login token (401 without it). Starts the real
# `fedveil dashboard` on a fresh store with a known token file, probes API routes without/with
# wrong/with query-string tokens and a few bypass shapes, then with the right Bearer token.
set -u
PY=/work/main/.venv/bin
D=$(mktemp -d)
$PY/python -c "from fedveil.server.store import RunStore; RunStore('$D/run.db').close()"
printf 'A%.0s' $(seq 1 40) > $D/tok; TOK=$(cat $D/tok)
PORT=$((20000 + RANDOM % 20000))
$PY/fedveil dashboard --store $D/run.db --task fedveil.tasks.synthetic --port $PORT --dashboard-token-file $D/tok > $D/log 2>&1 &
PID=$!
for i in $(seq 1 60); do curl -s -o /dev/null http://127.0.0.1:$PORT/ && break; sleep 0.5; done
req() { printf '%-62s -> ' "$*"; curl -s -o /tmp/dash_body -w '%{http_code}' "$@"; printf '  %s\n' "$(head -c 90 /tmp/dash_body | tr '\n' ' ')"; }
U=http://127.0.0.1:$PORT
req $U/api/status
req $U/api/runs
req -X POST -H 'X-Fedveil-Request: 1' -d '{}' $U/api/runs
req -X POST -H 'X-Fedveil-Request: 1' -d '{}' $U/api/predict
req -X DELETE -H 'X-Fedveil-Request: 1' $U/api/hospitals/x/upload
req "$U/api/status?token=$TOK"
req -H "Authorization: Bearer WRONGWRONGWRONGWRONGWRONGWRONGWRONG" $U/api/status
req -H "Authorization: bearer $TOK " $U/api/status
req -H "Cookie: fedveil-dashboard-$PORT=$TOK" $U/api/status
req -H "Authorization: Bearer ${TOK:0:39}" $U/api/status
req "$U/index.html?token=wrong"
req "$U/index.html/../api/status"
req -X HEAD $U/api/runs
req -H 'Host: evil.example' -H "Authorization: Bearer $TOK" $U/api/status
req -H "Authorization: Bearer $TOK" $U/api/status
req -H "Authorization: Bearer $TOK" $U/api/nonexistent
grep -c "$TOK" $D/log | sed 's/^/token occurrences in the log: /'
kill $PID; wait $PID 2>/dev/null
