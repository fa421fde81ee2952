# Token dropping (Switch Transformer): each expert takes at most 1.25 * N * K / E slots a batch; the
# lowest-weighted slots over capacity are dropped and their tokens keep only the residual path.
include("moe_e4k2.py")
out_dir = "out/moe_capacity"
capacity_factor = 1.25
