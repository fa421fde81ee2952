# The MoE recipe of the tiny-scale dense-vs-sparse study (Wael 2026, arXiv:2605.13769; see README):
# 4 experts, top-2, Switch load balancing (0.01) plus router z-loss (0.001), on TinyStories with
# GPT-2's tokenizer, under 25M total parameters (see the table `--dry_run=True` prints). One GPU;
# 20,000 steps of 16,384 tokens = 328M training tokens.
# Dense baselines: add --match=active or --match=total.
dataset = "tinystories"
out_dir = "out/moe_e4k2"
# model: 6 layers of width 256 (8 heads of 32), context 256
n_layer = 6
n_head = 8
n_embd = 256
block_size = 256
n_experts = 4
top_k = 2
expert_hidden = 512
aux_loss_coef = 0.01
z_loss_coef = 0.001
# schedule: 64 x 256 = 16,384 tokens per step
batch_size = 64
max_iters = 20000
warmup_iters = 500
learning_rate = 1e-3
min_lr = 1e-4
eval_interval = 500
eval_iters = 100
