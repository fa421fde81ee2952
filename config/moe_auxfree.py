# Loss-free balancing (Wang et al. 2024): no Switch loss; a per-expert selection bias nudged after
# every step towards equal load. The router z-loss stays.
include("moe_e4k2.py")
out_dir = "out/moe_auxfree"
balance = "aux_free"
bias_update_rate = 0.001
