# Very fine-grained, very sparse: 64 experts of a quarter the width, top-8 (8x sparsity). Same active
# parameters as moe_e4k2 (top_k * expert_hidden = 1024).
include("moe_e4k2.py")
out_dir = "out/moe_e64k8_fine"
n_experts = 64
top_k = 8
expert_hidden = 128
