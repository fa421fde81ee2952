# 8 experts, top-2: twice moe_e4k2's experts at the same active parameters (more total).
include("moe_e4k2.py")
out_dir = "out/moe_e8k2"
n_experts = 8
