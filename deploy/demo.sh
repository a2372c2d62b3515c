#!/usr/bin/env bash
# The main job, end to end on one machine (`make demo`):
#   a cluster CA in a temp HERD_HOME (herd init), `herd up --workers 2` (coordinator + 2 worker agents on
#   loopback), a tiny model and dataset, a 2-worker LoRA job submitted and watched through the CLI,
#   the adapter pulled from the coordinator, and a sample generated with it by mlx-lm.
# Every process it starts is stopped on exit. HERD_DEMO_KEEP=1 keeps the temp folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
herd() { "$PY" -m herd "$@"; }

WORK=$(mktemp -d -t herd-demo-XXXXXX)
export HERD_HOME="$WORK/home"
export HERD_ZEROCONF_INTERFACES=127.0.0.1
export HERD_LOG_LEVEL=${HERD_LOG_LEVEL:-warning}
UP_PID=""
cleanup() {
  local code=$?
  if [[ -n "$UP_PID" ]] && kill -0 "$UP_PID" 2>/dev/null; then
    kill -TERM "$UP_PID" 2>/dev/null || true
    wait "$UP_PID" 2>/dev/null || true
  fi
  if [[ "${HERD_DEMO_KEEP:-0}" == 1 || $code -ne 0 ]]; then
    echo "demo: files (and logs, in $WORK/cluster) kept in $WORK"
  else
    rm -rf "$WORK"
  fi
  exit $code
}
trap cleanup EXIT INT TERM

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
HTTP_PORT=${HERD_DEMO_HTTP_PORT:-$(free_port)}  # (not 7480: a coordinator of yours may hold it)
COORD="127.0.0.1:$PORT"

echo "== herd init"
herd init
echo "== herd up --workers 2"
# Started directly (not through the shell function) so $! is herd up itself, which stops its
# coordinator and workers on SIGTERM.
"$PY" -m herd up --workers 2 --port "$PORT" --http-port "$HTTP_PORT" --state-dir "$WORK/cluster" &
UP_PID=$!

echo "== tiny model and dataset"
herd tiny-model "$WORK/model" --arch llama --layers 4 --hidden 256
herd tiny-data "$WORK/data" --format text
cp deploy/demo-config.yaml "$WORK/job.yaml"   # model: model, data: data, from $WORK

echo "== waiting for 2 verified workers"
herd workers --wait 2 --coordinator "$COORD"

echo "== herd submit"
# Relative paths in a job config resolve from the current folder, as in mlx_lm.lora.
JOB=$(cd "$WORK" && herd submit job.yaml --coordinator "$COORD")
echo "== herd watch $JOB"
herd watch "$JOB" --coordinator "$COORD"
herd jobs --coordinator "$COORD"

echo "== herd pull $JOB"
herd pull "$JOB" -o "$WORK/adapter" --coordinator "$COORD"
ls -l "$WORK/adapter"

PROMPT="question: colour of the dog"
echo "== mlx_lm.generate, base model"
"$PY" -m mlx_lm generate --model "$WORK/model" --ignore-chat-template \
  --prompt "$PROMPT" --max-tokens 12 --temp 0
echo "== mlx_lm.generate with the pulled adapter"
"$PY" -m mlx_lm generate --model "$WORK/model" --adapter-path "$WORK/adapter" --ignore-chat-template \
  --prompt "$PROMPT" --max-tokens 12 --temp 0
echo "demo: done"
