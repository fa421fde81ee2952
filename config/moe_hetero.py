# Heterogeneous experts in each layer: 4 narrow (256) and 4 wide (768), top-2. Active parameters are
# the expectation under uniform routing: 2 * mean(256, 768) = 1024 units, as in moe_e4k2.
include("moe_e4k2.py")
out_dir = "out/moe_hetero"
expert_groups = ((4, 256), (4, 768))
top_k = 2
