#!/usr/bin/env bash
# The issue-14 study queue: seed after seed, the baseline pipeline, then transfer variants on its base and mask.
# Variants with --transfer-seed-from replay the baseline's transfer seed (paired: same data, initialisation and
# batches; only the conditions a variant changes are rerun). One process at a time on one thread; each
# `run ... --seeds k` call only does seed k's missing stages, so killing this loop between calls and starting it
# again loses nothing.
#     nohup bash studies/arith_queue.sh 10 > checkpoints/arith/queue.out 2>&1 &
#     .venv/bin/python studies/arith_seeds.py summary baseline inherit_only legacy reinit retransfer --against baseline
# Stop 16's study of the current preset (l0 penalty 1e-5), two queues side by side (one thread each): seeds 1-3 on
# the baseline's bases, replaying its transfer seeds (random_init is then the baseline's), seeds 4-10 whole:
#     run l0_1e-5 --start K --seeds K --base-from baseline --transfer-seed-from baseline \
#         --ablate-set mask.l0_lambda=1e-5 --transfer-set 'transfer.conditions=[subnet,sampled_subnet]'   (K = 1..3)
#     run l0_1e-5 --start K --seeds K --ablate-set mask.l0_lambda=1e-5                                    (K = 4..10)
#     .venv/bin/python studies/arith_seeds.py summary l0_1e-5 baseline --against baseline
set -e
cd "$(dirname "$0")/.."
py=.venv/bin/python
paired="--mask-from baseline --transfer-seed-from baseline"
for k in $(seq 1 "${1:-10}"); do
  # the preset as it was until stop 15 (l0 penalty 1e-7); stop 16 raised the preset's to 1e-5
  $py studies/arith_seeds.py run baseline --seeds "$k" --ablate-set mask.l0_lambda=1e-7
  # control: embeddings, norms and biases inherited, (almost) no masked weight transplanted: a magnitude mask keeping
  # the largest 0.1% of each masked weight matrix, in the subnet condition
  $py studies/arith_seeds.py run inherit_only --seeds "$k" --base-from baseline --transfer-seed-from baseline \
      --ablate-set mask.method=magnitude --ablate-set mask.prune_fraction=0.999 --transfer-set 'transfer.conditions=[subnet]'
  # the original's sampled baseline (it kept N - k random weights): only sampled_subnet changes
  $py studies/arith_seeds.py run legacy --seeds "$k" $paired --transfer-set transfer.legacy_sampling=true \
      --transfer-set 'transfer.conditions=[sampled_subnet]'
  # embeddings, norms and biases fresh (the paper's wording): random_init does not change
  $py studies/arith_seeds.py run reinit --seeds "$k" $paired --transfer-set transfer.non_masked=reinit \
      --transfer-set 'transfer.conditions=[subnet,sampled_subnet]'
  # the same mask, a fresh transfer seed (new data draw, initialisation and batches): the transfer's own variance
  $py studies/arith_seeds.py run retransfer --seeds "$k" --mask-from baseline
done
