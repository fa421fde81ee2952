# Fine-grained experts (DeepSeekMoE): 16 experts of half the width, top-4. Same active parameters as
# moe_e4k2 (top_k * expert_hidden = 1024), 4x its routed experts.
include("moe_e4k2.py")
out_dir = "out/moe_e16k4_fine"
n_experts = 16
top_k = 4
expert_hidden = 256
