# The MoE recipe (moe_e4k2.py: 4 experts, top-2, Switch loss + z-loss) at laptop scale, on the seed
# study's data: the first 20 MB of TinyStories' train file, with a 4096-token BPE trained on it. First:
#   python prepare.py --corpus=tinystories_slice --vocab_size=4096
# The model of cpu_moe.py with the study's context of 256; 1000 steps of 16 x 256 = 4,096 tokens.
# Step time: see README. Its losses on TinyStories have not been measured yet (the machine it was written
# on has no network); it was run end to end on TinyStories-format text only (tests/test_prepare.py).
include("moe_e4k2.py")
dataset = "tinystories_slice"
out_dir = "out/tinystories_laptop"
n_layer = 4
n_head = 4
n_embd = 128
expert_hidden = 256
block_size = 256
batch_size = 16
max_iters = 1000
warmup_iters = 50
eval_interval = 100
eval_iters = 20
log_interval = 20
