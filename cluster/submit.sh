#!/usr/bin/env bash
# Submit a groundup stage to a Ray cluster as a Ray job (the code is shipped as the working dir).
#
#   cluster/submit.sh [options] STAGE [stage arguments ...]    submit `groundup STAGE ...` and follow its logs
#   cluster/submit.sh [--address ADDR] logs JOB_ID              follow a job's logs
#   cluster/submit.sh [--address ADDR] status JOB_ID | stop JOB_ID | list
#
# STAGE: data, pretrain, serve, prefs (as in `prefs export`), quickstart, or a later stage
#        (tune, scaling, sft, reward, ppo, evaluate). Everything after STAGE goes to `groundup STAGE` unchanged.
# options:
#   --address ADDR      the cluster: GCS address (host:6379) or job server (http://host:8265);
#                       default: $RAY_ADDRESS
#   --no-wait           submit and return; print the job id and how to follow it
#   --job-id ID         submission id (default: groundup-STAGE-<time>)
#   --env KEY=VALUE     an environment variable for the job (repeatable), e.g. AWS_REGION=us-west-2
#   --working-dir DIR   the code to ship (default: the repository root)
#
# examples:
#   cluster/submit.sh data --input s3://<your-bucket>/corpus/ --run s3://<your-bucket>/runs/r1
#   cluster/submit.sh pretrain --run s3://<your-bucket>/runs/r1 --model 125m --workers 4 train.use_gpu=true
#   cluster/submit.sh --no-wait serve --model chat=/mnt/runs/r1/sft/final --num-gpus 1 --host 0.0.0.0 block=false
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
STAGES=" data pretrain serve prefs quickstart tune scaling sft reward ppo evaluate "

usage() {
  [[ $# -gt 0 ]] && echo "submit.sh: $*" >&2
  sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

address="${RAY_ADDRESS:-}"
wait=1
job_id=""
working_dir="$REPO"
envs=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) [[ $# -ge 2 ]] || usage "--address needs a value"; address="$2"; shift 2 ;;
    --address=*) address="${1#*=}"; shift ;;
    --no-wait) wait=0; shift ;;
    --job-id) [[ $# -ge 2 ]] || usage "--job-id needs a value"; job_id="$2"; shift 2 ;;
    --env) [[ $# -ge 2 && "$2" == *=* ]] || usage "--env needs KEY=VALUE"; envs+=("$2"); shift 2 ;;
    --working-dir) [[ $# -ge 2 ]] || usage "--working-dir needs a value"; working_dir="$2"; shift 2 ;;
    -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) usage "unknown option $1" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || usage "no STAGE given"
[[ -n "$address" ]] || usage "no cluster address: pass --address or export RAY_ADDRESS (cluster/local_cluster.sh start prints one)"
command -v ray >/dev/null || { echo "submit.sh: 'ray' not found (pip install 'ray[default]==2.60.0')" >&2; exit 1; }

action="$1"; shift
case "$action" in
  logs) [[ $# -eq 1 ]] || usage "logs needs JOB_ID"; exec ray job logs --address "$address" --follow "$1" ;;
  status) [[ $# -eq 1 ]] || usage "status needs JOB_ID"; exec ray job status --address "$address" "$1" ;;
  stop) [[ $# -eq 1 ]] || usage "stop needs JOB_ID"; exec ray job stop --address "$address" "$1" ;;
  list) [[ $# -eq 0 ]] || usage "list takes no arguments"; exec ray job list --address "$address" ;;
esac
[[ "$STAGES" == *" $action "* ]] || usage "unknown STAGE '$action'"
[[ -d "$working_dir" ]] || usage "no such working dir: $working_dir"

job_id="${job_id:-groundup-$action-$(date +%Y%m%d-%H%M%S)}"
# The runtime environment: what every stage sets for itself in tests (one log line per message across
# workers, no tokenizers fork warnings, Ray Train v2), plus --env pairs. Code from the working dir
# shadows the installed package; big or private things stay behind (.gitignore is honoured as well).
runtime_env="$(python3 - "${envs[@]+"${envs[@]}"}" <<'PY'
import json, sys
env = {"RAY_DEDUP_LOGS": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_V2_ENABLED": "1"}
env.update(kv.split("=", 1) for kv in sys.argv[1:])
print(json.dumps({"env_vars": env,
                  "excludes": [".git", "runs/", "**/__pycache__", "*.egg-info", ".venv/", "*.safetensors",
                               "*.pt", "*.bin"]}))
PY
)"

args=(ray job submit --address "$address" --submission-id "$job_id" --working-dir "$working_dir"
      --runtime-env-json "$runtime_env")
[[ "$wait" == 0 ]] && args+=(--no-wait)
echo "submitting $job_id to $address: groundup $action $*" >&2
"${args[@]}" -- groundup "$action" "$@"
if [[ "$wait" == 0 ]]; then
  echo >&2
  echo "follow:  $0 --address $address logs $job_id    (or: ray job logs -f $job_id)" >&2
  echo "status:  $0 --address $address status $job_id" >&2
  echo "stop:    $0 --address $address stop $job_id" >&2
fi
