# A small MoE that trains on a laptop CPU in a few minutes and visibly learns, on Shakespeare with a
# 2048-token BPE. First, tiny Shakespeare (1 MB) downloaded, or any local text (the README's numbers
# are on the 5 MB of Shakespeare's plays, prepared this way):
#   python prepare.py --corpus=shakespeare --vocab_size=2048
#   python prepare.py --input=shakespeare.txt --name=shakespeare --vocab_size=2048
# Its reference curve on tiny Shakespeare (3 seeds, what a healthy run looks like):
# docs/results/cpu_moe_reference/README.md
include("moe_e4k2.py")
dataset = "shakespeare"
out_dir = "out/cpu_moe"
n_layer = 4
n_head = 4
n_embd = 128
expert_hidden = 256
block_size = 128
batch_size = 16
max_iters = 600
warmup_iters = 50
eval_interval = 100
eval_iters = 20
log_interval = 20
