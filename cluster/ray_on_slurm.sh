#!/usr/bin/env bash
# A Ray cluster inside a SLURM allocation, then one sweep on it:
#
#   sbatch --nodes=4 --gpus-per-node=4 --cpus-per-task=32 --time=24:00:00 \
#       cluster/ray_on_slurm.sh configs/my_sweep.yaml
#
# One `ray start` per node (the head on the allocation's first node, the others joining it),
# then `dreamsweep run SPEC` on the head with RAY_ADDRESS set: give the spec
# `launcher: {kind: ray, address: auto}` (or no address: RAY_ADDRESS is used). Run it again in a
# new allocation after an interruption and the Tune experiment is restored from OUTPUT_DIR/ray/
# (the output folder must be on a filesystem every node shares).
#SBATCH --job-name=dreamsweep-ray
#SBATCH --ntasks-per-node=1
set -euo pipefail

spec=${1:?usage: sbatch [options] cluster/ray_on_slurm.sh SPEC}
port=${RAY_PORT:-6379}
cpus=${SLURM_CPUS_PER_TASK:-1}
gpus=${SLURM_GPUS_PER_NODE:-0}
gpus=${gpus##*:}  # "a100:4" → 4

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=${nodes[0]}
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head_node" hostname --ip-address | awk '{print $1}')
export RAY_ADDRESS="$head_ip:$port"
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}

# Each `ray start --block` lives as long as its srun step; the steps end with the job.
steps=()
srun --nodes=1 --ntasks=1 -w "$head_node" \
    ray start --head --node-ip-address="$head_ip" --port="$port" \
    --num-cpus="$cpus" --num-gpus="$gpus" --include-dashboard=false --block &
steps+=($!)
for _ in $(seq 60); do
    ray status --address="$RAY_ADDRESS" >/dev/null 2>&1 && break
    sleep 2
done
for node in "${nodes[@]:1}"; do
    srun --nodes=1 --ntasks=1 -w "$node" \
        ray start --address="$RAY_ADDRESS" --num-cpus="$cpus" --num-gpus="$gpus" --block &
    steps+=($!)
done
for _ in $(seq 60); do
    alive=$(python -c "import ray; ray.init(address='$RAY_ADDRESS', logging_level='ERROR'); \
print(sum(n['Alive'] for n in ray.nodes()))" 2>/dev/null || echo 0)
    [[ $alive -ge ${#nodes[@]} ]] && break
    sleep 2
done
echo "Ray cluster at $RAY_ADDRESS: ${alive:-0}/${#nodes[@]} nodes"

status=0
dreamsweep run "$spec" || status=$?
# End this job's own Ray steps (srun passes the signal to its `ray start --block`, which stops
# the Ray processes it started); `ray stop` would stop every Ray on the node, another job's too.
kill -TERM "${steps[@]}" 2>/dev/null || true
wait "${steps[@]}" 2>/dev/null || true
exit $status
