# A shared expert (DeepSeekMoE): one always-on expert of 256 beside 8 routed experts of 384, top-2.
# Active per token: 2 * 384 + 256 = 1024 expert units, as in moe_e4k2.
include("moe_e4k2.py")
out_dir = "out/moe_shared"
n_experts = 8
top_k = 2
expert_hidden = 384
n_shared_experts = 1
shared_expert_hidden = 256
