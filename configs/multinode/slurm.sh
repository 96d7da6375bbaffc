#!/bin/bash
# Multi-node DP-SGD with SLURM: one task per GPU; Lightning's SLURMEnvironment reads the ranks from srun.
#   sbatch configs/multinode/slurm.sh
# Keep --nodes / --ntasks-per-node equal to trainer.num_nodes / trainer.devices in the config.
#SBATCH --job-name=eqlightning-dp
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
set -euo pipefail
cd "${SLURM_SUBMIT_DIR}"
# every rank writes to runs/<run_name>/slurm-<job id> (or set EQL_RUN_ID yourself)
srun .venv/bin/python cli.py fit --config configs/multinode/pneumoniamnist_dp_eps8.yaml \
    --trainer.num_nodes "${SLURM_NNODES}" --trainer.devices "${SLURM_NTASKS_PER_NODE}"
