#!/usr/bin/env bash
# Training on a Cloud TPU VM pod slice (e.g. v5p-32: 4 hosts): the same command runs on every host
# (`gcloud ... ssh --worker=all`); JAX detects the Cloud TPU pod, process 0 is worker 0 and no
# address flag is needed.
#
#   export TPU_NAME=<TPU_NAME> ZONE=<ZONE> PROJECT=<PROJECT>
#   bash scripts/launch/tpu_pod.sh setup                         # once: code + venv on all hosts
#   bash scripts/launch/tpu_pod.sh train CONFIG WORKDIR [train flags ...]
#   bash scripts/launch/tpu_pod.sh stop                          # SIGTERM: checkpoint, then exit
#
# WORKDIR and the config's data_dir must be the same path on every host and shared by them (a
# Filestore/NFS mount or a gcsfuse mount of a bucket; checkpoints are written by all hosts).
# `train` runs detached (nohup) so that a dropped ssh session does not kill it; each host logs to
# ~/isic-jax-train.log. Maintenance events and `stop` send SIGTERM: every host finishes its step,
# all save one checkpoint and exit; rerunning `train` resumes from WORKDIR.
set -euo pipefail

TPU_NAME="${TPU_NAME:?set TPU_NAME=<TPU_NAME> (the TPU VM name)}"
ZONE="${ZONE:?set ZONE=<ZONE>, e.g. us-east5-a}"
PROJECT="${PROJECT:?set PROJECT=<PROJECT> (the Google Cloud project id)}"
REMOTE_DIR="${REMOTE_DIR:-isic_jax}"          # relative to the home directory of each host
PYTHON="${PYTHON:-python3.11}"                # the project needs Python >= 3.11; TPU VM images
                                              # (Ubuntu 22.04) ship 3.10, setup installs 3.11
LOG="isic-jax-train.log"

on_all_hosts() {
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --project="${PROJECT}" \
    --worker=all --command="$1"
}

quote() { printf '%q ' "$@"; }

cmd="${1:-}"
shift || true
case "${cmd}" in
  setup)
    # Copies this checkout (without its venv) to every host and installs it with jax[tpu].
    repo="$(cd "$(dirname "$0")/../.." && pwd)"
    tar -C "${repo}" --exclude=.venv --exclude=.git -czf /tmp/isic_jax_src.tgz .
    gcloud compute tpus tpu-vm scp /tmp/isic_jax_src.tgz "${TPU_NAME}:~/isic_jax_src.tgz" \
      --zone="${ZONE}" --project="${PROJECT}" --worker=all
    on_all_hosts "set -e; command -v ${PYTHON} >/dev/null || { sudo apt-get update -qq \
      && sudo apt-get install -y -qq ${PYTHON} ${PYTHON}-venv; }; \
      mkdir -p ${REMOTE_DIR} && tar -xzf ~/isic_jax_src.tgz -C ${REMOTE_DIR} \
      && cd ${REMOTE_DIR} && ${PYTHON} -m venv .venv && . .venv/bin/activate \
      && pip install -q --upgrade pip && pip install -q -e . 'jax[tpu]'"
    ;;
  train)
    [[ $# -ge 2 ]] || { echo "usage: $0 train CONFIG WORKDIR [train flags ...]" >&2; exit 2; }
    args="$(quote --config="$1" --workdir="$2" "${@:3}")"
    on_all_hosts "cd ${REMOTE_DIR} && . .venv/bin/activate && \
      nohup isic-jax train ${args} > ~/${LOG} 2>&1 < /dev/null &"
    echo "started on all hosts of ${TPU_NAME}; logs: ~/${LOG} on each host, e.g."
    echo "  gcloud compute tpus tpu-vm ssh ${TPU_NAME} --zone=${ZONE} --worker=0 --command='tail -f ~/${LOG}'"
    ;;
  stop)
    # This user's `isic-jax train` processes ([i]: the pattern does not match this ssh command).
    on_all_hosts "pgrep -u \$(id -u) -f '[i]sic-jax train' | xargs -r kill -TERM"
    ;;
  *)
    echo "usage: $0 setup | train CONFIG WORKDIR [train flags ...] | stop" >&2
    exit 2
    ;;
esac
