# A small MoE that trains on a laptop CPU in a few minutes and visibly learns, on Shakespeare with a
# 2048-token BPE. First, tiny Shakespeare (1 MB) downloaded, or a local copy of it:
#   python prepare.py --corpus=shakespeare --vocab_size=2048
#   python prepare.py --input=input.txt --name=shakespeare --vocab_size=2048
# Other text: prepare it under another --name and train with --dataset=NAME (the trio and laptop studies in
# docs/results used 5 MB of plays, not this file: their numbers differ from the reference curve's).
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
